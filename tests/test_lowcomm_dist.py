"""DDP / DiLoCo / NoLoCo / EF21 over real processes (gloo on loopback)."""
import json
import os

import pytest
import torch

from tests.faults import fault_env
from tests.procs import run, torchrun_cmd, train_cmd
from tests.test_resume import check_identical, final_weights, run_killed_and_resumed
from metrics import read_log


def test_ef21_variants_keep_one_g_equal_to_the_mean_of_g_i(tmp_path):
    run(torchrun_cmd(3, "tests/workers/ef21_group.py", str(tmp_path)))
    results = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(3)]
    for name, res in results[0].items():
        assert all(res["same"]), name  # every rank holds the identical g, every round
        if not name.startswith("ef14"):
            assert max(res["invariant"]) < 1e-5, name  # g == mean_i g_i
    # bytes per compressed round against a dense fp32 all-reduce, 3 workers, K/d = 1%:
    # Top-K all-gathers 6 bytes per kept value (fp32 + int16 offset) from each of the other 2 ranks:
    # (4/3 * 4 d) / (2 * 0.01 d * 6) = 44x; Rand-K all-reduces only the shared 1% (100x);
    # int8 all-gathers a byte per value plus a scale per chunk (2.66x)
    for kind in ("ef21", "ef21sgdm", "ef14"):
        assert results[0][f"{kind}-topk"]["ratio"] == pytest.approx(4 / 3 / (0.01 * 6 / 4 * 2), rel=0.01)
        assert results[0][f"{kind}-randk"]["ratio"] == pytest.approx(100, rel=0.01)
        assert results[0][f"{kind}-int8"]["ratio"] == pytest.approx(4 / 3 * 4 * 5000 / (2 * 5008), rel=0.01)


LOWCOMM = ["parallel.replicas=2", "parallel.stages=2", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
           "model.n_kv_heads=1", "data.seq_len=64", "train.batch_size=4", "parallel.microbatches=2",
           "train.steps=12", "log.eval_every=0", "log.log_every=4", "checkpoint.every=0"]


def summary_of(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return json.load(fh)


@pytest.mark.parametrize("extra,collectives", [
    (["sync.H=4"], lambda syncs: syncs),  # one fp32 all-reduce per outer step
    (["sync.H=4", "sync.fragments=2", "sync.precision=int4"], lambda syncs: 2 * syncs),  # values + scales
    (["sync.H=4", "sync.compress=ef21-topk", "sync.outer_momentum=0"], lambda syncs: 1 + 2 * (syncs - 1)),  # dense, then values + offsets
    # every step, each replica's own AdamW update through EF14 (bench/lowcomm.py's adamw-update+ef14-top1%)
    (["sync.H=1", "sync.outer_lr=1", "sync.outer_momentum=0", "sync.compress=ef14-topk"], lambda syncs: 2 * syncs),
    # the same after 3 dense warm-up steps (one fp32 all-reduce each): the compressed per-step AdamW
    (["sync.H=1", "sync.outer_lr=1", "sync.outer_momentum=0", "sync.compress=ef14-topk", "sync.dense_warmup=3"],
     lambda syncs: 3 + 2 * (syncs - 3)),
    # SparseLoCo: one all-gather of the 2-bit Top-K byte buffer per outer step
    (["sync.H=4", "sync.compress=sparseloco", "sync.outer_momentum=0", "sync.ratio=0.05", "sync.chunk=512"],
     lambda syncs: syncs),
])
def test_diloco_replicas_identical_after_every_outer_step(tmp_path, corpus_cache, extra, collectives):
    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=diloco", *extra, f"data.cache_dir={corpus_cache}",
                  f"log.run_dir={run_dir}"))
    for stage in (0, 1):  # ranks: replica-major, so stage s is rank s on replica 0 and 2 + s on replica 1
        a = read_log(os.path.join(run_dir, "sync", f"rank{stage}.jsonl"))
        b = read_log(os.path.join(run_dir, "sync", f"rank{2 + stage}.jsonl"))
        assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) >= 3
        assert [r["digest"] for r in a] == [r["digest"] for r in b]
    syncs = sum(len(r["fragments"]) for r in read_log(os.path.join(run_dir, "sync", "rank1.jsonl")))
    assert summary_of(run_dir)["collectives"]["cross_replica"] == collectives(syncs)  # rank 1 writes the summary


def test_noloco_makes_no_collective_across_replicas(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=noloco", "sync.H=4", f"data.cache_dir={corpus_cache}",
                  f"log.run_dir={run_dir}"))
    s = summary_of(run_dir)
    assert "cross_replica" not in s["collectives"]  # the comm layer saw no cross-replica collective
    assert s["p2p"]["cross_replica"] == 3  # one pair exchange per outer step (steps 4, 8, 12)
    assert s["bytes_sent"]["cross_replica"] > 0


def test_ddp_ef21_sends_far_fewer_bytes_than_ddp(tmp_path, corpus_cache):
    dense, ef = str(tmp_path / "dense"), str(tmp_path / "ef")
    run(train_cmd(4, *LOWCOMM, f"data.cache_dir={corpus_cache}", f"log.run_dir={dense}"))
    run(train_cmd(4, *LOWCOMM, "sync.compress=ef21-topk", f"data.cache_dir={corpus_cache}", f"log.run_dir={ef}"))
    assert summary_of(dense)["bytes_sent"]["cross_replica"] > 8 * summary_of(ef)["bytes_sent"]["cross_replica"]


@pytest.mark.parametrize("sync", [["sync.method=diloco", "sync.H=4"], ["sync.compress=ef21sgdm-topk", "optim.beta1=0"]])
def test_resume_restores_sync_state_bitwise(tmp_path, corpus_cache, sync):
    """Kill mid-round (after the step-5 checkpoint): DiLoCo's anchor/momentum and EF21's g_i/g/v come back."""
    killed, whole = run_killed_and_resumed(tmp_path, corpus_cache, 2,
                                           ["parallel.replicas=2", "parallel.stages=1", *sync])
    check_identical(tmp_path, killed, whole, replicas=2)
    saved = set(final_weights(killed, 12, tmp_path))
    assert saved == ({"replica0", "replica1"} if "sync.method=diloco" in sync else {"replica0"})  # DDP: one copy


def test_ef21_state_resets_to_a_dense_round_when_the_replica_count_changes(tmp_path, corpus_cache):
    """The documented reset rule: resumed with 3 replicas from a 2-replica checkpoint, EF21 starts over
    with one dense all-reduce, then 2 all-gathers (values, offsets) per step."""
    from tests.test_resume import TINY
    run_dir = str(tmp_path / "run")
    common = [*TINY, "parallel.stages=1", "sync.compress=ef21-topk", f"data.cache_dir={corpus_cache}",
              f"log.run_dir={run_dir}", "train.steps=8"]
    first = run(train_cmd(2, *common, "parallel.replicas=2"), check=False, env=fault_env("step", step=6))
    assert first.returncode != 0
    run(train_cmd(3, *common, "parallel.replicas=3", "checkpoint.resume=latest"))
    assert summary_of(run_dir)["collectives"]["cross_replica"] == 1 + 2 * 2  # steps 5, 6, 7
    same = str(tmp_path / "same")  # control: same replica count, the state is restored (no dense round)
    run(train_cmd(2, *[c for c in common if not c.startswith("log.run_dir")], f"log.run_dir={same}",
                  "parallel.replicas=2", "train.steps=5"))
    run(train_cmd(2, *[c for c in common if not c.startswith("log.run_dir")], f"log.run_dir={same}",
                  "parallel.replicas=2", "checkpoint.resume=latest"))
    assert summary_of(same)["collectives"]["cross_replica"] == 2 * 3


def test_noloco_final_average_leaves_one_model(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=noloco", "sync.H=4", "sync.final_average=true",
                  f"data.cache_dir={corpus_cache}", f"log.run_dir={run_dir}"))
    assert summary_of(run_dir)["collectives"]["cross_replica"] == 1  # the one export all-reduce
    for stage in (0, 1):
        a = read_log(os.path.join(run_dir, "sync", f"rank{stage}.jsonl"))[-1]
        b = read_log(os.path.join(run_dir, "sync", f"rank{2 + stage}.jsonl"))[-1]
        assert a["step"] == 12 and a["fragments"] == [0, "average"] and a["digest"] == b["digest"]
    weights = final_weights(run_dir, 12, tmp_path)
    for k, t in weights["replica0"]["model"].items():
        assert torch.equal(t, weights["replica1"]["model"][k]), k


@pytest.mark.parametrize("method", ["diloco"])  # NoLoCo takes the same path (measured: 5.3 vs 2.5 before the fix)
def test_resume_with_another_replica_count_continues_from_the_trained_model(tmp_path, corpus_cache, method):
    """Killed after the step-30 checkpoint and resumed with 2 -> 1 and 1 -> 2 replicas: the outer state comes
    from the saved one (a new replica takes replica 0's) or from the loaded weights, never from the initial
    weights, so the first outer step after the resume moves the weights no more than a normal one does (from
    the initial weights it would move them by all 35 steps of training at once)."""
    from tests.test_resume import TINY
    common = [*TINY, "parallel.stages=1", f"sync.method={method}", "sync.H=5", "train.steps=40",
              "optim.warmup_steps=5", "checkpoint.every=30", f"data.cache_dir={corpus_cache}"]

    def moved(run_dir, rank=0):
        return {r["step"]: r["moved"] for r in read_log(os.path.join(run_dir, "sync", f"rank{rank}.jsonl"))}

    ref = str(tmp_path / "ref")
    run(train_cmd(2, *common, "parallel.replicas=2", f"log.run_dir={ref}"))
    normal = moved(ref)
    assert sorted(normal) == list(range(5, 41, 5)) and min(normal.values()) > 0
    for before, after in ((2, 1), (1, 2)):
        run_dir = str(tmp_path / f"{before}to{after}")
        first = run(train_cmd(before, *common, f"parallel.replicas={before}", f"log.run_dir={run_dir}"), check=False,
                    env=fault_env("step", step=31))
        assert first.returncode != 0
        run(train_cmd(after, *common, f"parallel.replicas={after}", f"log.run_dir={run_dir}",
                      "checkpoint.resume=latest"))
        for rank in range(after):
            resumed = moved(run_dir, rank)
            assert sorted(resumed) == list(range(5 if rank < before else 35, 41, 5))
            assert resumed[35] <= 1.5 * max(normal.values()), (before, after, rank, resumed, normal)
        taken = [s for r in range(max(before, after)) for x in read_log(os.path.join(run_dir, "ledger", f"replica{r}.jsonl"))
                 for s in x["samples"]]  # the resumed run reads on from where the data stream stopped
        assert len(taken) == len(set(taken)) == 30 * before * 4 + 10 * after * 4


def test_sparseloco_bytes_are_its_wire_format(tmp_path, corpus_cache):
    """Cross-replica bytes = outer steps x (n - 1) x the byte buffer of each stage's parameters (rank 1: stage 1)."""
    from config import load_config
    from model.stages import build_stage
    from optim.sparseloco import wire_bytes
    from recovery.state import model_config
    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=diloco", "sync.H=4", "sync.compress=sparseloco", "sync.outer_momentum=0",
                  "sync.ratio=0.02", "sync.chunk=1024", f"data.cache_dir={corpus_cache}", f"log.run_dir={run_dir}"))
    cfg = load_config(LOWCOMM)
    stage1 = build_stage(model_config(cfg, 257), 1, 2, cfg.data.seq_len, 0)  # the byte tokenizer's 257 symbols
    d = sum(p.numel() for p in stage1.parameters())
    assert summary_of(run_dir)["bytes_sent"]["cross_replica"] == 3 * 1 * wire_bytes(d, 0.02, 1024)


def test_overlapped_diloco_lands_every_exchange_and_ends_with_one_model(tmp_path, corpus_cache):
    """sync.overlap=2: the exchanges started at steps 4 and 8 land at 6 and 10 (the replicas then differ by
    their local steps since), the one started at the last step lands at once: the replicas end identical."""
    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=diloco", "sync.H=4", "sync.overlap=2", f"data.cache_dir={corpus_cache}",
                  f"log.run_dir={run_dir}"))
    for stage in (0, 1):
        a = read_log(os.path.join(run_dir, "sync", f"rank{stage}.jsonl"))
        b = read_log(os.path.join(run_dir, "sync", f"rank{2 + stage}.jsonl"))
        assert [r["step"] for r in a] == [r["step"] for r in b] == [6, 10, 12]
        assert a[0]["digest"] != b[0]["digest"] and a[-1]["digest"] == b[-1]["digest"]
    assert summary_of(run_dir)["collectives"]["cross_replica"] == 3
