"""Tokens/s of train.py (one process, S=1) against a minimal plain PyTorch loop on the same model and batches.

Both run as fresh processes, alternately, in the same invocation; each reports steady-state tokens/s
(the median step time after two warm-up steps, as train.py's summary does). Prints one JSON line with both and their ratio (target >= 0.95).
Usage: python bench/throughput.py [--steps 40] [--rounds 2] [key=value overrides for both]
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


def plain_loop(overrides: list[str], steps: int) -> float:
    """The reference: the same model, optimizer settings and batches, no framework around them."""
    import torch

    from config import load_config
    from data.dataset import load_corpus
    from data.loader import ReplicaLoader
    from model.stages import build_stage, token_loss_sum
    from recovery.state import model_config

    cfg = load_config(SINGLE + overrides)
    corpus = load_corpus(cfg.data)
    model = build_stage(model_config(cfg, corpus.vocab_size), 0, 1, cfg.data.seq_len, cfg.train.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.optim.lr,
                            betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    loader = ReplicaLoader(corpus.train, corpus.eos, cfg.train.seed, 0, 1, cfg.train.batch_size)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = loader.next_batch()
        logits = model(b.inputs, model.prepare(b.doc_ids))
        loss = token_loss_sum(logits, b.targets) / b.n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)
        loss.item()
        times.append(time.perf_counter() - t0)
    return cfg.train.batch_size * cfg.data.seq_len / statistics.median(times[2:])


def run_train(overrides: list[str], steps: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SINGLE, *overrides, f"train.steps={steps}",
               f"log.run_dir={run_dir}"]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return json.load(fh)["tokens_per_s"]


def run_plain(overrides: list[str], steps: int) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--plain", "--steps", str(steps), *overrides]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.plain:
        print(plain_loop(overrides, args.steps))
        return
    train, plain = [], []
    for _ in range(args.rounds):  # alternate so drift on a noisy machine hits both alike
        plain.append(run_plain(overrides, args.steps))
        train.append(run_train(overrides, args.steps))
    t, p = statistics.median(train), statistics.median(plain)
    print(json.dumps({"bench": "throughput", "train_py_tokens_per_s": round(t, 1), "plain_loop_tokens_per_s": round(p, 1),
                      "ratio": round(t / p, 4), "target_ratio": 0.95, "steps": args.steps, "rounds": args.rounds,
                      "train_py_runs": [round(x, 1) for x in train], "plain_runs": [round(x, 1) for x in plain],
                      "overrides": overrides}))


if __name__ == "__main__":
    main()
