"""A local run: a coordinator and recovery-mode workers as real processes (the chaos launcher and fault tests)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from metrics import read_jsonl, read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, script: str, *args: str) -> list[str]:
    """A script of this repository on nproc local processes: torchrun --standalone (its own rendezvous)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            os.path.join(ROOT, script), *args]


def worker_cmd(*overrides: str) -> list[str]:
    """A recovery-mode worker: a plain `python train.py` (its rank comes from the coordinator, not torchrun)."""
    return [sys.executable, os.path.join(ROOT, "train.py"), *overrides]


def gpu_count() -> int:
    """GPUs this machine shows (torch loaded only for a run on GPUs)."""
    import torch
    return torch.cuda.device_count()


class Cluster:
    """One run: `start()` the coordinator, `worker()` as many times as needed (the same command for replacements)."""

    def __init__(self, run_dir: str, replicas: int, stages: int, overrides: list[str], secret: str = "test-secret",
                 heartbeat_timeout: float = 2.0, join_timeout: float = 30.0, lanes: int = 1):
        self.run_dir, self.replicas, self.stages, self.lanes = run_dir, replicas, stages, lanes
        self.secret, self.port = secret, free_port()
        self.heartbeat_timeout, self.join_timeout = heartbeat_timeout, join_timeout
        self.overrides = [f"parallel.replicas={replicas}", f"parallel.stages={stages}", f"parallel.lanes={lanes}",
                          f"log.run_dir={run_dir}",
                          f"recovery.coordinator=127.0.0.1:{self.port}", *overrides]
        self.coordinator: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.gpus = gpu_count() if "train.device=cuda" in overrides else 0
        os.makedirs(run_dir, exist_ok=True)

    @property
    def events_path(self) -> str:
        return os.path.join(self.run_dir, "events.jsonl")

    def env(self, secret: str | None = None, extra: dict | None = None) -> dict:
        return {**os.environ, "FLOTILLA_SECRET": secret or self.secret, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                **(extra or {})}

    def start(self) -> "Cluster":
        starts = sum(name.startswith("coordinator") for name in os.listdir(self.run_dir))
        log = open(os.path.join(self.run_dir, f"coordinator{starts or ''}.log"), "w")
        self.coordinator = subprocess.Popen(
            [sys.executable, "-m", "recovery.coordinator", "--host", "127.0.0.1", "--port", str(self.port),
             "--replicas", str(self.replicas), "--stages", str(self.stages), "--lanes", str(self.lanes),
             "--heartbeat-timeout",
             str(self.heartbeat_timeout), "--join-timeout", str(self.join_timeout), "--events", self.events_path],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        deadline, ups = time.monotonic() + 30, len(self.events("coordinator-up"))
        while len(self.events("coordinator-up")) <= ups:
            if self.coordinator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"coordinator did not start: {open(log.name).read()[-2000:]}")
            time.sleep(0.05)
        return self

    def restart_coordinator(self) -> "Cluster":
        """A new coordinator on a new port after the old one died; workers started from now on use it."""
        old = f"recovery.coordinator=127.0.0.1:{self.port}"
        self.port = free_port()
        self.overrides = [f"recovery.coordinator=127.0.0.1:{self.port}" if o == old else o for o in self.overrides]
        return self.start()

    def worker(self, *extra: str, secret: str | None = None, env: dict | None = None) -> subprocess.Popen:
        """One more worker process; `env` adds variables (a test's fault injection: tests/faults.py)."""
        i = sum(name.startswith("worker") for name in os.listdir(self.run_dir))
        log = open(os.path.join(self.run_dir, f"worker{i}.log"), "w")
        gpu = self.free_gpu()
        proc = subprocess.Popen(worker_cmd(*self.overrides, *extra), cwd=ROOT,
                                env=self.env(secret, {**(env or {}), **({"LOCAL_RANK": str(gpu)} if self.gpus else {})}),
                                stdout=log, stderr=subprocess.STDOUT)
        proc.log_path, proc.gpu = log.name, gpu
        self.workers.append(proc)
        return proc

    def free_gpu(self) -> int:
        """The lowest GPU no live worker holds (a replacement takes its dead predecessor's); with more live workers
        than GPUs they share, least-held first (gloo on CUDA allows it, NCCL does not)."""
        if not self.gpus:
            return -1
        held = [p.gpu for p in self.workers if p.poll() is None]
        return min(range(self.gpus), key=lambda g: (held.count(g), g))

    def events(self, kind: str | None = None) -> list[dict]:
        return [e for e in read_jsonl(self.events_path) if kind is None or e["event"] == kind]

    def wait_for(self, predicate, timeout: float = 120, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}\n{self.tail()}")
            time.sleep(0.05)

    def steps_done(self) -> int:
        """Steps recorded by the logger rank (replica 0, last stage)."""
        return len({r["step"] for r in read_log(os.path.join(self.run_dir, "metrics.jsonl")) if "loss" in r})

    def wait_all(self, procs: list[subprocess.Popen], timeout: float = 180) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"worker {p.pid} still running\n{self.tail()}") from None
        return [p.returncode for p in procs]

    def tail(self) -> str:
        out = []
        for p in self.workers:
            with open(p.log_path) as fh:
                lines = [line for line in fh if "Warning" not in line]
            out.append(f"--- worker {p.pid} ({p.poll()})\n" + "".join(lines[-8:]))
        return "\n".join(out) + "\n--- events\n" + "\n".join(json.dumps(e) for e in self.events()[-15:])

    def stop(self) -> None:
        for p in [*self.workers, self.coordinator]:
            if p and p.poll() is None:
                p.kill()
                p.wait()
