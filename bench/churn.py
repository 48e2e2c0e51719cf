"""Training through node churn: in-memory recovery (copy > CheckFree/CheckFree+ > checkpoint) against
checkpoint-restart, at CheckFree's failure rates, every run a real job under launch/chaos.py (SIGKILLs).

For each method and rate (% chance a stage fails within 100 steps) prints one JSON line: seconds and steps
to the target validation loss (plain failure-free training's loss at 80% of its steps), executed steps
(replays included), kills, detect-to-resume seconds per kill, and the final validation loss against the
same method's failure-free run. `--sync diloco|noloco` runs every method under that sync mode (sync.H 20).
Usage: python bench/churn.py [--steps 300] [--rates 0,5,10,16] [--only name,...] [--sync ddp|diloco|noloco]

`--isolation`: failure isolation under DiLoCo, 4 replicas x 2 stages, one run per recovery.rejoin rule side by
side: the last stage of replica 1 is SIGKILLed mid-way between two outer steps (a spare takes its slot at
once), and each other replica's inner-step rate while replica 1 is rebuilt (from the kill until replica 1 starts
the inner steps after the next outer step) is compared with its own rate just before the kill.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.cluster import Cluster  # noqa: E402
from metrics import ledger_path, read_log  # noqa: E402

METHODS = {  # name -> (chaos mode, train.py overrides)
    "recovery": ("recovery", []),  # layered: a copy from the other replica, else CheckFree, else the checkpoint
    "checkfree-only": ("recovery", ["recovery.swap=true", "recovery.rebuild=checkfree"]),
    "checkpoint-restart": ("restart", []),
}
BASE = ["model.dim=64", "model.n_layers=6", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128",
        "train.batch_size=8", "parallel.microbatches=2", "log.eval_batches=4", "log.log_every=25",
        "log.tensorboard=false", "train.threads=1"]


SYNC = {"ddp": [], "diloco": ["sync.method=diloco", "sync.H=20"], "noloco": ["sync.method=noloco", "sync.H=20"]}


def run(method: str, rate: float, steps: int, ckpt_every: int, workdir: str, seed: int, sync: list[str]) -> dict:
    mode, overrides = METHODS[method]
    overrides = [*sync, *overrides]
    run_dir = os.path.join(workdir, f"{method}-{rate:g}")
    cmd = [sys.executable, os.path.join(ROOT, "launch", "chaos.py"), "--mode", mode, "--replicas", "2", "--stages",
           "3", "--rate", str(rate), "--seed", str(seed), "--spares", "1", "--run-dir", run_dir, *BASE,
           f"train.steps={steps}", f"log.eval_every={steps // 12}", f"checkpoint.every={ckpt_every}", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        kept = shutil.copytree(run_dir, tempfile.mkdtemp(prefix=f"churn-failed-{method}-"), dirs_exist_ok=True)
        raise SystemExit(f"{method} at {rate}% failed (run kept in {kept}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    chaos = json.loads(proc.stdout.strip().splitlines()[-1])
    evals = [r for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "val_loss" in r]
    return {"chaos": chaos, "evals": evals, "start": chaos["started"]}


def to_target(result: dict, target: float) -> tuple[float | None, int | None]:
    hit = next((r for r in result["evals"] if r["val_loss"] <= target), None)
    return (round(hit["t"] - result["start"], 2), hit["step"]) if hit else (None, None)


def isolation(rejoin: str, workdir: str, H: int) -> dict:
    """One DiLoCo run (4 x 2) with replica 1's last stage killed half-way between its outer steps at H and 2H;
    see the module docstring."""
    steps, kill_at = 2 * H + 20, H + H // 2
    run_dir = os.path.join(workdir, f"isolation-{rejoin}-{H}")
    c = Cluster(run_dir, 4, 2, [*BASE, f"train.steps={steps}", "sync.method=diloco", f"sync.H={H}",
                                f"recovery.rejoin={rejoin}", "checkpoint.every=0", "log.eval_every=0"]).start()
    try:
        workers = [c.worker() for _ in range(9)]  # 8 slots and a spare
        stamps = lambda r: [(x["step"], x["t"]) for x in read_log(ledger_path(run_dir, r))]  # noqa: E731
        c.wait_for(lambda: len(stamps(1)) > kill_at, timeout=900, what=f"replica 1 at step {kill_at}")
        holder = {(e["replica"], e["stage"]): e["pid"] for e in c.events("assigned")}[(1, 1)]
        victim = next(p for p in workers if p.pid == holder)
        at_kill = stamps(1)[-1][0]  # the step replica 1 is in (its records after the last outer step are rolled back)
        victim.kill()
        t_kill = time.time()
        victim.wait()  # reaped: the coordinator sees the pid gone at once, as on a machine that lost the process
        codes = c.wait_all([p for p in workers if p is not victim], timeout=1800)
    finally:
        c.stop()
    if codes != [0] * 8:
        raise SystemExit(f"isolation run ({rejoin}) failed: exit codes {codes}; run in {run_dir}")
    join = (at_kill // H + 1) * H  # the outer step after the kill
    t_back = next(t for s, t in stamps(1) if s >= join and t > t_kill)  # replica 1 trains again after it
    window = t_back - t_kill
    ratios, rates = {}, {}
    for r in (0, 2, 3):
        ts = [t for _, t in stamps(r)]
        during = sum(t_kill <= t < t_back for t in ts) / window
        prior = sum(t_kill - window <= t < t_kill for t in ts) / window  # the same length of time just before
        ratios[r], rates[r] = round(during / prior, 3), [round(prior, 2), round(during, 2)]
    return {"bench": "churn-isolation", "sync": "diloco", "replicas": 4, "stages": 2, "H": H, "rejoin": rejoin,
            "killed_at_step": at_kill, "back_at_outer_step": join, "rebuild_window_s": round(window, 2),
            "others_steps_per_s_before_during": rates, "others_rate_vs_before": ratios,
            "min_ratio": min(ratios.values()),
            "rebuilt_by": [e["method"] for e in c.events("rebuilt")]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rates", default="0,5,10,16")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--sync", choices=sorted(SYNC), default="ddp", help="sync.method of every run")
    ap.add_argument("--isolation", action="store_true", help="the failure-isolation measurement instead")
    ap.add_argument("--isolation-H", default="20,100", help="isolation: the sync.H values to measure at")
    args = ap.parse_args()
    if args.isolation:
        with tempfile.TemporaryDirectory(prefix="flotilla-isolation-") as workdir:
            for H in map(int, args.isolation_H.split(",")):
                for rejoin in ("skip", "replay"):
                    print(json.dumps(isolation(rejoin, workdir, H)), flush=True)
        return
    rates = [float(r) for r in args.rates.split(",")]
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="flotilla-churn-") as workdir:
        results = {(m, r): run(m, r, args.steps, args.checkpoint_every, workdir, args.seed, SYNC[args.sync])
                   for m in methods for r in rates}
        plain = results[(methods[-1], min(rates))]  # plain training: the last method at the lowest rate
        target = [r for r in plain["evals"] if r["step"] <= 0.8 * args.steps][-1]["val_loss"]
        for m in methods:
            final_clean = results[(m, min(rates))]["evals"][-1]["val_loss"]
            for r in rates:
                res = results[(m, r)]
                seconds, step = to_target(res, target)
                kills = res["chaos"]["events"]
                print(json.dumps({
                    "bench": "churn", "sync": args.sync, "method": m, "rate_per_100_steps": r, "target_val_loss": round(target, 4),
                    "seconds_to_target": seconds, "steps_to_target": step,
                    "executed_steps": res["chaos"]["executed_steps"], "kills": len(kills),
                    "rebuilt_by": [k["rebuilt_by"] for k in kills],
                    "detect_to_resume_s": [k["detect_to_resume_s"] for k in kills],
                    "kill_to_resume_s": [k["resumed_s"] for k in kills], "total_seconds": res["chaos"]["seconds"],
                    "final_val_loss": round(res["evals"][-1]["val_loss"], 4),
                    "final_vs_failure_free": round(res["evals"][-1]["val_loss"] / final_clean - 1, 4)}), flush=True)


if __name__ == "__main__":
    main()
