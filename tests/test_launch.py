"""Launch paths with real processes on loopback: two torchrun "nodes" through launch/multinode.sh, the commands
launch/slurm.sbatch builds, the spot node agent restarting a SIGKILLed worker, the TensorBoard layout and the plots."""
import json
import os
import signal
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from launch.cluster import Cluster, free_port
from metrics import read_log
from tests.procs import ROOT
from tests.test_train_e2e import scalars

TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "data.seq_len=64",
        "train.batch_size=4", "parallel.microbatches=2", "checkpoint.every=0", "log.log_every=5", "log.eval_every=10",
        "log.eval_batches=1", "train.threads=1"]


def env(**extra) -> dict:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def test_two_torchrun_nodes_on_loopback(tmp_path, corpus_cache):
    run_dir, port = tmp_path / "run", free_port()
    overrides = [*TINY, "parallel.replicas=2", "parallel.stages=2", "train.steps=10", f"log.run_dir={run_dir}",
                 f"data.cache_dir={corpus_cache}"]
    logs = {rank: tmp_path / f"node{rank}.log" for rank in (1, 0)}
    nodes = {rank: subprocess.Popen(["bash", "launch/multinode.sh", f"127.0.0.1:{port}", "2", str(rank), "2", *overrides],
                                    cwd=ROOT, env=env(FLOTILLA_RDZV_ID=f"test-{port}"), stdout=open(path, "w"),
                                    stderr=subprocess.STDOUT)
             for rank, path in logs.items()}  # node 1 first: it waits for the head to host the rendezvous
    try:
        codes = {rank: p.wait(timeout=180) for rank, p in nodes.items()}
    finally:
        for p in nodes.values():
            if p.poll() is None:
                p.kill()
    outs = {rank: path.read_text() for rank, path in logs.items()}
    assert codes == {0: 0, 1: 0}, outs
    for rank, out in outs.items():
        printed = out.splitlines()[0]
        assert printed.startswith(f"multinode: node {rank} of 2: {sys.executable} -m torch.distributed.run --nnodes=2 "
                                  f"--nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:{port} "
                                  f"--rdzv-id=test-{port} --rdzv-conf=is_host={int(rank == 0)},join_timeout=600 train.py "), printed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 4 and summary["steps"] == 10
    assert summary["bytes_sent"]["cross_replica"] > 0 and summary["bytes_sent"]["intra_replica"] > 0
    for r in range(2):  # both replicas trained every step, each on its own samples
        assert [x["step"] for x in read_log(str(run_dir / "ledger" / f"replica{r}.jsonl"))] == list(range(10))


@pytest.mark.parametrize("args, says", [
    ([], "give the head node's address"),
    (["train.steps=5", "2", "0", "1"], "'train.steps=5' is not a head address"),
    (["10.0.0.1", "2", "2", "4"], "NODE_RANK='2' must be an integer in 0..1"),
    (["10.0.0.1", "2", "0", "four"], "PROCS_PER_NODE='four' is not a positive integer"),
])
def test_multinode_script_bad_arguments_print_usage(args, says):
    proc = subprocess.run(["bash", "launch/multinode.sh", *args], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    error, usage = proc.stderr.splitlines()
    assert error.startswith("multinode: error: ") and says in error
    assert usage.startswith("usage: launch/multinode.sh HEAD[:PORT] NNODES NODE_RANK PROCS_PER_NODE")


def test_slurm_script_runs_multinode_on_every_node_with_the_first_host_as_head(tmp_path):
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], cwd=ROOT).returncode == 0
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text('#!/usr/bin/env bash\n[ "$*" = "show hostnames gpu-a[01-02]" ] || exit 1\n'
                                   'printf "gpu-a01\\ngpu-a02\\n"\n')
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "srun $*" >> "$SRUN_LOG"\n'
                               'while [[ $1 == --* ]]; do shift; done\n'
                               'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    slurm = dict(SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="77", SLURM_SUBMIT_DIR=ROOT,
                 PROCS_PER_NODE="8", FLOTILLA_DRY_RUN="1", SRUN_LOG=str(tmp_path / "srun.log"),
                 PATH=f"{fake}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch"), "config=llama-125m", "train.steps=5"],
                          cwd=tmp_path, env=env(**slurm), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "slurm: job 77: 2 node(s) x 8 process(es), head gpu-a01"
    for rank, line in enumerate(lines[1:]):
        assert line == (f"multinode: node {rank} of 2: {sys.executable} -m torch.distributed.run --nnodes=2 "
                        f"--nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu-a01:29500 --rdzv-id=slurm-77 "
                        f"--rdzv-conf=is_host={int(rank == 0)},join_timeout=600 train.py config=llama-125m train.steps=5")
    assert len(lines) == 3
    assert (tmp_path / "srun.log").read_text().startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 ")


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory, corpus_cache):
    """A coordinator (2 replicas x 1 stage) and a node agent with 2 workers; one worker is SIGKILLed at step >= 3."""
    run_dir = str(tmp_path_factory.mktemp("agent") / "run")
    c = Cluster(run_dir, 2, 1, [], join_timeout=30.0).start()
    overrides = [*TINY, "parallel.replicas=2", "parallel.stages=1", "train.steps=30", f"log.run_dir={run_dir}",
                 f"data.cache_dir={corpus_cache}"]
    log_path = os.path.join(run_dir, "agent.log")
    agent = subprocess.Popen([sys.executable, "-m", "launch.node_agent", "--coordinator", f"127.0.0.1:{c.port}",
                              "--workers", "2", "--backoff", "0.5", *overrides], cwd=ROOT, env=c.env(),
                             stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        c.wait_for(lambda: c.steps_done() >= 3, what="3 steps")
        victim = next(e["pid"] for e in c.events("assigned") if e["replica"] == 1)
        os.kill(victim, signal.SIGKILL)
        code = agent.wait(timeout=120)
    finally:
        if agent.poll() is None:
            agent.terminate()  # forwarded to its workers
            agent.wait(timeout=30)
        c.stop()
    with open(log_path) as fh:
        return {"run_dir": run_dir, "port": c.port, "code": code, "victim": victim, "log": fh.read(),
                "events": c.events()}


def test_node_agent_restarts_a_killed_worker_which_rejoins_the_run(agent_run):
    run, victim = agent_run, agent_run["victim"]
    assert run["code"] == 0, run["log"][-3000:]
    lines = [ln for ln in run["log"].splitlines() if ln.startswith("node-agent: ")]
    started = [ln for ln in lines if "FLOTILLA_SECRET=<from the environment>" in ln]
    i = next(ln.split()[2] for ln in lines if ln.endswith(f": pid {victim}"))  # "node-agent: worker <i>: pid <pid>"
    assert [ln.split()[2] for ln in started] == ["0:", "1:", i]  # both, then the killed one again
    assert all(f"train.py recovery.coordinator=127.0.0.1:{run['port']} model.dim=32" in ln for ln in started)
    assert f"node-agent: worker {i[:-1]} (pid {victim}) died with signal SIGKILL; restarting it in 0.5s" in lines
    assert lines[-1] == "node-agent: the run finished"

    events = run["events"]
    assert [(e["replica"], e["stage"]) for e in events if e["event"] == "detect"] == [(1, 0)]
    assigned = [e for e in events if e["event"] == "assigned" and e["replica"] == 1]
    assert [e["pid"] for e in assigned][0] == victim and len(assigned) == 2
    assert f"node-agent: worker {i} pid {assigned[1]['pid']}" in lines  # the agent's replacement took the slot
    reformed = [e for e in events if e["event"] == "re-formed"]
    assert reformed[0]["fresh"] == [assigned[1]["uid"]] and reformed[0]["active"] == [0, 1]
    assert [(e["replica"], e["stage"], e["method"]) for e in events if e["event"] == "rebuilt"] == [(1, 0, "copy")]
    assert len({e["step"] for e in events if e["event"] == "resumed"}) == 1  # both ranks resumed at the same step
    for r in range(2):  # replica 1 was back before the join timeout: no step skipped or repeated anywhere
        steps = [x["step"] for x in read_log(os.path.join(run["run_dir"], "ledger", f"replica{r}.jsonl"))]
        assert steps == list(range(30))


def test_node_agent_forwards_a_preemption_notice_to_its_workers(tmp_path, corpus_cache):
    c = Cluster(str(tmp_path / "run"), 2, 1, []).start()  # one worker for two slots: it waits for the other
    log_path = tmp_path / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "launch.node_agent", "--coordinator", f"127.0.0.1:{c.port}",
                              "--workers", "1", *TINY, "parallel.replicas=2", "parallel.stages=1",
                              f"log.run_dir={c.run_dir}", f"data.cache_dir={corpus_cache}"], cwd=ROOT, env=c.env(),
                             stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    try:
        c.wait_for(lambda: c.events("hello"), timeout=60, what="the worker's hello")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if agent.poll() is None:
            agent.kill()
        c.stop()
    worker = c.events("hello")[0]["uid"].split("-")[-2]  # <host>-<pid>-<hex>
    lines = log_path.read_text().splitlines()
    assert f"node-agent: SIGTERM: forwarding it to 1 worker(s) [{worker}]" in lines
    with pytest.raises(ProcessLookupError):
        os.kill(int(worker), 0)  # it ended (and was reaped) before the agent exited


def test_node_agent_gives_up_a_worker_that_keeps_failing_at_start():
    proc = subprocess.run([sys.executable, "-m", "launch.node_agent", "--coordinator", "127.0.0.1:9", "--workers", "1",
                           "--backoff", "0.1", "--max-restarts", "1", "model.n_layer=2"], cwd=ROOT,
                          env=env(FLOTILLA_SECRET="s"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.count("flotilla: error: unknown config key 'model.n_layer'") == 2  # started, restarted once
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("node-agent: ")]
    assert "node-agent: worker 0 (pid" in lines[2] and lines[2].endswith("died with exit code 2; restarting it in 0.1s")
    assert lines[-2].startswith("node-agent: error: worker 0 failed 2 times in a row, each within 60s of starting "
                                "(last: exit code 2)")
    assert lines[-1] == "node-agent: error: every worker was given up"


@pytest.mark.parametrize("args, says", [
    (["--workers", "2"], "the following arguments are required: --coordinator"),
    (["--coordinator", "10.0.0.1", "--workers", "2"], "is not HOST:PORT"),
    (["--coordinator", "10.0.0.1:29400", "--workers", "2", "recovery.coordinator=x:1"], "drop the override"),
    (["--coordinator", "10.0.0.1:29400", "--workers", "2", "--secret", "x"], "unknown argument --secret"),
])
def test_node_agent_bad_input_is_one_line(args, says):
    proc = subprocess.run([sys.executable, "-m", "launch.node_agent", *args], cwd=ROOT, env=env(FLOTILLA_SECRET="s"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and says in proc.stderr.splitlines()[-1]


def test_tensorboard_custom_scalars_layout_and_tags(agent_run):
    tb = os.path.join(agent_run["run_dir"], "tb")
    acc = EventAccumulator(os.path.join(tb, "train"))
    acc.Reload()
    assert acc.Tags()["tensors"] == ["custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert sorted(charts.values()) == [["by_bytes/.*"], ["by_tokens/.*"], ["recovery/.*"]]
    assert any(title.startswith("loss vs tokens") for title in charts)

    train = scalars(os.path.join(tb, "train"))
    tokens_per_step = 2 * 4 * 64  # replicas x batch_size x seq_len
    assert [s for s, _ in train["by_tokens/train_loss"]] == [s * tokens_per_step for s in range(5, 31, 5)]
    assert [v for _, v in train["by_tokens/train_loss"]] == [v for _, v in train["train/loss"]]
    assert [s for s, _ in train["by_tokens/val_loss"]] == [s * tokens_per_step for s in (10, 20, 30)]
    by_bytes = train["by_bytes/val_loss"]
    assert len(by_bytes) == 3 and 0 < by_bytes[0][0] < by_bytes[1][0] < by_bytes[2][0]  # DDP: bytes grow every step
    assert [v for _, v in by_bytes] == [v for _, v in train["val/loss"]]
    recovered = scalars(os.path.join(tb, "rank1"))  # the replaced worker (replica 1) was rebuilt, then resumed
    assert [v for _, v in recovered["recovery/rebuilt"]] == [1] and [v for _, v in recovered["recovery/resumed"]] == [1]
    resumed_at = next(e["step"] for e in agent_run["events"] if e["event"] == "resumed")
    assert recovered["recovery/resumed"][0][0] == resumed_at


def test_plots_command_writes_pngs(agent_run, tmp_path):
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "bench/plots.py", agent_run["run_dir"], "--out", str(out), "--churn",
                           "docs/churn.jsonl"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(proc.stdout.splitlines()[-1])["plots"]
    names = ["loss_vs_tokens.png", "loss_vs_bytes.png", "goodput.png", "step_times.png", "time_to_target.png",
             "recoveries.png"]
    assert listed == [str(out / n) for n in names]
    for n in names:
        assert (out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / n).stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "bench/plots.py", str(tmp_path)], cwd=ROOT, env=env(), capture_output=True,
                         text=True)
    assert bad.returncode == 1 and bad.stderr.strip() == (f"plots: error: {tmp_path} has no metrics.jsonl: pass a run "
                                                          f"folder (the log.run_dir of a run that has started training)")
