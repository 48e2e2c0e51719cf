"""Our Ulysses attention (two polled all-to-alls through Comm) against DeepSpeed's DistributedAttention, side by side.

Each of --nproc processes (one SP group, gloo) holds a slice of --seq tokens, (s/d, b, h, head_dim); the two
implementations take turns, forward + backward, --repeats times each; prints one JSON line per implementation
with the median milliseconds and their ratio. DeepSpeed is optional: without it only ours is timed.
Usage: python bench/ulysses.py [--nproc 4] [--seq 2048] [--heads 8] [--head-dim 64] [--repeats 20]
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

    from dist.sp_attention import MaskedAttention, Ulysses
    from model.llama import document_mask
    dist.init_process_group("gloo")
    rank, d = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(d)))
    impls = {"flotilla": Ulysses(group)}
    try:
        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention
        deepspeed.init_distributed(dist_backend="gloo")
        ds = DistributedAttention(MaskedAttention(), group, scatter_idx=2, gather_idx=0)
        impls["deepspeed"] = lambda q, k, v, mask: ds(q, k, v, 1, None, mask)
    except ImportError:
        if rank == 0:
            print("ulysses: deepspeed is not installed (pip install -e .[sp]): timing flotilla's only", file=sys.stderr)
    g = torch.Generator().manual_seed(rank)
    s, b, h, hd = args.seq, 1, args.heads, args.head_dim
    q, k, v = (torch.randn(s // d, b, h, hd, generator=g, requires_grad=True) for _ in range(3))
    mask = document_mask(torch.cumsum((torch.rand(b, s, generator=torch.Generator().manual_seed(0)) < 0.01).long(), 1))
    times = {name: [] for name in impls}
    for i in range(args.repeats + 2):
        for name, attn in impls.items():
            dist.barrier(group)
            t0 = time.perf_counter()
            attn(q, k, v, mask).square().sum().backward()
            dist.barrier(group)
            if i >= 2:  # the first two rounds warm up
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        base = statistics.median(times["flotilla"])
        for name, ts in times.items():
            print(json.dumps({"impl": name, "nproc": d, "seq": s, "heads": h, "head_dim": hd,
                              "median_ms": round(1e3 * statistics.median(ts), 2),
                              "vs_flotilla": round(statistics.median(ts) / base, 3)}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    flags = ["--worker", "--seq", str(args.seq), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
             "--repeats", str(args.repeats)]
    out = subprocess.run(torchrun_cmd(args.nproc, os.path.abspath(__file__), *flags), cwd=ROOT, check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print("\n".join(line for line in out.stdout.splitlines() if line.startswith("{")), flush=True)


if __name__ == "__main__":
    main()
