"""Training through node churn: in-memory recovery (copy > CheckFree/CheckFree+ > checkpoint) against
checkpoint-restart, at CheckFree's failure rates, every run a real job under launch/chaos.py (SIGKILLs).

For each method and rate (% chance a stage fails within 100 steps) prints one JSON line: seconds and steps
to the target validation loss (plain failure-free training's loss at 80% of its steps), executed steps
(replays included), kills, detect-to-resume seconds per kill, and the final validation loss against the
same method's failure-free run. Usage: python bench/churn.py [--steps 300] [--rates 0,5,10,16] [--only name,...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metrics import read_log  # noqa: E402

METHODS = {  # name -> (chaos mode, train.py overrides)
    "recovery": ("recovery", []),  # layered: a copy from the other replica, else CheckFree, else the checkpoint
    "checkfree-only": ("recovery", ["recovery.swap=true", "recovery.rebuild=checkfree"]),
    "checkpoint-restart": ("restart", []),
}
BASE = ["model.dim=64", "model.n_layers=6", "model.n_heads=4", "model.n_kv_heads=2", "data.seq_len=128",
        "train.batch_size=8", "parallel.microbatches=2", "log.eval_batches=4", "log.log_every=25",
        "log.tensorboard=false", "train.threads=1"]


def run(method: str, rate: float, steps: int, ckpt_every: int, workdir: str, seed: int) -> dict:
    mode, overrides = METHODS[method]
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
    return (round(hit["t"] - result["start"], 2), hit["step"] + 1) if hit else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rates", default="0,5,10,16")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated method names")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    methods = [m for m in METHODS if not args.only or m in args.only.split(",")]
    with tempfile.TemporaryDirectory(prefix="flotilla-churn-") as workdir:
        results = {(m, r): run(m, r, args.steps, args.checkpoint_every, workdir, args.seed)
                   for m in methods for r in rates}
        plain = results[(methods[-1], min(rates))]  # plain training: the last method at the lowest rate
        target = [r for r in plain["evals"] if r["step"] + 1 <= 0.8 * args.steps][-1]["val_loss"]
        for m in methods:
            final_clean = results[(m, min(rates))]["evals"][-1]["val_loss"]
            for r in rates:
                res = results[(m, r)]
                seconds, step = to_target(res, target)
                kills = res["chaos"]["events"]
                print(json.dumps({
                    "bench": "churn", "method": m, "rate_per_100_steps": r, "target_val_loss": round(target, 4),
                    "seconds_to_target": seconds, "steps_to_target": step,
                    "executed_steps": res["chaos"]["executed_steps"], "kills": len(kills),
                    "rebuilt_by": [k["rebuilt_by"] for k in kills],
                    "detect_to_resume_s": [k["detect_to_resume_s"] for k in kills],
                    "kill_to_resume_s": [k["resumed_s"] for k in kills], "total_seconds": res["chaos"]["seconds"],
                    "final_val_loss": round(res["evals"][-1]["val_loss"], 4),
                    "final_vs_failure_free": round(res["evals"][-1]["val_loss"] / final_clean - 1, 4)}), flush=True)


if __name__ == "__main__":
    main()
