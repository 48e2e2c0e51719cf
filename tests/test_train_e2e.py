"""The main job for real: torchrun, 2 replicas x 2 stages (gloo), the default corpus, TensorBoard logs."""
import glob
import json
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.procs import run, train_cmd


def scalars(path: str) -> dict:
    """Every scalar of a TensorBoard log folder as (step, value) pairs."""
    acc = EventAccumulator(path)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_2x2_torchrun_learns_well_below_unigram_entropy(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    proc = run(train_cmd(4, f"log.run_dir={run_dir}", f"data.cache_dir={corpus_cache}", "train.steps=200",
                         "train.batch_size=8", "optim.warmup_steps=20", "log.eval_every=100",
                         "log.eval_batches=4", "checkpoint.every=100"), timeout=600)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["world_size"] == 4
    assert summary["val_loss"] < summary["unigram_entropy"] - 0.5, summary  # context is being used, not just byte counts
    assert summary["bytes_sent"]["cross_replica"] > 0 and summary["bytes_sent"]["intra_replica"] > 0

    progress = [ln for ln in proc.stdout.splitlines() if ln.startswith("step ") and "tok/s" in ln]
    assert len(progress) == 20 and "loss" in progress[-1]
    assert len([ln for ln in proc.stdout.splitlines() if "val loss" in ln]) == 2

    train = scalars(os.path.join(run_dir, "tb", "train"))
    for tag in ("train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/loss", "val/ppl"):
        assert tag in train, tag
    assert train["train/loss"][-1][1] < train["train/loss"][0][1]
    replica_losses = []
    for rank in range(4):  # each rank reports its own bytes per link class; a last stage its replica's loss
        comm = scalars(os.path.join(run_dir, "tb", f"rank{rank}"))
        assert comm["comm/bytes_cross_replica"][-1][1] > 0
        if "train/replica_loss" in comm:
            replica_losses.append([v for _, v in comm["train/replica_loss"]])
    assert len(replica_losses) == 2 and all(len(r) == 20 for r in replica_losses)
    assert replica_losses[0] != replica_losses[1]  # each replica's own batches
    ledgers = sorted(glob.glob(os.path.join(run_dir, "ledger", "*.jsonl")))
    assert [os.path.basename(p) for p in ledgers] == ["replica0.jsonl", "replica1.jsonl"]
    seen = [set(s for line in open(p) for s in json.loads(line)["samples"]) for p in ledgers]
    assert not seen[0] & seen[1]  # replicas read disjoint shards
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000100", "step_00000200"]
