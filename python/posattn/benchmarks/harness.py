"""One benchmark harness for every op (STYLE.md "Benchmarks").

A benchmark is a list of :class:`Case` objects. Each case carries a ``setup() -> (fn, inputs)``
that builds the inputs once and returns a callable; the same setup serves the speed run
(:func:`time_fn`) and the memory run (:func:`peak_memory`). A case may carry a ``check``
callable returning the max abs error against the float64 reference (the ``--check`` pass).

Timing
------
* CUDA: ``triton.testing.do_bench`` (median, p20, p80 over repeated launches, with its L2 flush).
* CPU: ``time.perf_counter`` around the call after warm-up, median/p20/p80 over repeats.
Benchmarks never assert times; results are rows in a table and a CSV.

FLOPs
-----
``attention_flops``: 4 * Sq * Sk * d * H * B for a full mask, counted exactly under a causal
(or windowed) mask by the number of visible (i, j) pairs; backward counts 2.5x forward.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch


# ---------------------------------------------------------------------------------------------
# FLOPs and bytes
# ---------------------------------------------------------------------------------------------
def visible_pairs(seqlen_q: int, seqlen_k: int, *, causal: bool = False, offset: int = 0,
                  window: tuple[int, int] = (-1, -1)) -> int:
    """Number of (i, j) pairs a query/key mask lets through (exact, O(seqlen_q)).

    Key j is visible to query i iff ``lo(i) <= j <= hi(i)`` with ``hi = i + offset`` under
    ``causal`` (offset 0 top-left, Sk - Sq bottom-right) and the window bounds around ``i + offset``.
    """
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    total = 0
    for i in range(seqlen_q):
        c = i + offset
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, c + right)
        lo = 0 if left < 0 else max(0, c - left)
        if hi >= lo:
            total += hi - lo + 1
    return total


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int,
                    head_dim_v: Optional[int] = None, *, causal: bool = False, offset: int = 0,
                    window: tuple[int, int] = (-1, -1), mode: str = "fwd") -> float:
    """FLOPs of softmax attention: 2*pairs*d (QK^T) + 2*pairs*dv (PV) per head; bwd = 2.5x fwd."""
    dv = head_dim if head_dim_v is None else head_dim_v
    if not causal and window == (-1, -1):
        pairs = seqlen_q * seqlen_k
    else:
        pairs = visible_pairs(seqlen_q, seqlen_k, causal=causal, offset=offset, window=window)
    fwd = 2.0 * pairs * (head_dim + dv) * heads * batch
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode]


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def time_fn(fn: Callable[[], object], device: torch.device, *, min_time_s: float = 0.2,
            max_reps: int = 50, warmup: int = 1) -> Timing:
    """Median/p20/p80 wall time of ``fn()`` in milliseconds on ``device``."""
    if device.type == "cuda":
        from triton.testing import do_bench
        q = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
        return Timing(q[0], q[1], q[2], -1)
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > min_time_s and len(times) >= 3:
            break
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, int(round(p * (len(times) - 1))))]

    return Timing(statistics.median(times), pct(0.2), pct(0.8), len(times))


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra memory of one call in bytes (everything the call allocates, its output included).

    * CUDA: the caching allocator's peak above what was allocated before the call.
    * CPU: torch's CPU allocations are not visible to ``tracemalloc``; we replay the allocator's own
      records. With ``torch.profiler.profile(profile_memory=True)`` every allocation and free is a
      raw ``[memory]`` event with its size (negative for a free) and a timestamp; the running sum
      in time order gives the live extra bytes, and its maximum is the peak. (The per-op
      ``FunctionEvent.cpu_memory_usage`` totals include children, so summing them double counts
      nested ops: 2x on ``(x @ x).softmax(-1)``, 3x on SDPA's math path; not used.)
      ``rss_peak_memory`` is the independent cross-check (whole-process RSS high-water).
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    raw = [e for e in prof.profiler.kineto_results.events()
           if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    raw.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in raw:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


_RSS_CHILD = r"""
import gc, importlib, json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
mod, name = sys.argv[1].rsplit(":", 1)
fn, inputs = getattr(importlib.import_module(mod), name)(json.loads(sys.argv[2]))

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

fn()  # warm-up: one-time costs (lazy imports, thread pools, caches) are not the call's memory
gc.collect()
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # Linux >= 4.0: "5" resets the VmHWM high-water mark
    fh.write("5")
fn()
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def rss_peak_memory(setup_ref: str, cfg: dict, *, threads: int = 1, timeout: float = 900) -> int:
    """Extra resident memory of one call (RSS high-water minus RSS before), in a fresh subprocess.

    The independent CPU cross-check of :func:`peak_memory` (Linux only). ``setup_ref`` is
    ``"module:function"``; ``function(cfg) -> (fn, inputs)`` builds the inputs. The child runs
    ``fn()`` once to warm up, resets the kernel's high-water mark (``/proc/self/clear_refs``) and
    reads ``VmHWM`` after a second call. glibc is started with ``MALLOC_MMAP_THRESHOLD_=65536``
    so every buffer above 64 KiB is its own mapping, returned to the OS when freed (otherwise a
    freed buffer kept in the heap would hide the next call's allocations). Page granularity and
    the interpreter's own small allocations make it an approximation to ~1 MiB.
    """
    import json
    import sys
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, setup_ref, json.dumps(cfg), str(threads)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"rss_peak_memory({setup_ref}): {proc.stderr.strip().splitlines()[-1:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["peak"] - res["base"]


_COPY_BW: dict = {}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (bytes read + written per second), cached per device.

    The ceiling that memory-bound rows are compared against: 1 GiB buffers on CUDA, 64 MiB on CPU.
    """
    key = str(device)
    if key not in _COPY_BW:
        n = (1 << 30) if device.type == "cuda" else (1 << 26)
        src = torch.empty(n // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        t = time_fn(lambda: dst.copy_(src), device, min_time_s=0.1, max_reps=20)
        _COPY_BW[key] = 2 * n / (t.median_ms * 1e-3) / 1e9
        del src, dst
    return _COPY_BW[key]


# ---------------------------------------------------------------------------------------------
# Cases and results
# ---------------------------------------------------------------------------------------------
class Absent(Exception):
    """Raised by a setup when its provider cannot run here (not importable, needs CUDA, no kernel for
    this shape or option). The row stays in the table with status ``absent: <reason>``."""


@dataclasses.dataclass
class Case:
    """One row of a benchmark: an op on a shape with one provider.

    setup() -> (fn, inputs): builds inputs once and returns a zero-arg callable (one call of the
    op in ``mode``); raises :class:`Absent` when the provider cannot run here.
    check(fn_output) -> max abs error vs the float64 reference (optional; fwd outputs only).
    baseline: the provider whose time this row's ratio is against (same op, shape, dtype, mode).
    bytes: bytes a memory-bound call must move at least (adds GB/s and % of the copy bandwidth).
    x, series: the swept size (seqlen) and the plot panel the row belongs to (``--plot``).
    """
    op: str
    shape: str
    provider: str
    setup: Callable[[], tuple]
    dtype: str = "float32"
    mode: str = "fwd"
    flops: Optional[float] = None
    bytes: Optional[float] = None
    check: Optional[Callable[[object], float]] = None
    baseline: Optional[str] = None
    note: str = ""
    tokens: Optional[Callable[[], int]] = None  # tokens per call, read after setup (adds tok/s)
    x: Optional[int] = None
    series: str = ""


def absent_case(op: str, shape: str, provider: str, reason: str, **kw) -> Case:
    """A row for a provider that cannot run here, with the reason (never a silent omission)."""
    def setup():
        raise Absent(reason)
    return Case(op, shape, provider, setup, **kw)


@dataclasses.dataclass
class Result:
    op: str
    shape: str
    provider: str
    dtype: str
    mode: str
    status: str
    max_err: Optional[float] = None
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    ratio: Optional[float] = None        # baseline time / this time (>1: faster than baseline)
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mb: Optional[float] = None
    baseline: Optional[str] = None
    note: str = ""
    bw_frac: Optional[float] = None      # gbps / measured copy bandwidth
    x: Optional[int] = None
    series: str = ""


def run_case(case: Case, device: torch.device, *, check: bool = True, memory: bool = False,
             min_time_s: float = 0.2) -> Result:
    """Set up, check (``--check``), time and optionally measure memory of one case; never raises."""
    res = Result(case.op, case.shape, case.provider, case.dtype, case.mode, "ok",
                 baseline=case.baseline, note=case.note, x=case.x, series=case.series)
    try:
        fn, _inputs = case.setup()
        out = fn()
        if check and case.check is not None:
            res.max_err = float(case.check(out))
        del out
        t = time_fn(fn, device, min_time_s=min_time_s)
        res.median_ms, res.p20_ms, res.p80_ms = t.median_ms, t.p20_ms, t.p80_ms
        if case.flops:
            res.tflops = case.flops / (t.median_ms * 1e-3) / 1e12
        if case.tokens is not None:
            res.note = f"{case.tokens() / (t.median_ms * 1e-3):,.0f} tok/s" + (f"; {res.note}" if res.note else "")
        if case.bytes:
            res.gbps = case.bytes / (t.median_ms * 1e-3) / 1e9
            res.bw_frac = res.gbps / copy_bandwidth(device)
        if memory:
            res.peak_mb = peak_memory(fn, device) / 2**20
    except Absent as err:
        res.status = f"absent: {err}"
    except NotImplementedError as err:
        res.status = f"not built yet ({err})" if str(err) else "not built yet"
    except Exception as err:  # a failing provider is a row, not a crash of the whole table
        if "No available kernel" in str(err):  # torch SDPA: this backend does not take these inputs
            res.status = "absent: this SDPA backend does not take these inputs (torch: No available kernel)"
            return res
        res.status = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def fill_ratios(results: list[Result]) -> None:
    """ratio = baseline median / this median, for rows of the same op, shape, dtype and mode."""
    index = {(r.op, r.shape, r.dtype, r.mode, r.provider): r for r in results}
    for r in results:
        if r.baseline and r.median_ms:
            b = index.get((r.op, r.shape, r.dtype, r.mode, r.baseline))
            if b is not None and b.median_ms:
                r.ratio = b.median_ms / r.median_ms


# ---------------------------------------------------------------------------------------------
# Environment and output
# ---------------------------------------------------------------------------------------------
def emit_json(record: dict, path: str | None = None) -> None:
    """Print ``record`` as indented JSON and, when ``path`` is given, write it there too (bench scripts' --out)."""
    text = json.dumps(record, indent=2)
    print(text)
    if path:
        with open(path, "w") as fh:
            fh.write(text + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[3]
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    from posattn import __version__
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name(device), "torch": torch.__version__, "triton": tv,
            "posattn": __version__, "git_sha": git_sha()}


def write_csv(results: list[Result], path: str | Path, env: dict) -> Path:
    """Append rows (with device, versions, git sha) to a CSV; writes the header for a new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(env) + [f.name for f in dataclasses.fields(Result)]
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        if new:
            w.writeheader()
        for r in results:
            w.writerow({**env, **dataclasses.asdict(r)})
    return path


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def to_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        rows.append([r.op, r.shape, r.provider, r.dtype, r.mode,
                     _fmt(r.max_err, ".1e"), _fmt(r.median_ms, ".3f"),
                     f"{_fmt(r.p20_ms, '.3f')}-{_fmt(r.p80_ms, '.3f')}" if r.p20_ms is not None else "",
                     (f"{r.ratio:.2f}x vs {r.baseline}" if r.ratio is not None else ""),
                     _fmt(r.tflops, ".3f") if r.tflops is not None else "",
                     (_fmt(r.gbps, ".1f") + (f" ({100 * r.bw_frac:.0f}% copy)" if r.bw_frac else ""))
                     if r.gbps is not None else "",
                     _fmt(r.peak_mb, ".1f") if r.peak_mb is not None else "",
                     r.status if r.status != "ok" else (r.note or "ok")])
    return rows


HEADER = ["op", "shape", "backend", "dtype", "mode", "max err", "ms (median)", "p20-p80", "ratio",
          "TFLOP/s", "GB/s", "peak MB", "status"]


def markdown_table(results: list[Result], env: dict) -> str:
    lines = [f"Measured {env['date']} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
             f"posattn {env['posattn']} @ {env['git_sha']}).", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in to_rows(results):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def print_table(results: list[Result], env: dict, title: str = "posattn bench") -> None:
    """The table on the console; absent providers listed compactly below it (they stay in the CSV)."""
    from rich.console import Console
    from rich.table import Table
    shown = [r for r in results if not r.status.startswith("absent")]
    table = Table(title=f"{title} — {env['device']} — {env['date']}")
    for h in HEADER:
        table.add_column(h, overflow="fold")
    for row in to_rows(shown):
        table.add_row(*row)
    console = Console(width=max(160, int(os.environ.get("COLUMNS", "160"))))
    console.print(table)
    reasons: dict = {}
    for r in results:
        if r.status.startswith("absent"):
            reasons.setdefault((r.provider, r.status[len("absent: "):]), set()).add(r.op)
    if reasons:
        console.print("absent here: " + "; ".join(f"{p} ({why}; {', '.join(sorted(ops))})"
                                                   for (p, why), ops in sorted(reasons.items())),
                      highlight=False)
