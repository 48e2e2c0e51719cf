"""Kill a real 2-stage run mid-step (SIGKILL), resume from the latest checkpoint: bitwise the same as never stopping."""
import os

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from metrics import read_log
from tests.faults import fault_env
from tests.procs import run, train_cmd

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64",
        "train.batch_size=4", "parallel.microbatches=2", "train.steps=12", "checkpoint.every=5",
        "log.eval_every=0", "log.log_every=4"]


def final_weights(run_dir, step, tmp_path):
    out = os.path.join(tmp_path, f"{os.path.basename(run_dir)}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step_{step:08d}"), out)
    return torch.load(out, weights_only=False)


def run_killed_and_resumed(tmp_path, cache, nproc, topo):
    killed, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
    common = TINY + topo + [f"data.cache_dir={cache}"]
    crashed = run(train_cmd(nproc, *common, f"log.run_dir={killed}"), check=False, env=fault_env("step", step=7))
    assert crashed.returncode != 0  # really died, mid-step 7 (after the step-5 checkpoint)
    ledger_before = read_log(os.path.join(killed, "ledger", "replica0.jsonl"))
    # steps 5, 6 ran but were never checkpointed; step 7 had taken its samples when it died
    assert [r["step"] for r in ledger_before] == list(range(8))
    resumed = run(train_cmd(nproc, *common, f"log.run_dir={killed}", "checkpoint.resume=latest"))
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout
    run(train_cmd(nproc, *common, f"log.run_dir={whole}"))
    return killed, whole


def check_identical(tmp_path, killed, whole, replicas):
    losses = [(r["step"], r["loss"]) for r in read_log(os.path.join(killed, "metrics.jsonl")) if "loss" in r]
    expected = [(r["step"], r["loss"]) for r in read_log(os.path.join(whole, "metrics.jsonl")) if "loss" in r]
    assert losses == expected and len(losses) == 12  # bitwise: floats compared exactly
    for r in range(replicas):
        got = read_log(os.path.join(killed, "ledger", f"replica{r}.jsonl"))
        want = read_log(os.path.join(whole, "ledger", f"replica{r}.jsonl"))
        assert [x["step"] for x in got] == list(range(12))
        assert [x["samples"] for x in got] == [x["samples"] for x in want]
        samples = [s for x in got for s in x["samples"]]
        assert len(samples) == len(set(samples))  # nothing repeated (and with the step list, nothing lost)
    a, b = final_weights(killed, 12, tmp_path), final_weights(whole, 12, tmp_path)
    assert a.keys() == b.keys() and "replica0" in a
    for ns in a:
        assert a[ns]["model"].keys() == b[ns]["model"].keys() and len(a[ns]["model"]) > 0
        for k in a[ns]["model"]:
            assert torch.equal(a[ns]["model"][k], b[ns]["model"][k]), k
        for k in a[ns]["optim"]:
            for name, t in a[ns]["optim"][k].items():
                assert torch.equal(t, b[ns]["optim"][k][name]), (k, name)


def test_resume_after_sigkill_two_stages_is_bitwise_identical(tmp_path, corpus_cache):
    killed, whole = run_killed_and_resumed(tmp_path, corpus_cache, 2, ["parallel.replicas=1", "parallel.stages=2"])
    check_identical(tmp_path, killed, whole, replicas=1)


def test_resume_single_process_is_bitwise_identical(tmp_path, corpus_cache):
    killed, whole = run_killed_and_resumed(tmp_path, corpus_cache, 1, ["parallel.replicas=1", "parallel.stages=1"])
    check_identical(tmp_path, killed, whole, replicas=1)


def test_resuming_a_finished_run_trains_nothing_and_exits_cleanly(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    common = TINY + ["parallel.replicas=1", "parallel.stages=1", f"data.cache_dir={corpus_cache}",
                     f"log.run_dir={run_dir}"]
    run(train_cmd(1, *common))
    again = run(train_cmd(1, *common, "checkpoint.resume=latest"))
    assert "resumed from" in again.stdout and "step_00000012" in again.stdout
    assert [r["step"] for r in read_log(os.path.join(run_dir, "ledger", "replica0.jsonl"))] == list(range(12))


def test_checkpoint_from_three_stages_resumes_on_two(tmp_path, corpus_cache):
    """Parameter names are global, so DCP re-shards: a 1 x 3 checkpoint continues as a 1 x 2 pipeline."""
    three, whole = str(tmp_path / "three"), str(tmp_path / "whole")
    common = [*TINY, "model.n_layers=3", "parallel.replicas=1", "train.steps=8", f"data.cache_dir={corpus_cache}"]
    run(train_cmd(3, *common, "parallel.stages=3", f"log.run_dir={whole}"))
    run(train_cmd(3, *common, "parallel.stages=3", "train.steps=5", f"log.run_dir={three}"))
    resumed = run(train_cmd(2, *common, "parallel.stages=2", f"log.run_dir={three}", "checkpoint.resume=latest"))
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout
    got = [r["loss"] for r in read_log(os.path.join(three, "metrics.jsonl")) if "loss" in r]
    want = [r["loss"] for r in read_log(os.path.join(whole, "metrics.jsonl")) if "loss" in r]
    assert len(got) == len(want) == 8
    # the same model, only split differently (all 8 steps are inside the 30-step warm-up, so the shorter
    # first run has the same learning rates)
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
