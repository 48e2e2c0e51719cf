"""Model pieces: stage splitting equals the whole model, document masking/positions, GQA shapes, initial loss."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from data.loader import make_batch
from model.llama import attention, document_bins, document_mask, document_positions
from model.stages import build_stage, split_layers, token_loss_sum
from tests.tiny import tiny_batch, tiny_model_config

SEED = 7
EOS = 63


def run_stages(stages, tokens, doc_ids):
    h = tokens
    for st in stages:
        h = st(h, st.prepare(doc_ids))
    return h


# ---------------------------------------------------------------- stage splitting


@pytest.mark.parametrize("n_stages", [2, 3])
def test_stage_chain_equals_single_stage(n_stages):
    torch.manual_seed(0)
    cfg = tiny_model_config(n_layers=5)  # 5 layers: uneven split for both S=2 and S=3
    batch = tiny_batch(cfg, seed=1, rows=3, seq_len=24, eos=EOS)
    whole = build_stage(cfg, 0, 1, 24, SEED)
    parts = [build_stage(cfg, s, n_stages, 24, SEED) for s in range(n_stages)]

    # Parameter names of the stages partition the single-stage names, with identical values.
    whole_params = dict(whole.named_parameters())
    seen = []
    for st in parts:
        for name, p in st.named_parameters():
            seen.append(name)
            assert name in whole_params, name
            assert torch.equal(p, whole_params[name]), name
    assert len(seen) == len(set(seen))
    assert set(seen) == set(whole_params)

    # Only the first stage embeds, only the last has norm and head.
    assert parts[0].embed is not None and all(st.embed is None for st in parts[1:])
    assert parts[-1].head is not None and all(st.head is None for st in parts[:-1])

    with torch.no_grad():
        ref = whole(batch.inputs, whole.prepare(batch.doc_ids))
        out = run_stages(parts, batch.inputs, batch.doc_ids)
    assert ref.shape == (3, 24, cfg.vocab_size)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_different_seed_gives_different_weights():
    cfg = tiny_model_config(n_layers=2)
    a = dict(build_stage(cfg, 0, 1, 16, 1).named_parameters())
    b = dict(build_stage(cfg, 0, 1, 16, 2).named_parameters())
    assert not torch.equal(a["layers.0.attn.wq.weight"], b["layers.0.attn.wq.weight"])
    # Different parameters with the same shape must not share their random init.
    assert not torch.equal(a["layers.0.attn.wq.weight"], a["layers.1.attn.wq.weight"])


@pytest.mark.parametrize("n_layers", range(1, 13))
def test_split_layers_contiguous_balanced_cover(n_layers):
    for stages in range(1, n_layers + 1):
        ranges = split_layers(n_layers, stages)
        assert len(ranges) == stages
        flat = [i for r in ranges for i in r]
        assert flat == list(range(n_layers))  # every layer once, in order, contiguous
        sizes = [len(r) for r in ranges]
        assert min(sizes) >= 1
        assert max(sizes) - min(sizes) <= 1
        for r in ranges:
            assert r.step == 1


# ---------------------------------------------------------------- document masking


def _two_doc_row(rng, t=20, split=8):
    """One packed row: doc 0 = positions 0..split-1 (ending in eos), doc 1 = the rest."""
    w = rng.integers(0, EOS, size=(1, t + 1))
    w[0, split - 1] = EOS
    return w


def _logits(model, window):
    b = make_batch(window, np.array([0]), EOS)
    with torch.no_grad():
        return model(b.inputs, model.prepare(b.doc_ids))[0], b.doc_ids[0]


def test_document_masking_isolates_documents():
    cfg = tiny_model_config(n_layers=2)
    model = build_stage(cfg, 0, 1, 32, SEED)
    rng = np.random.default_rng(0)
    split, t = 8, 20
    w = _two_doc_row(rng, t, split)
    base, doc_ids = _logits(model, w)
    assert doc_ids.tolist() == [0] * split + [1] * (t - split)

    # Changing the second document leaves the first document's outputs unchanged.
    w2 = w.copy()
    w2[0, split:] = (w[0, split:] + 1 + rng.integers(0, EOS - 1, size=t + 1 - split)) % EOS
    assert (w2[0, split:t] != w[0, split:t]).all()
    out2, ids2 = _logits(model, w2)
    assert torch.equal(ids2, doc_ids)
    assert torch.allclose(out2[:split], base[:split], atol=1e-6, rtol=0)
    assert not torch.allclose(out2[split:], base[split:], atol=1e-3)

    # Changing the first document's first token changes its later outputs ...
    w1 = w.copy()
    w1[0, 0] = (w[0, 0] + 5) % EOS
    out1, ids1 = _logits(model, w1)
    assert torch.equal(ids1, doc_ids)
    assert (out1[1:split] - base[1:split]).abs().max() > 1e-4
    # ... but not the second document's outputs (doc 1 cannot see doc 0).
    assert torch.allclose(out1[split:], base[split:], atol=1e-6, rtol=0)

    # Changing every non-eos token of doc 0 still leaves doc 1 untouched.
    w3 = w.copy()
    w3[0, : split - 1] = (w[0, : split - 1] + 11) % EOS
    out3, _ = _logits(model, w3)
    assert torch.allclose(out3[split:], base[split:], atol=1e-6, rtol=0)


def test_packed_document_equals_document_alone():
    """Positions restart per document, so doc 1 in a packed row scores as if it were alone."""
    cfg = tiny_model_config(n_layers=2)
    model = build_stage(cfg, 0, 1, 32, SEED)
    rng = np.random.default_rng(3)
    split, t = 9, 20
    w = _two_doc_row(rng, t, split)
    packed, _ = _logits(model, w)
    alone, alone_ids = _logits(model, w[:, split:])
    assert alone_ids.tolist() == [0] * (t - split)
    assert torch.allclose(packed[split:], alone, atol=1e-5, rtol=0)


def test_without_document_mask_documents_would_leak():
    """Sanity check that the isolation above is due to the mask: a single-document row does leak."""
    cfg = tiny_model_config(n_layers=2)
    model = build_stage(cfg, 0, 1, 32, SEED)
    rng = np.random.default_rng(0)
    tokens = torch.from_numpy(rng.integers(0, EOS, size=(1, 16)))
    one_doc = torch.zeros(1, 16, dtype=torch.long)
    changed = tokens.clone()
    changed[0, 0] = (changed[0, 0] + 5) % EOS
    with torch.no_grad():
        a = model(tokens, model.prepare(one_doc))
        b = model(changed, model.prepare(one_doc))
    assert (a[0, 10:] - b[0, 10:]).abs().max() > 1e-4


def test_document_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2],
                            [0, 1, 1, 1, 1, 1, 2, 3, 3],
                            [4, 4, 4, 4, 4, 4, 4, 4, 4]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3],
                             [0, 0, 1, 2, 3, 4, 0, 0, 1],
                             [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert torch.equal(document_positions(doc_ids), expected)


def test_document_positions_from_make_batch():
    # inputs: a b EOS c d e EOS f ; the eos belongs to the document it ends
    window = np.array([[1, 2, EOS, 3, 4, 5, EOS, 6, 7]])
    b = make_batch(window, np.array([0]), EOS)
    assert b.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert document_positions(b.doc_ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]


def test_document_mask_matches_hand_built():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1],
                            [0, 1, 1, 2, 2]])
    expected = torch.tensor([
        [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [0, 0, 1, 0, 0],
         [0, 0, 1, 1, 0],
         [0, 0, 1, 1, 1]],
        [[1, 0, 0, 0, 0],
         [0, 1, 0, 0, 0],
         [0, 1, 1, 0, 0],
         [0, 0, 0, 1, 0],
         [0, 0, 0, 1, 1]],
    ], dtype=torch.bool)[:, None]
    mask = document_mask(doc_ids)
    assert mask.dtype == torch.bool
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask, expected)


def test_document_bins_equal_the_dense_document_mask_on_interleaved_documents():
    """A Ulysses pack's order (each document in pieces, interleaved with others) cut into bins of <= 16 tokens
    and one 40-token document alone: the same attention and gradients as the dense mask, GQA included."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 7, 1, 40, 12, 5, 9, 2, 11, 6])
    pieces = [torch.repeat_interleave(torch.arange(10), (lengths + 1) // 2) for _ in range(2)]  # 2 lanes' slices
    doc_ids = torch.cat(pieces)[None]
    bins = document_bins(doc_ids, tokens=16)
    assert [b - a for a, b, _ in bins.bins] == [14, 40, 12, 16, 14, 6]  # 2 x ceil(n / 2) tokens per document
    q = torch.randn(1, 4, doc_ids.shape[1], 8, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, doc_ids.shape[1], 8, generator=g, requires_grad=True) for _ in range(2))
    got, want = attention(q, k, v, bins), attention(q, k, v, document_mask(doc_ids))
    assert (got - want).abs().max() < 1e-6
    w = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        assert (a - b).abs().max() < 1e-6


# ---------------------------------------------------------------- GQA


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_gqa_runs_with_smaller_kv_projections(n_kv_heads):
    cfg = dataclasses.replace(tiny_model_config(n_layers=2), n_heads=4, n_kv_heads=n_kv_heads)
    model = build_stage(cfg, 0, 1, 32, SEED)
    head_dim = cfg.dim // cfg.n_heads
    for layer in model.layers.values():
        assert tuple(layer.attn.wq.weight.shape) == (cfg.n_heads * head_dim, cfg.dim)
        assert tuple(layer.attn.wk.weight.shape) == (n_kv_heads * head_dim, cfg.dim)
        assert tuple(layer.attn.wv.weight.shape) == (n_kv_heads * head_dim, cfg.dim)
        assert layer.attn.wk.weight.shape[0] < layer.attn.wq.weight.shape[0]
    batch = tiny_batch(cfg, seed=2, rows=2, seq_len=16, eos=EOS)
    with torch.no_grad():
        out = model(batch.inputs, model.prepare(batch.doc_ids))
    assert out.shape == (2, 16, cfg.vocab_size)
    assert torch.isfinite(out).all()


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Query head h uses kv head h // (n_heads / n_kv_heads): same as MHA with kv weights repeated per group."""
    gcfg = dataclasses.replace(tiny_model_config(n_layers=2), n_heads=4, n_kv_heads=2)
    mcfg = dataclasses.replace(gcfg, n_kv_heads=4)
    gqa = build_stage(gcfg, 0, 1, 32, SEED)
    mha = build_stage(mcfg, 0, 1, 32, SEED)
    head_dim = gcfg.dim // gcfg.n_heads
    group = gcfg.n_heads // gcfg.n_kv_heads
    with torch.no_grad():
        mha.load_state_dict({k: v for k, v in gqa.state_dict().items() if not k.endswith(("wk.weight", "wv.weight"))},
                            strict=False)
        for i, layer in gqa.layers.items():
            for proj in ("wk", "wv"):
                w = getattr(layer.attn, proj).weight.view(gcfg.n_kv_heads, head_dim, gcfg.dim)
                getattr(mha.layers[i].attn, proj).weight.copy_(w.repeat_interleave(group, dim=0).reshape(-1, gcfg.dim))
        batch = tiny_batch(gcfg, seed=4, rows=2, seq_len=16, eos=EOS)
        a = gqa(batch.inputs, gqa.prepare(batch.doc_ids))
        b = mha(batch.inputs, mha.prepare(batch.doc_ids))
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- initial loss


def test_untrained_loss_near_uniform():
    cfg = dataclasses.replace(tiny_model_config(n_layers=2), vocab_size=64)
    model = build_stage(cfg, 0, 1, 32, SEED)
    batch = tiny_batch(cfg, seed=5, rows=4, seq_len=32, eos=EOS)
    with torch.no_grad():
        logits = model(batch.inputs, model.prepare(batch.doc_ids))
        loss = token_loss_sum(logits, batch.targets) / batch.n_tokens
    assert math.isfinite(loss.item())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.5


def test_token_loss_sum_is_a_sum():
    logits = torch.zeros(2, 3, 5)
    targets = torch.zeros(2, 3, dtype=torch.long)
    assert torch.allclose(token_loss_sum(logits, targets), torch.tensor(6 * math.log(5)))
