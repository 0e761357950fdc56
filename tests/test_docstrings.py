"""Every public docstring example runs when pasted into a fresh interpreter.

Public objects: the names of ``dir(posattn)`` and ``dir(posattn.nn)`` (modules excluded), plus the
``__all__`` of the public modules ``posattn.positional`` and ``posattn.flash_attn_interface``; classes
include their methods' examples. Each example runs with EMPTY globals (``DocTestFinder(...).find(obj,
globs={})``), so an example that uses ``torch`` or a posattn name without importing it fails here.
Not covered yet: ``posattn.reference`` (its owner's examples still rely on the module's globals).
"""
import doctest
import io
import types

import pytest

import posattn
import posattn.flash_attn_interface
import posattn.nn
import posattn.positional


def _public_objects():
    objs = {}
    for modname, mod in (("posattn", posattn), ("posattn.nn", posattn.nn)):
        for name in dir(mod):
            obj = getattr(mod, name)
            if not name.startswith("_") and not isinstance(obj, types.ModuleType):
                objs.setdefault(id(obj), (f"{modname}.{name}", obj))
    for mod in (posattn.positional, posattn.flash_attn_interface):
        for name in mod.__all__:
            obj = getattr(mod, name)
            objs.setdefault(id(obj), (f"{mod.__name__}.{name}", obj))
    return sorted(objs.values(), key=lambda t: t[0])


def _examples():
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    cases = []
    for name, obj in _public_objects():
        for test in finder.find(obj, name, globs={}):
            if test.examples:
                cases.append(pytest.param(test, id=test.name))
    return cases


_CASES = _examples()


def test_examples_were_found():
    # guards against a finder change that silently collects nothing
    names = {p.values[0].name for p in _CASES}
    assert len(_CASES) >= 25
    assert {"posattn.scaled_dot_product_attention", "posattn.flash_attn_varlen_func",
            "posattn.nn.KernelizedRPEAttention", "posattn.RoPE"} <= names


@pytest.mark.parametrize("test", _CASES)
def test_docstring_example_runs_with_empty_globals(test):
    assert set(test.globs) <= {"__builtins__", "__name__"}  # nothing the example could lean on
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    report = io.StringIO()
    result = runner.run(test, out=report.write, clear_globs=True)
    assert result.failed == 0, f"{test.name} ({test.filename}:{test.lineno}):\n{report.getvalue()}"
