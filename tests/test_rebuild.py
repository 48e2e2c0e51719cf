"""Recovery decisions and CheckFree arithmetic on tiny inputs (no processes)."""
from types import SimpleNamespace

import pytest
import torch

from config import ConfigError, load_config
from dist.pipeline import swap_route
from model.stages import build_stage
from optim.sync import DDPSync
from recovery.rebuild import RankInfo, apply, decide, decide_per_replica, join_step, weight
from tests.tiny import tiny_model_config
from recovery.runtime import check_timeouts


def info(r, s, fresh=False, step=10, undo=True, g=1.0):
    return RankInfo(r, s, fresh, step, undo, g)


def test_rank_info_round_trips_through_a_tensor():
    i = RankInfo(1, 2, True, 37, False, 0.25, 36, True, 3)
    assert RankInfo.unpack(i.pack()) == i


def test_decide_prefers_copy_then_checkfree_then_checkpoint():
    two = [info(0, 0), info(0, 1), info(0, 2), info(1, 0), info(1, 1, fresh=True), info(1, 2)]
    d = decide(two, 3)
    assert d.target == 10 and d.sources == (((1, 1, 0), "copy", ((0, 1, 0),)),) and not d.checkpoint
    d = decide(two, 3, mode="checkfree")
    assert d.sources == (((1, 1, 0), "checkfree", ((1, 0, 0), (1, 2, 0))),)
    edge = [info(0, 0, fresh=True), info(0, 1), info(0, 2)]
    assert decide(edge, 3).checkpoint  # an edge without CheckFree+ swaps has no in-memory source
    assert decide(edge, 3, swap=True).sources == (((0, 0, 0), "checkfree+", ((0, 1, 0),)),)
    adjacent = [info(0, 0), info(0, 1, fresh=True), info(0, 2, fresh=True), info(0, 3)]
    assert decide(adjacent, 4, swap=True).checkpoint  # two neighbours lost at once
    assert decide(two, 3, mode="checkpoint").checkpoint


def test_decide_takes_back_a_half_committed_step():
    infos = [info(0, 0, step=11), info(0, 1, step=10), info(0, 2, step=11, undo=True)]
    d = decide(infos, 3)
    assert d.target == 10 and d.undo == ((0, 0, 0), (0, 2, 0)) and not d.checkpoint
    assert decide([info(0, 0, step=12), info(0, 1, step=10)], 2).checkpoint  # no common step in memory
    assert decide([info(0, 0, fresh=True, step=0), info(0, 1, fresh=True, step=0)], 2).target is None  # new run


def outer(r, s, step, outer_step, fresh=False, applied=False, lane=0):
    return RankInfo(r, s, fresh, step + applied, True, 1.0, outer_step, applied, lane)


def test_a_lost_lane_is_copied_from_a_sibling_lane_first():
    lanes = [RankInfo(r, s, (r, s, lane) == (1, 1, 1), 10, True, 1.0, lane=lane)
             for r in range(2) for s in range(2) for lane in range(2)]
    assert decide(lanes, 2).sources == (((1, 1, 1), "lane", ((1, 1, 0),)),)
    assert decide(lanes, 2, mode="checkfree").sources == (((1, 1, 1), "lane", ((1, 1, 0),)),)
    both = [i if i.slot != (1, 1, 0) else RankInfo(1, 1, True, 0, False, 1.0) for i in lanes]
    assert decide(both, 2).sources == (((1, 1, 0), "copy", ((0, 1, 0),)), ((1, 1, 1), "copy", ((0, 1, 1),)))
    # DiLoCo: the replica goes on (the sibling's copy is exact); with both lanes lost it rewinds, lane by lane
    per = [outer(i.replica, i.stage, 27, 24, fresh=i.fresh, lane=i.lane) for i in lanes]
    d = decide_per_replica(per)
    assert d.sources == (((1, 1, 1), "lane", ((1, 1, 0),)),) and not d.rewind and d.target_of(1) == 27
    per = [outer(i.replica, i.stage, 27, 24, fresh=i.fresh, lane=i.lane) for i in both]
    d = decide_per_replica(per)
    assert d.rewind == (1,) and d.sources == (((1, 1, 0), "rewind", ((0, 1, 0),)), ((1, 1, 1), "rewind", ((0, 1, 1),)))


def test_per_replica_decision_rewinds_only_replicas_without_the_newest_outer_step():
    # replica 0 intact at step 27 (outer step 24); replica 1 lost stage 1: it rewinds to 24, stage 1 from replica 0
    d = decide_per_replica([outer(0, 0, 27, 24), outer(0, 1, 27, 24), outer(1, 0, 26, 24),
                            outer(1, 1, 0, -1, fresh=True)])
    assert dict(d.replica_targets) == {0: 27, 1: 24} and d.rewind == (1,) and not d.checkpoint
    assert d.sources == (((1, 1, 0), "rewind", ((0, 1, 0),)),)
    # replica 1 sat out from step 9 (outer step 8) while replica 0 took outer steps to 24: it rejoins at 24
    # from replica 0's snapshots; a mid-update rank of replica 0 takes its step back
    d = decide_per_replica([outer(0, 0, 26, 24, applied=True), outer(0, 1, 26, 24), outer(1, 0, 9, 8),
                            outer(1, 1, 9, 8)])
    assert dict(d.replica_targets) == {0: 26, 1: 24} and d.undo == ((0, 0, 0),) and not d.checkpoint
    assert d.sources == (((1, 0, 0), "rewind", ((0, 0, 0),)), ((1, 1, 0), "rewind", ((0, 1, 0),)))
    # a rank that missed the last outer step's commit: its replica rewinds to it, that rank from another replica
    d = decide_per_replica([outer(0, 0, 24, 24), outer(0, 1, 24, 24), outer(1, 0, 24, 24), outer(1, 1, 24, 20)])
    assert d.rewind == (1,) and d.sources == (((1, 1, 0), "rewind", ((0, 1, 0),)),)
    # nobody else holds the newest outer step of a stage: only the checkpoint is common ground
    assert decide_per_replica([outer(0, 0, 24, 24), outer(0, 1, 0, -1, fresh=True), outer(1, 0, 22, 20),
                               outer(1, 1, 22, 20)]).checkpoint
    assert decide_per_replica([outer(0, 0, 0, -1, fresh=True)]).target is None
    # routed replicas move in lockstep: one replica's rewind rewinds all, and otherwise all resume at one step
    d = decide_per_replica([outer(0, 0, 27, 24), outer(0, 1, 27, 24), outer(1, 0, 27, 24),
                            outer(1, 1, 0, -1, fresh=True)], coupled=True)
    assert d.rewind == (0, 1) and dict(d.replica_targets) == {0: 24, 1: 24} and d.target == 24
    d = decide_per_replica([outer(0, 0, 27, 24, applied=True), outer(0, 1, 27, 24), outer(1, 0, 27, 24),
                            outer(1, 1, 27, 24)], coupled=True)
    assert d.target == 27 and d.undo == ((0, 0, 0),) and not d.rewind and d.target_of(1) == 27


def test_a_rewound_diloco_replica_rejoins_at_the_next_outer_step_when_nothing_needs_it_before():
    lost = [outer(0, 0, 27, 24), outer(0, 1, 27, 24), outer(1, 0, 26, 24), outer(1, 1, 0, -1, fresh=True)]
    join = lambda newest: join_step(newest, 8, 100, 0)  # noqa: E731
    d = decide_per_replica(lost, join=join)
    assert d.skip == (1,) and d.join == 32 and d.rewind == (1,) and d.target_of(1) == 24 and d.target_of(0) == 27
    assert decide_per_replica(lost, join=join, coupled=True).skip == ()  # routed replicas move in lockstep
    both = [outer(0, 0, 27, 24), outer(0, 1, 0, -1, fresh=True), outer(1, 0, 26, 24), outer(1, 1, 0, -1, fresh=True),
            outer(2, 0, 24, 24), outer(2, 1, 24, 24)]
    assert decide_per_replica(both, join=join).skip == (0, 1)
    assert decide_per_replica(both[:4], join=join).skip == ()  # every replica rewinds: nobody to skip to, replay
    assert join_step(24, 8, 100, 16) == 32  # checkpoints at outer steps: none in between
    assert join_step(24, 8, 100, 10) is None  # a checkpoint at 30 needs every replica at step 30
    assert join_step(24, 8, 30, 0) is None  # the run ends before the next outer step: replay
    assert join_step(20, 8, 100, 0) is None  # a snapshot between outer steps (a checkpoint loaded there): replay


def test_checkfree_rebuild_is_the_gradient_norm_weighted_average_with_boosted_lr():
    cfg = tiny_model_config(n_layers=3)
    prev, lost, nxt = (build_stage(cfg, s, 3, 16, seed=s + 1) for s in range(3))
    received = [{"layers": [layer.state_dict() for layer in m.layers.values()], "grad_norm": g}
                for m, g in ((prev, 0.5), (nxt, 1.5))]
    w = SimpleNamespace(module=lost, lr_scale=1.0, sync=DDPSync(list(lost.parameters()), None, None, None, 1))
    apply("checkfree", received, w, "grad_norm", 1.1)
    a, b = weight(0.5, "grad_norm"), weight(1.5, "grad_norm")
    for name, p in lost.layers["1"].state_dict().items():
        want = (a * prev.layers["0"].state_dict()[name] + b * nxt.layers["2"].state_dict()[name]) / (a + b)
        assert torch.allclose(p, want)
    assert w.lr_scale == pytest.approx(1.1)
    assert weight(2.0, "grad_norm_sq") == pytest.approx(4.0001) and weight(7.0, "uniform") == 1.0


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 5, 6])
def test_swap_routes_run_every_block_once_in_order_and_hop_at_most_two_stages(stages):
    kinds = set()
    for index in range(8):
        route = swap_route(stages, index)
        blocks = [(s, b) for s, parts in route for b in parts]
        assert blocks[0] == (0, "E") and blocks[-1] == (stages - 1, "H")
        layers = [s for s, b in blocks if b == "L"]
        assert sorted(layers) == list(range(stages))
        assert all(abs(a[0] - b[0]) <= 2 for a, b in zip(route, route[1:]))
        kinds.add(tuple(layers))
        if index % 2 == 0:
            assert layers == list(range(stages))
    if stages >= 2:  # both edges get swapped at some point: the first two and the last two
        assert any(k[:2] == (1, 0) for k in kinds) and any(k[-2:] == (stages - 1, stages - 2) for k in kinds)


def test_timeouts_must_nest():
    cfg = load_config(["parallel.timeout_s=100", "recovery.heartbeat_s=0.5"])
    good = {"heartbeat_timeout_s": 2.0, "join_timeout_s": 30.0, "replicas": 2, "stages": 2}
    check_timeouts(cfg, good)
    for bad in ({**good, "heartbeat_timeout_s": 1.0}, {**good, "join_timeout_s": 200.0}, {**good, "replicas": 3},
                {**good, "join_timeout_s": 6.0}):  # the phase margin (5 s) must fit between heartbeat and join
        with pytest.raises(ConfigError):
            check_timeouts(cfg, bad)
