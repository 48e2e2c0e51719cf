"""Adaptive sequence parallelism against every static SP degree, predicted by the fitted cost model.

For two length mixes - documents of the default corpus (this Python's standard library, byte tokens) and a
synthetic long tail (Pareto, shape 1.1) - and L = 4, 8, 16, 64 lanes, plans batches of 512 sequences and
prints one JSON line per setting: predicted step seconds of the adaptive plan and of each static degree,
the ratio of the best static to adaptive, and planner milliseconds for 64, 512 and 4096 sequences.
At L = 4 it also measures: train.py on 4 real processes (1 replica x 1 stage x 4 lanes, gloo, Ulysses in
groups > 1) with parallel.sp=adaptive and every static degree, on the same batches (windows of --seq-len
tokens of that mix: the default corpus, or long-tail documents written to a temporary folder); mean
measured seconds per step after warm-up, and the predicted seconds of the same plans.
The cost model comes from `bench/profile_sp.py` (run it first on the machine of interest).

--cluster <preset> (dist/sp_cost.py, e.g. flexsp-a100-64: FlexSP's published A100 figures) studies the planner
at cluster scale instead, predictions only: batches of 512 sequences from the Wikipedia document length sample
(bench/data) and a long tail (Pareto 1.1 x 256 tokens), at 16 / 32 / 64 GPUs (one lane each) and a maximum
length of 64K / 192K / 384K tokens (longer documents cut there). Per setting one JSON line: mean predicted step
seconds of the adaptive plan, of one static degree sized for the maximum length (FlexSP's DeepSpeed-Ulysses
baseline) and of the best static degree chosen per batch (FlexSP's BatchAda), their ratios (sums over the
batches), and the lane-seconds bound; then one line of planner milliseconds for 512 sequences on 64 lanes.
Usage: python bench/adaptive_sp.py [--cost .cache/flotilla/sp_cost.json] [--seed 0] [--steps 6] [--no-measure]
       python bench/adaptive_sp.py --cluster flexsp-a100-64 [--batches 20] [--seed 0] [--gpus 16 32 64]
           [--max-len 65536 196608 393216] [--node-limit N: add the per-pass MILP, at most N nodes per pass]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.corpus import list_files, read_documents  # noqa: E402
from dist.sp_cost import SPCost, preset  # noqa: E402
from dist.sp_planner import PassTable, plan, static_plan  # noqa: E402
from launch.cluster import torchrun_cmd  # noqa: E402
from metrics import read_log  # noqa: E402


def corpus_lengths() -> np.ndarray:
    root, files = list_files("stdlib", "")
    return np.array([len(d.text.encode()) + 1 for d in read_documents(root, files)])  # bytes + end-of-document


def draw(mix: str, n: int, longest: int, rng: np.random.Generator, pool: np.ndarray) -> list[int]:
    """n sequence lengths, documents cut at `longest` tokens (a real loader splits longer ones)."""
    raw = rng.choice(pool, n) if mix == "corpus" else (rng.pareto(1.1, n) + 1) * 256
    return [int(x) for x in np.clip(raw, 16, longest)]


def longtail_docs(folder: str, n: int, longest: int, rng: np.random.Generator) -> None:
    """n text documents with Pareto(1.1) lengths (x 256 bytes, at most `longest`)."""
    words = np.array("the lane stage plan group token sequence replica pipeline attention".split())
    for i, size in enumerate(np.clip((rng.pareto(1.1, n) + 1) * 256, 16, longest).astype(int)):
        text = " ".join(rng.choice(words, size // 5 + 1))[:size]
        with open(os.path.join(folder, f"doc{i:05d}.txt"), "w") as fh:
            fh.write(text)


def measure(mix: str, cost_path: str, steps: int, seq_len: int, seed: int) -> dict:
    """Seconds per step of train.py on 4 lanes for adaptive and each static degree (mean after 2 warm-up steps)."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = ["data.source=stdlib"]
        if mix == "longtail":
            os.makedirs(os.path.join(tmp, "docs"))
            longtail_docs(os.path.join(tmp, "docs"), 2000, 4 * seq_len, np.random.default_rng(seed))
            data = ["data.source=path", f"data.path={os.path.join(tmp, 'docs')}", f"data.cache_dir={tmp}/cache"]
        for mode in ("adaptive", "static:1", "static:2", "static:4"):
            run_dir = os.path.join(tmp, mode.replace(":", ""))
            cmd = torchrun_cmd(4, "train.py", "parallel.replicas=1", "parallel.stages=1", "parallel.lanes=4",
                               "parallel.microbatches=1", f"parallel.sp={mode}", f"parallel.sp_cost={cost_path}",
                               f"data.seq_len={seq_len}", "train.batch_size=4", f"train.steps={steps}",
                               "train.threads=1", "checkpoint.every=0", "log.eval_every=0", f"log.log_every={steps}",
                               "log.tensorboard=false", f"log.run_dir={run_dir}", *data)
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"adaptive_sp: {mode} failed:\n{proc.stderr[-3000:]}")
            records = [r for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "sp_measured_s" in r][2:]
            out[mode] = {"measured_s": round(float(np.mean([r["sp_measured_s"] for r in records])), 4),
                         "predicted_s": round(float(np.mean([r["sp_predicted_s"] for r in records])), 4)}
    best = min(v["measured_s"] for k, v in out.items() if k != "adaptive")
    return {"runs": out, "steps_timed": steps - 2, "seq_len": seq_len, "batch_size": 4,
            "best_static_over_adaptive": round(best / out["adaptive"]["measured_s"], 3)}


def wikipedia_lengths() -> np.ndarray:
    return np.loadtxt(os.path.join(ROOT, "bench", "data", "wikipedia_doc_lengths_50k.txt.gz"), dtype=np.int64)


def cluster_study(name: str, batches: int, seed: int, gpu_counts: list[int], max_lens: list[int],
                  node_limit: int) -> None:
    """The --cluster lines (module docstring)."""
    cost = preset(name)
    pool = wikipedia_lengths()
    for mix in ("wikipedia", "longtail"):
        for gpus in gpu_counts:
            for max_len in max_lens:
                line = {"bench": "adaptive_sp", "cluster": name, "mix": mix, "gpus": gpus, "max_len": max_len,
                        "batches": batches, "sequences": 512, "tokens_per_lane": cost.tokens_per_lane,
                        "node_limit": node_limit}
                need = cost.min_degree(max_len)
                if need > gpus:
                    print(json.dumps({**line, "fits": False, "why": f"a {max_len}-token sequence needs {need} GPUs "
                                      f"of {cost.tokens_per_lane} tokens"}), flush=True)
                    continue
                rng = np.random.default_rng(seed)
                degrees = [1 << i for i in range(gpus.bit_length()) if 1 << i <= gpus]
                sums = {"adaptive": 0.0, "static_max": 0.0, "best_static": 0.0, "bound": 0.0}
                chosen, passes, tokens = {}, 0, 0
                for _ in range(batches):
                    lengths = draw("corpus" if mix == "wikipedia" else mix, 512, max_len, rng, pool)
                    adaptive = plan(lengths, gpus, cost, node_limit=node_limit)
                    statics = {d: static_plan(lengths, gpus, d, cost).predicted for d in degrees
                               if d >= cost.min_degree(max(lengths))}
                    best = min(statics, key=statics.get)
                    chosen[best] = chosen.get(best, 0) + 1
                    area = PassTable.build(list(range(len(lengths))), lengths, degrees, cost).area().sum() / gpus
                    sums["adaptive"] += adaptive.predicted
                    sums["static_max"] += statics[need]
                    sums["best_static"] += statics[best]
                    sums["bound"] += area + len(adaptive.microbatches) * cost.per_pass
                    passes += len(adaptive.microbatches)
                    tokens += sum(lengths)
                print(json.dumps({**line, "fits": True, "tokens_mean": round(tokens / batches),
                                  **{f"{k}_s": round(v / batches, 3) for k, v in sums.items()},
                                  "static_max_degree": need, "best_static_degrees": dict(sorted(chosen.items())),
                                  "passes_mean": round(passes / batches, 2),
                                  "over_static_max": round(sums["static_max"] / sums["adaptive"], 3),
                                  "over_best_static": round(sums["best_static"] / sums["adaptive"], 3),
                                  "bound_over_adaptive": round(sums["bound"] / sums["adaptive"], 3)}), flush=True)
    rng = np.random.default_rng(seed)
    plan([int(x) for x in rng.choice(pool, 512)], 64, cost)  # the tilings of 64 lanes are cached once per process
    ms, cpu_ms = [], []
    for _ in range(batches):
        lengths = [int(x) for x in rng.choice(pool, 512)]
        t0, c0 = time.perf_counter(), time.process_time()
        plan(lengths, 64, cost, node_limit=node_limit)
        ms.append(1000 * (time.perf_counter() - t0))
        cpu_ms.append(1000 * (time.process_time() - c0))
    print(json.dumps({"bench": "adaptive_sp_planner", "cluster": name, "mix": "wikipedia", "lanes": 64,
                      "sequences": 512, "plans": batches, "node_limit": node_limit,
                      "ms_mean": round(float(np.mean(ms)), 1), "ms_max": round(float(np.max(ms)), 1),
                      "cpu_ms_mean": round(float(np.mean(cpu_ms)), 1), "cpu_ms_max": round(float(np.max(cpu_ms)), 1),
                      "target_ms": 50}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost", default=os.path.join(ROOT, ".cache", "flotilla", "sp_cost.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--no-measure", action="store_true", help="predictions only (no training processes)")
    ap.add_argument("--cluster", default="", help="a cost preset (dist/sp_cost.py): study the planner at that scale")
    ap.add_argument("--batches", type=int, default=20, help="--cluster: batches per setting")
    ap.add_argument("--gpus", type=int, nargs="+", default=[16, 32, 64], help="--cluster: GPU counts")
    ap.add_argument("--max-len", type=int, nargs="+", default=[64 * 1024, 192 * 1024, 384 * 1024],
                    help="--cluster: maximum sequence lengths (tokens)")
    ap.add_argument("--node-limit", type=int, default=0, help="--cluster: per-pass MILP nodes (0: greedy only)")
    args = ap.parse_args()
    if args.cluster:
        cluster_study(args.cluster, args.batches, args.seed, args.gpus, args.max_len, args.node_limit)
        return
    if not os.path.exists(args.cost):
        sys.exit(f"adaptive_sp: no cost model at {args.cost}: run python bench/profile_sp.py first")
    cost = SPCost.load(args.cost).analytic()  # predictions for any L: the analytic model (groups measured only to L)
    pool = corpus_lengths()
    for mix in ("corpus", "longtail"):
        for lanes in (4, 8, 16, 64):
            rng = np.random.default_rng(args.seed)
            longest = lanes * cost.tokens_per_lane // 2
            lengths = draw(mix, 512, longest, rng, pool)
            adaptive = plan(lengths, lanes, cost)
            statics = {}
            for d in (1 << i for i in range(lanes.bit_length()) if 1 << i <= lanes):
                if max(cost.min_degree(s) for s in lengths) <= d:  # smaller degrees cannot hold the longest
                    statics[d] = static_plan(lengths, lanes, d, cost).predicted
            planner_ms = {}
            for n in (64, 512, 4096):
                batch = draw(mix, n, longest, rng, pool)
                t0 = time.perf_counter()
                plan(batch, lanes, cost)
                planner_ms[n] = round(1000 * (time.perf_counter() - t0), 1)
            best = min(statics.values())
            print(json.dumps({"bench": "adaptive_sp", "mix": mix, "lanes": lanes, "sequences": 512,
                              "tokens": sum(lengths), "longest": max(lengths),
                              "adaptive_s": round(adaptive.predicted, 4), "passes": len(adaptive.microbatches),
                              "group_sizes": sorted({g.size for mb in adaptive.microbatches for g in mb}),
                              "static_s": {d: round(t, 4) for d, t in statics.items()},
                              "best_static_over_adaptive": round(best / adaptive.predicted, 3),
                              "planner_ms": planner_ms,
                              "measured_step": measure(mix, args.cost, args.steps, args.seq_len, args.seed)
                              if lanes == 4 and not args.no_measure else None}), flush=True)


if __name__ == "__main__":
    main()
