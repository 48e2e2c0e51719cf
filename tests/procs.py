"""Helpers to run real multi-process jobs (torchrun, gloo on loopback) from tests."""
import os
import subprocess
import sys

from launch.cluster import ROOT, torchrun_cmd


def run(cmd: list[str], timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run to the end; `env` adds variables (a test's fault injection: tests/faults.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def train_cmd(nproc: int, *overrides: str) -> list[str]:
    """train.py under torchrun (nproc > 1) or as a plain process (nproc == 1)."""
    if nproc == 1:
        return [sys.executable, os.path.join(ROOT, "train.py"), *overrides]
    return torchrun_cmd(nproc, "train.py", *overrides)
