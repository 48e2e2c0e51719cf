"""Flotilla training entry point: `python train.py [key=value ...]` or `torchrun --nproc-per-node=N train.py ...`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from config import Config, ConfigError, check_world, load_config, to_yaml
from data.corpus import DataError
from data.dataset import load_corpus
from data.loader import ReplicaLoader, validation_batches
from dist.comm import CROSS, Comm
from dist.groups import build_groups
from dist.pipeline import eval_step, train_step
from dist.routing import local_microbatches
from dist.topology import Topology
from metrics import RunLog, Throughput, warn
from model.stages import build_stage
from optim.clip import clip_global_grad_norm
from optim.inner import build_optimizer, lr_at, set_lr
from optim.sync import build_sync
from recovery import checkpoint
from recovery.checkpoint import CheckpointError


def init_processes(cfg: Config) -> tuple[int, int, torch.device]:
    """Join the torchrun world, or make a world of one for a plain `python train.py`."""
    use_cuda = cfg.train.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible: use train.device=cpu")
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="flotilla-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return dist.get_rank(), dist.get_world_size(), device


def model_config(cfg: Config, tokenizer_vocab: int):
    """The model's vocabulary: the tokenizer's, rounded up to a multiple of 64, unless set larger."""
    vocab = cfg.model.vocab_size or 64 * math.ceil(tokenizer_vocab / 64)
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}: "
                          f"set model.vocab_size=0 (automatic)")
    return dataclasses.replace(cfg.model, vocab_size=vocab)


def choose_checkpoint(cfg: Config, root: str) -> tuple[str | None, int]:
    """Rank 0 picks (and verifies) the checkpoint to resume from; every rank gets its path and step or its error."""
    choice = [None]
    if dist.get_rank() == 0:
        try:
            path = checkpoint.choose(root, cfg.checkpoint.resume, warn)
            choice[0] = ("ok", path, checkpoint.verify(path) if path else 0)
        except CheckpointError as err:
            choice[0] = ("error", str(err), 0)
    dist.broadcast_object_list(choice, src=0)
    status, path, step = choice[0]
    if status == "error":
        raise CheckpointError(f"{path}; resume from another one (checkpoint.resume=latest or a path) "
                              f"or start fresh with checkpoint.resume=none")
    return path, step


def evaluate(module, batches, replica: int, groups, comm, cfg: Config, device) -> float:
    """Mean validation token loss of this replica's model on the held-out batches (meaningful on the last stage)."""
    module.eval()
    loss_sum = sum(eval_step(module, [mb.to(device) for mb in b.split(cfg.parallel.microbatches)], replica, groups,
                             comm) for b in batches)
    module.train()
    return loss_sum / sum(b.n_tokens for b in batches)


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(argv)
    rank, world, device = init_processes(cfg)
    check_world(cfg, world)
    topo = Topology(cfg.parallel.replicas, cfg.parallel.stages)
    replica, stage = topo.slot(rank)
    groups = build_groups(topo, rank, cfg.parallel.timeout_s, replica_pairs=cfg.sync.method == "noloco",
                          routing=cfg.sync.routing)
    comm = Comm()

    corpus = load_corpus(cfg.data)
    mcfg = model_config(cfg, corpus.vocab_size)
    module = build_stage(mcfg, stage, topo.stages, cfg.data.seq_len, cfg.train.seed).to(device)
    params = list(module.parameters())
    optimizer = build_optimizer(module, cfg.optim)
    loader = ReplicaLoader(corpus.train, corpus.eos, cfg.train.seed, replica, topo.replicas, cfg.train.batch_size)
    sync = build_sync(cfg.sync, module, groups, comm, replica, topo.replicas, stage, cfg.train.seed, cfg.train.steps)
    val_batches = validation_batches(corpus.val, corpus.eos, cfg.log.eval_batches, cfg.train.batch_size, 0, 1)

    ckpt_root = os.path.join(cfg.log.run_dir, "checkpoints")
    os.makedirs(cfg.log.run_dir, exist_ok=True)
    resume_path, start = choose_checkpoint(cfg, ckpt_root)
    if resume_path:
        extra = checkpoint.load(resume_path, module, optimizer, (replica, stage))
        loader.load_state_dict(extra.get("loader", {"step": start}))
        if "rng" in extra:
            torch.set_rng_state(extra["rng"])
        if extra.get("sync") is not None and extra.get("replicas") == topo.replicas:
            sync.load_state_dict(extra["sync"])  # else: fresh sync state (EF21's reset rule: a dense round)
    log = RunLog(cfg.log.run_dir, rank, replica, stage, topo.stages, start, cfg.log.tensorboard)
    if rank == 0:
        with open(os.path.join(cfg.log.run_dir, "config.yaml"), "w") as fh:
            fh.write(to_yaml(cfg))
    n_params = torch.tensor([float(sum(p.numel() for p in params))])
    comm.all_reduce(n_params, groups.replica, "setup")
    log.say(f"flotilla: {topo.replicas} replica(s) x {topo.stages} stage(s), {cfg.parallel.schedule} with "
            f"{cfg.parallel.microbatches} micro-batches | sync {cfg.sync.method}"
            f"{'+' + cfg.sync.compress if cfg.sync.compress != 'none' else ''} | model {n_params.item() / 1e6:.2f}M params | corpus "
            f"{len(corpus.train)} train / {len(corpus.val)} val windows of {cfg.data.seq_len} tokens | unigram "
            f"entropy {corpus.unigram_entropy:.3f} nats" + (f" | resumed from {resume_path}" if resume_path else ""))

    tokens_per_step = topo.replicas * cfg.train.batch_size * cfg.data.seq_len
    meter = Throughput(tokens_per_step)
    val_loss, loss_sum_interval, steps_interval = float("nan"), 0.0, 0
    for step in range(start, cfg.train.steps):
        t0 = time.perf_counter()
        batch = loader.next_batch()  # this replica's samples (the ledger)
        microbatches, hops = local_microbatches(batch, loader, step, cfg.parallel.microbatches, replica, stage,
                                                topo.replicas, topo.stages, cfg.train.seed, cfg.sync.routing)
        loss = train_step(module, [mb.to(device) for mb in microbatches], hops, groups, comm,
                          cfg.parallel.schedule, stage, topo.stages, batch.n_tokens)
        if step == cfg.fault.kill_at_step and (not cfg.fault.kill_ranks or rank in cfg.fault.kill_ranks):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-step, before the update
        sync.before_update()
        grad_norm = clip_global_grad_norm(params, cfg.optim.grad_clip, groups.replica, comm, topo.stages)
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        done = step + 1
        synced = sync.after_update(done)
        meter.add(time.perf_counter() - t0)

        # the step is committed: record it
        if synced:
            log.record_sync(done, synced, params, comm)
        log.record_samples(step, batch.sample_ids)
        log.record_step(step, loss=loss, lr=lr, grad_norm=grad_norm)
        loss_sum_interval, steps_interval = loss_sum_interval + loss, steps_interval + 1
        if done % cfg.log.log_every == 0 or done == cfg.train.steps:
            mean_loss = loss_sum_interval / steps_interval  # replica 0's: no cross-replica traffic for metrics
            tps = meter.interval()
            sent = comm.totals()
            log.scalars(done, {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tps,
                               "train/grad_norm": grad_norm})
            log.comm_scalars(done, comm)
            log.say(f"step {done}/{cfg.train.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                    f"grad {grad_norm:.3f} | sent intra {sent['intra_replica'] / 1e6:.1f} MB, "
                    f"cross {sent[CROSS] / 1e6:.1f} MB")
            loss_sum_interval, steps_interval = 0.0, 0
        if replica == 0 and cfg.log.eval_every and (done % cfg.log.eval_every == 0 or done == cfg.train.steps):
            val_loss = evaluate(module, val_batches, replica, groups, comm, cfg, device)
            log.scalars(done, {"val/loss": val_loss, "val/ppl": math.exp(val_loss)})
            log.record_step(step, val_loss=val_loss, cross_bytes=comm.bytes_sent[CROSS])
            log.say(f"step {done} | val loss {val_loss:.4f} | val ppl {math.exp(val_loss):.2f}")
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
            extra = {"rng": torch.get_rng_state(), "loader": loader.state_dict(), "step": done,
                     "sync": sync.state_dict(), "replicas": topo.replicas}
            path = checkpoint.save(ckpt_root, done, module, optimizer, extra, (replica, stage), cfg.checkpoint.keep,
                                   replicas_differ=cfg.sync.method != "ddp")
            log.say(f"step {done} | checkpoint {path}")

    summary = {"event": "done", "steps": cfg.train.steps, "tokens_per_s": meter.overall(),
               "val_loss": None if math.isnan(val_loss) else val_loss,
               "unigram_entropy": corpus.unigram_entropy, "bytes_sent": comm.totals(), "world_size": world,
               "sync": cfg.sync.method, "collectives": dict(comm.calls), "p2p": dict(comm.p2p)}
    if log.is_logger:
        with open(os.path.join(cfg.log.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
    log.say(json.dumps(summary))
    log.close()
    dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as err:
        if os.environ.get("RANK", "0") == "0":
            print(f"flotilla: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
