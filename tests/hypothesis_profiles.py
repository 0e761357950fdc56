"""Hypothesis profiles of the property-based fuzz tests (tests/test_fuzz_*.py).

* ``ci`` (default): fast and reproducible. ``derandomize=True`` so a CI run never flakes and the same
  cases run every time; each fuzz test sets its own small example count through ``examples(n)``
  (20-40 for the torch backend, 5-10 tiny cases for the Triton interpreter).
* ``deep``: ``max_examples=5000`` per test (per op and per backend: every fuzz test is one op on one
  backend), random seeds, the example database under ``$HYPOTHESIS_STORAGE_DIRECTORY`` (set it to a
  folder in /tmp so nothing lands in the repository). Select with ``--hypothesis-profile=deep``;
  ``POSATTN_FUZZ_EXAMPLES=N`` overrides the count (e.g. for a shorter background run).

Run the deep profile of one op, for instance::

    HYPOTHESIS_STORAGE_DIRECTORY=/tmp/hyp nohup python -m pytest -p no:cacheprovider tests/test_fuzz_sdpa.py \\
        --hypothesis-profile=deep --hypothesis-show-statistics -q > /tmp/fuzz_deep_sdpa.log 2>&1 &

The profiles are registered when conftest.py imports this module (before pytest's hypothesis plugin reads
``--hypothesis-profile``); ``ci`` is loaded unless that option names another one.
"""
from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

DEEP_EXAMPLES = 5000

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

settings.register_profile("ci", max_examples=30, derandomize=True, database=None, **_COMMON)
settings.register_profile("deep", max_examples=DEEP_EXAMPLES,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink),
                          **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _deep() -> bool:
    return settings.get_current_profile_name() == "deep"


def examples(ci: int):
    """``@settings`` for one fuzz test: ``ci`` examples under the ci profile, the profile's count (>= 5000)
    under ``deep``, ``POSATTN_FUZZ_EXAMPLES`` when that is set. Resolved when the test module is imported
    (after pytest's hypothesis plugin loaded the profile)."""
    env = os.environ.get("POSATTN_FUZZ_EXAMPLES")
    if env:
        n = int(env)
    elif _deep():
        n = settings.default.max_examples
    else:
        n = ci
    return settings(max_examples=n)
