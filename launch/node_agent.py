"""Spot node agent: keep N recovery-mode workers running on this node until the run finishes.

  FLOTILLA_SECRET=... python -m launch.node_agent --coordinator HOST:PORT --workers N [train.py key=value ...]

Each worker is `python train.py recovery.coordinator=HOST:PORT ...`: it says hello to the coordinator and takes a
free slot, or waits as a spare. A worker that dies (a signal or a non-zero exit) is started again after a backoff
that doubles from --backoff up to --max-backoff; one that fails more than --max-restarts times in a row, each time
within --healthy-after seconds of starting, is given up (a bad config or secret does not fix itself). A worker that
exits 0 has finished the run (or the run ended while it waited as a spare): nothing is restarted after that, and the
agent exits 0 once every worker has ended. SIGTERM or SIGINT (a spot preemption notice) is forwarded to the
workers; the agent waits for them and exits with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from launch.cluster import ROOT, worker_cmd


@dataclass
class Slot:
    """One of this node's workers: its process (None while waiting to restart) and its failures in a row."""
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    done: bool = False


def say(msg: str) -> None:
    print(f"node-agent: {msg}", flush=True)


def describe(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def launch(slot: Slot, cmd: list[str]) -> None:
    say(f"worker {slot.index}: FLOTILLA_SECRET=<from the environment> {shlex.join(cmd)}")
    slot.proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                     "LOCAL_RANK": str(slot.index)})  # worker slot k: GPU k
    slot.started = time.monotonic()
    say(f"worker {slot.index}: pid {slot.proc.pid}")


def preempt(slots: list[Slot], signum: int, grace_s: float) -> int:
    """Forward the notice to every live worker, give them grace_s to end, then kill what is left."""
    live = [s.proc for s in slots if s.proc and s.proc.poll() is None]
    say(f"{signal.Signals(signum).name}: forwarding it to {len(live)} worker(s) {[p.pid for p in live]}")
    for p in live:
        p.send_signal(signum)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return 128 + signum


def ended(slot: Slot, code: int, finished: bool, args) -> None:
    """A worker exited with a non-zero code or a signal: schedule its restart, or give it up."""
    pid, slot.proc = slot.proc.pid, None
    if finished:
        say(f"worker {slot.index} (pid {pid}) ended with {describe(code)} after the run finished")
        slot.done = True
        return
    quick = time.monotonic() - slot.started < args.healthy_after
    slot.failures = slot.failures + 1 if quick else 1
    if slot.failures > args.max_restarts:
        say(f"error: worker {slot.index} failed {slot.failures} times in a row, each within {args.healthy_after:g}s "
            f"of starting (last: {describe(code)}): see its error line above, fix it and start the agent again")
        slot.done = True
        return
    delay = min(args.backoff * 2 ** (slot.failures - 1), args.max_backoff)
    say(f"worker {slot.index} (pid {pid}) died with {describe(code)}; restarting it in {delay:g}s")
    slot.restart_at = time.monotonic() + delay


def run(args, overrides: list[str]) -> int:
    cmd = worker_cmd(f"recovery.coordinator={args.coordinator}", *overrides)
    notices: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: notices.append(signum))
    slots = [Slot(i) for i in range(args.workers)]
    for slot in slots:
        launch(slot, cmd)
    finished = False  # a worker exited 0: the run is over
    while not all(s.done for s in slots):
        if notices:
            return preempt(slots, notices[0], args.grace)
        for slot in (s for s in slots if not s.done):
            if slot.proc is None:
                if finished:
                    slot.done = True
                elif time.monotonic() >= slot.restart_at:
                    launch(slot, cmd)
                continue
            code = slot.proc.poll()
            if code == 0:
                say(f"worker {slot.index} (pid {slot.proc.pid}) finished")
                slot.proc, slot.done, finished = None, True, True
            elif code is not None:
                ended(slot, code, finished, args)
        time.sleep(0.1)
    say("the run finished" if finished else "error: every worker was given up")
    return 0 if finished else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coordinator", required=True, help="HOST:PORT of python -m recovery.coordinator")
    ap.add_argument("--workers", type=int, required=True, help="worker processes to keep running on this node")
    ap.add_argument("--backoff", type=float, default=1.0, help="seconds before the first restart (doubles)")
    ap.add_argument("--max-backoff", type=float, default=30.0)
    ap.add_argument("--max-restarts", type=int, default=5, help="quick failures in a row before a worker is given up")
    ap.add_argument("--healthy-after", type=float, default=60.0, help="a worker that ran this long starts a new count")
    ap.add_argument("--grace", type=float, default=20.0, help="seconds workers get to end after a preemption notice")
    args, overrides = ap.parse_known_args(argv)
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        ap.error(f"--coordinator {args.coordinator!r} is not HOST:PORT: give the coordinator's address, e.g. 10.0.0.1:29400")
    if args.workers < 1:
        ap.error(f"--workers {args.workers}: give at least 1")
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unknown argument {bad[0]}: train.py overrides are key=value")
    if any(o.startswith("recovery.coordinator=") for o in overrides):
        ap.error("recovery.coordinator is set by --coordinator: drop the override")
    if not os.environ.get("FLOTILLA_SECRET"):
        ap.error("set FLOTILLA_SECRET (the run's shared secret, as given to the coordinator) in the environment")
    return run(args, overrides)


if __name__ == "__main__":
    sys.exit(main())
