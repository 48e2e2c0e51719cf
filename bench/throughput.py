"""Tokens/s, MFU and peak memory of train.py (one process, S=1) against a minimal plain PyTorch loop with the same
model, batches and fast settings (train.precision, model.attention, optim.fused, train.activation_checkpointing,
train.compile, train.device), plus a 2-stage row (two processes on this machine: gloo, on one GPU when
train.device=cuda).

Both single-process runs are fresh processes, alternately, in the same invocation; each reports steady-state
tokens/s (the median step time after warm-up, as train.py's summary does). MFU = model FLOPs per token x tokens/s
/ the device's peak: FLOPs per token = 6 N (N: parameters outside the embedding) + 6 L T d (causal attention's
score and value matmuls, forward and backward, over a window of T tokens; document masks make the real count
smaller). The peak comes from --peak-tflops, else a table of bf16 dense peaks by GPU name (fp32 runs are still
divided by the bf16 peak: MFU says how much of the chip is used); on a CPU MFU is null unless --peak-tflops is given.
Prints JSON lines: one per row and a comparison line with the ratio (target >= 0.95).
Usage: python bench/throughput.py [--steps 40] [--rounds 3] [--two-stage] [key=value overrides for every row]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SINGLE = ["parallel.replicas=1", "parallel.stages=1", "parallel.microbatches=1", "log.eval_every=0",
          "checkpoint.every=0", "log.tensorboard=false", "log.log_every=1000000"]
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}  # dense


def flops_per_token(cfg, n_params: int) -> float:
    """6 N + 6 L T d (see the module docstring); N: the model's parameters but the embedding table."""
    return 6 * n_params + 6 * cfg.model.n_layers * cfg.data.seq_len * cfg.model.dim


def peak_flops(device: str, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def plain_loop(overrides: list[str], steps: int) -> dict:
    """The reference: the same model, optimizer settings, batches and fast settings, no framework around them."""
    import torch

    from config import load_config
    from data.dataset import load_corpus
    from data.loader import ReplicaLoader
    from model.stages import build_stage, set_fast_path, token_loss_sum
    from optim.inner import build_optimizer
    from recovery.state import model_config
    from train import peak_memory

    cfg = load_config(SINGLE + overrides)
    device = torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    corpus = load_corpus(cfg.data)
    model = set_fast_path(build_stage(model_config(cfg, corpus.vocab_size), 0, 1, cfg.data.seq_len,
                                      cfg.train.seed).to(device),
                          cfg.train.precision, cfg.train.activation_checkpointing, cfg.train.compile)
    opt = build_optimizer(model, cfg.optim)
    loader = ReplicaLoader(corpus.train, corpus.eos, cfg.train.seed, 0, 1, cfg.train.batch_size)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = loader.next_batch().to(device)
        logits = model(b.inputs, model.prepare(b.doc_ids))
        loss = token_loss_sum(logits, b.targets) / b.n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)
        loss.item()  # as train.py: the loss reaches the host every step
        times.append(time.perf_counter() - t0)
    return {"tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / statistics.median(times[2:]),
            "peak_memory_bytes": peak_memory(device),
            "params_but_embedding": sum(p.numel() for name, p in model.named_parameters() if not name.startswith("embed"))}


def run_train(overrides: list[str], steps: int, stages: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        common = [f"train.steps={steps}", f"log.run_dir={run_dir}"]
        if stages == 1:
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SINGLE, *overrides, *common]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={stages}",
                   os.path.join(ROOT, "train.py"), *SINGLE, f"parallel.stages={stages}", "parallel.microbatches=4",
                   "parallel.backend=gloo", *overrides, *common]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return json.load(fh)


def run_plain(overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--plain", "--steps", str(steps), *overrides]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--two-stage", action="store_true", help="also the 2-stage row (two processes)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.plain:
        print(json.dumps(plain_loop(overrides, args.steps)))
        return
    from config import load_config
    cfg = load_config(SINGLE + overrides)
    train, plain = [], []
    for _ in range(args.rounds):  # alternate so drift on a noisy machine hits both alike
        plain.append(run_plain(overrides, args.steps))
        train.append(run_train(overrides, args.steps))
    flops, peak = flops_per_token(cfg, plain[0]["params_but_embedding"]), peak_flops(cfg.train.device, args.peak_tflops)
    rows = {"plain_loop": [r["tokens_per_s"] for r in plain], "train_py": [r["tokens_per_s"] for r in train]}
    memory = {"plain_loop": max(r["peak_memory_bytes"] for r in plain),
              "train_py": max(r["peak_memory_bytes"] for r in train)}
    if args.two_stage:
        two = run_train(overrides, args.steps, stages=2)
        rows["train_py_2_stages"], memory["train_py_2_stages"] = [two["tokens_per_s"]], two["peak_memory_bytes"]
    for name, runs in rows.items():
        tps = statistics.median(runs)
        print(json.dumps({"bench": "throughput", "row": name, "tokens_per_s": round(tps, 1),
                          "mfu": round(flops * tps / peak, 4) if peak else None,
                          "peak_memory_gib": round(memory[name] / 2**30, 3), "runs": [round(x, 1) for x in runs],
                          "flops_per_token": flops, "device": cfg.train.device, "overrides": overrides}), flush=True)
    t, p = statistics.median(rows["train_py"]), statistics.median(rows["plain_loop"])
    print(json.dumps({"bench": "throughput", "row": "ratio", "train_py_vs_plain_loop": round(t / p, 4),
                      "target_ratio": 0.95, "steps": args.steps, "rounds": args.rounds}))


if __name__ == "__main__":
    main()
