"""Loss against cross-replica bytes for every way replicas can sync, on the default corpus.

Every method trains the same model on the same tokens (real processes, gloo on loopback, torchrun): no
simulation. Prints one JSON line per method (final validation loss, cross-replica bytes sent per rank,
cross-replica collective calls) and writes a loss-vs-bytes plot.
Two regimes:
  quick (default): 4 replicas, 500 steps of 1,024 tokens per replica, 2.5 tokens per parameter: a CI-sized check.
  paper: the regime published DiLoCo results live in: a 0.24M-parameter model, ~20 tokens per parameter,
    4,600 steps (115 outer steps at H = 40), warm-up and cosine decay, 2 and 4 replicas at the same global batch;
    DDP's learning rate is tuned first (PAPER_LRS) and every other method trains with the best one. Also writes
    loss against wall clock at a given bandwidth, *computed* from each run's measured seconds per step and
    measured bytes (with and without overlap), and prints each method's computed time.
Usage: python bench/lowcomm.py [--regime quick|paper] [--steps N] [--jobs 1] [--out DIR] [--plot PNG]
       [--only name,...] [--bandwidth-mbit 100] [--lr LR (paper: skip tuning)] [key=value ...]
--jobs runs that many methods at once (each is 2-4 single-threaded processes: give it 4 cores per job).
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
# update (docs/lowcomm.md; tests/test_lowcomm_math.py)
ADAMW_UPDATE = ["sync.method=diloco", "sync.H=1", *FEDAVG]
QUICK = {
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
    # NoLoCo's replicas differ: the model a user exports is their average, one all-reduce after the last step
    # (counted apart from training's collectives)
    "noloco-H50": ["sync.method=noloco", "sync.H=50", "sync.final_average=true"],
    # alpha 0, beta = gamma = 1: each pair's slow weights become the pair's mean fast weights (pairwise FedAvg)
    "noloco-H50-pair-average": ["sync.method=noloco", "sync.H=50", "sync.alpha=0", "sync.beta=1", "sync.gamma=1",
                                "sync.final_average=true"],
    # the error-feedback state carries the outer step's memory: no outer momentum on top (required with compress)
    "diloco-H50+ef21-top10%": ["sync.method=diloco", "sync.H=50", "sync.compress=ef21-topk", "sync.ratio=0.1",
                               "sync.outer_momentum=0"],
    "diloco-H50+ef14-top10%": ["sync.method=diloco", "sync.H=50", "sync.compress=ef14-topk", "sync.ratio=0.1",
                               "sync.outer_momentum=0"],
}
QUICK_BASE = ["parallel.replicas=4", "parallel.stages=1", "parallel.microbatches=1", "train.batch_size=8",
              "data.seq_len=128", "log.eval_batches=16", "log.log_every=50", "checkpoint.every=0",
              "log.tensorboard=false"]
# the targets: (method, reference, most val-loss increase over the reference, fewest x fewer bytes than
# DDP, most cross-replica collectives during training)
QUICK_TARGETS = [("diloco-H50", "ddp", 0.03, 40, None), ("diloco-H50-fedavg", "ddp", 0.03, 40, None),
                 ("ddp+ef21-top1%", "ddp", 0.03, 25, None), ("adamw-update+ef14-top1%", "ddp", 0.03, 25, None),
                 ("noloco-H50", "diloco-H50", 0.02, None, 0),
                 ("noloco-H50-pair-average", "diloco-H50-fedavg", 0.02, None, 0)]

# the same global batch; the same 128 validation sequences (eval_batches x batch_size)
R4 = ["parallel.replicas=4", "train.batch_size=4", "log.eval_batches=32"]
R2 = ["parallel.replicas=2", "train.batch_size=8", "log.eval_batches=16"]
DILOCO_H40 = ["sync.method=diloco", "sync.H=40"]
PAPER = {
    "ddp": R4,
    "ddp-2rep": R2,
    "diloco-H40": [*R4, *DILOCO_H40],
    "diloco-H40-2rep": [*R2, *DILOCO_H40],
    # the model a user exports is the replicas' average: one all-reduce after the last step (counted apart)
    "noloco-H40": [*R4, "sync.method=noloco", "sync.H=40", "sync.final_average=true"],
    "sparseloco-H40-top3%": [*R4, *DILOCO_H40, "sync.compress=sparseloco", "sync.ratio=0.03", "sync.chunk=4096",
                             *FEDAVG],
    "adamw-update": [*R4, *ADAMW_UPDATE],
    "adamw-update+ef14-top1%": [*R4, *ADAMW_UPDATE, "sync.compress=ef14-topk", "sync.ratio=0.01",
                                "sync.dense_warmup=20"],
    # the exchange hides behind 5 inner steps (about 0.14 s of compute here; an exchange takes 0.11 s at 100 Mbit/s);
    # 20 steps hide nothing more and apply a staler outer step
    "diloco-H40-overlap5": [*R4, *DILOCO_H40, "sync.overlap=5"],
    "diloco-H40-overlap20": [*R4, *DILOCO_H40, "sync.overlap=20"],
}
PAPER_BASE = ["parallel.stages=1", "parallel.microbatches=1", "model.dim=64", "model.n_layers=4", "data.seq_len=64",
              "optim.warmup_steps=100", "log.log_every=230", "checkpoint.every=0",
              "log.tensorboard=false"]
PAPER_LRS = (2e-3, 4e-3, 8e-3)  # DDP's learning rate, tuned at the regime's token budget (min_lr = lr / 10)
PAPER_TARGETS = [("diloco-H40", "ddp", 0.05, 40, None), ("diloco-H40-2rep", "ddp-2rep", 0.03, 40, None),
                 ("noloco-H40", "diloco-H40", 0.015, None, 0),
                 ("sparseloco-H40-top3%", "diloco-H40", 0.01, 500, None),
                 ("adamw-update+ef14-top1%", "adamw-update", 0.03, 25, None)]
REGIMES = {"quick": (QUICK_BASE, QUICK, QUICK_TARGETS, 500), "paper": (PAPER_BASE, PAPER, PAPER_TARGETS, 4600)}


def method_args(base: list[str], overrides: list[str], name: str, steps: int, extra: list[str],
                workdir: str) -> list[str]:
    return [*base, f"train.steps={steps}", f"log.eval_every={steps // 10}", f"log.run_dir={os.path.join(workdir, name)}",
            *overrides, *extra]


def run_method(name: str, args: list[str], workdir: str) -> dict:
    run_dir, cfg = os.path.join(workdir, name), load_config(args)
    cmd = torchrun_cmd(cfg.parallel.replicas * cfg.parallel.stages, "train.py", *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(run_dir, "summary.json")) as fh:
        s = json.load(fh)
    export = 1 if cfg.sync.final_average else 0  # the one all-reduce that leaves a single model to export
    return {"bench": "lowcomm", "method": name, "val_loss": s["val_loss"], "replicas": cfg.parallel.replicas,
            "lr": cfg.optim.lr, "cross_replica_bytes_per_rank": s["bytes_sent"]["cross_replica"],
            "cross_replica_collectives": s["collectives"].get("cross_replica", 0) - export,
            "export_average_collectives": export, "cross_replica_p2p": s["p2p"].get("cross_replica", 0),
            "steps": cfg.train.steps, "seconds_per_step": cfg.parallel.replicas * cfg.train.batch_size
            * cfg.data.seq_len / s["tokens_per_s"], "overlap_steps": cfg.sync.overlap,
            "tokens": cfg.train.steps * cfg.parallel.replicas * cfg.train.batch_size * cfg.data.seq_len}


def check_target(by_name: dict, method: str, ref: str, max_loss: float, min_bytes_x: float | None,
                 max_collectives: int | None) -> dict:
    r = by_name[method]
    loss = r["val_loss"] / by_name[ref]["val_loss"] - 1
    out = {"bench": "lowcomm-target", "method": method, "against": ref, "val_loss_vs": round(loss, 4),
           "holds": loss <= max_loss}
    if min_bytes_x is not None:
        ddp = by_name["ddp-2rep" if r["replicas"] == 2 and "ddp-2rep" in by_name else "ddp"]
        out["bytes_reduction_x"] = round(ddp["cross_replica_bytes_per_rank"] / max(r["cross_replica_bytes_per_rank"], 1), 1)
        out["holds"] = out["holds"] and out["bytes_reduction_x"] >= min_bytes_x
    if max_collectives is not None:
        out["cross_replica_collectives"] = r["cross_replica_collectives"]
        out["holds"] = out["holds"] and r["cross_replica_collectives"] <= max_collectives
    return out


def computed_seconds(r: dict, steps: int, nbytes: float, bandwidth: float) -> float:
    """Wall clock after `steps` steps with `nbytes` sent per rank, on a link of `bandwidth` bytes/s (computed):
    measured seconds per step x steps, plus each exchange's transfer time beyond what overlap hides
    (an exchange overlapped with tau steps hides tau x seconds per step of its transfer)."""
    exchanges = r["cross_replica_collectives"] + r["export_average_collectives"] + r["cross_replica_p2p"]
    total = r["cross_replica_bytes_per_rank"]
    if not exchanges or not total:
        return steps * r["seconds_per_step"]
    per_exchange = total / exchanges / bandwidth
    exposed = max(0.0, per_exchange - r["overlap_steps"] * r["seconds_per_step"])
    return steps * r["seconds_per_step"] + nbytes / total * exchanges * exposed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--regime", choices=sorted(REGIMES), default="quick")
    ap.add_argument("--steps", type=int, default=0, help="default: the regime's (quick 500, paper 4600)")
    ap.add_argument("--plot", default="", help="default: docs/lowcomm.png (quick) or docs/lowcomm_paper.png")
    ap.add_argument("--only", default="", help="comma-separated method names")
    ap.add_argument("--jobs", type=int, default=1, help="methods run at once (2-4 processes each)")
    ap.add_argument("--out", default="", help="keep every method's run directory here (default: a temporary one)")
    ap.add_argument("--bandwidth-mbit", type=float, default=100.0, help="the link of the computed wall clock (paper)")
    ap.add_argument("--lr", type=float, default=0.0, help="paper: train with this lr instead of tuning DDP's first")
    args, extra = ap.parse_known_args()
    base, methods, targets, default_steps = REGIMES[args.regime]
    steps = args.steps or default_steps
    names = [n for n in methods if not args.only or n in args.only.split(",")]
    unknown = sorted(set(args.only.split(",")) - set(methods)) if args.only else []
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}: choose from {list(methods)}")
    plot_path = args.plot or os.path.join(ROOT, "docs", "lowcomm.png" if args.regime == "quick" else "lowcomm_paper.png")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.out or tmp

        def run_all(specs: dict[str, list[str]]) -> list[dict]:
            for name, a in specs.items():  # every config is checked before any runs: a bad override is one line
                try:
                    load_config(a)
                except ConfigError as err:
                    raise SystemExit(f"bench/lowcomm.py: {name}: {err}") from None

            def one(item) -> dict:
                r = run_method(*item, workdir)
                print(json.dumps(r), flush=True)
                return r
            with ThreadPoolExecutor(max(1, args.jobs)) as pool:
                return list(pool.map(one, specs.items()))

        results, tuned = [], []
        if args.regime == "paper" and args.lr:  # tuned by an earlier run
            extra = [f"optim.lr={args.lr}", f"optim.min_lr={args.lr / 10}", *extra]
        elif args.regime == "paper":  # DDP's learning rate first; every method then trains with the best one
            sweep = {f"ddp-lr{lr:g}": method_args(base, [*PAPER["ddp"], f"optim.lr={lr}", f"optim.min_lr={lr / 10}"],
                                                  f"ddp-lr{lr:g}", steps, extra, workdir) for lr in PAPER_LRS}
            tuned = run_all(sweep)
            best = min(tuned, key=lambda r: r["val_loss"])["lr"]
            print(json.dumps({"bench": "lowcomm-lr", "ddp_val_loss_by_lr": {r["lr"]: r["val_loss"] for r in tuned},
                              "best_lr": best}), flush=True)
            extra = [f"optim.lr={best}", f"optim.min_lr={best / 10}", *extra]
            results = [dict(r, method="ddp") for r in tuned if r["lr"] == best and "ddp" in names]
            names = [n for n in names if not (n == "ddp" and results)]
        results += run_all({n: method_args(base, methods[n], n, steps, extra, workdir) for n in names})
        runs = {}
        for r in results:  # the tuned DDP run is the sweep's best
            folder = f"ddp-lr{r['lr']:g}" if r["method"] == "ddp" and tuned else r["method"]
            runs[r["method"]] = dict(load_run(os.path.join(workdir, folder)), name=r["method"])
        plot(list(runs.values()), plot_path, f"{args.regime} regime: same model and tokens per method")
        if args.regime == "paper":
            bandwidth = args.bandwidth_mbit * 1e6 / 8
            plot_wall_clock(results, runs, bandwidth, plot_path.replace(".png", "_wallclock.png"))
    by_name = {r["method"]: r for r in results}
    if "ddp" in by_name:
        for r in results:
            ddp = by_name["ddp-2rep" if r["replicas"] == 2 and "ddp-2rep" in by_name else "ddp"]
            print(json.dumps({"bench": "lowcomm-vs-ddp", "method": r["method"],
                              "val_loss_vs_ddp": round(r["val_loss"] / ddp["val_loss"] - 1, 4),
                              "bytes_reduction_x": round(ddp["cross_replica_bytes_per_rank"]
                                                         / max(r["cross_replica_bytes_per_rank"], 1), 1)}))
    if args.regime == "paper":
        for r in results:
            compute = r["steps"] * r["seconds_per_step"]
            wall = computed_seconds(r, r["steps"], r["cross_replica_bytes_per_rank"], bandwidth)
            print(json.dumps({"bench": "lowcomm-wallclock", "computed": True, "method": r["method"],
                              "bandwidth_mbit": args.bandwidth_mbit, "compute_s": round(compute, 1),
                              "wall_s": round(wall, 1), "vs_compute": round(wall / compute, 4),
                              "holds": wall <= 1.05 * compute if "overlap" in r["method"] else None}))
    for target in targets:
        if target[0] in by_name and target[1] in by_name:
            print(json.dumps(check_target(by_name, *target)))


def plot(runs: list[dict], path: str, title: str) -> None:
    """Validation loss against cross-replica bytes, one curve per method (bench/plots.py's chart)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    plot_bytes(runs, ax)
    ax.set_title(title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save(fig, path)


def plot_wall_clock(results: list[dict], runs: dict, bandwidth: float, path: str) -> None:
    """Validation loss against the computed wall clock at `bandwidth` (bytes/s), one curve per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    colors = colormaps["tab10"].colors
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, r in enumerate(results):
        val = runs[r["method"]]["val"]
        if not val:
            continue
        steps, losses, nbytes = zip(*val)
        seconds = [computed_seconds(r, s, b, bandwidth) for s, b in zip(steps, nbytes)]
        ax.plot(seconds, losses, "os^D"[i % 4] + "-", ms=4, color=colors[i % len(colors)],
                label=f"{r['method']} ({seconds[-1]:.0f} s)")
    ax.set_xscale("log")
    ax.set_xlabel(f"computed wall clock at {bandwidth * 8 / 1e6:g} Mbit/s (s, log): measured compute + bytes / bandwidth")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Loss vs wall clock on a slow link (computed)")
    save(fig, path)


if __name__ == "__main__":
    main()
