"""PNG plots of finished (or running) runs from what they write: metrics.jsonl, events.jsonl and config.yaml.

  python bench/plots.py RUN_DIR [RUN_DIR ...] [--out docs/]

Writes loss_vs_tokens.png (train loss, a 10-step running mean, and validation loss against tokens seen),
loss_vs_bytes.png (validation loss against the cross-replica bytes the logger rank sent, when some run evaluated)
and recoveries.png (steps against wall-clock seconds with every kill and every resumed generation marked, when some
run has recovery events), one curve per run named after its folder. Prints one JSON line listing the files.
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
    val = sorted((r["step"], r["val_loss"], r["cross_bytes"]) for r in records if "val_loss" in r)
    events = [e for e in read_jsonl(os.path.join(run_dir, "events.jsonl")) if e["event"] in RECOVERY_EVENTS]
    return {"name": os.path.basename(os.path.normpath(run_dir)), "tokens_per_step": tokens_per_step, "train": train,
            "val": val, "events": events}


def running_mean(values: list[float], window: int = 10) -> np.ndarray:
    """The mean of each value and the (up to) window - 1 before it."""
    sums = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_tokens(runs: list[dict], ax) -> None:
    for run in runs:
        steps, losses, _ = zip(*run["train"])
        tokens = (np.array(steps) + 1) * run["tokens_per_step"] / 1e6
        line, = ax.plot(tokens, running_mean(losses), lw=1.2, label=f"{run['name']} train (10-step mean)")
        if run["val"]:
            vs, vl, _ = zip(*run["val"])
            ax.plot((np.array(vs) + 1) * run["tokens_per_step"] / 1e6, vl, "o--", color=line.get_color(), ms=4,
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
    ax.set_xlabel("cross-replica MB sent by the logger rank (log)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs communication")


def plot_recoveries(runs: list[dict], axes) -> None:
    for run, ax in zip(runs, axes):
        t0 = min([t for _, _, t in run["train"]] + [e["t"] for e in run["events"]])
        steps, _, times = zip(*run["train"])
        ax.plot(np.array(times) - t0, np.array(steps) + 1, lw=1.2, color="black", label="committed steps")
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
    ap.add_argument("runs", nargs="+", help="run folders (log.run_dir)")
    ap.add_argument("--out", default="docs", help="folder for the PNG files")
    args = ap.parse_args(argv)
    runs = [load_run(d) for d in args.runs]
    empty = [r["name"] for r in runs if not r["train"]]
    if empty:
        raise SystemExit(f"plots: error: run {empty[0]} has no committed step in metrics.jsonl yet: let it train first")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(args.out, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    plot_tokens(runs, ax)
    files = [save(fig, os.path.join(args.out, "loss_vs_tokens.png"))]
    if any(r["val"] for r in runs):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        plot_bytes(runs, ax)
        files.append(save(fig, os.path.join(args.out, "loss_vs_bytes.png")))
    churned = [r for r in runs if r["events"]]
    if churned:
        fig, axes = plt.subplots(len(churned), 1, figsize=(7.5, 2.2 + 1.8 * len(churned)), squeeze=False)
        plot_recoveries(churned, axes[:, 0])
        files.append(save(fig, os.path.join(args.out, "recoveries.png")))
    print(json.dumps({"plots": files, "runs": args.runs}), flush=True)
    return files


if __name__ == "__main__":
    main()
