"""Ceilings for the benchmark table on the device at hand: device-to-device copy bandwidth (GB/s)
and dense bf16 matmul rate (TFLOP/s). Memory-bound ops report GB/s against the first, matmul-bound
ones TFLOP/s against the second.

    python bench/ceilings.py [--out ceilings.json]
"""
import argparse

import torch

from posattn.benchmarks.harness import copy_bandwidth, device_name, emit_json, time_fn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    copy_gbps = copy_bandwidth(dev)  # the same figure the bench table's GB/s rows are compared against
    m = 8192 if dev.type == "cuda" else 1024
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=dev, dtype=dt)
    b = torch.randn(m, m, device=dev, dtype=dt)
    t2 = time_fn(lambda: a @ b, dev)
    tflops = 2 * m ** 3 / (t2.median_ms * 1e-3) / 1e12
    res = {"device": device_name(dev), "copy_GBps": round(copy_gbps, 1),
           f"matmul_{str(dt).replace('torch.', '')}_TFLOPs": round(tflops, 2)}
    emit_json(res, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
