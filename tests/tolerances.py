"""The one table of tolerances, per dtype, for comparing a kernel against the float64 reference.

Why these numbers: an fp32 kernel accumulating in fp32 over a few hundred keys is ~1e-6 relative
(tf32 is off in conftest); bf16 has an 8-bit mantissa (2**-8 ~ 4e-3 unit roundoff) and the inputs
themselves are rounded, so ~1e-2 relative norm; fp16 has 11 bits (~5e-4), so a few 1e-3.
Gradients go through one more matmul chain and the recomputed softmax, so they get twice the room.

Two oracles (STYLE.md "Tests"): ``assert_close`` checks the table; ``assert_within_torch_error``
checks that the kernel's error vs fp64 is at most ``factor`` x the error of PyTorch's own
computation of the same thing in the same dtype.
"""
from __future__ import annotations

import torch

# dtype -> (atol, rtol, max relative L2 error)
FWD = {
    torch.float64: (1e-10, 1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2, 1e-2),
}
BWD = {dt: (2 * a, 2 * r, 2 * l) for dt, (a, r, l) in FWD.items()}


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, *, grad: bool = False,
                 name: str = "out") -> None:
    """Kernel result (any dtype) vs float64 reference, with the table's tolerance for ``dtype``."""
    atol, rtol, l2 = (BWD if grad else FWD)[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), finite), f"{name}: non-finite values where the reference is finite (or vice versa)"
    a, e = a[finite], e[finite]
    if a.numel() == 0:
        return
    err = rel_l2(a, e)
    assert err <= l2, f"{name}: relative L2 error {err:.3e} > {l2:.1e} ({dtype})"
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{name} ({dtype}): {m}")


def assert_within_torch_error(actual, torch_same_dtype, expected_fp64, *, factor: float = 2.0,
                              floor: float = 1e-6, name: str = "out") -> None:
    """FlashAttention's oracle: |kernel - fp64| <= factor * |torch(dtype) - fp64| + floor (max abs)."""
    e = expected_fp64.detach().to(torch.float64).cpu()
    ours = (actual.detach().to(torch.float64).cpu() - e).abs().max().item()
    theirs = (torch_same_dtype.detach().to(torch.float64).cpu() - e).abs().max().item()
    assert ours <= factor * theirs + floor, f"{name}: max error {ours:.3e} > {factor} x torch's {theirs:.3e} + {floor:.0e}"


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """A NaN-filled output buffer: a kernel that forgets to write a value cannot pass."""
    return torch.full_like(t, float("nan"))
