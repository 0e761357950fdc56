"""Strategies and checks shared by the property-based fuzz tests (tests/test_fuzz_*.py).

Every example draws a seed (so the minimal failing input hypothesis prints is reproducible) and builds
fresh random tensors from it: never zeros, in one of several value regimes (unit normal, tiny, large,
exact ties) and memory layouts (contiguous, permuted, storage offset, strided with NaN in the gaps).
Kernels run inside ``poisoned_allocations()``: ``torch.empty`` & co. return NaN, so an output element a
kernel forgets to write cannot pass. Results are compared with the float64 reference with the table of
tests/tolerances.py (``check_close`` adds: no NaN anywhere, and +-inf exactly where the reference has it).
Cases are built on CPU and copied to the device under test (``to_device``), so a seed draws the same values on
every device; tests/test_fuzz_cuda.py runs the CPU fuzz files' case builders on a GPU that way.
"""
from __future__ import annotations

import contextlib
import copy
import math
from unittest import mock

import torch
from hypothesis import strategies as st

from posattn import _backends
from posattn.positional import ALiBi, LearnedPhaseRoPE, RelativeBias, RoPE, T5Bias, URPE, XPos
from tolerances import BWD, FWD

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HALF_DTYPES = (torch.float16, torch.bfloat16)
VALUE_KINDS = ("unit", "tiny", "large", "ties")
LAYOUTS = ("contiguous", "permuted", "offset", "strided")
_SCALE = {"unit": 1.0, "tiny": 1e-3, "large": 2.5}
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


# ---------------------------------------------------------------------------------------------
# allocation poisoning, snapshots
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def poisoned_allocations():
    """While active, uninitialised allocations (torch.empty, empty_like, new_empty, ...) are filled with NaN
    (integers: their max), through torch's deterministic mode with ``fill_uninitialized_memory``."""
    import torch.utils.deterministic as det
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        det.fill_uninitialized_memory = prev[2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype in _INT_VIEW:
        return t.view(_INT_VIEW[t.dtype])
    return t


def snapshot(**tensors):
    """Bit copies (and strides) of the given tensors, for ``assert_unchanged``."""
    return {n: (None if t is None else (_bits(t).clone(), t.stride(), t.storage_offset()))
            for n, t in tensors.items() if t is None or isinstance(t, torch.Tensor)}


def assert_unchanged(snap, **tensors):
    """The inputs are bit-identical to their snapshot (NaN payloads included) with the same strides."""
    for n, t in tensors.items():
        if n not in snap or snap[n] is None:
            continue
        bits, stride, off = snap[n]
        assert t.stride() == stride and t.storage_offset() == off, f"{n}: layout changed"
        assert torch.equal(_bits(t), bits), f"{n}: the op modified its input"


# ---------------------------------------------------------------------------------------------
# devices: a case is built on CPU from the drawn seed, then copied to the device under test
# ---------------------------------------------------------------------------------------------

CPU = torch.device("cpu")


def on_device(device) -> torch.device:
    """torch.device with an index ("cuda" -> "cuda:<current>"), so that ``t.device == device`` compares."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


def to_device(t, device):
    """``t`` on ``device`` with its strides, storage offset and the bytes around it (NaN gaps, offset prefix):
    the whole storage is copied (detached). On t's own device (and for None): t itself."""
    if t is None or t.device == device:
        return t
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = t.detach().as_strided((n,), (1,), 0)
    return flat.to(device).as_strided(t.shape, t.stride(), t.storage_offset())


def same_layout_copy(t):
    """A fresh copy of t with t's strides and storage offset (for probes that may write)."""
    if t is None:
        return None
    n = t.untyped_storage().nbytes() // t.element_size()
    flat = t.detach().as_strided((n,), (1,), 0).clone()
    return flat.as_strided(t.shape, t.stride(), t.storage_offset())


_POSITION_TENSORS = ("slopes", "table", "freqs", "position_ids")


def position_to_device(position, device):
    """(``position`` for ``device``, {id(tensor): its copy}): shallow copies of the encoding objects whose tensors
    (ALiBi slopes, bias / URPE tables, learned phases, RoPE position_ids) are on another device, holding
    ``to_device`` copies that keep requires_grad (a learnable table stays a leaf: map the reference's leaves
    through the dict). The reference's objects are left as they are. On the tensors' own device: position."""
    moved = {}
    if position is None:
        return None, moved
    out = []
    for p in (position if isinstance(position, list) else [position]):
        names = [a for a in _POSITION_TENSORS
                 if isinstance(getattr(p, a, None), torch.Tensor) and getattr(p, a).device != device]
        if names:
            p = copy.copy(p)
            for a in names:
                t = getattr(p, a)
                moved[id(t)] = d = to_device(t, device).requires_grad_(t.requires_grad)
                setattr(p, a, d)
        out.append(p)
    if not moved:
        return position, moved
    return (out if isinstance(position, list) else out[0]), moved


# where the CUDA path stops on a machine without a GPU: posattn._cuda / _C ("no CUDA device", "must be a CUDA
# tensor") or torch.cuda.device(cpu) ("Expected a cuda device")
_DEVICE_ERRORS = ("no CUDA device", "must be a CUDA tensor", "Expected a cuda device")


def cuda_probe(call):
    """CPU self-check of a ``cuda=True`` case (tests/test_fuzz_cuda.py): it passes every host-side check of the
    op's ``backend="cuda"`` path. ``call()`` runs the op with ``backend="cuda"`` on the case's CPU tensors
    (copies of those it may write).

    posattn._C is reported available for the call (``_backends.cuda_ext_available``), so the op resolves
    ``backend="cuda"`` for CPU tensors and runs all its CUDA-path checks (dtype, head_dim, options, layouts,
    schedule); it may then only stop where it reaches the device (``_DEVICE_ERRORS``) or return early (nothing
    to launch). A ValueError / TypeError of the op means the builder drew a case the CUDA backend refuses.
    Without posattn._C there is no CUDA path to probe."""
    if _backends.load_C() is None:
        return
    with mock.patch.object(_backends, "cuda_ext_available", lambda device: True), torch.no_grad():
        try:
            call()
        except Exception as e:  # noqa: BLE001 - anything but a device error is a refusal
            if not any(s in str(e) for s in _DEVICE_ERRORS):
                raise AssertionError(f"backend='cuda' refuses this case: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# values and layouts
# ---------------------------------------------------------------------------------------------

def values(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random values of ``kind``, rounded to ``dtype`` (contiguous, no grad).

    unit: N(0, 1); tiny: N(0, 1e-3^2); large: N(0, 2.5^2); ties: multiples of 0.5 in [-1, 1] (equal logits
    and equal values, exactly representable in every dtype)."""
    shape = tuple(shape)
    if kind == "ties":
        t = torch.randint(-2, 3, shape, generator=gen).to(torch.float32) * 0.5
    else:
        t = torch.randn(shape, generator=gen) * _SCALE[kind]
    return t.to(dtype)


# layouts of the gradient fed to an op's output: out.sum().backward() hands an expanded one (stride 0 everywhere;
# the Triton attention backward read it as unit-stride rows and gave garbage gradients), slicing a wider
# gradient a last-dim stride of 2
GRAD_LAYOUTS = ("contiguous", "contiguous", "expanded", "strided")


def grad_output(data, shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """The gradient of an op's output (``values(shape, dtype, "unit", gen)``) in a drawn layout: contiguous,
    expanded from one value (as ``out.sum().backward()`` gives), or a view with last-dim stride 2 and NaN in
    the gaps. Move it to a device with ``to_device`` (keeps the layout); ``.double()`` gives the reference
    its values."""
    layout = data.draw(st.sampled_from(GRAD_LAYOUTS), label="dout_layout")
    shape = tuple(shape)
    if layout == "expanded":
        return values((), dtype, "unit", gen).expand(shape)
    if layout == "strided" and shape:
        return with_layout(values(shape, dtype, "unit", gen), "strided")
    return values(shape, dtype, "unit", gen)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a leaf without grad).

    contiguous: a copy; permuted: memory order of the first two dims swapped (unit last-dim stride kept);
    offset: a view at storage offset 3 of a filled buffer; strided: every other element of the last dim of a
    filled buffer (last-dim stride 2). The fill is NaN for float tensors, 2**30 for integer ones (an index or
    length far out of range), so reading the gaps shows."""
    t = t.detach()
    if layout == "contiguous" or t.dim() == 0:
        return t.clone()
    if layout == "permuted":
        if t.dim() < 2:
            return t.clone()
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    fill = float("nan") if t.is_floating_point() else 2 ** 30
    if layout == "offset":
        buf = torch.full((t.numel() + 3,), fill, dtype=t.dtype)
        view = buf[3:].view(t.shape)
        view.copy_(t)
        return view
    if layout == "strided":
        buf = torch.full(tuple(t.shape[:-1]) + (2 * t.shape[-1],), fill, dtype=t.dtype)
        view = buf[..., ::2]
        view.copy_(t)
        return view
    raise KeyError(layout)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.requires_grad_(requires_grad)


# ---------------------------------------------------------------------------------------------
# comparisons
# ---------------------------------------------------------------------------------------------

# second oracle: a kernel's error may be this many times that of reference.attention(kernel_rounding=dtype)
EMULATION_FACTOR = 3.0
# ... and with XPos: the kernels centre the xPos scales per block (fwd: the query block, dq: its query block,
# dk/dv: the key block; a global centre overflows fp16 on long sequences), so the backward's rotated q / k are
# rounded differently from the forward's that produced lse, an inconsistency the emulation (one rounding) does
# not model. Measured 2026-11-30 (bf16 varlen, XPos + softcap 2, 12 random dO): kernel / worst-emulation error
# ratios dq 0.5-2.5, dk 1.4-6.4, dv 1.7-3.4; without XPos at most 2.4.
EMULATION_FACTOR_XPOS = 8.0


def emulation_factor(position) -> float:
    """EMULATION_FACTOR, or EMULATION_FACTOR_XPOS when ``position`` holds an XPos."""
    items = position if isinstance(position, (list, tuple)) else [position]
    return EMULATION_FACTOR_XPOS if any(isinstance(p, XPos) for p in items) else EMULATION_FACTOR


def kernel_rounding(backend: str, dtype: torch.dtype):
    """``reference.attention(kernel_rounding=...)`` for a backend: the Triton kernels feed fp16 / bf16
    tensor-core dots (rotated q / k, probabilities, dS), so in those dtypes the reference that rounds at the
    same points, straight-through, is a second oracle (``check_close(emulated=...)``): FlashAttention's tests
    bound the kernel's error by a multiple of the error of the same computation in the low dtype. The deep
    profile (2026-11-30) found cases the table alone rejects although the kernel is right: fp16, large values,
    XPos + softcap 0.5 (the softcap derivative 1 - tanh^2 of a pre-cap logit of ~50 amplifies the rounding of
    the rotated operands and of dS), learned-phase gradients that cancel. The torch backend works in fp32
    throughout: None (the table only)."""
    if backend == "triton" and dtype in (torch.float16, torch.bfloat16):
        return dtype
    return None


def emulations(reference, backend: str, dtype: torch.dtype, seed: int, n_random: int = 7):
    """``[reference(kernel_rounding=dtype, rounding_generator=g)]`` for g = None (round to nearest) and
    ``n_random`` seeded generators (random roundings: the kernels round other intermediate values than the
    reference, e.g. unnormalised probabilities, xPos with per-block centres, so their rounding errors are other
    draws of the same size; a gradient's error through delta = rowsum(dO * out) is one projection per row, so
    one draw can be far below another: deep profile 2026-11-30, bf16 softcap 5 with no encoding, dq error 1.13
    vs 0.19-0.28 for four draws). [] where ``kernel_rounding`` is None."""
    if kernel_rounding(backend, dtype) is None:
        return []
    gens = [None] + [torch.Generator().manual_seed(seed * 31 + i) for i in range(n_random)]
    return [reference(kernel_rounding=dtype, rounding_generator=g) for g in gens]


class Emulations:
    """Lazy ``emulations``: the emulated references (and their gradients) are computed only when a
    ``check_close`` needs them, i.e. where the table alone rejects (rare), so the deep profile stays fast.
    ``transform`` maps a reference output to the kernel's layout."""

    def __init__(self, reference, backend: str, dtype: torch.dtype, seed: int, transform=None):
        self.active = kernel_rounding(backend, dtype) is not None
        self._args = (reference, backend, dtype, seed)
        self._transform = transform or (lambda t: t)
        self._runs = None
        self._grads = None

    def _get(self):
        if self._runs is None:
            self._runs = emulations(*self._args)
        return self._runs

    def output(self, i: int):
        """Callable for ``check_close(emulated=...)``: output ``i`` (0 out, 1 lse) of every emulation."""
        if not self.active:
            return None
        return lambda: [self._transform(r[0]) if i == 0 else r[i] for r in self._get()]

    def grads(self, wrt, dout, n: int):
        """``n`` callables, the i-th giving d(output 0)/d(wrt[i]) of every emulation for grad output ``dout``."""
        if not self.active:
            return [None] * n

        def get(i):
            if self._grads is None:
                self._grads = [grads(self._transform(r[0]), wrt, dout) for r in self._get()]
            return [g[i] for g in self._grads]
        return [(lambda i=i: get(i)) for i in range(n)]


def lse_floor(lse_ref) -> float:
    """Norm floor for comparing an lse: its error is absolute (log space), so near lse = 0 a relative L2
    measure is meaningless (deep profile: lse ~5.9e-3 with an 8e-8 absolute error failed 1e-5 relative).
    Values are measured against at least unit magnitude per element, as the elementwise check already is."""
    finite = lse_ref[torch.isfinite(lse_ref)]
    return math.sqrt(max(finite.numel(), 1))


def check_close(actual, expected, dtype, *, grad=False, name="out", scale=None, terms=None, cond=1.0,
                emulated=None, emulation_factor=EMULATION_FACTOR):
    """Compare with the float64 reference using the per-dtype table of tests/tolerances.py, scaled to the
    magnitude of the values (fuzzing draws large values and gradients that cancel to ~0).

    * no NaN in ``actual``; +-inf exactly where the reference has them;
    * relative L2 error <= the table's ``l2``, relative to ``max(||expected||, scale)``;
    * elementwise ``|a - e| <= atol * m + rtol * |e|`` with ``m = max(1, max|expected|, scale_max)``.

    ``scale`` (a float norm) is a floor for tensors whose true value cancels to ~0 (e.g. dk with one key:
    every softmax row is constant, so the gradient is 0 and fp32 leaves ~1e-7 of rounding): pass the norm of a
    sibling gradient of the same units, scaled to this tensor's size (``grad_floor``).
    ``terms``: the gradient of a positional table is a sum over every (batch, head, query, key) logit, with
    cancellation (each softmax row's gradient sums to 0), so fp32 round-off grows like sqrt(terms); the
    tolerances are widened by ``max(1, sqrt(terms) / 16)`` (16^2 = 256 terms is what the table assumes).
    ``cond``: a further factor, ``logit_cond`` (fp32 round-off of a logit s is ~eps * |s|, and the softmax
    turns it into a relative error of p; the table assumes |s| of a few units).
    ``emulated``: a list of references with the kernel's roundings (``emulations``), or a callable returning it
    (``Emulations``: evaluated only where the table rejects); where the table rejects,
    the result still passes if its error is within ``emulation_factor`` x the worst emulation's (L2 and
    max-abs) plus the table's tolerance. Never a substitute for the NaN / inf checks above.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{name}: NaN in the result ({int(torch.isnan(a).sum())} values)"
    assert not torch.isnan(e).any(), f"{name}: NaN in the reference (a test bug)"
    inf = torch.isinf(e)
    assert torch.equal(torch.isinf(a), inf), f"{name}: infinities differ from the reference"
    assert torch.equal(a[inf], e[inf]), f"{name}: infinities of the wrong sign"
    a, e = a[~inf], e[~inf]
    if e.numel() == 0:
        return
    atol, rtol, l2 = (BWD if grad else FWD)[dtype]
    widen = max(1.0, float(cond))
    if terms:
        widen *= max(1.0, math.sqrt(terms) / 16)
    atol, rtol, l2 = atol * widen, rtol * widen, l2 * widen
    floor = 0.0 if scale is None else float(scale)
    denom = max(e.norm().item(), floor)
    err = (a - e).norm().item()
    m = max(1.0, e.abs().max().item(), floor / math.sqrt(max(e.numel(), 1)))
    table_ok = (err <= l2 * denom or err == 0.0) and not ((a - e).abs() > atol * m + rtol * e.abs()).any()
    if not table_ok and emulated is not None:
        ems = [x.detach().to(torch.float64).cpu()[~inf] for x in (emulated() if callable(emulated) else emulated)]
    if not table_ok and emulated is not None and ems:
        emu_l2 = max((em - e).norm().item() for em in ems)
        emu_max = max((em - e).abs().max().item() for em in ems)
        if err <= l2 * denom + emulation_factor * emu_l2 and \
                ((a - e).abs() <= atol * m + rtol * e.abs() + emulation_factor * emu_max).all():
            return
    assert err <= l2 * denom or err == 0.0, (
        f"{name}: relative L2 error {err / max(denom, 1e-300):.3e} > {l2:.1e} ({dtype}; |ref| {e.norm().item():.3e}, "
        f"floor {floor:.3e})")
    bad = (a - e).abs() > atol * m + rtol * e.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {e.numel()} elements off by more than atol*{m:.3g} + rtol*|ref| ({dtype}); "
        f"worst {(a - e).abs().max().item():.3e}")


def logit_cond(q, k, scale, *, head_dim=None, softcap=0.0, grad=False):
    """Widening factor for ``check_close(cond=...)`` from the logits' magnitude, for q (..., D), k (..., D).

    A logit computed in a dtype is off by about eps * scale * sum_d |q_d k_d| <= eps * B, with
    B = scale * max row norm of q * max row norm of k (Cauchy-Schwarz); the softmax turns that absolute error
    into a relative error of p, and the table assumes |logits| of a few units: factor max(1, B / 8).
    With softcap the error of a pre-cap logit stays the same size (the cap's derivative 1 - tanh^2 <= 1, and
    near the cap's knee it is ~1), so the forward factor is the same; the backward multiplies dS by
    1 - tanh^2(s / softcap), whose relative error is 2 |tanh| * error(s) / softcap: for gradients
    (``grad=True``) the factor is max(1, B * max(1, 2 / softcap) / 8). Deep profile 2026-11-30: fp32 torch
    backend, softcap 0.5, 'large' values, sum |q k| ~230 for logits near the knee: dq 3.8e-5 vs the table's
    2e-5 (tests/test_regressions.py::test_fp32_softcap_gradient_error_follows_logit_magnitude)."""
    if q.numel() == 0 or k.numel() == 0:
        return 1.0
    d = q.shape[-1] if head_dim is None else head_dim
    s = (d ** -0.5 if scale is None else scale)
    bound = s * q.double().norm(dim=-1).max().item() * k.double().norm(dim=-1).max().item()
    if grad and softcap and softcap > 0:
        bound *= max(1.0, 2.0 / softcap)
    return max(1.0, bound / 8.0)


def grad_floor(ref_grads, names, base=("dq", "dk", "dv"), positions=1):
    """Floors for ``check_close(scale=...)``: the per-element norm of the largest of dq/dk/dv (dq, dk and
    additive tables share units up to the logit scale), times sqrt(numel) of each; table gradients (names
    ``d_leaf*``) also times ``positions`` (ALiBi's slope gradient weights each logit's by its distance)."""
    per = 0.0
    for g, n in zip(ref_grads, names):
        if n in base and g.numel():
            per = max(per, g.detach().double().norm().item() / math.sqrt(g.numel()))
    return [per * math.sqrt(max(g.numel(), 1)) * (max(1, positions) if n.startswith("d_leaf") else 1)
            for g, n in zip(ref_grads, names)]


def grads(outputs, inputs, grad_outputs):
    """torch.autograd.grad with zeros for inputs not reached (the fuzz tests assert separately that an op's
    output is attached to the graph when its inputs require grad). ``outputs`` / ``grad_outputs``: a tensor
    each, or lists of them; an output that is not attached (e.g. a reference with nothing to compute, which
    returns plain zeros) carries no gradient."""
    inputs = list(inputs)
    if not inputs:
        return []
    if isinstance(outputs, torch.Tensor):
        outputs, grad_outputs = [outputs], [grad_outputs]
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    g = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for t, x in zip(inputs, g)]


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------

SEEDS = st.integers(0, 2 ** 31 - 1)
# lengths with 0, 1 and block boundaries (16, 32, 64 are the Triton block sizes in use)
LENGTHS_TINY = st.sampled_from([0, 1, 2, 3, 5, 15, 16, 17])
LENGTHS = st.one_of(st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65]), st.integers(0, 70))


@st.composite
def heads(draw, max_heads=6):
    """(num_heads, num_heads_k) with num_heads_k | num_heads: MHA, GQA with odd groups, MQA."""
    hk = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    h = min(hk * group, max_heads)
    if h % hk:
        h = hk
    return h, hk


@st.composite
def position_spec(draw, *, batch, heads, seqlen_q, seqlen_k, head_dim, offset, gen, learnable_alibi=True,
                  allow=("rope", "xpos", "phase", "alibi", "relative", "t5", "urpe"), dynamic=True):
    """A random composition of positional encodings (at most one rotary, one bias, one URPE) that fits the
    call, its learnable tensors (requires_grad) and a short description."""
    leaves = []
    parts = []
    # rotary positions come from key indices [offset, offset + seqlen_q): learned phases and RoPE
    # position_ids need them inside [0, seqlen_k)
    rows_fit = seqlen_q == 0 or (offset >= 0 and seqlen_q + offset <= seqlen_k)
    rot_choices = ["none"]
    if "rope" in allow and head_dim >= 2:
        rot_choices.append("rope")
    if "xpos" in allow and head_dim % 2 == 0:
        rot_choices.append("xpos")
    if "phase" in allow and rows_fit and head_dim >= 2:
        rot_choices.append("phase")
    rot = draw(st.sampled_from(rot_choices))
    even_dims = [r for r in range(2, head_dim + 1, 2)]
    if rot == "rope":
        rdim = draw(st.sampled_from([None] + even_dims)) if head_dim % 2 == 0 else draw(st.sampled_from(even_dims))
        scaling = draw(st.sampled_from([None, "linear", "ntk", "dynamic", "llama3", "yarn"]))
        if scaling == "dynamic" and not dynamic:
            scaling = None  # varlen documents 'dynamic' as unsupported (ValueError)
        if scaling in ("ntk", "dynamic") and (rdim or head_dim) <= 2:
            scaling = None  # NTK's exponent r/(r-2) needs rotary_dim > 2 (a documented ValueError)
        sc = None
        if scaling == "linear" or scaling == "ntk":
            sc = {"type": scaling, "factor": draw(st.sampled_from([0.5, 2.0, 4.0]))}
        elif scaling == "dynamic":
            sc = {"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": draw(st.sampled_from([4, 16]))}
        elif scaling == "llama3":
            sc = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": draw(st.sampled_from([8, 64]))}
        elif scaling == "yarn":
            sc = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": draw(st.sampled_from([8, 32]))}
        ids = None
        if rows_fit and draw(st.booleans()):
            shape = draw(st.sampled_from([(seqlen_k,), (1, seqlen_k), (batch, seqlen_k)]))
            ids = torch.randint(0, 4 * seqlen_k + 8, shape, generator=gen)
        parts.append(RoPE(draw(st.sampled_from([10000.0, 500.0, 1e6])), rotary_dim=rdim,
                          interleaved=draw(st.booleans()), scaling=sc, position_ids=ids))
    elif rot == "xpos":
        parts.append(XPos(draw(st.sampled_from([10000.0, 100.0])), scale_base=draw(st.sampled_from([32.0, 512.0]))))
    elif rot == "phase":
        fb = draw(st.sampled_from([1, batch]))
        fr = (0.05 + 0.9 * torch.rand(fb, heads, seqlen_k, generator=gen)).requires_grad_(True)
        leaves.append(fr)
        rdim = draw(st.sampled_from([None] + even_dims)) if head_dim % 2 == 0 else draw(st.sampled_from(even_dims))
        parts.append(LearnedPhaseRoPE(fr, rotary_dim=rdim, interleaved=draw(st.booleans())))

    bias_choices = ["none"] + [b for b in ("alibi", "relative", "t5") if b in allow]
    bias = draw(st.sampled_from(bias_choices))
    if bias == "alibi":
        kind = draw(st.sampled_from(["paper", "heads", "batch_heads"]))
        if kind == "paper":
            parts.append(ALiBi())
        else:
            shape = (heads,) if kind == "heads" else (batch, heads)
            s = (0.02 + torch.rand(shape, generator=gen)).requires_grad_(learnable_alibi)
            if learnable_alibi:
                leaves.append(s)
            parts.append(ALiBi(s))
    elif bias == "relative":
        dist = draw(st.integers(1, 8))
        t = torch.randn(heads, 2 * dist + 1, generator=gen).requires_grad_(True)
        leaves.append(t)
        parts.append(RelativeBias(t, max_distance=dist))
    elif bias == "t5":
        bidir = draw(st.booleans())
        nb = draw(st.sampled_from([4, 8, 16] if bidir else [2, 3, 8, 16]))
        exact = (nb // 2 if bidir else nb) // 2
        md = draw(st.integers(exact + 1, exact + 40))
        t = torch.randn(nb, heads, generator=gen).requires_grad_(True)
        leaves.append(t)
        parts.append(T5Bias(t, num_buckets=nb, max_distance=md, bidirectional=bidir))
    if "urpe" in allow and draw(st.booleans()):
        dist = draw(st.integers(1, 8))
        t = (1.0 + 0.5 * torch.randn(heads, 2 * dist + 1, generator=gen)).requires_grad_(True)
        leaves.append(t)
        parts.append(URPE(t, max_distance=dist))
    if draw(st.booleans()):  # the order inside the list must not matter
        parts = parts[::-1]
    position = None if not parts else (parts[0] if len(parts) == 1 and draw(st.booleans()) else parts)
    return position, leaves


def hidden_keys(allowed: torch.Tensor, num_heads_k: int) -> torch.Tensor:
    """allowed (B, H, Sq, Sk) bool -> (B, Hk, Sk) bool: keys no query of the kv head's group can see."""
    B, H, Sq, Sk = allowed.shape
    seen = allowed.reshape(B, num_heads_k, H // num_heads_k, Sq, Sk).any(dim=2).any(dim=2)
    return ~seen


def visibility(B, H, Sq, Sk, *, causal, offset, left=-1, right=-1, bool_mask=None, float_mask=None):
    """(B, H, Sq, Sk) bool: which logits are finite (causal / window / masks), as in reference.attention."""
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Sk)[None, :]
    rel = j - (i + offset)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        allowed &= rel <= 0
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    allowed = allowed.expand(B, H, Sq, Sk)
    if bool_mask is not None:
        allowed = allowed & bool_mask
    if float_mask is not None:
        allowed = allowed & ~torch.isneginf(float_mask.to(torch.float64))
    return allowed


def poison_rows(t: torch.Tensor, rows: torch.Tensor, dim_layout: str = "bshd", value=float("nan")):
    """Copy of ``t`` (B, S, Hk, D) ("bshd") or (B, Hk, S, D) ("bhsd") with the (b, hk, s) rows of ``rows``
    (B, Hk, S) set to ``value``."""
    t = t.detach().clone()
    m = rows if dim_layout == "bhsd" else rows.transpose(1, 2)
    t[m] = value
    return t
