"""Adaptive sequence parallelism against every static SP degree, predicted by the fitted cost model.

For two length mixes - documents of the default corpus (this Python's standard library, byte tokens) and a
synthetic long tail (Pareto, shape 1.1) - and L = 4, 8, 16, 64 lanes, plans batches of 512 sequences and
prints one JSON line per setting: predicted step seconds of the adaptive plan and of each static degree,
the ratio of the best static to adaptive, and planner milliseconds for 64, 512 and 4096 sequences.
The cost model comes from `bench/profile_sp.py` (run it first on the machine of interest).
Usage: python bench/adaptive_sp.py [--cost .cache/flotilla/sp_cost.json] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.corpus import list_files, read_documents  # noqa: E402
from dist.sp_cost import SPCost  # noqa: E402
from dist.sp_planner import plan, static_plan  # noqa: E402


def corpus_lengths() -> np.ndarray:
    root, files = list_files("stdlib", "")
    return np.array([len(d.text.encode()) + 1 for d in read_documents(root, files)])  # bytes + end-of-document


def draw(mix: str, n: int, longest: int, rng: np.random.Generator, pool: np.ndarray) -> list[int]:
    """n sequence lengths, documents cut at `longest` tokens (a real loader splits longer ones)."""
    raw = rng.choice(pool, n) if mix == "corpus" else (rng.pareto(1.1, n) + 1) * 256
    return [int(x) for x in np.clip(raw, 16, longest)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost", default=os.path.join(ROOT, ".cache", "flotilla", "sp_cost.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.path.exists(args.cost):
        sys.exit(f"adaptive_sp: no cost model at {args.cost}: run python bench/profile_sp.py first")
    cost = SPCost.load(args.cost)
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
                              "planner_ms": planner_ms, "measured_step": None}), flush=True)


if __name__ == "__main__":
    main()
