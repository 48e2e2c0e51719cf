"""Adaptive SP against each static degree, measured on this machine's lanes with an emulated slow cross-node link.

Documents of a short / long mix (--short-len and --long-len ranges, --long-share of them long; bytes of a few
words, written to a temporary folder) are trained on by train.py on --lanes processes (1 replica x 1 stage x
L lanes, gloo, model.dim=64, 2 layers, data.seq_len=--seq-len, train.batch_size=--batch-size) with
bench/slow_link.py installed (FLOTILLA_HOOKS): groups of more than lanes_per_node lanes wait
nbytes / GB/s after each all-to-all. First bench/profile_sp.py fits the cost model under the same link (--cost
takes one instead) and calibrates per_step / per_pass on training steps of another seed. Then --rounds
rounds each run every mode (adaptive, and static:d for every d that holds the longest sequence) for --steps
steps, interleaved, on the same batches; the first --warmup steps of a run are left out.
A plan is a step's batch (the same in every round: the planner is deterministic); its measured seconds are
the best over rounds (other load on the machine only adds time; bench/profile_sp.py's timings are best-of-3
too). Prints one JSON line per mode: median over plans of measured and predicted step seconds, each round's
median (the machine's noise), the per-plan max |predicted - measured| / measured, the passes and
group sizes, and the median sp_plan_wait_s (planning one step ahead; target < 1 ms); then one line per static
degree: adaptive / static step seconds (sums over the plans), measured and predicted, and
|measured / predicted - 1| (target <= 10%); then one line of acceptance (every plan within 15%, every ratio
within 10%, median wait < 1 ms).
Usage: python bench/sp_measured.py [--lanes 2] [--slow-link 1:0.05] [--seq-len 2048] [--batch-size 2]
       [--tokens-per-lane 1536] [--steps 5] [--warmup 1] [--rounds 3] [--seed 0] [--cost profiled.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import slow_link  # noqa: E402
from bench.profile_sp import train_steps  # noqa: E402
from dist.sp_cost import SPCost  # noqa: E402

PLAN_ERROR, RATIO_ERROR, WAIT_S = 0.15, 0.10, 1e-3  # acceptance


def write_docs(folder: str, n: int, short: tuple[int, int], long: tuple[int, int], long_share: float,
               rng: np.random.Generator) -> None:
    """n text documents, a long_share of them of uniform length in `long` bytes, the rest in `short`."""
    words = np.array("the lane stage plan group token sequence replica pipeline attention".split())
    os.makedirs(folder)
    for i in range(n):
        lo, hi = long if rng.random() < long_share else short
        size = int(rng.integers(lo, hi + 1))
        with open(os.path.join(folder, f"doc{i:05d}.txt"), "w") as fh:
            fh.write(" ".join(rng.choice(words, size // 5 + 1))[:size])


def profile(out: str, args, overrides: list[str]) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "profile_sp.py"), "--out", out, "--lanes", str(args.lanes),
           "--slow-link", args.slow_link, "--tokens-per-lane", str(args.tokens_per_lane),
           "--lengths", *map(str, (128, 256, 512, 1024, args.seq_len)), "--calibrate-steps", str(args.steps),
           "--warmup", str(args.warmup), "--calibrate-modes", *modes(args), "--set", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"sp_measured: profiling failed:\n{proc.stderr[-3000:]}")


def modes(args) -> list[str]:
    """adaptive and every static degree whose groups hold a whole window (the longest possible sequence)."""
    degrees = [1 << i for i in range(args.lanes.bit_length()) if 1 << i <= args.lanes]
    need = SPCost(0, 0, 0, 1, args.tokens_per_lane).min_degree(args.seq_len)
    return ["adaptive", *(f"static:{d}" for d in degrees if d >= need)]


def summarize(mode: str, rounds: list[list[dict]]) -> tuple[dict, list[float], list[float]]:
    """One mode's runs (one list of step records per round, warm-up left out) -> its JSON line's fields, and
    per plan (step) the best measured and the predicted seconds."""
    plans = list(zip(*rounds))
    groups = [[r["sp_groups"] for r in plan] for plan in plans]
    if any(g != g_[0] for g_ in groups for g in g_):
        sys.exit(f"sp_measured: {mode} planned one step differently in two rounds: the planner must be deterministic")
    measured = [min(r["sp_measured_s"] for r in plan) for plan in plans]
    predicted = [plan[0]["sp_predicted_s"] for plan in plans]
    errors = [abs(p - m) / m for p, m in zip(predicted, measured)]
    waits = [r["sp_plan_wait_s"] for steps in rounds for r in steps]
    line = {"bench": "sp_measured", "mode": mode, "plans": len(plans),
            "measured_s": round(statistics.median(measured), 4), "predicted_s": round(statistics.median(predicted), 4),
            "round_medians_s": [round(statistics.median(r["sp_measured_s"] for r in steps), 4) for steps in rounds],
            "plan_error_max": round(max(errors), 3), "plan_errors": [round(e, 3) for e in errors],
            "groups": [g[0] for g in groups], "plan_wait_ms_median": round(1000 * statistics.median(waits), 3)}
    return line, measured, predicted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--slow-link", default="1:0.05", help="<lanes_per_node>:<GB/s> (bench/slow_link.py)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--tokens-per-lane", type=int, default=1536, help="the memory model's tokens per lane")
    ap.add_argument("--short-len", type=int, nargs=2, default=[100, 400], help="bytes of a short document")
    ap.add_argument("--long-len", type=int, nargs=2, default=[1500, 4000], help="bytes of a long document")
    ap.add_argument("--long-share", type=float, default=0.3)
    ap.add_argument("--docs", type=int, default=600)
    ap.add_argument("--steps", type=int, default=5, help="steps per run (and per calibration run)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost", default="", help="a cost model fitted under the same link (default: profile now)")
    args = ap.parse_args()
    env = slow_link.env(args.slow_link)
    with tempfile.TemporaryDirectory() as tmp:
        write_docs(os.path.join(tmp, "docs"), args.docs, tuple(args.short_len), tuple(args.long_len),
                   args.long_share, np.random.default_rng(args.seed))
        common = ["model.dim=64", "model.n_layers=2", "data.source=path", f"data.path={tmp}/docs",
                  f"data.cache_dir={tmp}/cache", f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}",
                  "parallel.microbatches=1"]
        cost = args.cost
        if not cost:
            cost = os.path.join(tmp, "sp_cost.json")
            profile(cost, args, [*common, f"train.seed={args.seed + 1}"])
        fitted = SPCost.load(cost)
        runs = {mode: [] for mode in modes(args)}
        for r in range(args.rounds):
            for mode in runs:
                steps = train_steps(args.lanes, mode, cost, args.steps, os.path.join(tmp, f"{mode}-{r}"),
                                    [*common, f"train.seed={args.seed}"], env)
                runs[mode].append(steps[args.warmup:])
    lines, sums = {}, {}
    for mode, rounds in runs.items():
        lines[mode], measured, predicted = summarize(mode, rounds)
        sums[mode] = (sum(measured), sum(predicted))
        print(json.dumps({**lines[mode], "slow_link": args.slow_link, "seq_len": args.seq_len,
                          "batch_size": args.batch_size, "per_step_s": round(fitted.per_step, 4),
                          "per_pass_s": round(fitted.per_pass, 4)}), flush=True)
    ratio_errors = []
    for mode in runs:
        if mode == "adaptive":
            continue
        measured = sums["adaptive"][0] / sums[mode][0]
        predicted = sums["adaptive"][1] / sums[mode][1]
        ratio_errors.append(abs(measured / predicted - 1))
        print(json.dumps({"bench": "sp_measured_ratio", "adaptive_over": mode, "measured": round(measured, 3),
                          "predicted": round(predicted, 3), "error": round(ratio_errors[-1], 3)}), flush=True)
    plan_error = max(line["plan_error_max"] for line in lines.values())
    wait_ms = max(lines[m]["plan_wait_ms_median"] for m in runs)
    print(json.dumps({"bench": "sp_measured_acceptance", "plan_error_max": plan_error,
                      "plans_ok": plan_error <= PLAN_ERROR, "ratio_error_max": round(max(ratio_errors), 3),
                      "ratios_ok": max(ratio_errors) <= RATIO_ERROR, "plan_wait_ms_median_max": wait_ms,
                      "wait_ok": wait_ms < 1000 * WAIT_S}), flush=True)


if __name__ == "__main__":
    main()
