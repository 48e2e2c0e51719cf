"""Loss against cross-replica bytes for every way replicas can sync, on the default corpus.

Every method trains the same model on the same tokens with 4 replicas (4 real processes, gloo on
loopback, torchrun): no simulation. Prints one JSON line per method (final validation loss,
cross-replica bytes sent per rank, cross-replica collective calls) and writes a loss-vs-bytes plot.
Usage: python bench/lowcomm.py [--steps 500] [--jobs 1] [--out DIR] [--plot docs/lowcomm.png] [--only name,...]
       [key=value ...]
--jobs runs that many methods at once (each is 4 single-threaded processes: give it 4 cores per job).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.plots import load_run, plot_bytes, save  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from launch.cluster import torchrun_cmd  # noqa: E402

FEDAVG = ["sync.outer_lr=1", "sync.outer_momentum=0"]  # the outer step is the plain average of the replicas
# adamw-update*: every step, each replica takes its own AdamW step and the replicas average that update (DiLoCo
# with H = 1 and FedAvg), dense or through error feedback; EF14 on the update is EF21 on the replica's cumulative
# update (README, "Loss against bytes"; tests/test_lowcomm_math.py)
ADAMW_UPDATE = ["sync.method=diloco", "sync.H=1", *FEDAVG]
METHODS = {
    "ddp": [],
    "ddp+ef21-top1%": ["sync.compress=ef21-topk", "sync.ratio=0.01"],
    "ddp+ef21sgdm-top1%": ["sync.compress=ef21sgdm-topk", "sync.ratio=0.01", "optim.beta1=0"],
    "ddp+ef14-top1%": ["sync.compress=ef14-topk", "sync.ratio=0.01"],
    "adamw-update": ADAMW_UPDATE,
    "adamw-update+ef14-top1%": [*ADAMW_UPDATE, "sync.compress=ef14-topk", "sync.ratio=0.01"],
    "adamw-update+ef21-top1%": [*ADAMW_UPDATE, "sync.compress=ef21-topk", "sync.ratio=0.01"],
    "diloco-H50": ["sync.method=diloco", "sync.H=50"],
    "diloco-H50-fedavg": ["sync.method=diloco", "sync.H=50", *FEDAVG],
    "streaming-diloco-H50-P4-int4": ["sync.method=diloco", "sync.H=50", "sync.fragments=4", "sync.precision=int4"],
    "noloco-H50": ["sync.method=noloco", "sync.H=50"],
    # alpha 0, beta = gamma = 1: each pair's slow weights become the pair's mean fast weights (pairwise FedAvg)
    "noloco-H50-pair-average": ["sync.method=noloco", "sync.H=50", "sync.alpha=0", "sync.beta=1", "sync.gamma=1"],
    # the error-feedback state carries the outer step's memory: no outer momentum on top (required with compress)
    "diloco-H50+ef21-top10%": ["sync.method=diloco", "sync.H=50", "sync.compress=ef21-topk", "sync.ratio=0.1",
                               "sync.outer_momentum=0"],
    "diloco-H50+ef14-top10%": ["sync.method=diloco", "sync.H=50", "sync.compress=ef14-topk", "sync.ratio=0.1",
                               "sync.outer_momentum=0"],
}
BASE = ["parallel.replicas=4", "parallel.stages=1", "parallel.microbatches=1", "train.batch_size=8",
        "data.seq_len=128", "log.eval_batches=16", "log.log_every=50", "checkpoint.every=0", "log.tensorboard=false"]


def method_args(name: str, steps: int, extra: list[str], workdir: str) -> list[str]:
    return [*BASE, f"train.steps={steps}", f"log.eval_every={steps // 5}", f"log.run_dir={os.path.join(workdir, name)}",
            *METHODS[name], *extra]


def run_method(name: str, steps: int, extra: list[str], workdir: str) -> dict:
    args = method_args(name, steps, extra, workdir)
    run_dir, cfg = os.path.join(workdir, name), load_config(args)
    cmd = torchrun_cmd(4, "train.py", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    return {"bench": "lowcomm", "method": name, "val_loss": s["val_loss"],
            "cross_replica_bytes_per_rank": s["bytes_sent"]["cross_replica"],
            "cross_replica_collectives": s["collectives"].get("cross_replica", 0),
            "cross_replica_p2p": s["p2p"].get("cross_replica", 0), "steps": steps,
            "tokens": steps * cfg.parallel.replicas * cfg.train.batch_size * cfg.data.seq_len}


# the targets: (method, reference, most val-loss increase over the reference, fewest x fewer bytes than
# DDP, most cross-replica collectives)
TARGETS = [("diloco-H50", "ddp", 0.03, 40, None), ("diloco-H50-fedavg", "ddp", 0.03, 40, None),
           ("ddp+ef21-top1%", "ddp", 0.03, 25, None), ("adamw-update+ef14-top1%", "ddp", 0.03, 25, None),
           ("noloco-H50", "diloco-H50", 0.02, None, 0),
           ("noloco-H50-pair-average", "diloco-H50-fedavg", 0.02, None, 0)]


def check_target(by_name: dict, method: str, ref: str, max_loss: float, min_bytes_x: float | None,
                 max_collectives: int | None) -> dict:
    r = by_name[method]
    loss = r["val_loss"] / by_name[ref]["val_loss"] - 1
    out = {"bench": "lowcomm-target", "method": method, "against": ref, "val_loss_vs": round(loss, 4),
           "holds": loss <= max_loss}
    if min_bytes_x is not None and "ddp" in by_name:
        out["bytes_reduction_x"] = round(by_name["ddp"]["cross_replica_bytes_per_rank"]
                                         / max(r["cross_replica_bytes_per_rank"], 1), 1)
        out["holds"] = out["holds"] and out["bytes_reduction_x"] >= min_bytes_x
    if max_collectives is not None:
        out["cross_replica_collectives"] = r["cross_replica_collectives"]
        out["holds"] = out["holds"] and r["cross_replica_collectives"] <= max_collectives
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs", "lowcomm.png"))
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--jobs", type=int, default=1, help="methods run at once (4 processes each)")
    ap.add_argument("--out", default="", help="keep every method's run directory here (default: a temporary one)")
    args, extra = ap.parse_known_args()
    names = [n for n in METHODS if not args.only or n in args.only.split(",")]
    unknown = sorted(set(args.only.split(",")) - set(METHODS)) if args.only else []
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {list(METHODS)}")

    def one(name: str) -> dict:
        r = run_method(name, args.steps, extra, workdir)
        print(json.dumps(r), flush=True)
        return r

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.out or tmp
        for name in names:  # every method's config is checked before any runs: a bad override is one line
            try:
                load_config(method_args(name, args.steps, extra, workdir))
            except ConfigError as err:
                raise SystemExit(f"bench/lowcomm.py: {name}: {err}") from None
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(one, names))
        plot([load_run(os.path.join(workdir, name)) for name in names], args.plot)
    by_name = {r["method"]: r for r in results}
    if "ddp" in by_name:
        for r in results:
            print(json.dumps({"bench": "lowcomm-vs-ddp", "method": r["method"],
                              "val_loss_vs_ddp": round(r["val_loss"] / by_name["ddp"]["val_loss"] - 1, 4),
                              "bytes_reduction_x": round(by_name["ddp"]["cross_replica_bytes_per_rank"]
                                                         / max(r["cross_replica_bytes_per_rank"], 1), 1)}))
    for target in TARGETS:
        if target[0] in by_name and target[1] in by_name:
            print(json.dumps(check_target(by_name, *target)))


def plot(runs: list[dict], path: str) -> None:
    """Validation loss against cross-replica bytes, one curve per method (bench/plots.py's chart)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plot_bytes(runs, ax)
    ax.set_title("Loss vs communication: 4 replicas, same model and tokens")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(fig, path)


if __name__ == "__main__":
    main()
