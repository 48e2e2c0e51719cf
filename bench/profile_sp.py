"""Fit the sequence-parallel cost model (dist/sp_cost.py) from measurements on this machine.

Compute: forward + backward of the default config's stage layers on one lane for several sequence
lengths (least squares on s^2 and s). Communication: gloo all_to_all_single between 2 real processes for
several sizes (bandwidth through the origin). Writes the fitted model as JSON and prints one JSON line.
Usage: python bench/profile_sp.py [--out .cache/flotilla/sp_cost.json] [--tokens-per-lane 4096]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from config import load_config  # noqa: E402
from dist.sp_cost import fit  # noqa: E402
from model.llama import Block, document_mask, rope_tables  # noqa: E402
from train import model_config  # noqa: E402


def time_compute(lengths: list[int], repeats: int = 3) -> list[tuple[int, float]]:
    cfg = model_config(load_config([]), 257)
    layers = [Block(cfg) for _ in range(cfg.n_layers)]
    out = []
    for s in lengths:
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, s, cfg.rope_theta)
        cos, sin = cos[None, None], sin[None, None]  # (1, 1, s, head_dim / 2)
        mask = document_mask(torch.zeros(1, s, dtype=torch.long))
        best = float("inf")
        for _ in range(repeats):
            x = torch.randn(1, s, cfg.dim, requires_grad=True)
            t0 = time.perf_counter()
            h = x
            for layer in layers:
                h = layer(h, cos, sin, mask)
            h.sum().backward()
            best = min(best, time.perf_counter() - t0)
        out.append((s, best))
    return out


def alltoall_worker(out_path: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    results = []
    for n in (1 << 8, 1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20):
        x = torch.randn(n)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)  # warm-up
        best = float("inf")
        for _ in range(5):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            best = min(best, time.perf_counter() - t0)
        results.append((n * 4 / 2, best))  # bytes this lane sends: half its tensor goes to the other
    if dist.get_rank() == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, ".cache", "flotilla", "sp_cost.json"))
    ap.add_argument("--tokens-per-lane", type=int, default=4096)
    ap.add_argument("--alltoall-worker", default="")
    args = ap.parse_args()
    if args.alltoall_worker:
        alltoall_worker(args.alltoall_worker)
        return
    torch.set_num_threads(1)
    compute = time_compute([128, 256, 512, 1024, 2048])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "a2a.json")
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.abspath(__file__), "--alltoall-worker", path], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
        with open(path) as fh:
            alltoall = [tuple(x) for x in json.load(fh)]
    cfg = model_config(load_config([]), 257)
    bytes_per_token = 4 * 2 * cfg.n_layers * cfg.dim * 4  # q, k, v, out; forward + backward; fp32
    cost = fit(compute, alltoall, bytes_per_token, args.tokens_per_lane, alltoalls_per_sequence=4 * 2 * cfg.n_layers)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    cost.save(args.out)
    print(json.dumps({"bench": "profile_sp", "out": args.out, **cost.__dict__,
                      "compute": compute, "alltoall": alltoall}), flush=True)


if __name__ == "__main__":
    main()
