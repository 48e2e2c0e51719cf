"""PNG plots of finished (or running) runs from what they write: metrics.jsonl, events.jsonl and config.yaml.

  python bench/plots.py RUN_DIR [RUN_DIR ...] [--out docs/]

  python bench/plots.py --churn docs/churn.jsonl docs/churn_lowcomm.jsonl --out docs/

Writes loss_vs_tokens.png (train loss, a 10-step running mean, and validation loss against tokens seen),
loss_vs_bytes.png (validation loss against the cross-replica bytes every rank of the job sent together),
goodput.png (validation loss against wall-clock seconds: runs with and without churn side by side),
step_times.png (each logged interval's step split into compute, waiting on the replica's peers, sync),
recoveries.png (steps against wall-clock seconds with every kill and every resumed generation marked, when some
run has recovery events) and, from bench/churn.py's JSON lines, time_to_target.png (seconds to the target loss
against the failure rate). One curve per run, named after its folder. Prints one JSON line listing the files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metrics import read_jsonl, read_log  # noqa: E402

RECOVERY_EVENTS = {"kill", "detect", "rebuilt", "resumed", "restart"}


def load_run(run_dir: str) -> dict:
    """One run's curves: train loss and val loss by tokens seen, val loss by cross-replica bytes, steps by time."""
    metrics, config = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "config.yaml")
    for path in (metrics, config):
        if not os.path.exists(path):
            raise SystemExit(f"plots: error: {run_dir} has no {os.path.basename(path)}: pass a run folder "
                             f"(the log.run_dir of a run that has started training)")
    with open(config) as fh:
        cfg = yaml.safe_load(fh)
    tokens_per_step = cfg["parallel"]["replicas"] * cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
    records = read_log(metrics)
    train = sorted((r["step"], r["loss"], r["t"]) for r in records if "loss" in r)
    job_bytes = whole_job_bytes(run_dir)
    val = sorted((r["step"], r["val_loss"], job_bytes(r["step"]) if job_bytes else r["cross_bytes"])
                 for r in records if "val_loss" in r)
    times = sorted((r["step"], r["compute_s"], r["waiting_s"], r["sync_s"]) for r in records if "compute_s" in r)
    val_clock = sorted((r["t"], r["val_loss"]) for r in records if "val_loss" in r)
    events = [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e["event"] in RECOVERY_EVENTS]
    return {"name": os.path.basename(os.path.normpath(run_dir)), "tokens_per_step": tokens_per_step, "train": train,
            "val": val, "val_clock": val_clock, "events": events, "times": times, "bytes_scope": "all ranks" if job_bytes else "logger rank"}


def whole_job_bytes(run_dir: str):
    """step -> cross-replica bytes sent by every rank together up to that step (each rank's latest record at or
    before it, from bytes/rank<k>.jsonl); None for a run that did not write them."""
    folder = os.path.join(run_dir, "bytes")
    if not os.path.isdir(folder):
        return None
    ranks = [sorted((r["step"], r["sent"]["cross_replica"]) for r in read_log(os.path.join(folder, name)))
             for name in sorted(os.listdir(folder)) if name.endswith(".jsonl")]

    def at(step: int) -> float:
        return sum(next((b for s, b in reversed(rank) if s <= step), 0.0) for rank in ranks)
    return at


def running_mean(values: list[float], window: int = 10) -> np.ndarray:
    """The mean of each value and the (up to) window - 1 before it."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_tokens(runs: list[dict], ax) -> None:
    for run in runs:
        steps, losses, _ = zip(*run["train"])
        tokens = np.array(steps) * run["tokens_per_step"] / 1e6
        line, = ax.plot(tokens, running_mean(losses), lw=1.2, label=f"{run['name']} train (10-step mean)")
        if run["val"]:
            vs, vl, _ = zip(*run["val"])
            ax.plot(np.array(vs) * run["tokens_per_step"] / 1e6, vl, "o--", color=line.get_color(), ms=4,
                    label=f"{run['name']} val ({vl[-1]:.3f})")
    ax.set_xlabel("tokens seen (millions, all replicas)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss vs tokens")


def plot_bytes(runs: list[dict], ax) -> None:
    from matplotlib import colormaps
    colors = colormaps["tab20"].colors  # distinct colours for up to 20 runs (bench/lowcomm.py plots 14)
    for i, run in enumerate(r for r in runs if r["val"]):
        _, vl, vb = zip(*run["val"])
        ax.plot(np.maximum(vb, 1.0) / 1e6, vl, "os^D"[i % 4] + "-", ms=4, color=colors[i % len(colors)],
                label=f"{run['name']} ({vl[-1]:.3f})")
    ax.set_xscale("log")
    scopes = {r.get("bytes_scope", "logger rank") for r in runs}
    ax.set_xlabel(f"cross-replica MB sent, {' / '.join(sorted(scopes))} (log)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs communication")


def plot_recoveries(runs: list[dict], axes) -> None:
    for run, ax in zip(runs, axes):
        t0 = min([t for _, _, t in run["train"]] + [e["t"] for e in run["events"]])
        steps, _, times = zip(*run["train"])
        ax.plot(np.array(times) - t0, steps, lw=1.2, color="black", label="committed steps")
        lost = [e["t"] - t0 for e in run["events"] if e["event"] == "kill"]
        if not lost:  # no launcher logged its kills (a node agent, a real failure): the coordinator's detections
            lost = [e["t"] - t0 for e in run["events"] if e["event"] == "detect"]
        resumed = {}  # per generation, the last rank back (a checkpoint restart logs one, without a generation)
        for e in (e for e in run["events"] if e["event"] == "resumed"):
            gen = e.get("gen", e["t"])
            resumed[gen] = max(resumed.get(gen, 0.0), e["t"] - t0)
        for i, t in enumerate(lost):
            ax.axvline(t, color="tab:red", ls="--", lw=1, label="worker lost" if i == 0 else None)
        for i, t in enumerate(sorted(resumed.values())):
            ax.axvline(t, color="tab:green", ls=":", lw=1.5, label="training again" if i == 0 else None)
        rebuilt = sorted({e["method"] for e in run["events"] if e["event"] == "rebuilt"})
        ax.set_title(f"{run['name']}: {len(lost)} lost, {len(resumed)} resumed"
                     + (f" (rebuilt by {', '.join(rebuilt)})" if rebuilt else ""))
        ax.set_ylabel("step")
    axes[-1].set_xlabel("seconds since start")


def plot_goodput(runs: list[dict], ax) -> None:
    """Validation loss against wall-clock seconds since the run's first step: what churn costs in time."""
    for run in (r for r in runs if r["val_clock"] and r["train"]):
        t0 = min([t for _, _, t in run["train"]] + [e["t"] for e in run["events"]])
        ts, vl = zip(*run["val_clock"])
        kills = sum(e["event"] == "kill" for e in run["events"])
        ax.plot(np.array(ts) - t0, vl, "o-", ms=3, label=f"{run['name']} ({kills} killed, {vl[-1]:.3f})")
    ax.set_xlabel("seconds since start (wall clock)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Goodput: loss vs wall clock")


def plot_step_times(runs: list[dict], axes) -> None:
    """Each logged interval's mean step split into compute, waiting on peers of the replica, and sync."""
    for run, ax in zip(runs, axes):
        steps, compute, waiting, sync = (np.array(c) for c in zip(*run["times"]))
        ax.stackplot(steps, compute, waiting, sync, labels=["compute", "waiting on peers", "sync between replicas"],
                     colors=["tab:blue", "tab:orange", "tab:red"], alpha=0.8)
        ax.set_title(f"{run['name']}: seconds per step")
        ax.set_ylabel("s / step")
    axes[-1].set_xlabel("step")


def plot_time_to_target(rows: list[dict], ax) -> None:
    """bench/churn.py's rows: seconds to the target loss against the failure rate, one line per sync and method
    (a missing point: the target was never reached)."""
    lines: dict[str, list] = {}
    for r in rows:
        if r.get("bench") == "churn":
            lines.setdefault(f"{r.get('sync', 'ddp')} {r['method']}", []).append(
                (r["rate_per_100_steps"], r["seconds_to_target"]))
    for name, points in sorted(lines.items()):
        rate, secs = zip(*sorted(points))
        ax.plot(rate, [np.nan if s is None else s for s in secs], "o-", ms=4, label=name)
    ax.set_xlabel("workers killed per 100 steps")
    ax.set_ylabel("seconds to the target validation loss")
    ax.set_title("Time to target vs failure rate")


def save(fig, path: str) -> str:
    for ax in fig.axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="run folders (log.run_dir)")
    ap.add_argument("--out", default="docs", help="folder for the PNG files")
    ap.add_argument("--churn", nargs="*", default=[], help="bench/churn.py JSON-line files (time_to_target.png)")
    args = ap.parse_args(argv)
    if not args.runs and not args.churn:
        raise SystemExit("plots: error: nothing to plot: pass run folders and/or --churn docs/churn.jsonl")
    runs = [load_run(d) for d in args.runs]
    empty = [r["name"] for r in runs if not r["train"]]
    if empty:
        raise SystemExit(f"plots: error: run {empty[0]} has no committed step in metrics.jsonl yet: let it train first")
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plots: error: matplotlib is not installed: pip install -e .[plots]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    files = []

    def chart(name: str, draw, data) -> None:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        draw(data, ax)
        files.append(save(fig, os.path.join(args.out, name)))
    if runs:
        chart("loss_vs_tokens.png", plot_tokens, runs)
    if any(r["val"] for r in runs):
        chart("loss_vs_bytes.png", plot_bytes, runs)
        chart("goodput.png", plot_goodput, runs)
    timed = [r for r in runs if r["times"]]
    if timed:
        fig, axes = plt.subplots(len(timed), 1, figsize=(7.5, 1.5 + 2 * len(timed)), squeeze=False)
        plot_step_times(timed, axes[:, 0])
        files.append(save(fig, os.path.join(args.out, "step_times.png")))
    if args.churn:
        chart("time_to_target.png", plot_time_to_target, [r for path in args.churn for r in read_jsonl(path)])
    churned = [r for r in runs if r["events"]]
    if churned:
        fig, axes = plt.subplots(len(churned), 1, figsize=(7.5, 2.2 + 1.8 * len(churned)), squeeze=False)
        plot_recoveries(churned, axes[:, 0])
        files.append(save(fig, os.path.join(args.out, "recoveries.png")))
    print(json.dumps({"plots": files, "runs": args.runs}), flush=True)
    return files


if __name__ == "__main__":
    main()
