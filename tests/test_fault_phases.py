"""Faults in every phase of the recovery runtime, with real processes on loopback: a kill while a generation
forms, a generation with no survivor (resumes from the newest sealed checkpoint), an evicted worker that wakes
up after its replacement took over (writes nothing), a kill during a checkpoint save, a store client without
the secret, and the checkpoint retention rule."""
import json
import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from metrics import read_jsonl, read_log, truncate_jsonl
from recovery import checkpoint
from recovery.coordinator import SignedStore
from tests.faults import fault_env, faults_env
from tests.procs import run, train_cmd
from tests.test_recovery import TINY, check_ledger, final_weights


def no_tracebacks(c):
    for p in c.workers:
        text = open(p.log_path).read()
        assert "Traceback" not in text and "frame #" not in text, text[-3000:]


def metrics_steps(run_dir):
    return [r["step"] for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


@pytest.mark.parametrize("point", ["forming", "connecting"])
def test_kill_while_the_next_generation_forms(cluster, point):
    """Replica 1 stage 0 dies mid-step 6; while generation 2 forms its world (or builds its groups), replica 0
    stage 1 dies too. Survivors must not crash or wait out the group timeout (a failed world must not leave
    ranks naming their groups differently): generation 3 copies both stages and the run ends."""
    c = cluster("forming", 2, 2, "parallel.timeout_s=120")
    faults = faults_env({"point": "step", "action": "kill", "step": 6, "grid_rank": 2},
                        {"point": point, "action": "kill", "gen": 2, "grid_rank": 1})
    workers = [c.worker(env=faults) for _ in range(4)]
    c.wait_for(lambda: sum(p.poll() is not None for p in workers) == 1, what="the first victim")
    replacement = c.worker()
    c.wait_for(lambda: sum(p.poll() is not None for p in workers) == 2, timeout=60, what="a death while forming")
    replacement2 = c.worker()
    t0 = time.monotonic()
    codes = c.wait_all([p for p in workers if p.poll() is None] + [replacement, replacement2])
    assert codes == [0, 0, 0, 0], c.tail()
    assert time.monotonic() - t0 < 60  # no survivor sat out a 120 s group timeout
    assert sorted(p.returncode for p in workers if p.returncode) == [-signal.SIGKILL] * 2
    gens = {e["gen"] for e in c.events("resumed")}
    assert max(gens) >= 3
    assert sorted((e["replica"], e["stage"], e["method"]) for e in c.events("rebuilt") if e["gen"] == max(gens)) == \
        [(0, 1, "copy"), (1, 0, "copy")]
    check_ledger(c.run_dir, 2)
    no_tracebacks(c)


def test_no_survivor_resumes_from_the_newest_sealed_checkpoint(cluster, tmp_path):
    """Both workers of a 1 x 2 run are killed after step 12 (checkpoints every 5 steps): the replacements resume
    from the newest sealed checkpoint, not from step 0; ledger and metrics are rolled back to it, and the
    final weights equal a run that never failed."""
    common = ["checkpoint.every=5", "checkpoint.keep=0", "train.steps=40"]
    c = cluster("nosurvivor", 1, 2, *common)
    workers = [c.worker() for _ in range(2)]
    c.wait_for(lambda: len(metrics_steps(c.run_dir)) >= 12, what="12 steps")
    for p in workers:
        p.kill()
        p.wait()
    sealed = max(int(n.split("_")[1]) for n in os.listdir(os.path.join(c.run_dir, "checkpoints"))
                 if n.startswith("step_"))
    assert c.wait_all([c.worker() for _ in range(2)]) == [0, 0], c.tail()
    resumed = c.events("resumed")
    assert sealed >= 10 and {(e["step"], os.path.basename(e["checkpoint"])) for e in resumed} == \
        {(sealed, f"step_{sealed:08d}")}
    check_ledger(c.run_dir, 1, steps=40)
    assert metrics_steps(c.run_dir) == list(range(1, 41))
    whole = cluster("nosurvivor-whole", 1, 2, *common)
    assert whole.wait_all([whole.worker() for _ in range(2)]) == [0, 0]
    a, b = final_weights(c.run_dir, tmp_path, 40), final_weights(whole.run_dir, tmp_path, 40)
    for k in a["replica0"]["model"]:
        assert torch.equal(a["replica0"]["model"][k], b["replica0"]["model"][k]), k
    no_tracebacks(c)


def test_evicted_worker_woken_after_its_replacement_writes_nothing(cluster):
    """Stage 0 (the ledger writer) stops itself mid-step 6 past the heartbeat timeout; its replacement takes the
    slot and trains on. Woken, the old worker must not append its in-flight step anywhere: it exits 2 saying it
    was declared dead, and ledger and metrics hold every step once."""
    c = cluster("zombie", 1, 2, "train.steps=40", "checkpoint.every=5", heartbeat_timeout=1.5)
    workers = [c.worker(env=fault_env("step", "stop", step=6, grid_rank=0)) for _ in range(2)]
    c.wait_for(lambda: c.events("detect"), timeout=60, what="the stopped worker to be declared dead")
    victim = next(p for p in workers if p.pid == next(e["pid"] for e in c.events("assigned") if e["stage"] == 0))
    replacement = c.worker()
    c.wait_for(lambda: len(metrics_steps(c.run_dir)) >= 12, timeout=120, what="the replacement to train on")
    ledger = os.path.join(c.run_dir, "ledger", "replica0.jsonl")
    lines_before = len(read_jsonl(ledger))
    victim.send_signal(signal.SIGCONT)
    assert victim.wait(timeout=60) == 2
    out = open(victim.log_path).read()
    assert "is not in generation" in out and "Traceback" not in out
    survivor = next(p for p in workers if p is not victim)
    assert c.wait_all([survivor, replacement]) == [0, 0], c.tail()
    check_ledger(c.run_dir, 1, steps=40)
    assert metrics_steps(c.run_dir) == list(range(1, 41))
    assert all(tuple(r["gen"])[1] >= 2 for r in read_jsonl(ledger)[lines_before:] if "samples" in r)


def test_kill_during_a_checkpoint_save_resumes_within_the_heartbeat_bound(cluster):
    """Rank 1 dies with its shards written and the step-10 checkpoint not yet sealed: the others were waiting in
    the save's barrier; they must leave it within the heartbeat timeout + the phase margin, not the group timeout."""
    c = cluster("saving", 1, 3, "checkpoint.every=10", "recovery.phase_margin_s=3", heartbeat_timeout=2.0)
    workers = [c.worker(env=fault_env("saving", step=10, rank=1)) for _ in range(4)]  # one waits as a spare
    c.wait_for(lambda: any(p.poll() is not None for p in workers), timeout=120, what="the victim")
    assert c.wait_all([p for p in workers if p.poll() is None]) == [0, 0, 0], c.tail()
    detect = c.events("detect")[0]["t"]
    resumed = [e["t"] for e in c.events("resumed") if e["gen"] == 2]
    assert len(resumed) == 3 and max(resumed) - detect < 2.0 + 3 + 3  # heartbeat timeout + margin + start-up
    root = os.path.join(c.run_dir, "checkpoints")
    assert not [n for n in os.listdir(root) if n.startswith(".tmp")]  # the abandoned save left nothing behind
    assert "step_00000014" in os.listdir(root)
    check_ledger(c.run_dir, 1)
    no_tracebacks(c)


def test_store_client_without_the_secret_cannot_end_a_generation_or_finish_the_run(cluster):
    """An intruder who knows the address and run id forges trouble reports, `left`, the epoch, a plan and
    `finished`: the run goes on in generation 1 and the spare keeps waiting until the real end."""
    c = cluster("intruder", 1, 1, "train.steps=300")
    worker, spare = c.worker(), None
    c.wait_for(lambda: len(metrics_steps(c.run_dir)) >= 3, what="training")
    spare = c.worker()
    c.wait_for(lambda: len(c.events("hello")) == 2, what="the spare's hello")
    raw = dist.TCPStore("127.0.0.1", c.port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=5))
    store = dist.PrefixStore("flotilla/flotilla/", raw)
    uid = c.events("assigned")[0]["uid"]
    store.set(f"trouble/1/{uid}", "1")
    store.set(f"left/{uid}", "done")
    store.set("epoch", "7")
    store.set("plan/2", json.dumps({"gen": 2, "members": {}, "active": [], "fresh": [], "idle": []}))
    store.set("finished", "1")
    forged = SignedStore(store, "not-the-secret", "flotilla")  # signed, but with the wrong key
    forged.put("finished", "1")
    forged.put(f"trouble/1/{uid}", "1")
    time.sleep(1.0)
    assert spare.poll() is None  # still waiting as a spare
    assert c.wait_all([worker, spare]) == [0, 0], c.tail()
    assert [e["event"] for e in c.events() if e["event"] in ("generation-ended", "re-formed")] == []
    assert c.events("tampered") and metrics_steps(c.run_dir) == list(range(1, 301))
    finished = c.events("run-finished")[0]["t"]
    assert os.path.getmtime(spare.log_path) >= finished - 0.5  # the spare left only when the run really ended


@pytest.mark.parametrize("keep,left", [(0, [2, 4, 6]), (1, [6])])
def test_checkpoint_keep(tmp_path, corpus_cache, keep, left):
    run_dir = str(tmp_path / f"keep{keep}")
    run(train_cmd(1, *TINY, "parallel.replicas=1", "parallel.stages=1", "train.steps=6", "checkpoint.every=2",
                  f"checkpoint.keep={keep}",
                  f"data.cache_dir={corpus_cache}", f"log.run_dir={run_dir}"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [f"step_{s:08d}" for s in left]


def test_read_log_ignores_records_of_ended_generations(tmp_path):
    """A rollback marker drops the replayed steps; a record from an older generation after it (a fenced worker
    that woke up) is ignored; a generation of a later launch wins over any of an earlier one."""
    path = str(tmp_path / "ledger.jsonl")
    rows = [{"step": s, "gen": [1.0, 1]} for s in range(5)]
    rows += [{"rollback": 3, "gen": [1.0, 2]}, {"step": 3, "gen": [1.0, 2]}, {"step": 4, "gen": [1.0, 1]},
             {"step": 4, "gen": [1.0, 2]}, {"rollback": 5, "gen": [2.0, 1]}, {"step": 5, "gen": [2.0, 1]}]
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3, 4, 5]
    truncate_jsonl(path, 4, [2.0, 2])
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3]
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": 9, "gen": [2.0, 1]}) + "\n")  # a zombie of the generation before
    assert [r["step"] for r in read_log(path)] == [0, 1, 2, 3]


@pytest.mark.parametrize("differ,expected", [(False, 319), (True, 300)])
def test_salvage_set_between_outer_steps_needs_every_replica(tmp_path, differ, expected):
    """The coordinator died while DiLoCo replica 1 replayed behind replica 0: replica 0 saved its stages at step
    319, replica 1 at 318, and each rank also its snapshot of the outer step at 300. Under DDP (replicas identical)
    the set at 319 is complete; under DiLoCo / NoLoCo replica 1 must not take replica 0's state at 319 (its step
    318 would be missing from its ledger): the newest set is the outer step at 300, where any replica's stage will do
    (replica 1 stage 1 died: it saved nothing)."""
    root = str(tmp_path)

    def put(step, replica, stage, at_outer):
        extra = {"stages": 2, "lanes": 1, "replicas_differ": differ, "at_outer_step": at_outer}
        checkpoint.salvage_state(root, step, {"model": {}, "optim": {}, "extra": extra}, (replica, stage, 0))

    for stage in range(2):
        put(319, 0, stage, False)
        put(300, 0, stage, True)
    put(318, 1, 0, False)
    put(300, 1, 0, True)
    assert checkpoint.choose(root, "latest", print) == os.path.join(root, "salvage", f"step_{expected:08d}")


def test_coordinator_death_while_a_generation_forms_keeps_the_survivors_state(cluster, tmp_path):
    """2 replicas x 1 stage, no checkpoints: replica 1 dies and no replacement comes; while replica 0 waits for
    the next plan the coordinator dies too. Replica 0 saves its own state (salvage) and says so in one line;
    a relaunch with checkpoint.resume=latest resumes from that step, not from step 0, and ends bitwise equal to
    a run that never failed."""
    common = ["train.steps=30"]
    c = cluster("salvage", 2, 1, *common)
    workers = [c.worker() for _ in range(2)]
    c.wait_for(lambda: len(metrics_steps(c.run_dir)) >= 8, what="8 steps")
    victim = next(p for p in workers if p.pid == next(e["pid"] for e in c.events("assigned") if e["replica"] == 1))
    victim.kill()
    c.wait_for(lambda: c.events("generation-ended"), what="the generation to end")
    time.sleep(1.0)  # replica 0 is waiting for a plan that needs a replacement
    c.coordinator.kill()
    c.coordinator.wait()
    survivor = next(p for p in workers if p is not victim)
    assert survivor.wait(timeout=60) == 2
    out = open(survivor.log_path).read()
    assert "is gone; saved this rank's state at step" in out and "Traceback" not in out
    step = int(out.split("state at step ")[1].split()[0])
    assert step >= 8
    c.restart_coordinator()
    assert c.wait_all([c.worker("checkpoint.resume=latest") for _ in range(2)]) == [0, 0], c.tail()
    resumed = [e for e in c.events("resumed") if e.get("checkpoint")]
    assert resumed and resumed[-1]["step"] == step and "salvage" in resumed[-1]["checkpoint"]
    check_ledger(c.run_dir, 2, steps=30)
    whole = cluster("salvage-whole", 2, 1, *common)
    assert whole.wait_all([whole.worker() for _ in range(2)]) == [0, 0]
    a, b = final_weights(c.run_dir, tmp_path, 30), final_weights(whole.run_dir, tmp_path, 30)
    for k in a["replica0"]["model"]:
        assert torch.equal(a["replica0"]["model"][k], b["replica0"]["model"][k]), k


def test_worker_frozen_while_a_generation_forms_wakes_into_the_next(cluster):
    """Replica 0 stage 0 stops itself as generation 1 forms its world and stays stopped past the heartbeat timeout:
    the coordinator ends generation 1 while the others wait for it. Woken before a replacement arrives, it must
    not join generation 1 nor send on its groups (the others may hold receives they abandoned there, and gloo
    aborts a process that gets data of another size): it first hears from the coordinator, finds its generation
    ended, and exits 2 when generation 2 forms without it; every other worker finishes the run."""
    c = cluster("frozen-forming", 2, 2, "train.steps=100", heartbeat_timeout=1.5)
    workers = [c.worker(env=fault_env("forming", "stop", gen=1, grid_rank=0)) for _ in range(4)]
    c.wait_for(lambda: c.events("generation-ended"), timeout=60, what="generation 1 to end")
    victim = next(p for p in workers if p.pid == next(e["pid"] for e in c.events("assigned") if e["stage"] == 0
                                                      and e["replica"] == 0))
    time.sleep(0.3)
    victim.send_signal(signal.SIGCONT)
    time.sleep(1.0)
    replacement = c.worker()
    assert victim.wait(timeout=60) == 2
    assert "is not in generation 2" in open(victim.log_path).read()
    assert c.wait_all([p for p in workers if p is not victim] + [replacement]) == [0, 0, 0, 0], c.tail()
    assert {e["gen"] for e in c.events("resumed")} == {2}
    check_ledger(c.run_dir, 2, steps=100)
    no_tracebacks(c)
