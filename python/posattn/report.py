"""``python -m posattn report``: compile every kernel for the GPUs we target, without a GPU, and
report its resources.

How Triton kernels are found: each ``triton_kernels/<op>.py`` module may define
``report_cases() -> list[(label, thunk)]``; a thunk calls the op's launcher on small CPU tensors
exactly as the op would on a GPU (same block sizes, warps, stages, constexpr modes). While a thunk
runs, :class:`LaunchRecorder` intercepts every ``kernel[grid](...)`` launch (and every config of
an autotuned kernel) instead of running it, and binds the arguments with Triton's own binder for
the target, so the kernel compiled here is the one a GPU would get. Each is then compiled with
``triton.compile`` for ``GPUTarget("cuda", 80, 32)`` and ``GPUTarget("cuda", 90, 32)``.

CUDA C++ kernels are read from the built ``posattn._C`` (cubins for sm_80 and sm_90a).

For every kernel x config x arch the table gives registers, stack bytes, spill instructions
(LDL/STL in the SASS), static + dynamic shared memory vs the arch's limit, tensor-core
instructions (HMMA on sm_80, HGMMA on sm_90) and an occupancy estimate (CTAs per SM from
registers, shared memory and warps). ``cuobjdump`` and ``nvdisasm`` ship inside the Triton package.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

# sm -> (max shared memory per block with opt-in, shared per SM, regs per SM, max threads per SM, max CTAs per SM)
ARCH_LIMITS = {
    80: dict(smem_block=163 * 1024, smem_sm=164 * 1024, regs_sm=65536, threads_sm=2048, ctas_sm=32),
    90: dict(smem_block=227 * 1024, smem_sm=228 * 1024, regs_sm=65536, threads_sm=2048, ctas_sm=32),
}
ARCHS = (80, 90)

# modules under triton_kernels/ whose kernels are reported (those that exist are imported)
TRITON_MODULES = ["fused_attention", "rotary", "lean_decode", "kernelized_rpe", "ecoformer"]


def _tool(name: str) -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    return name  # fall back to PATH (CUDA toolkit)


@dataclasses.dataclass
class KernelResources:
    source: str               # "triton" or "cuda"
    op: str
    kernel: str
    config: str
    arch: int
    registers: Optional[int] = None
    stack: Optional[int] = None
    spill_ld: Optional[int] = None
    spill_st: Optional[int] = None
    spill_in_loop: Optional[int] = None  # LDL + STL inside loops (see sass_stats)
    smem_static: Optional[int] = None
    smem_dynamic: Optional[int] = None
    num_warps: Optional[int] = None
    tensor_core: str = ""     # "HMMA", "HGMMA", "" (none)
    matmul_bound: bool = False
    error: str = ""

    @property
    def smem_total(self) -> int:
        return (self.smem_static or 0) + (self.smem_dynamic or 0)

    @property
    def smem_ok(self) -> bool:
        return self.smem_total <= ARCH_LIMITS[self.arch]["smem_block"]

    @property
    def spills(self) -> bool:
        return bool(self.spill_ld) or bool(self.spill_st)

    def occupancy(self) -> Optional[int]:
        """CTAs per SM from registers, shared memory, threads (a model, not a measurement)."""
        if self.registers is None or not self.num_warps:
            return None
        lim = ARCH_LIMITS[self.arch]
        threads = 32 * self.num_warps
        # registers are allocated per warp in units of 256
        regs_warp = ((max(self.registers, 1) * 32 + 255) // 256) * 256
        by_regs = lim["regs_sm"] // (regs_warp * self.num_warps)
        by_threads = lim["threads_sm"] // threads
        by_smem = lim["smem_sm"] // self.smem_total if self.smem_total else lim["ctas_sm"]
        return max(0, min(by_regs, by_threads, by_smem, lim["ctas_sm"]))


# --------------------------------------------------------------------------------------------
# SASS / cubin analysis
# --------------------------------------------------------------------------------------------
_RES_RE = re.compile(r"Function ([^\s:]+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin_or_so: str) -> dict[str, dict[str, int]]:
    """Per-function REG/STACK/SHARED/LOCAL from ``cuobjdump -res-usage``."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_or_so], capture_output=True, text=True).stdout
    return {m.group(1): dict(reg=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                             local=int(m.group(5))) for m in _RES_RE.finditer(out)}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def sass_stats(sass: str) -> dict[str, object]:
    """Spill instructions (LDL / STL), how many of them sit inside a loop (between a backward branch's
    target and the branch: the code that runs once per KV / query block), tensor-core instructions."""
    ld = len(re.findall(r"\bLDL(\.\S+)?\s", sass))
    st = len(re.findall(r"\bSTL(\.\S+)?\s", sass))
    tc = "HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "")
    instrs = [(int(m.group(1), 16), m.group(2)) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, text in instrs:
        b = _BRANCH_TARGET.search(text)
        if b and int(b.group(1), 16) < addr:
            loops.append((int(b.group(1), 16), addr))
    in_loop = sum(1 for addr, text in instrs if re.search(r"\b(LDL|STL)\b", text)
                  and any(lo <= addr <= hi for lo, hi in loops))
    return dict(spill_ld=ld, spill_st=st, spill_in_loop=in_loop, tensor_core=tc)


# --------------------------------------------------------------------------------------------
# Triton: record launches, compile for each arch
# --------------------------------------------------------------------------------------------
class LaunchRecorder:
    """Context manager: ``kernel[grid](...)`` records (fn, args, kwargs) instead of launching."""

    def __init__(self):
        self.launches: list[tuple] = []

    def __enter__(self):
        from triton.runtime import autotuner, jit
        self._jit_run = jit.JITFunction.run
        self._at_run = autotuner.Autotuner.run
        rec = self.launches

        def jit_run(fn, *args, grid, warmup, **kwargs):
            rec.append((fn, args, dict(kwargs), None))
            return None

        def at_run(tuner, *args, **kwargs):
            for cfg in tuner.configs:
                kw = dict(kwargs)
                kw.update(cfg.all_kwargs())
                rec.append((tuner.fn, args, kw, cfg))
            return None

        jit.JITFunction.run = jit_run
        autotuner.Autotuner.run = at_run
        return self

    def __exit__(self, *exc):
        from triton.runtime import autotuner, jit
        jit.JITFunction.run = self._jit_run
        autotuner.Autotuner.run = self._at_run
        return False


def compile_launch(fn, args, kwargs, arch: int):
    """Bind a recorded launch with Triton's binder for ``arch`` and compile it; returns CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    kw.setdefault("debug", False)
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        kw.pop(opt, None)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _config_label(fn, kwargs, cfg) -> str:
    names = {p.name for p in fn.params if p.is_constexpr}
    parts = [f"{k}={v}" for k, v in kwargs.items() if k in names and not callable(v)]
    for k in ("num_warps", "num_stages"):
        if k in kwargs:
            parts.append(f"{k.replace('num_', '')}={kwargs[k]}")
    return " ".join(parts)


def _dtype_of(args) -> str:
    import torch
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return str(a.dtype).replace("torch.", "")
    return ""


def triton_cases(only: Optional[str] = None) -> list[tuple[str, str, Callable[[], None], object]]:
    """(op, label, thunk, matmul_bound) from every triton_kernels module with report_cases().

    A module's ``MATMUL_BOUND`` is a bool (all its kernels) or a set of kernel names: those must use
    tensor-core instructions (HMMA on sm_80, HGMMA on sm_90)."""
    out = []
    for mod_name in TRITON_MODULES:
        if only and only not in mod_name:
            continue
        try:
            mod = importlib.import_module(f"posattn.triton_kernels.{mod_name}")
        except ImportError:
            continue
        fn = getattr(mod, "report_cases", None)
        if fn is None:
            continue
        matmul = getattr(mod, "MATMUL_BOUND", False)
        try:
            cases = fn()
        except Exception as err:  # a broken report_cases() is a failing row, not a crash
            def thunk(err=err):
                raise err
            cases = [("report_cases()", thunk)]
        for label, thunk in cases:
            out.append((mod_name, label, thunk, matmul))
    return out


def _forced_arch(arch: int):
    """Context: Triton launchers choose the configs of ``arch`` (no-op if the kernels lack it)."""
    import contextlib
    try:
        from posattn.triton_kernels.fused_attention import force_target_arch
    except ImportError:
        return contextlib.nullcontext()
    return force_target_arch(arch)


def triton_report(archs=ARCHS, only: Optional[str] = None) -> list[KernelResources]:
    rows: list[KernelResources] = []
    seen = set()
    for op, label, thunk, matmul in triton_cases(only):
        for arch in archs:
            # launchers pick per-arch configs (fused_attention.target_arch): record what ``arch`` gets
            with LaunchRecorder() as rec, _forced_arch(arch):
                try:
                    thunk()
                except Exception as err:
                    rows.append(KernelResources("triton", op, "?", label, arch, error=f"launcher failed: {err}"))
                    continue
            for fn, args, kwargs, cfg in rec.launches:
                cfg_label = f"{label}; {_config_label(fn, kwargs, cfg)}"
                if (fn.__name__, cfg_label, arch) in seen:
                    continue
                seen.add((fn.__name__, cfg_label, arch))
                mm = (fn.__name__ in matmul) if isinstance(matmul, (set, frozenset, tuple, list)) else bool(matmul)
                rows.append(_compiled_row(op, fn, args, kwargs, cfg_label, arch, mm))
    return rows


def _compiled_row(op, fn, args, kwargs, cfg_label, arch, matmul_bound) -> KernelResources:
    row = KernelResources("triton", op, fn.__name__, cfg_label, arch, matmul_bound=matmul_bound)
    try:
        k = compile_launch(fn, args, kwargs, arch)
        row.num_warps = k.metadata.num_warps
        row.smem_dynamic = int(k.metadata.shared)
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "k.cubin")
            with open(p, "wb") as fh:
                fh.write(k.asm["cubin"])
            res = resource_usage(p)
            sass = subprocess.run([_tool("cuobjdump"), "-sass", p], capture_output=True, text=True).stdout
        r = next(iter(res.values()), {})
        row.registers, row.stack, row.smem_static = r.get("reg"), r.get("stack"), r.get("shared")
        for kk, vv in sass_stats(sass).items():
            setattr(row, kk, vv)
    except Exception as err:
        row.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    return row


# --------------------------------------------------------------------------------------------
# CUDA C++: read the cubins inside posattn._C
# --------------------------------------------------------------------------------------------
def cuda_report(so_path: Optional[str] = None) -> list[KernelResources]:
    if so_path is None:
        try:
            import posattn._C as C
            so_path = C.__file__
        except ImportError:
            return []
    rows = []
    listing = subprocess.run([_tool("cuobjdump"), "--list-elf", so_path], capture_output=True, text=True).stdout
    elves = re.findall(r"ELF file\s+\d+:\s+(\S+)", listing)
    with tempfile.TemporaryDirectory() as d:
        for elf in elves:
            m = re.search(r"sm_(\d+)", elf)
            arch = int(m.group(1)) if m else 0
            subprocess.run([_tool("cuobjdump"), "--extract-elf", elf, so_path], cwd=d, capture_output=True)
            cubin = next(Path(d).glob(f"*{elf}*"), None) or Path(d) / elf
            if not cubin.exists():
                continue
            res = resource_usage(str(cubin))
            sass_all = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
            funcs = re.split(r"\n\s*Function : ", sass_all)
            sass_by = {}
            for chunk in funcs[1:]:
                name = chunk.split("\n", 1)[0].strip()
                sass_by[name] = chunk
            for name, r in res.items():
                st = sass_stats(sass_by.get(name, ""))
                base_arch = 90 if arch >= 90 else 80
                row = KernelResources("cuda", "_C", _demangle(name), f"sm_{m.group(1) if m else '?'}", base_arch,
                                      registers=r["reg"], stack=r["stack"], smem_static=r["shared"], smem_dynamic=0,
                                      **st)
                rows.append(row)
    return rows


def _demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True, timeout=5).stdout.strip()
        out = re.sub(r"\(.*\)$", "", out)
        return out or name
    except Exception:
        return name


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
HEADER = ["source", "op", "kernel", "config", "arch", "regs", "stack", "spill LDL/STL", "smem (B) / limit",
          "tensor cores", "CTAs/SM", "verdict"]


def verdict(r: KernelResources) -> str:
    if r.error:
        return "FAIL: " + r.error
    issues = []
    if not r.smem_ok:
        issues.append("shared memory over limit")
    if r.spills:
        issues.append("spills" + (" in a loop" if r.spill_in_loop else " (outside loops)"))
    if r.matmul_bound and r.arch == 90 and r.tensor_core != "HGMMA":
        issues.append("no HGMMA on sm_90")
    if r.matmul_bound and r.arch == 80 and r.tensor_core != "HMMA":
        issues.append("no HMMA on sm_80")
    return "ok" if not issues else "; ".join(issues)


def to_rows(rows: list[KernelResources]) -> list[list[str]]:
    out = []
    for r in rows:
        lim = ARCH_LIMITS.get(r.arch, {}).get("smem_block")
        out.append([r.source, r.op, r.kernel, r.config, f"sm_{r.arch}" if r.source == "triton" else r.config,
                    str(r.registers if r.registers is not None else ""), str(r.stack if r.stack is not None else ""),
                    (f"{r.spill_ld}/{r.spill_st}" + (f" ({r.spill_in_loop} in loops)" if r.spills else ""))
                    if r.spill_ld is not None else "",
                    f"{r.smem_total} / {lim}" if lim else "", r.tensor_core or "-",
                    str(r.occupancy() if r.occupancy() is not None else ""), verdict(r)])
    return out


def markdown(rows: list[KernelResources]) -> str:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Compiled here (no GPU) on {date} with triton "
             f"{importlib.import_module('triton').__version__} and nvcc for sm_80/sm_90(a); "
             "`python -m posattn report --markdown` regenerates it. Occupancy is a model from registers, "
             "shared memory and warps, not a measurement.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in to_rows(rows):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines) + "\n"


def collect(only: Optional[str] = None, cuda: bool = True) -> list[KernelResources]:
    rows = triton_report(only=only)
    if cuda and (only is None or only in ("cuda", "_C")):
        rows += cuda_report()
    return rows


def add_arguments(p) -> None:
    p.add_argument("--markdown", metavar="FILE", nargs="?", const="-", default=None,
                   help="write the table as markdown (to FILE, or stdout with no FILE)")
    p.add_argument("--only", default=None, help="only ops whose name contains this (e.g. fused_attention, cuda)")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ kernels of posattn._C")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON (for tests)")


def run(args) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real targets, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly
    rows = collect(only=args.only, cuda=not args.no_cuda)
    if args.json:
        import json
        Path(args.json).write_text(json.dumps(
            [dict(dataclasses.asdict(r), verdict=verdict(r), occupancy=r.occupancy(), smem_total=r.smem_total)
             for r in rows], indent=1))
    if args.markdown:
        text = markdown(rows)
        if args.markdown == "-":
            print(text)
        else:
            Path(args.markdown).write_text(text)
            print(f"wrote {args.markdown}")
    else:
        from rich.console import Console
        from rich.table import Table
        table = Table(title="posattn kernel resources (compiled without a GPU)")
        for h in HEADER:
            table.add_column(h, overflow="fold")
        for row in to_rows(rows):
            table.add_row(*row)
        Console(width=200).print(table)
    return 1 if any(r.error for r in rows) else 0
