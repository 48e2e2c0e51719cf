"""Chaos launcher: run a job on this machine, SIGKILL random workers at a failure rate, start replacements.

  python launch/chaos.py --replicas 2 --stages 3 --rate 10 [--mode recovery|restart] [train.py overrides ...]
  python launch/chaos.py --random --faults 15 --seed 0 [--baseline] [train.py overrides ...]   (launch/chaos_random.py)

Failure model (CheckFree's, with "an hour" replaced by 100 training steps): every stage fails within 100
steps with probability rate %, i.e. with p = 1 - (1 - rate/100)^(1/100) per executed step (replayed steps
count). The draws come from --seed, so both modes see kills at the same executed steps.

  recovery  a coordinator + one process per slot (+ --spares waiting ones); a killed worker's replacement starts
            --replace-after s later, and the run recovers in memory (copy / CheckFree / CheckFree+ / checkpoint)
  restart   the baseline: a kill ends the torchrun job, which is started again and resumes from the latest
            checkpoint (every worker restarts; steps since that checkpoint are replayed)

Events (kill, detect, re-formed, rebuilt, resumed) go to <run_dir>/events.jsonl; a summary with the
seconds of each phase per kill goes to <run_dir>/chaos.json and the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch.cluster import ROOT, Cluster, read_jsonl, torchrun_cmd  # noqa: E402
from metrics import read_log  # noqa: E402


def log_event(run_dir: str, kind: str, t: float | None = None, **fields) -> None:
    line = json.dumps({"t": t or time.time(), "event": kind, **fields})
    print(f"chaos: {line}", flush=True)
    with open(os.path.join(run_dir, "events.jsonl"), "a") as fh:
        fh.write(line + "\n")


def last_step(run_dir: str) -> int:
    """Steps the logger rank has committed so far (goes back when a checkpoint-restart rolls back)."""
    steps = [r["step"] for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    return steps[-1] if steps else 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(x) for x in fh.read().split()]
    except OSError:
        return []


class Kills:
    """Seeded Bernoulli draws per (executed step, slot)."""

    def __init__(self, rate: float, slots: int, seed: int):
        self.p = 1 - (1 - rate / 100) ** (1 / 100) if rate > 0 else 0.0
        self.slots, self.rng = slots, random.Random(seed)

    def draw(self) -> list[int]:
        return [s for s in range(self.slots) if self.rng.random() < self.p]


def run_recovery(args, overrides: list[str]) -> tuple[int, int]:
    """(exit code, executed steps)."""
    c = Cluster(args.run_dir, args.replicas, args.stages, overrides, secret=os.environ["FLOTILLA_SECRET"],
                heartbeat_timeout=args.heartbeat_timeout, join_timeout=args.join_timeout).start()
    try:
        for _ in range(args.replicas * args.stages + args.spares):
            c.worker()
        kills, executed, seen, pending, killed_at = Kills(args.rate, args.replicas * args.stages, args.seed), 0, 0, [], -1
        while any(p.poll() is None for p in c.workers):
            step = last_step(args.run_dir)
            for _ in range(max(0, step - seen)):
                executed += 1
                for slot in kills.draw():
                    victim = holder(c, slot)
                    if victim and victim.poll() is None and not pending and step > killed_at:  # one failure at a time
                        t_kill = time.time()
                        victim.kill()
                        victim.wait()  # reaped, as a node agent would: the coordinator's pid probe sees it gone
                        log_event(args.run_dir, "kill", t_kill, replica=slot // args.stages, stage=slot % args.stages,
                                  pid=victim.pid, executed_step=executed, step=step)
                        pending.append(time.monotonic() + args.replace_after)
                        killed_at = step
            seen = max(seen, step)
            if pending and time.monotonic() >= pending[0]:
                pending.pop(0)
                c.worker()
            time.sleep(0.05)
        bad = [(p.pid, p.returncode, p.log_path) for p in c.workers if p.returncode not in (0, -signal.SIGKILL)]
        if bad:
            log_event(args.run_dir, "worker-failed", workers=bad)
        return (0 if not bad else 1), executed
    finally:
        c.stop()


def holder(c: Cluster, slot: int):
    """The live worker process currently assigned to a slot (from the coordinator's events)."""
    replica, stage = divmod(slot, c.stages)
    pids = [e["pid"] for e in c.events("assigned") if (e["replica"], e["stage"]) == (replica, stage)]
    return next((p for p in c.workers if pids and p.pid == pids[-1]), None)


def run_restart(args, overrides: list[str]) -> tuple[int, int]:
    """(exit code, executed steps) of checkpoint-restart: a kill takes the whole torchrun job down; it is started
    again and resumes from the latest checkpoint (torchrun's own --max-restarts reused stale gloo addresses here)."""
    n = args.replicas * args.stages
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(os.path.join(args.run_dir, "torchrun.log"), "w")
    kills, executed, seen = Kills(args.rate, n, args.seed), 0, 0
    for attempt in range(args.max_restarts + 1):
        cmd = torchrun_cmd(n, "train.py", f"parallel.replicas={args.replicas}", f"parallel.stages={args.stages}",
                           f"log.run_dir={args.run_dir}", "checkpoint.resume=latest", *overrides)
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if attempt:
            log_event(args.run_dir, "restart", attempt=attempt)
        try:
            while agent.poll() is None:
                step = last_step(args.run_dir)
                for _ in range(max(0, step - seen)):
                    executed += 1
                    for slot in kills.draw():
                        pids = sorted(children(agent.pid))
                        if len(pids) == n:
                            t_kill = time.time()
                            os.kill(pids[slot], signal.SIGKILL)
                            log_event(args.run_dir, "kill", t_kill, slot=slot, pid=pids[slot], executed_step=executed, step=step)
                seen = step  # after a restart the run goes back to its checkpoint: replayed steps count again
                time.sleep(0.05)
        finally:
            if agent.poll() is None:
                agent.kill()
        if agent.returncode == 0:
            return 0, executed
    return 1, executed


def summarize(run_dir: str) -> dict:
    """Per kill: seconds from the kill to detection, re-formation, the last rank resuming; the rebuild method."""
    events = read_jsonl(os.path.join(run_dir, "events.jsonl"))
    out = []
    for i, kill in enumerate(e for e in events if e["event"] == "kill"):
        after = [e for e in events if e["t"] >= kill["t"]]

        def first(kind, after=after):
            return next((e for e in after if e["event"] == kind), None)

        detect, formed = first("detect"), first("re-formed")
        if not formed:  # checkpoint-restart: the restarted job has loaded its checkpoint
            back = first("resumed")
            out.append({"kill": i, "resumed_s": round(back["t"] - kill["t"], 3) if back else None,
                        "detect_to_resume_s": None, "rebuilt_by": ["checkpoint-restart"]})
            continue
        resumed = [e for e in after if e["event"] == "resumed" and e.get("gen") == formed["gen"]]
        rebuilt = [e for e in after if e["event"] == "rebuilt" and e.get("gen") == formed["gen"]]
        out.append({"kill": i, "detect_s": round(detect["t"] - kill["t"], 3) if detect else None,
                    "reformed_s": round(formed["t"] - kill["t"], 3),
                    "resumed_s": round(max(e["t"] for e in resumed) - kill["t"], 3) if resumed else None,
                    "detect_to_resume_s": round(max(e["t"] for e in resumed) - detect["t"], 3)
                    if resumed and detect else None,
                    "rebuilt_by": [e["method"] for e in rebuilt]})
    return {"kills": len(out), "events": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["recovery", "restart"], default="recovery")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--rate", type=float, default=10.0, help="%% chance that a stage fails within 100 steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replace-after", type=float, default=0.5, help="seconds before a replacement worker starts")
    ap.add_argument("--spares", type=int, default=0, help="recovery: extra workers that wait to take a lost slot")
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--join-timeout", type=float, default=60.0)
    ap.add_argument("--max-restarts", type=int, default=100, help="restart mode: give up after this many")
    ap.add_argument("--run-dir", default="runs/chaos")
    ap.add_argument("--random", action="store_true", help="faults of every kind at random moments (chaos_random.py)")
    ap.add_argument("--faults", type=int, default=15, help="random: how many faults to inject")
    ap.add_argument("--mean-gap", type=float, default=10.0, help="random: mean seconds between faults (exponential)")
    ap.add_argument("--max-replace-delay", type=float, default=5.0, help="random: replacements start 0..this s later")
    ap.add_argument("--steps", type=int, default=600, help="random: train.steps")
    ap.add_argument("--run-id", default="flotilla", help="random: recovery.run_id (the intruder writes under it)")
    ap.add_argument("--baseline", action="store_true", help="random: also run failure-free and compare the loss")
    ap.add_argument("--give-up-after", type=float, default=300.0, help="random: stop a run that made no progress "
                    "for this many seconds (and report it)")
    args, overrides = ap.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        ap.error(f"unknown argument {bad[0]}: train.py overrides are key=value")
    if os.path.isdir(args.run_dir) and os.listdir(args.run_dir):
        ap.error(f"--run-dir {args.run_dir} is not empty (a restart would resume its checkpoints): pick a new one")
    os.makedirs(args.run_dir, exist_ok=True)
    if "FLOTILLA_SECRET" not in os.environ:
        os.environ["FLOTILLA_SECRET"] = os.urandom(16).hex()  # the launcher owns the run: a fresh secret
    if args.random:
        from launch import chaos_random
        return chaos_random.main(args, overrides)
    t0 = time.time()
    code, executed = (run_recovery if args.mode == "recovery" else run_restart)(args, overrides)
    summary = {"mode": args.mode, "rate": args.rate, "exit": code, "started": t0, "seconds": round(time.time() - t0, 2),
               "executed_steps": executed, **summarize(args.run_dir)}
    with open(os.path.join(args.run_dir, "chaos.json"), "w") as fh:
        json.dump(summary, fh)
    print(json.dumps(summary), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
