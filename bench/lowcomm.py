"""Loss against cross-replica bytes for every way replicas can sync, on the default corpus.

Every method trains the same model on the same tokens with 4 replicas (4 real processes, gloo on
loopback, torchrun): no simulation. Prints one JSON line per method (final validation loss,
cross-replica bytes sent per rank, cross-replica collective calls) and writes a loss-vs-bytes plot.
Usage: python bench/lowcomm.py [--steps 500] [--plot docs/lowcomm.png] [--only name,...] [key=value ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from metrics import read_jsonl  # noqa: E402

METHODS = {
    "ddp": [],
    "ddp+ef21-top1%": ["sync.compress=ef21-topk", "sync.ratio=0.01"],
    "ddp+ef21sgdm-top1%": ["sync.compress=ef21sgdm-topk", "sync.ratio=0.01"],
    "ddp+ef14-top1%": ["sync.compress=ef14-topk", "sync.ratio=0.01"],
    "diloco-H50": ["sync.method=diloco", "sync.H=50"],
    "diloco-H50-outer-mom0.3": ["sync.method=diloco", "sync.H=50", "sync.outer_momentum=0.3"],
    "streaming-diloco-H50-P4-int4": ["sync.method=diloco", "sync.H=50", "sync.fragments=4", "sync.precision=int4"],
    "noloco-H50": ["sync.method=noloco", "sync.H=50"],
    "diloco-H50+ef21-top10%": ["sync.method=diloco", "sync.H=50", "sync.compress=ef21-topk", "sync.ratio=0.1"],
}
BASE = ["parallel.replicas=4", "parallel.stages=1", "parallel.microbatches=1", "train.batch_size=8",
        "data.seq_len=128", "log.eval_batches=16", "log.log_every=50", "checkpoint.every=0", "log.tensorboard=false"]


def run_method(name: str, overrides: list[str], steps: int, extra: list[str], workdir: str) -> dict:
    run_dir = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
           os.path.join(ROOT, "train.py"), *BASE, f"train.steps={steps}", f"log.eval_every={steps // 5}",
           f"log.run_dir={run_dir}", *overrides, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    curve = [(r["cross_bytes"], r["val_loss"]) for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if "val_loss" in r]
    return {"bench": "lowcomm", "method": name, "val_loss": s["val_loss"],
            "cross_replica_bytes_per_rank": s["bytes_sent"]["cross_replica"],
            "cross_replica_collectives": s["collectives"].get("cross_replica", 0),
            "cross_replica_p2p": s["p2p"].get("cross_replica", 0), "steps": steps,
            "tokens": steps * 4 * 8 * 128, "curve": curve}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in results:
        xs, ys = zip(*[(max(b, 1.0) / 1e6, v) for b, v in r["curve"]])
        ax.plot(xs, ys, marker="o", ms=3, label=f"{r['method']} ({r['val_loss']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("cross-replica MB sent per rank (log)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Loss vs communication: 4 replicas, same model and tokens")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "lowcomm.png"))
    ap.add_argument("--only", default="", help="comma-separated method names")
    args, extra = ap.parse_known_args()
    names = [n for n in METHODS if not args.only or n in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            r = run_method(name, METHODS[name], args.steps, extra, workdir)
            results.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}), flush=True)
    ddp = next((r for r in results if r["method"] == "ddp"), None)
    if ddp:
        for r in results:
            print(json.dumps({"bench": "lowcomm-vs-ddp", "method": r["method"],
                              "val_loss_vs_ddp": round(r["val_loss"] / ddp["val_loss"] - 1, 4),
                              "bytes_reduction_x": round(ddp["cross_replica_bytes_per_rank"]
                                                         / max(r["cross_replica_bytes_per_rank"], 1), 1)}))
    plot(results, args.plot)


if __name__ == "__main__":
    main()
