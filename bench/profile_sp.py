"""Fit the sequence-parallel cost model (dist/sp_cost.py) from measurements on this machine.

Compute: forward + backward of the default config's stage layers on one lane for several sequence
lengths (least squares on s^2 and s). Communication: gloo all_to_all_single between 2 real processes for
several sizes (start-up time and bandwidth). Groups as they run (--lanes L > 1): L real processes, for every
group size d <= L all L / d groups at once each run forward + backward of the layers on one sequence (Ulysses
attention across the group), timed from a barrier to a barrier, and a s^2 + b s + c is fitted per d: the
trainer's planner uses these. Memory: the bytes autograd saves for the backward of the stage's layers at
two lengths (per token a + q s; parameters not counted) and the layers' model states (16 B per parameter:
weights, gradients, Adam moments; every lane holds its stage's) give the tokens a lane holds (`lane_tokens`)
in --memory-gb (default: the GPU's memory, or on CPU this machine's memory / --lanes); --tokens-per-lane
overrides it. What one machine cannot measure is given: --per-pass-s (a pass's fixed cost), --lanes-per-node
and --node-gbps (groups across nodes). --set key=value ... (config overrides: model.dim=64 ...) sets the model timed.
--slow-link <lanes_per_node>:<GB/s> times the groups with bench/slow_link.py's emulated cross-node link installed
(the fits of groups > lanes_per_node include its delay) and records it as lanes_per_node / node_bandwidth.
--calibrate-steps N then fits what a whole training step costs beyond its passes (dist/sp_cost.py `fit_fixed`):
train.py on the --lanes processes (1 replica x 1 stage, the overrides, the same link) for N steps per
--calibrate-modes mode with the model just fitted; the least residual measured - predicted seconds of the steps
after --warmup is per_step, written into the model.
Writes the fitted model as JSON and prints one JSON line.
Usage: python bench/profile_sp.py [--out .cache/flotilla/sp_cost.json] [--lanes 4] [--memory-gb G]
       [--tokens-per-lane E] [--per-pass-s 0] [--lanes-per-node 0 --node-gbps 0] [--slow-link 1:0.05]
       [--lengths 128 256 ...] [--calibrate-steps 0 --calibrate-modes adaptive static:2 --warmup 2]
       [--set key=value ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import slow_link  # noqa: E402
from config import load_config  # noqa: E402
from dist.groups import sp_ranges  # noqa: E402
from dist.sp_cost import SPCost, fit, fit_fixed, fit_measured, lane_tokens  # noqa: E402
from launch.cluster import torchrun_cmd  # noqa: E402
from metrics import read_log  # noqa: E402
from model.llama import Block, document_mask, rope_tables  # noqa: E402
from recovery import hooks  # noqa: E402
from recovery.state import model_config  # noqa: E402


def lane_inputs(cfg, s: int, d: int, i: int):
    """RoPE tables of lane i's slice of a length-s sequence split over d lanes, and the whole sequence's mask."""
    c = math.ceil(s / d)
    cos, sin = rope_tables(cfg.dim // cfg.n_heads, c * d, cfg.rope_theta)
    part = slice(i * c, (i + 1) * c)
    return cos[part][None, None], sin[part][None, None], document_mask(torch.zeros(1, c * d, dtype=torch.long))


def time_layers(layers, dim: int, cos, sin, mask, attend=None, repeats: int = 3, barrier=lambda: None) -> float:
    """Best of `repeats` forward + backward of the layers on a random slice (timed between two barriers)."""
    best = float("inf")
    for _ in range(repeats):
        x = torch.randn(1, cos.shape[2], dim, requires_grad=True)
        barrier()
        t0 = time.perf_counter()
        h = x
        for layer in layers:
            h = layer(h, cos, sin, mask, attend)
        h.sum().backward()
        barrier()
        best = min(best, time.perf_counter() - t0)
    return best


def activation_bytes_per_token(s: int, overrides: list[str]) -> tuple[float, int]:
    """(bytes autograd saves for the backward of the default config's stage layers on one s-token sequence, per
    token; the layers' parameter count). Saved parameters are not activations and shared storage counts once."""
    cfg = model_config(load_config(overrides), 257)
    layers = [Block(cfg) for _ in range(cfg.n_layers)]
    params = {p.data_ptr() for layer in layers for p in layer.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.data_ptr(), t.numel()] = t.numel() * t.element_size()
        return t

    cos, sin, mask = lane_inputs(cfg, s, 1, 0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = torch.randn(1, s, cfg.dim, requires_grad=True)
        for layer in layers:
            h = layer(h, cos, sin, mask, None)
    return sum(saved.values()) / s, sum(p.numel() for layer in layers for p in layer.parameters())


def memory_bytes(gb: float, lanes: int) -> float:
    if gb > 0:
        return gb * 1e9
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(lanes, 1)


def time_compute(lengths: list[int], overrides: list[str]) -> list[tuple[int, float]]:
    cfg = model_config(load_config(overrides), 257)
    layers = [Block(cfg) for _ in range(cfg.n_layers)]
    return [(s, time_layers(layers, cfg.dim, *lane_inputs(cfg, s, 1, 0))) for s in lengths]


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


def groups_worker(out_path: str, lengths: list[int], overrides: list[str], repeats: int = 5) -> None:
    """One of L lanes: every group size d, every length, all groups busy at once; rank 0 writes the timings."""
    import torch.distributed as dist

    from dist.sp_attention import Ulysses
    hooks.install_from_env()  # --slow-link: the emulated cross-node link
    dist.init_process_group("gloo")
    rank, lanes = dist.get_rank(), dist.get_world_size()
    groups = {key: dist.new_group(list(range(key[0], key[0] + key[1]))) for key in sp_ranges(lanes)}
    cfg = model_config(load_config(overrides), 257)
    layers = [Block(cfg) for _ in range(cfg.n_layers)]
    runs = {}
    for d in (1 << i for i in range(lanes.bit_length()) if 1 << i <= lanes):
        attend = Ulysses(groups[rank // d * d, d]) if d > 1 else None
        runs[d] = [(s, time_layers(layers, cfg.dim, *lane_inputs(cfg, s, d, rank % d), attend, repeats, dist.barrier))
                   for s in lengths]
    if rank == 0:
        with open(out_path, "w") as fh:
            json.dump(runs, fh)
    dist.destroy_process_group()


def run_workers(nproc: int, flag: str, path: str, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run(torchrun_cmd(nproc, os.path.abspath(__file__), flag, path, *args), cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"profile_sp: {flag} workers failed:\n{proc.stderr[-3000:]}")


def train_steps(lanes: int, mode: str, cost_path: str, steps: int, run_dir: str, overrides: list[str],
                env: dict | None = None) -> list[dict]:
    """train.py on `lanes` processes (1 replica x 1 stage x lanes, gloo, parallel.sp=mode): its steps' SP records
    (sp_groups, sp_predicted_s, sp_measured_s, sp_plan_wait_s) from metrics.jsonl, in order."""
    cmd = torchrun_cmd(lanes, "train.py", "parallel.replicas=1", "parallel.stages=1", f"parallel.lanes={lanes}",
                       f"parallel.sp={mode}", f"parallel.sp_cost={cost_path}", f"train.steps={steps}",
                       "train.threads=1", "checkpoint.every=0", "log.eval_every=0", f"log.log_every={steps}",
                       "log.tensorboard=false", f"log.run_dir={run_dir}", *overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"profile_sp: train.py parallel.sp={mode} failed:\n{proc.stderr[-3000:]}")
    return [r for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "sp_measured_s" in r]


def calibrate(cost: SPCost, path: str, lanes: int, modes: list[str], steps: int, warmup: int, overrides: list[str],
              env: dict) -> tuple[SPCost, list]:
    """The model with per_step fitted from training steps (module docstring); and the points
    [(mode, passes, measured - predicted seconds)]."""
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            for r in train_steps(lanes, mode, path, steps, os.path.join(tmp, mode.replace(":", "")), overrides,
                                 env)[warmup:]:
                points.append((mode, len(r["sp_groups"]), r["sp_measured_s"] - r["sp_predicted_s"] + cost.per_step))
    return dataclasses.replace(cost, per_step=fit_fixed([res for _, _, res in points])), points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, ".cache", "flotilla", "sp_cost.json"))
    ap.add_argument("--tokens-per-lane", type=int, default=0, help="override the memory model (0: derive it)")
    ap.add_argument("--memory-gb", type=float, default=0.0, help="memory per lane (0: the GPU's, or RAM / lanes)")
    ap.add_argument("--per-pass-s", type=float, default=0.0, help="fixed seconds per pass (micro-batch)")
    ap.add_argument("--lanes-per-node", type=int, default=0, help="lanes sharing a node (0: one node)")
    ap.add_argument("--node-gbps", type=float, default=0.0, help="GB/s of one node's links to the others")
    ap.add_argument("--lanes", type=int, default=4, help="time groups of every size on this many processes (1: skip)")
    ap.add_argument("--slow-link", default="", help="<lanes_per_node>:<GB/s>: emulate that cross-node link")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048], help="tokens timed")
    ap.add_argument("--calibrate-steps", type=int, default=0, help="training steps per mode to fit per_step (0: no)")
    ap.add_argument("--calibrate-modes", nargs="+", default=["adaptive"], help="parallel.sp modes to calibrate on")
    ap.add_argument("--warmup", type=int, default=2, help="calibration steps left out first")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides (key=value) of the "
                    "model timed and of the calibration runs")
    ap.add_argument("--alltoall-worker", default="")
    ap.add_argument("--groups-worker", default="")
    args = ap.parse_args()
    lengths = args.lengths
    if args.alltoall_worker:
        alltoall_worker(args.alltoall_worker)
        return
    if args.groups_worker:
        groups_worker(args.groups_worker, lengths, args.overrides)
        return
    link_env = slow_link.env(args.slow_link) if args.slow_link else {}
    if args.slow_link:
        link = slow_link.parse(args.slow_link)
        args.lanes_per_node, args.node_gbps = link.lanes_per_node, link.bandwidth / 1e9
    torch.set_num_threads(1)
    compute = time_compute(lengths, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_workers(2, "--alltoall-worker", os.path.join(tmp, "a2a.json"))
        with open(os.path.join(tmp, "a2a.json")) as fh:
            alltoall = [tuple(x) for x in json.load(fh)]
        runs = {}
        if args.lanes > 1:
            run_workers(args.lanes, "--groups-worker", os.path.join(tmp, "groups.json"), "--lengths",
                        *map(str, lengths), "--set", *args.overrides, env=link_env)
            with open(os.path.join(tmp, "groups.json")) as fh:
                runs = {int(d): [tuple(x) for x in pts] for d, pts in json.load(fh).items()}
    cfg = model_config(load_config(args.overrides), 257)
    bytes_per_token = 4 * 2 * cfg.n_layers * cfg.dim * 4  # q, k, v, out; forward + backward; fp32
    (short, params), (long, _) = (activation_bytes_per_token(s, args.overrides) for s in (lengths[-3], lengths[-1]))
    quadratic = max((long - short) / (lengths[-1] - lengths[-3]), 0.0)  # per token: a + q s
    act = short - quadratic * lengths[-3]
    memory = memory_bytes(args.memory_gb, args.lanes)
    tokens = args.tokens_per_lane or lane_tokens(memory, act, params, quadratic=quadratic)
    cost = fit(compute, alltoall, bytes_per_token, tokens, alltoalls_per_sequence=4 * 2 * cfg.n_layers)
    cost = dataclasses.replace(cost, measured=fit_measured(runs) if runs else None, per_pass=args.per_pass_s,
                               lanes_per_node=args.lanes_per_node, node_bandwidth=args.node_gbps * 1e9)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cost.save(args.out)
    points = []
    if args.calibrate_steps:
        cost, points = calibrate(cost, args.out, args.lanes, args.calibrate_modes, args.calibrate_steps, args.warmup,
                                 args.overrides, link_env)
        cost.save(args.out)
    print(json.dumps({"bench": "profile_sp", "out": args.out, **cost.__dict__, "lanes": args.lanes,
                      "slow_link": args.slow_link or None, "calibration": points,
                      "activation_bytes_per_token": round(act),
                      "activation_bytes_per_token2": quadratic, "stage_params": params, "memory_bytes": memory,
                      "compute": compute, "alltoall": alltoall, "groups": runs}), flush=True)


if __name__ == "__main__":
    main()
