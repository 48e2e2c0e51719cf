"""Packed SP groups against their sequences run one at a time, side by side, on 2 lanes (2 processes, gloo).

A batch of --sequences documents of --min-len to --max-len tokens (uniform, seeded) runs forward + backward on one
stage of the default model (config.py's ModelConfig, byte vocabulary) under two plans: one SP group of both
lanes (Ulysses: every sequence sliced over the 2 lanes) and a group per lane (half the sequences each, no
all-to-all). Per plan, the per-sequence path (a call per sequence: its own kernels and, on the group of 2, its
own 4 all-to-alls per layer forward and 4 backward) and the packed path (dist/lanes.py: one call and one set
of all-to-alls per layer for the whole group) take turns every step, so load elsewhere on the machine hits both
alike; seconds per step are the slower lane's (barriers around each), median over --steps after one warm-up.
Prints one JSON line per plan: unpacked_s, packed_s, speedup (= unpacked_s / packed_s) and all-to-alls per step.
Usage: python bench/packed_sp.py [--sequences 64] [--min-len 16] [--max-len 64] [--steps 5] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.cluster import torchrun_cmd  # noqa: E402


def worker(args) -> None:
    import torch.distributed as dist

    from config import ModelConfig
    from data.loader import Batch
    from dist.comm import SP, Comm
    from dist.lanes import LaneRunner, lane_microbatches, segments
    from dist.sp_planner import Group, Plan
    from model.stages import build_stage, token_loss_sum
    dist.init_process_group("gloo")
    lane, comm = dist.get_rank(), Comm()
    runner = LaneRunner({(0, 2): dist.new_group([0, 1])}, comm)
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.sequences,), generator=g)
    n = int(lengths.sum())
    batch = Batch(torch.randint(0, 256, (1, n), generator=g), torch.randint(0, 256, (1, n), generator=g),
                  torch.repeat_interleave(torch.arange(args.sequences), lengths)[None], [0])
    cfg = ModelConfig(vocab_size=256)
    module = build_stage(cfg, 0, 1, max_seq_len=args.max_len + 1, seed=args.seed)
    half = args.sequences // 2
    plans = {"one group of 2 lanes": Plan(((Group(0, 2, tuple(range(args.sequences)), 0.0),),), 0.0, "bench"),
             "a group per lane": Plan(((Group(0, 1, tuple(range(half)), 0.0),
                                        Group(1, 1, tuple(range(half, args.sequences)), 0.0)),), 0.0, "bench")}
    segs = segments(batch)
    work = {name: {"unpacked": [one for mb in lane_microbatches(batch, segs, p, lane) for one in mb.per_sequence()],
                   "packed": lane_microbatches(batch, segs, p, lane)} for name, p in plans.items()}
    times = {(name, kind): [] for name in work for kind in ("unpacked", "packed")}
    calls = {}
    for step in range(args.steps + 1):  # the first round warms up
        for name, kinds in work.items():
            for kind, microbatches in kinds.items():
                module.zero_grad(set_to_none=True)
                dist.barrier()
                before, t0 = comm.calls[SP], time.perf_counter()
                loss = sum(token_loss_sum(runner(module, mb.inputs, mb), mb.targets) for mb in microbatches)
                (loss / n).backward()
                dist.barrier()
                if step:
                    times[name, kind].append(time.perf_counter() - t0)
                calls[name, kind] = comm.calls[SP] - before
    if lane == 0:
        for name in work:
            unpacked, packed = (statistics.median(times[name, kind]) for kind in ("unpacked", "packed"))
            print(json.dumps({"bench": "packed_sp", "lanes": 2, "plan": name, "sequences": args.sequences,
                              "lengths": [args.min_len, args.max_len], "tokens": n, "dim": cfg.dim,
                              "layers": cfg.n_layers, "steps": args.steps, "unpacked_s": round(unpacked, 4),
                              "packed_s": round(packed, 4), "speedup": round(unpacked / packed, 2),
                              "all_to_alls_per_step": {k: calls[name, k] for k in ("unpacked", "packed")}}),
                  flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    flags = ["--worker", "--sequences", str(args.sequences), "--min-len", str(args.min_len), "--max-len",
             str(args.max_len), "--steps", str(args.steps), "--seed", str(args.seed)]
    out = subprocess.run(torchrun_cmd(2, os.path.abspath(__file__), *flags), cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        sys.exit(f"packed_sp: the workers failed:\n{out.stderr[-3000:]}")
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith("{")), flush=True)


if __name__ == "__main__":
    main()
