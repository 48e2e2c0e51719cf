"""Flotilla training entry point: `python train.py [key=value ...]` or `torchrun --nproc-per-node=N train.py ...`
(`python train.py --help` lists every key; `--print-config` prints the resolved config).

The training step is here and reads top to bottom (`train`); forming worlds, recovery and checkpoints are the
runtime's (recovery/runtime.py).
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # before torch loads: c10d logs every expected failure (a
# dead peer, a gone store) with a 20-line C++ stack; ours are one line (TORCH_CPP_LOG_LEVEL=INFO shows them again)

import json
import math
import resource
import sys
import time
from dataclasses import dataclass

import torch

import cli
from config import ConfigError, load_config
from data.corpus import DataError
from data.loader import validation_batches
from dist.comm import CROSS, LANE
from dist.generation import exit_process
from dist.lanes import imbalance, lane_microbatches, segments
from dist.pipeline import eval_step, run_rows, swap_route, train_step, train_step_routes
from dist.routing import local_microbatches
from dist.sp_planner import PlanError
from optim.clip import clip_global_grad_norm
from optim.inner import lr_at, set_lr
from recovery import hooks, snapshot
from recovery.checkpoint import CheckpointError
from recovery.membership import MembershipError, RunFinished
from recovery.rebuild import refresh_edge_copies
from recovery.runtime import close, keep_outer_snapshot, run, save_checkpoint, stop_before_world_step
from recovery.state import RankState


def evaluate(w: RankState, batches) -> float:
    """Mean validation token loss of this replica's model on the held-out batches (meaningful on the last stage;
    with lanes, each lane evaluates every L-th batch along its own stages and the last stage's lanes add up)."""
    w.module.eval()
    loss_sum = sum(eval_step(w.module, [mb.to(w.device) for mb in b.split(w.cfg.parallel.microbatches)], w.replica,
                             w.groups, w.comm) for b in batches[w.lane::w.topo.lanes])
    w.module.train()
    return lanes_sum(w, loss_sum) / sum(b.n_tokens for b in batches)


@dataclass
class StepWork:
    """This rank's share of one step: micro-batches, their pipeline hops, how to run them, the SP plan."""
    microbatches: list
    hops: list[tuple[int, int]]
    n_tokens: float  # each micro-batch's loss is divided by this
    run: object = run_rows
    plan: object = None
    plan_wait_s: float = 0.0  # how long the planner rank waited for this step's SP plan


def split_batch(w: RankState, batch, step: int) -> StepWork:
    """Micro-batches of this replica's batch: rows split n ways (routed between replicas with sync.routing), or,
    with lanes, this lane's shards of the batch's documents by the SP plan (losses scaled by L: lanes average)."""
    cfg, topo = w.cfg, w.topo
    if topo.lanes == 1:
        microbatches, hops = local_microbatches(batch, w.loader, step, cfg.parallel.microbatches, w.replica, w.stage,
                                                topo.members, topo.stages, cfg.train.seed, cfg.sync.routing)
        return StepWork([mb.to(w.device) for mb in microbatches], hops, batch.n_tokens)
    segs = segments(batch)
    planned, waited = w.sp_planner.plan(w.loader.step - 1)  # by the batch's loader position (made during the
    # previous step by one rank of the replica, with parallel.sp_plan_ahead)
    microbatches = [mb.to(w.device) for mb in lane_microbatches(batch, segs, planned, w.lane)]
    return StepWork(microbatches, [(w.replica, w.replica)] * len(microbatches), batch.n_tokens / topo.lanes,
                    w.lane_runner, planned, waited)


def lanes_sum(w: RankState, value: float) -> float:
    """A last-stage value summed over the lanes of the stage (as it is with one lane, and on other stages)."""
    if w.topo.lanes == 1 or not w.module.last:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=w.device)
    w.comm.all_reduce(total, w.groups.lanes, LANE)
    return float(total)


def inner_step(w: RankState, step: int) -> tuple[float, float, float, StepWork]:
    """Forward, backward and the inner update of one step on this replica's batch; returns (loss, lr, grad norm,
    this rank's work). With recovery on, the state before the update is kept so a half-committed step can be
    taken back."""
    cfg, topo, module = w.cfg, w.topo, w.module
    batch = w.loader.next_batch()  # this replica's samples
    w.log.record_samples(step, batch.sample_ids)  # the ledger, before they reach any peer: a step that is
    # rolled back is truncated from it, and one another replica commits after this rank dies stays in it
    work = split_batch(w, batch, step)
    if cfg.recovery.swap:  # CheckFree+: some micro-batches run the edge stages' layers swapped
        routes = [swap_route(topo.stages, step * len(work.microbatches) + i) for i in range(len(work.microbatches))]
        loss = train_step_routes(module, work.microbatches, routes, w.groups, w.comm, w.stage, work.n_tokens)
    else:
        loss = train_step(module, work.microbatches, work.hops, w.groups, w.comm, cfg.parallel.schedule, w.stage,
                          topo.stages, work.n_tokens, work.run)
    loss = lanes_sum(w, loss) / topo.lanes  # each lane's part was scaled by L
    hooks.at("step", step=step, grid_rank=w.grid_rank)  # mid-step, before the update (tests inject faults here)
    if w.lane_sync:
        w.lane_sync.before_update(step + 1)  # the lanes of this stage first: then every lane holds the same gradient
    w.sync.before_update(step + 1)
    grad_norm, w.grad_norm = clip_global_grad_norm(list(module.parameters()), cfg.optim.grad_clip, w.groups.replica,
                                                   w.comm, topo.stages)
    lr = lr_at(step, cfg.optim, cfg.train.steps) * w.lr_scale
    set_lr(w.optimizer, lr)
    if w.member:
        w.undo = snapshot.take(module, w.optimizer, w.sync, wait=False)  # so a half-committed step can be taken
        # back (on a GPU: copied to pinned host memory while the update runs)
    w.optimizer.step()
    w.optimizer.zero_grad(set_to_none=False)
    w.applied = True
    return loss, lr, grad_norm, work


def train(w: RankState) -> None:
    """Steps from w.committed to the end. A step reads top to bottom; with recovery on, a lost peer raises
    GenerationLost out of any transfer and the step is replayed in the next generation."""
    cfg, topo, params, meter = w.cfg, w.topo, list(w.module.parameters()), w.meter
    val_batches = validation_batches(w.corpus.val, w.corpus.eos, cfg.log.eval_batches, cfg.train.batch_size, 0, 1)
    loss_sum_interval, steps_interval = 0.0, 0
    for step in range(w.join_at - 1 if w.join_at else w.committed, cfg.train.steps):
        t0, (waited0, synced0) = time.perf_counter(), w.comm.blocked()
        stop_before_world_step(w, step + 1)  # the generation ended elsewhere: train on only to the next outer step
        if w.join_at == step + 1:  # DiLoCo, rejoining at this outer step: the weights are the anchor (a zero
            loss, grad_norm, work = None, w.grad_norm, None  # pseudo-gradient); its unfinished inner steps are
            lr = lr_at(step, cfg.optim, cfg.train.steps) * w.lr_scale  # not redone
            w.loader.step = step + 1
        else:
            loss, lr, grad_norm, work = inner_step(w, step)
        done = step + 1
        hooks.at("updated", step=step, grid_rank=w.grid_rank)  # between the update and the outer exchange
        synced = w.sync.after_update(done)
        if cfg.recovery.swap and done % cfg.recovery.edge_copy_every == 0:
            refresh_edge_copies(w, w.comm, topo.stages)
        w.committed, w.applied, w.join_at = done, False, None
        if synced:
            keep_outer_snapshot(w, done)  # DiLoCo / NoLoCo under recovery: the point a replica rewinds to
        seconds, (waited, syncing) = time.perf_counter() - t0, w.comm.blocked()
        if work:
            meter.add(seconds, waited - waited0, syncing - synced0)

        # the step is committed: record it
        if synced:
            w.log.record_sync(done, synced, params, w.comm, w.sync.outer_update_norm())
        if work:  # not a rejoining replica's skipped step
            w.log.record_step(done, loss=loss, lr=lr, grad_norm=grad_norm,
                              **(log_plan(w, done, work, seconds) if work.plan else {}))
            loss_sum_interval, steps_interval = loss_sum_interval + loss, steps_interval + 1
        if steps_interval and (done % cfg.log.log_every == 0 or done == cfg.train.steps):
            mean_loss = loss_sum_interval / steps_interval  # replica 0's: no cross-replica traffic for metrics
            times, sent = meter.interval(), w.comm.totals()
            eta = (cfg.train.steps - done) * times.step_s
            w.log.scalars(done, {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": times.tokens_per_s,
                                 "train/grad_norm": grad_norm, "time/step_s": times.step_s,
                                 "time/compute_s": times.compute_s, "time/waiting_s": times.waiting_s,
                                 "time/sync_s": times.sync_s, "time/eta_s": eta})
            w.log.record_step(done, step_s=times.step_s, compute_s=times.compute_s, waiting_s=times.waiting_s,
                              sync_s=times.sync_s)
            w.log.comm_scalars(done, w.comm, mean_loss if w.lane == 0 else math.nan)
            w.log.say(f"step {done}/{cfg.train.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | "
                      f"{times.tokens_per_s:,.0f} tok/s | grad {grad_norm:.3f} | step {times.step_s:.3f} s: compute "
                      f"{times.compute_s:.3f}, waiting {times.waiting_s:.3f}, sync {times.sync_s:.3f} | sent intra "
                      f"{sent['intra_replica'] / 1e6:.1f} MB, cross {sent[CROSS] / 1e6:.1f} MB | ETA {eta_text(eta)}")
            loss_sum_interval, steps_interval = 0.0, 0
        if w.replica == 0 and cfg.log.eval_every and (done % cfg.log.eval_every == 0 or done == cfg.train.steps):
            w.val_loss = evaluate(w, val_batches)
            w.log.scalars(done, {"val/loss": w.val_loss, "val/ppl": math.exp(w.val_loss)})
            w.log.record_step(done, val_loss=w.val_loss, cross_bytes=w.comm.bytes_sent[CROSS])
            w.log.say(f"step {done} | val loss {w.val_loss:.4f} | val ppl {math.exp(w.val_loss):.2f}")
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
            w.log.say(f"step {done} | checkpoint {save_checkpoint(w, done)}")


def eta_text(seconds: float) -> str:
    """Time left as 1h02m, 3m05s or 12s."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_plan(w: RankState, done: int, work: StepWork, seconds: float) -> dict:
    """The step's SP plan to TensorBoard (group sizes, predicted vs measured seconds, predicted imbalance, the
    planner's wait); returns the same for metrics.jsonl."""
    planned = work.plan
    sizes = [sorted((g.size for g in groups), reverse=True) for groups in planned.microbatches]
    record = {"sp_groups": sizes, "sp_predicted_s": planned.predicted, "sp_measured_s": seconds,
              "sp_imbalance": imbalance(planned, w.topo.lanes), "sp_plan_wait_s": work.plan_wait_s}
    w.log.scalars(done, {"sp/predicted_s": planned.predicted, "sp/measured_s": seconds,
                         "sp/plan_wait_s": work.plan_wait_s,
                         "sp/imbalance": record["sp_imbalance"], "sp/passes": len(sizes),
                         "sp/groups": sum(map(len, sizes)) / len(sizes), "sp/largest_group": max(map(max, sizes))})
    return record


def peak_memory(device: torch.device) -> int:
    """This process's peak bytes: the GPU allocator's on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def finish(w: RankState) -> dict:
    cfg = w.cfg
    summary = {"event": "done", "steps": cfg.train.steps, "tokens_per_s": w.meter.overall(),
               "val_loss": None if math.isnan(w.val_loss) else w.val_loss,
               "unigram_entropy": w.corpus.unigram_entropy, "bytes_sent": w.comm.totals(),
               "world_size": w.topo.world_size, "sync": cfg.sync.method, "collectives": dict(w.comm.calls),
               "p2p": dict(w.comm.p2p), "peak_memory_bytes": peak_memory(w.device)}
    if w.log.is_logger:
        w.fence()
        with open(os.path.join(cfg.log.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
    w.log.say(json.dumps(summary))
    w.log.close()
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    argv = sys.argv[1:] if argv is None else argv
    if cli.answer(argv):  # --help or --print-config: printed, nothing started
        return None
    cfg = load_config(argv)
    hooks.install_from_env()  # tests install fault injection here; a normal run has none
    w = run(cfg, train)  # one generation (torchrun, or a single process) or, with a coordinator, as many as faults need
    summary = finish(w)
    close(w)
    return summary


if __name__ == "__main__":
    try:
        main()
    except RunFinished:
        print("flotilla: the run finished before this spare worker was needed", flush=True)
    except (ConfigError, DataError, CheckpointError, MembershipError, PlanError) as err:
        if os.environ.get("RANK", "0") == "0" or isinstance(err, MembershipError):
            print(f"flotilla: error: {err}", file=sys.stderr, flush=True)
        exit_process(2)
    exit_process(0)
