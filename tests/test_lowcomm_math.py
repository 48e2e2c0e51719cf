"""DiLoCo, NoLoCo, EF21 and the compressors against hand-computed references on tiny tensors (one process)."""
import math

import pytest
import torch

from optim import compress, sparseloco
from optim.diloco import DiLoCo, fragment_of, nesterov_step
from optim.ef21 import ErrorFeedback
from optim.sparseloco import SparseLoCo
from optim.noloco import check_bounds, noloco_step, pair_means, partners


def test_nesterov_step_by_hand():
    anchor, mom = torch.tensor([1.0, 2.0]), torch.zeros(2)
    delta = torch.tensor([0.5, -1.0])
    nesterov_step(anchor, mom, delta, lr=0.7, mu=0.9, nesterov=True)
    # m = 0.9*0 + d = d; step = d + 0.9*m = 1.9 d; anchor = anchor - 0.7*1.9 d
    assert torch.allclose(mom, delta)
    assert torch.allclose(anchor, torch.tensor([1.0 - 0.7 * 1.9 * 0.5, 2.0 + 0.7 * 1.9 * 1.0]))
    nesterov_step(anchor, mom, delta, lr=0.7, mu=0.9, nesterov=True)
    # m = 0.9 d + d = 1.9 d; step = d + 0.9 * 1.9 d = 2.71 d
    assert torch.allclose(mom, 1.9 * delta)
    assert torch.allclose(anchor, torch.tensor([1.0, 2.0]) - 0.7 * (1.9 + 2.71) * delta)


def test_nesterov_step_matches_torch_sgd():
    p = torch.nn.Parameter(torch.randn(5))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    anchor, mom = p.detach().clone(), torch.zeros(5)
    for _ in range(3):
        d = torch.randn(5)
        p.grad = d.clone()
        sgd.step()
        nesterov_step(anchor, mom, d, 0.7, 0.9, True)
    assert torch.allclose(anchor, p.detach(), atol=1e-6)


def inner_steps(params, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.data -= 0.01 * torch.randn(p.shape, generator=g)


def test_diloco_one_replica_outer_lr_1_momentum_0_is_plain_training():
    named = [("layers.0.w", torch.nn.Parameter(torch.randn(3, 3))), ("head.weight", torch.nn.Parameter(torch.randn(4)))]
    plain = [p.detach().clone() for _, p in named]
    diloco = DiLoCo(named, H=5, lr=1.0, mu=0.0, nesterov=True, fragments=1, precision="fp32", ef=None,
                    comm=None, group=None, link="cross_replica", n=1)
    for outer in range(3):
        inner_steps([p for _, p in named], 5, seed=outer)
        inner_steps(plain, 5, seed=outer)
        assert diloco.after_update(5 * (outer + 1)) == [0]
        for (_, p), q in zip(named, plain):
            assert torch.allclose(p.detach(), q, atol=1e-6)


def test_diloco_outer_step_by_hand():
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    diloco = DiLoCo([("layers.0.w", p)], H=2, lr=0.7, mu=0.9, nesterov=True, fragments=1, precision="fp32",
                    ef=None, comm=None, group=None, link="cross_replica", n=1)
    p.data = torch.tensor([0.8, 1.2])  # after inner steps: pseudo-gradient = anchor - theta = [0.2, -0.2]
    assert diloco.after_update(1) == []  # not due
    diloco.after_update(2)
    expected = torch.tensor([1.0, 1.0]) - 0.7 * 1.9 * torch.tensor([0.2, -0.2])
    assert torch.allclose(p.detach(), expected) and torch.allclose(diloco.anchor[0], expected)


def test_streaming_fragments_are_staggered():
    named = [(f"layers.{i}.w", torch.nn.Parameter(torch.zeros(2))) for i in range(6)]
    diloco = DiLoCo(named, H=6, lr=1.0, mu=0.0, nesterov=False, fragments=3, precision="fp32", ef=None,
                    comm=None, group=None, link="cross_replica", n=1)
    schedule = {done: diloco.due(done) for done in range(1, 19) if diloco.due(done)}
    assert schedule == {2: [1], 4: [2], 6: [0], 8: [1], 10: [2], 12: [0], 14: [1], 16: [2], 18: [0]}
    assert [fragment_of(n, 3) for n, _ in named] == [0, 1, 2, 0, 1, 2]
    assert fragment_of("embed.weight", 3) == 0 and fragment_of("head.weight", 3) == 2


@pytest.mark.parametrize("replicas", [2, 3, 4, 5, 8])
def test_noloco_pairing_is_a_matching_every_step(replicas):
    seen = set()
    for outer in range(50):
        p = partners(replicas, seed=3, outer_step=outer)
        assert p == partners(replicas, seed=3, outer_step=outer)  # every rank computes the same
        for r, q in enumerate(p):
            if q is not None:
                assert q != r and p[q] == r
        assert sum(q is None for q in p) == replicas % 2
        seen.add(tuple(p))
    assert len(seen) > 1 or replicas == 2


def test_noloco_update_by_hand():
    phi, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.0])
    theta = torch.tensor([0.5, 2.5])  # Delta = [-0.5, 0.5]
    peer_phi, peer_Delta = torch.tensor([3.0, 2.0]), torch.tensor([0.5, 0.5])
    noloco_step(phi, delta, *pair_means(phi, theta, peer_phi, peer_Delta), alpha=0.5, beta=0.7, gamma=0.7)
    mean_D, mean_phi = torch.tensor([0.0, 0.5]), torch.tensor([2.0, 2.0])
    want_delta = 0.5 * torch.tensor([0.1, 0.0]) + 0.7 * mean_D - 0.7 * (torch.tensor([1.0, 2.0]) - mean_phi)
    assert torch.allclose(delta, want_delta)
    assert torch.allclose(phi, torch.tensor([1.0, 2.0]) + want_delta)


def test_noloco_alone_moves_by_its_own_delta():
    phi, delta, theta = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0])
    noloco_step(phi, delta, *pair_means(phi, theta, None, None), alpha=0.5, beta=0.7, gamma=0.7)
    assert torch.allclose(phi, torch.tensor([1.0 - 0.7]))


def test_noloco_bounds():
    check_bounds(0.5, 0.7, 0.7)
    with pytest.raises(ValueError, match="beta > alpha"):
        check_bounds(0.8, 0.7, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        check_bounds(0.5, 0.7, 0.4)
    with pytest.raises(ValueError, match="gamma"):
        check_bounds(0.5, 0.7, math.sqrt(2.25) + 0.01)


def test_topk_keeps_the_largest_per_chunk_and_is_contractive():
    v = torch.randn(10_000)
    s = compress.topk_encode(v, ratio=0.01, chunk=1000)
    assert s.values.shape == (10, 10) and s.offsets.dtype == torch.int16
    out = compress.topk_decode(s, v.numel(), chunk=1000)
    for c in range(10):
        part, kept = v[c * 1000:(c + 1) * 1000], out[c * 1000:(c + 1) * 1000]
        assert (kept != 0).sum() == 10
        assert kept.abs().max() == part.abs().max()
        assert kept[kept != 0].abs().min() >= part.abs().sort(descending=True).values[9]
    assert (out - v).pow(2).sum() <= (1 - 0.01) * v.pow(2).sum()
    assert s.nbytes == 100 * 6  # fp32 value + int16 offset: 1.5% of the dense fp32 bytes


def test_topk_handles_a_partial_last_chunk():
    v = torch.arange(1.0, 2501.0)
    out = compress.topk_decode(compress.topk_encode(v, 0.01, 1000), 2500, 1000)
    assert out.numel() == 2500 and out[2499] == 2500.0


def test_randk_shared_seed_same_indices():
    a, b = compress.randk_indices(1000, 0.05, seed=9), compress.randk_indices(1000, 0.05, seed=9)
    assert torch.equal(a, b) and a.numel() == 50 and a.unique().numel() == 50
    assert not torch.equal(a, compress.randk_indices(1000, 0.05, seed=10))


@pytest.mark.parametrize("bits", [8, 4])
def test_low_bit_round_trip_error_is_within_half_a_step(bits):
    v = torch.randn(9000)
    enc, dec, levels = ((compress.int8_encode, compress.int8_decode, 127) if bits == 8
                        else (compress.int4_encode, compress.int4_decode, 7))
    q, scale = enc(v)
    out = dec(q, scale, v.numel())
    step = torch.repeat_interleave(scale, 3000)[: v.numel()]  # 9000 values: 3 chunks of 3000, no padding
    assert ((out - v).abs() <= step / 2 + 1e-6).all()
    assert q.numel() * q.element_size() == (9000 if bits == 8 else 4500) and scale.numel() == 3
    assert torch.allclose(v.abs().max() / levels, scale.max())


@pytest.mark.parametrize("kind", ["ef21", "ef21sgdm"])
@pytest.mark.parametrize("comp", ["topk", "randk", "int8"])
def test_ef21_single_worker_tracks_its_input(kind, comp):
    """With one worker g == g_i always; the first round is dense; a constant input is learned (g -> x)."""
    ef = ErrorFeedback(kind, comp, ratio=0.1, eta=0.5, chunk=100, seed=1, comm=None, group=None,
                       link="cross_replica", n=1)
    x = torch.randn(300)
    assert torch.equal(ef.aggregate(x), x)
    for _ in range(60):
        g = ef.aggregate(x)
        assert torch.allclose(ef.g, ef.g_i)
    assert torch.allclose(g, x, atol=1e-2)
    ef.reset()  # membership changed: the next round is dense again
    assert ef.g is None and torch.equal(ef.aggregate(2 * x), 2 * x)


def test_ef21sgdm_is_the_papers_update_on_a_hand_computed_case():
    """EF21-SGDM (Fatkhullin et al.): v <- (1 - eta) v + eta x ; g_i <- g_i + C(v - g_i) ; g = mean g_i, and the
    model steps x <- x - lr g (so AdamW runs with beta1 = 0: the momentum is v's). One worker, Top-1 of 4, eta 0.5."""
    ef = ErrorFeedback("ef21sgdm", "topk", ratio=0.25, eta=0.5, chunk=4, seed=1, comm=None, group=None,
                       link="cross_replica", n=1)
    assert ef.aggregate(torch.tensor([1.0, 2.0, -4.0, 0.5])).tolist() == [1.0, 2.0, -4.0, 0.5]  # dense: v = g = x
    # v = [2, 1, -2, 0.75]; v - g_i = [1, -1, 2, 0.25]: Top-1 sends the 2 at index 2
    assert ef.aggregate(torch.tensor([3.0, 0.0, 0.0, 1.0])).tolist() == [1.0, 2.0, -2.0, 0.5]
    # v = [3, 0.5, -1, 0.875]; v - g_i = [2, -1.5, 1, 0.375]: the 2 at index 0
    assert ef.aggregate(torch.tensor([4.0, 0.0, 0.0, 1.0])).tolist() == [3.0, 2.0, -2.0, 0.5]
    assert ef.v.tolist() == [3.0, 0.5, -1.0, 0.875]


def test_ef14_error_accumulates_what_was_not_sent():
    ef = ErrorFeedback("ef14", "topk", ratio=0.01, eta=0.1, chunk=100, seed=1, comm=None, group=None,
                       link="cross_replica", n=1)
    x = torch.arange(100.0)
    sent = ef.aggregate(x)
    assert sent[99] == 99.0 and (sent != 0).sum() == 1
    assert torch.allclose(ef.e + sent, x)


def test_ef14_on_increments_is_ef21_on_their_running_sum():
    """EF21 tracking a replica's cumulative update sends exactly what EF14 sends on the per-step updates (after
    EF21's dense first round, EF14's error starts at 0): docs/lowcomm.md's reading of `adamw-update+ef14-top1%`."""
    make = lambda kind: ErrorFeedback(kind, "topk", ratio=0.05, eta=0.1, chunk=100, seed=1, comm=None, group=None,
                                      link="cross_replica", n=1)
    ef21, ef14 = make("ef21"), make("ef14")
    gen = torch.Generator().manual_seed(0)
    total = torch.randn(300, generator=gen)
    before = ef21.aggregate(total)  # dense: the sum so far is known exactly on both sides
    for _ in range(40):
        step = torch.randn(300, generator=gen)
        total = total + step
        after = ef21.aggregate(total)
        sent = ef14.aggregate(step)
        assert (sent != 0).sum() == 15
        assert torch.allclose(after - before, sent, atol=1e-5)
        before = after
    assert torch.allclose(total - before, ef14.e, atol=1e-4)  # what is still owed is the same vector


def test_sparseloco_two_bit_topk_by_hand():
    """One chunk of 8, K = 4: the 4 largest magnitudes, the larger two decode to their mean (5), the smaller two to
    theirs (2.5), signs kept; the wire holds exactly 4 offsets (int16), 4 codes (one byte) and 2 fp32 levels."""
    v = torch.tensor([0.1, -6.0, 2.0, 0.0, 4.0, -3.0, 0.2, -0.3])
    s = sparseloco.encode(v, ratio=0.5, chunk=8)
    assert sparseloco.decode(s, 8, 8).tolist() == [0.0, -5.0, 2.5, 0.0, 5.0, -2.5, 0.0, 0.0]
    wire = s.to_wire()
    assert wire.dtype == torch.uint8 and wire.numel() == 4 * 2 + 1 + 2 * 4 == sparseloco.wire_bytes(8, 0.5, 8)
    back = sparseloco.TwoBitTopK.from_wire(wire, 1, 4)
    assert torch.equal(sparseloco.decode(back, 8, 8), sparseloco.decode(s, 8, 8))


@pytest.mark.parametrize("d,ratio,chunk", [(10000, 0.02, 4096), (4096, 0.0156, 4096), (777, 0.05, 100)])
def test_sparseloco_wire_bytes_are_the_buffer_it_sends(d, ratio, chunk):
    s = sparseloco.encode(torch.randn(d), ratio, chunk)
    n_chunks, k = -(-d // chunk), compress.chunk_k(d, ratio, chunk)
    assert s.to_wire().numel() == sparseloco.wire_bytes(d, ratio, chunk) == 2 * n_chunks * k + -(-n_chunks * k // 4) + 8 * n_chunks


def test_sparseloco_error_feedback_decays_and_keeps_what_was_not_sent():
    """e <- beta e + Delta ; c = Q2(TopK(e)) ; e <- e - c: one replica gets c back as the mean."""
    sl = SparseLoCo(ratio=0.25, chunk=8, decay=0.5, comm=None, group=None, link="cross_replica", n=1)
    d1 = torch.tensor([0.1, -6.0, 2.0, 0.0, 4.0, -3.0, 0.2, -0.3])
    c1 = sl.aggregate(d1)  # K = 2: -6 and 4 -> levels 6 and 4
    assert c1.tolist() == [0.0, -6.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0]
    assert torch.equal(sl.e, d1 - c1)
    d2 = torch.ones(8)
    e = 0.5 * (d1 - c1) + d2  # [1.05, 1, 2, 1, 1, -0.5, 1.1, 0.85]: K = 2 sends 2 and 1.1
    c2 = sl.aggregate(d2)
    assert torch.allclose(c2, torch.tensor([0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 1.1, 0.0]))
    assert torch.allclose(sl.e, e - c2)
    assert torch.equal(sl.aggregate(d2, dense=True), d2) and torch.allclose(sl.e, e - c2)  # warm-up: plain mean


def test_ef_dense_warmup_rounds_are_exact_means_then_compression_starts():
    for kind in ("ef21", "ef14"):
        ef = ErrorFeedback(kind, "topk", ratio=0.01, eta=0.1, chunk=100, seed=1, comm=None, group=None,
                           link="cross_replica", n=1)
        x = torch.randn(300)
        for _ in range(3):
            assert torch.equal(ef.aggregate(x, dense=True), x)
        y = x + torch.randn(300)
        out = ef.aggregate(y)
        assert (out != (x if kind == "ef21" else 0)).sum() == 3  # then Top-1% of each 100-value chunk moves


def test_diloco_overlap_applies_the_outer_step_late_and_keeps_the_local_steps():
    """Exchange started after step 2 (pseudo-gradient anchor - theta(2)), applied after step 3: theta = anchor' +
    (theta(3) - theta(2)); at the last step every exchange in flight lands."""
    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    diloco = DiLoCo([("layers.0.w", p)], H=2, lr=0.5, mu=0.0, nesterov=False, fragments=1, precision="fp32",
                    ef=None, comm=None, group=None, link="cross_replica", n=1, overlap=1, total_steps=4)
    p.data = torch.tensor([0.8, 1.2])
    assert diloco.after_update(2) == []  # started, in flight
    assert p.tolist() == pytest.approx([0.8, 1.2])
    p.data += torch.tensor([0.1, 0.1])  # step 3's local update
    assert diloco.after_update(3) == [0]
    anchor = torch.tensor([1.0, 1.0]) - 0.5 * torch.tensor([0.2, -0.2])
    assert torch.allclose(diloco.anchor[0], anchor) and torch.allclose(p.detach(), anchor + 0.1)
    p.data -= torch.tensor([0.3, 0.0])  # step 4: started and landed at once (the last step)
    assert diloco.after_update(4) == [0]
    assert torch.allclose(p.detach(), diloco.anchor[0])
