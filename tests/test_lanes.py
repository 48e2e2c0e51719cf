"""Lanes: a stage on several devices that split each batch's documents by the SP plan (Ulysses in groups > 1)."""
import json
import os

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data.loader import make_batch
from dist.lanes import IGNORE, lane_microbatches, plan_batch, segments
from dist.sp_cost import SPCost
from dist.sp_planner import PlanError
from dist.topology import Topology
from metrics import read_log
from tests.procs import run, torchrun_cmd, train_cmd

# Lanes hold 100 tokens: a 128-token document piece needs a group of 2, shorter ones fit on one lane.
COST = SPCost(quad=1e-7, lin=2e-5, bytes_per_token=4096.0, bandwidth=2e8, tokens_per_lane=100, latency=2e-3)
TINY = ["model.dim=32", "model.n_layers=2", "data.seq_len=128", "train.batch_size=4", "parallel.replicas=1",
        "parallel.stages=2", "parallel.microbatches=1", "train.steps=3", "checkpoint.every=1", "checkpoint.keep=5",
        "optim.grad_clip=0", "log.eval_every=3", "log.log_every=1"]


def test_topology_with_lanes_keeps_lane_one_numbering():
    flat, wide = Topology(2, 3), Topology(2, 3, lanes=4)
    assert [flat.rank(r, s) for r in range(2) for s in range(3)] == list(range(6))
    ranks = [wide.rank(r, s, ln) for r in range(2) for s in range(3) for ln in range(4)]
    assert ranks == list(range(24)) and wide.world_size == 24
    assert all((wide.slot(k), wide.lane(k)) == ((r, s), ln) for k, (r, s, ln) in
               zip(ranks, [(r, s, ln) for r in range(2) for s in range(3) for ln in range(4)]))
    assert wide.lane_ranks(1, 2) == [20, 21, 22, 23] and wide.stage_ranks(1, 3) == [7, 19]


@pytest.mark.parametrize("mode", ["adaptive", "static:1", "static:2", "static:4"])
def test_lane_shards_cover_every_token_once(mode):
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(1, 50, (6, 129), generator=g).numpy()
    windows[:3][windows[:3] % 9 == 0] = 0  # end-of-document tokens in rows 0-2: pieces of many lengths
    windows[4, 100] = 0  # rows 3 and 5: one 128-token piece each
    batch = make_batch(windows, list(range(6)), eos=0)
    segs = segments(batch)
    assert sum(s.length for s in segs) == batch.n_tokens
    if mode == "static:1":  # 128-token pieces do not fit one lane of 100 tokens
        with pytest.raises(PlanError, match="needs an SP group of 2 lanes .* use parallel.sp=adaptive or static:2"):
            plan_batch(segs, 4, mode, COST, None)
        return
    planned = plan_batch(segs, 4, mode, COST, None)
    per_lane = [lane_microbatches(batch, segs, planned, lane) for lane in range(4)]
    seen = []
    for m, groups in enumerate(planned.microbatches):
        for grp in groups:
            for k in grp.seqs:
                seg = segs[k]
                tokens = []
                for lane in range(grp.start, grp.start + grp.size):  # the lanes' slices, in order
                    one = per_lane[lane][m].per_sequence()[grp.seqs.index(k)]
                    i, (c,) = lane - grp.start, one.chunks
                    assert one.positions[0].tolist() == list(range(i * c, i * c + c))
                    tokens += [(int(x), int(y)) for x, y in zip(one.inputs[0], one.targets[0])]
                real = [(int(x), int(y)) for x, y in zip(batch.inputs[seg.row, seg.start:seg.end],
                                                          batch.targets[seg.row, seg.start:seg.end])]
                assert tokens[:seg.length] == real and all(y == IGNORE for _, y in tokens[seg.length:])
                seen.append(k)
            lanes = [per_lane[lane][m] for lane in range(grp.start, grp.start + grp.size)]
            if grp.seqs:  # the all-to-all's order: the lanes' tokens in lane order; in it every sequence is in order
                order = torch.cat([torch.repeat_interleave(torch.arange(len(grp.seqs)), torch.tensor(mb.chunks))
                                   for mb in lanes])
                places = torch.cat([mb.positions[0] for mb in lanes])
                assert all(torch.equal(mb.gathered_doc_ids()[0], order) for mb in lanes)
                assert all(places[order == j].tolist() == list(range(len(places[order == j])))
                           for j in range(len(grp.seqs)))
    assert sorted(seen) == list(range(len(segs)))
    assert max(grp.size for groups in planned.microbatches for grp in groups if grp.seqs) >= 2  # 128-token pieces


def test_packed_groups_equal_their_sequences_run_one_at_a_time(tmp_path):
    """2 lanes (real processes): a pass with one group of both lanes holding 5 sequences of 1-30 tokens (padded
    slices) and a pass with a group per lane; packed (one call, one all-to-all per layer) equals the sequences
    run one at a time, and the lanes' sum equals one device on the whole batch (loss and gradients; flex: forward)."""
    run(torchrun_cmd(2, "tests/workers/packed_lanes.py", str(tmp_path)))
    for lane in range(2):
        with open(os.path.join(tmp_path, f"rank{lane}.json")) as fh:
            errors = json.load(fh)
        assert max(errors["sdpa"].values()) < 1e-5 and errors["flex"]["out"] < 1e-5, (lane, errors)


def checkpoint_state(run_dir, step, tmp_path):
    out = os.path.join(tmp_path, f"{os.path.basename(run_dir)}-{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), out)
    return torch.load(out, weights_only=False)["replica0"]


def test_sp_training_equals_training_without_sp(tmp_path):
    """2 stages x 2 lanes, adaptive (groups of 1 and 2 in one step; planned one step ahead and broadcast, or by every
    rank in the step) and static:2, against 2 stages on one lane: the same losses, gradients (Adam's first moment
    after step 1 = 0.1 x gradient) and weights."""
    cost, docs = str(tmp_path / "cost.json"), tmp_path / "docs"
    COST.save(cost)
    docs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):  # documents of 10-400 characters: windows hold pieces of many lengths
        words = rng.choice(["lane", "stage", "replica", "token", "plan", "group"], int(rng.integers(2, 70)))
        (docs / f"doc{i}.txt").write_text(" ".join(words))
    common = TINY + [f"data.cache_dir={tmp_path / 'cache'}", f"parallel.sp_cost={cost}", "data.source=path",
                     f"data.path={docs}", "data.val_percent=10"]
    ref = str(tmp_path / "ref")
    run(train_cmd(2, *common, f"log.run_dir={ref}"))
    ref_steps = [r for r in read_log(os.path.join(ref, "metrics.jsonl")) if "loss" in r]
    ref_state = {s: checkpoint_state(ref, s, tmp_path) for s in (1, 3)}
    groups_by_mode = {}
    for mode, ahead in (("adaptive", "true"), ("adaptive", "false"), ("static:2", "true")):
        out = str(tmp_path / f"{mode.replace(':', '')}-{ahead}")
        proc = run(train_cmd(4, *common, "parallel.lanes=2", f"parallel.sp={mode}", f"parallel.sp_plan_ahead={ahead}",
                             f"log.run_dir={out}"))
        assert f"x 2 lanes (sp {mode})" in proc.stdout
        steps = [r for r in read_log(os.path.join(out, "metrics.jsonl")) if "loss" in r]
        assert len(steps) == 3
        for mine, theirs in zip(steps, ref_steps):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5)
            assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
            assert len(mine["sp_groups"]) >= 3  # 512 tokens on 2 lanes of 100: several passes
            assert mine["sp_predicted_s"] > 0 and mine["sp_measured_s"] > 0 and mine["sp_imbalance"] >= 1
        sizes = {d for r in steps for groups in r["sp_groups"] for d in groups}
        assert sizes == ({1, 2} if mode == "adaptive" else {2})
        groups_by_mode[mode, ahead] = [r["sp_groups"] for r in steps]
        assert all(r["sp_plan_wait_s"] >= 0 for r in steps) and (ahead == "true" or {r["sp_plan_wait_s"] for r in steps} == {0})
        for s in (1, 3):
            state = checkpoint_state(out, s, tmp_path)
            for name, w in ref_state[s]["model"].items():
                assert torch.allclose(state["model"][name], w, atol=2e-6), (mode, s, name)
        first = checkpoint_state(out, 1, tmp_path)["optim"]
        for name, st in ref_state[1]["optim"].items():
            assert torch.allclose(first[name]["exp_avg"], st["exp_avg"], atol=1e-7, rtol=1e-4), (mode, name)
        assert set(os.listdir(os.path.join(out, "ledger"))) == {"replica0.jsonl"}  # one ledger: lane 0 of stage 0
        tb = EventAccumulator(os.path.join(out, "tb", "train")).Reload()
        assert {"sp/predicted_s", "sp/measured_s", "sp/imbalance", "sp/largest_group"} <= set(tb.Tags()["scalars"])
    # planned one step ahead on one rank per replica and broadcast: the plans every rank ran are the ones every
    # rank computes for itself (the run's losses above match the single-lane run either way)
    assert groups_by_mode["adaptive", "true"] == groups_by_mode["adaptive", "false"]


def test_lanes_under_diloco_with_ef21_lane_sync_keep_every_rank_identical(tmp_path, corpus_cache):
    """2 replicas x 1 stage x 2 lanes, DiLoCo across replicas and EF21 Top-K across lanes: after each outer step
    all four ranks hold the same bits (lanes share one EF21 estimate; replicas average per lane)."""
    cost = str(tmp_path / "cost.json")
    COST.save(cost)
    out = str(tmp_path / "run")
    run(train_cmd(4, "parallel.replicas=2", "parallel.stages=1", "parallel.lanes=2", "parallel.microbatches=1",
                  f"parallel.sp_cost={cost}", "model.dim=32", "model.n_layers=2", "data.seq_len=128",
                  "train.batch_size=4", "train.steps=10", "sync.method=diloco", "sync.H=5",
                  "sync.lane_compress=ef21-topk", "sync.ratio=0.1", "log.eval_every=0", "checkpoint.every=0",
                  f"data.cache_dir={corpus_cache}", f"log.run_dir={out}"))
    digests = [[(r["step"], r["digest"]) for r in read_log(os.path.join(out, "sync", f"rank{k}.jsonl"))]
               for k in range(4)]
    assert [s for s, _ in digests[0]] == [5, 10] and all(d == digests[0] for d in digests)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["bytes_sent"]["intra_stage"] > 0 and summary["collectives"]["cross_replica"] == 2


@pytest.mark.parametrize("method", ["ddp", "diloco"])
def test_a_lost_lane_is_copied_from_its_sibling_and_the_run_is_bitwise_unchanged(cluster, tmp_path, method):
    """Recovery with lanes, 2 replicas x 1 stage x 2 lanes: lane 1 of replica 1 dies mid-step 6. Its sibling lane
    holds the same weights, Adam and sync state, so the replacement is a copy of it: replica 1 replays only the
    in-flight step (no rewind under DiLoCo), every ledger holds each step once, and the final weights are the
    bits of a run that never failed."""
    from tests.test_recovery import check_ledger, final_weights, kill_and_replace
    cost = str(tmp_path / "cost.json")
    COST.save(cost)
    grid = ["parallel.microbatches=1", "model.n_layers=2", "data.seq_len=128", f"parallel.sp_cost={cost}",
            f"sync.method={method}", "sync.H=4", "checkpoint.every=14"]
    c = cluster(f"{method}-lane-killed", 2, 1, *grid, lanes=2)
    kill_and_replace(c, [3])
    assert [(e["replica"], e["stage"], e["lane"], e["method"]) for e in c.events("rebuilt")] == [(1, 0, 1, "lane")]
    resumed = {(e["rank"] // 2, e["step"]) for e in c.events("resumed") if e.get("gen") == 2}
    assert {step for r, step in resumed if r == 1} == {6}  # the in-flight step only, no rewind to the outer step 4
    assert all(step >= 6 for r, step in resumed if r == 0)
    check_ledger(c.run_dir, 2)
    whole = cluster(f"{method}-lane-whole", 2, 1, *grid, lanes=2)
    assert whole.wait_all([whole.worker() for _ in range(4)]) == [0] * 4
    a, b = final_weights(c.run_dir, tmp_path), final_weights(whole.run_dir, tmp_path)
    assert a.keys() == b.keys()
    for replica in a:
        for k, v in b[replica]["model"].items():
            assert torch.equal(a[replica]["model"][k], v), (replica, k)
