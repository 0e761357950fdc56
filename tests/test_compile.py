"""Compile gate (issue 9): every Triton kernel, in every config its launcher uses, compiles for
sm_80 and sm_90 without a GPU; none exceeds the arch's shared memory; none spills registers
(LDL/STL in SASS); matmul-bound kernels use tensor cores (HMMA on sm_80, HGMMA on sm_90). The
CUDA C++ kernels of posattn._C are read from its sm_80/sm_90a cubins under the same rules.

Runs ``python -m posattn report --json`` once in a subprocess (the interpreter must be off there:
the report compiles for real targets).
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "posattn", "report", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert out.exists(), f"report did not run:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return json.loads(out.read_text())


def _label(r):
    return f"{r['source']} {r['op']} {r['kernel']} [{r['config']}] sm_{r['arch']}"


def test_every_triton_op_is_reported(report):
    ops = {r["op"] for r in report if r["source"] == "triton"}
    for op in ("fused_attention", "rotary", "lean_decode", "ecoformer", "kernelized_rpe"):
        assert op in ops, f"triton_kernels/{op}.py has no report_cases() (or its launcher failed)"


def test_every_config_compiles_for_both_archs(report):
    failed = [f"{_label(r)}: {r['error']}" for r in report if r["error"]]
    assert not failed, "\n".join(failed)
    triton = [r for r in report if r["source"] == "triton"]
    for arch in (80, 90):
        assert any(r["arch"] == arch for r in triton), f"nothing compiled for sm_{arch}"


def test_shared_memory_within_arch_limit(report):
    from posattn.report import ARCH_LIMITS
    over = [f"{_label(r)}: {r['smem_total']} > {ARCH_LIMITS[r['arch']]['smem_block']}"
            for r in report if r["smem_total"] > ARCH_LIMITS[r["arch"]]["smem_block"]]
    assert not over, "\n".join(over)


# Known spills, listed one by one so that a new one fails the gate (README "Kernel resources"):
# (kernel, report case, arch) -> (LDL, STL) seen on 2026-11-30. Only head_dim 256 with learned phases on
# sm_90 is left: values kept from before the loop to the epilogue of the second dk half and of dq (the
# phase gradient's epilogue); none of these spills is inside a loop (test_no_spills_inside_loops).
# Results are correct (interpreter tests); speed on a GPU is unmeasured.
KNOWN_SPILLS = {
    ("_fused_attention_bwd_dkdv_kernel", "d=256 phases bwd fp16", 90): (11, 11),
    ("_fused_attention_bwd_dq_kernel", "d=256 phases bwd fp16", 90): (29, 27),
}
# ptxas may move a few spills around between versions; a known entry may grow by this much
SPILL_SLACK = 8


def test_no_register_spills(report):
    spills = []
    for r in report:
        if not (r["spill_ld"] or r["spill_st"]):
            continue
        known = KNOWN_SPILLS.get((r["kernel"], r["config"].split(";")[0].strip(), r["arch"]))
        if known and r["spill_ld"] <= known[0] + SPILL_SLACK and r["spill_st"] <= known[1] + SPILL_SLACK:
            continue
        spills.append(f"{_label(r)}: regs {r['registers']}, LDL {r['spill_ld']}, STL {r['spill_st']}")
    assert not spills, "\n".join(spills)


def test_no_spills_inside_loops(report):
    # no exception: a spill inside the main loop (between a backward branch's target and the branch) costs
    # local-memory traffic per KV / query block; one in a prologue / epilogue costs it once per program
    bad = [f"{_label(r)}: {r['spill_in_loop']} LDL/STL inside loops" for r in report if r.get("spill_in_loop")]
    assert not bad, "\n".join(bad)


def test_matmul_bound_kernels_use_tensor_cores(report):
    want = {80: "HMMA", 90: "HGMMA"}
    bad = [f"{_label(r)}: {r['tensor_core'] or 'no tensor-core instructions'}"
           for r in report if r["source"] == "triton" and r["matmul_bound"] and r["tensor_core"] != want[r["arch"]]]
    assert not bad, "\n".join(bad)


def test_cuda_extension_has_both_archs(report):
    cuda = [r for r in report if r["source"] == "cuda"]
    if not cuda:
        pytest.skip("posattn._C not built here (no nvcc at install time)")
    archs = {r["config"] for r in cuda}
    assert any("80" in a for a in archs) and any("90" in a for a in archs), archs
