"""Flotilla training entry point: `python train.py [key=value ...]` or `torchrun --nproc-per-node=N train.py ...`."""
from __future__ import annotations

import dataclasses
import json
import threading
import math
import os
import signal
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dataclasses import dataclass, field

from config import Config, ConfigError, check_world, load_config, to_yaml
from data.corpus import DataError
from data.dataset import Corpus, load_corpus
from data.loader import ReplicaLoader, validation_batches
from dist.comm import CROSS, LANE, Comm, GenerationLost
from dist.generation import exit_process, start_generation
from dist.groups import Groups, build_groups
from dist.lanes import LaneRunner, imbalance, lane_microbatches, plan_batch, segments
from dist.pipeline import eval_step, run_rows, swap_route, train_step, train_step_routes
from dist.sp_cost import SPCost
from dist.sp_planner import PlanError
from dist.routing import local_microbatches
from dist.topology import Topology
from metrics import RunLog, Throughput, ledger_path, truncate_jsonl, warn
from model.stages import Stage, build_stage
from optim.clip import clip_global_grad_norm
from optim.inner import build_optimizer, lr_at, set_lr
from optim.sync import build_lane_sync, build_sync
from recovery import checkpoint, snapshot
from recovery.checkpoint import CheckpointError
from recovery.membership import CoordinatorLost, Member, MembershipError, RunFinished
from recovery.rebuild import Decision, RankInfo, decide, gather_infos, refresh_edge_copies, run_transfers


def choose_backend(cfg: Config) -> str:
    """gloo or nccl (the config's, or by device); also applies train.threads. Checks a GPU is there if asked."""
    use_cuda = cfg.train.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible: use train.device=cpu")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    return cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")


def init_processes(cfg: Config) -> tuple[int, int, torch.device]:
    """Join the torchrun world, or make a world of one for a plain `python train.py`."""
    backend = choose_backend(cfg)
    use_cuda = cfg.train.device == "cuda"
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="flotilla-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def model_config(cfg: Config, tokenizer_vocab: int):
    """The model's vocabulary: the tokenizer's, rounded up to a multiple of 64, unless set larger."""
    vocab = cfg.model.vocab_size or 64 * math.ceil(tokenizer_vocab / 64)
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}: "
                          f"set model.vocab_size=0 (automatic)")
    return dataclasses.replace(cfg.model, vocab_size=vocab)


def choose_checkpoint(root: str, resume: str) -> tuple[str | None, int]:
    """Rank 0 picks (and verifies) the checkpoint to resume from; every rank gets its path and step or its error."""
    choice = [None]
    if dist.get_rank() == 0:
        try:
            path = checkpoint.choose(root, resume, warn)
            choice[0] = ("ok", path, checkpoint.verify(path) if path else 0)
        except CheckpointError as err:
            choice[0] = ("error", str(err), 0)
    dist.broadcast_object_list(choice, src=0)
    status, path, step = choice[0]
    if status == "error":
        raise CheckpointError(f"{path}; resume from another one (checkpoint.resume=latest or a path) "
                              f"or start fresh with checkpoint.resume=none")
    return path, step


@dataclass
class Worker:
    """Everything one rank holds. It outlives generations: after a failure only its groups and sync are rebuilt."""
    cfg: Config
    topo: Topology
    replica: int
    stage: int
    device: torch.device
    corpus: Corpus
    module: Stage
    optimizer: torch.optim.Optimizer
    loader: ReplicaLoader
    comm: Comm
    member: Member | None = None
    lane: int = 0  # this rank's lane of its stage (sequence parallelism)
    groups: Groups | None = None
    sync: object = None
    wan: object = None  # this rank's hivemind peer, when sites exchange over it (sync.transport=hivemind)
    lane_sync: object = None  # gradient averaging across the lanes of this stage (lanes > 1)
    lane_runner: LaneRunner | None = None  # runs this lane's sequence shards, Ulysses attention in SP groups
    sp_cost: SPCost | None = None  # the planner's cost model (lanes > 1)
    log: RunLog | None = None
    lr_scale: float = 1.0  # CheckFree raises it on a rebuilt stage
    grad_norm: float = 0.0  # this stage's own last gradient norm (CheckFree's weight)
    edge_copy: dict = field(default_factory=dict)  # CheckFree+: a neighbour's (de)embedding, kept for recovery
    committed: int = 0  # steps whose every transfer succeeded here
    applied: bool = False  # the in-flight step's update is already in the weights
    undo: dict | None = None  # the state before the last update (recovery on)
    val_loss: float = float("nan")
    meter: Throughput | None = None

    @property
    def rank(self) -> int:
        """This generation's rank (shifts while a replica sits out)."""
        return self.topo.rank(self.replica, self.stage, self.lane)

    @property
    def grid_rank(self) -> int:
        """The slot's place in the full replicas x stages x lanes grid: a stable name for logs and fault injection."""
        return (self.replica * self.topo.stages + self.stage) * self.topo.lanes + self.lane

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.log.run_dir, "checkpoints")


def build_worker(cfg: Config, topo: Topology, replica: int, stage: int, device, corpus: Corpus,
                 member: Member | None, lane: int = 0) -> Worker:
    module = build_stage(model_config(cfg, corpus.vocab_size), stage, topo.stages, cfg.data.seq_len,
                         cfg.train.seed).to(device)
    shard = cfg.wan.site * topo.replicas + replica, cfg.wan.sites * topo.replicas  # site k reads like replica k
    loader = ReplicaLoader(corpus.train, corpus.eos, cfg.train.seed, *shard, cfg.train.batch_size)
    comm = Comm(member.abort if member else None)
    meter = Throughput(topo.replicas * cfg.train.batch_size * cfg.data.seq_len)
    return Worker(cfg, topo, replica, stage, device, corpus, module, build_optimizer(module, cfg.optim), loader, comm,
                  member, lane, meter=meter)


def connect(w: Worker) -> None:
    """This generation's process groups, and the sync layer on them (its state carried over)."""
    cfg = w.cfg
    w.groups = build_groups(w.topo, w.rank, cfg.parallel.timeout_s, replica_pairs=cfg.sync.method == "noloco",
                            routing=cfg.sync.routing, swap=cfg.recovery.swap)
    state = w.sync.state_dict() if w.sync else None
    if cfg.sync.transport == "hivemind" and w.wan is None:
        from optim.wan import join_sites  # imports hivemind: only runs that use it pay for that
        w.wan = join_sites(cfg, w.module, w.stage, w.replica, w.topo.replicas, w.comm, w.grid_rank)
    w.sync = build_sync(cfg.sync, w.module, w.groups, w.comm, w.replica, len(w.topo.members), w.stage,
                        cfg.train.seed, cfg.train.steps, w.wan)
    if state:
        w.sync.load_state_dict(state)
    if w.topo.lanes > 1:
        for p in w.module.parameters():  # a lane that got no sequence in a step still joins the gradient sync
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        w.lane_sync = build_lane_sync(cfg.sync, w.module, w.groups, w.comm, w.topo.lanes, w.stage, cfg.train.seed)
        w.lane_runner = LaneRunner(w.groups.sp, dist.get_backend())
        w.sp_cost = load_sp_cost(cfg.parallel.sp_cost)


def load_sp_cost(path: str) -> SPCost:
    """Rank 0 reads the SP cost model and every rank gets its copy, so all plan with the same numbers."""
    box = [None]
    if dist.get_rank() == 0:
        box[0] = SPCost.load(path) if os.path.exists(path) else None
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise ConfigError(f"no SP cost model at parallel.sp_cost={path}: run `python bench/profile_sp.py --out {path}` "
                          f"on this machine first (or point parallel.sp_cost at a fitted one)")
    return box[0]


def load_checkpoint(w: Worker, path: str, step: int) -> None:
    extra = checkpoint.load(path, w.module, w.optimizer, (w.replica, w.stage, w.lane))
    w.committed = step
    w.loader.load_state_dict(extra.get("loader", {"step": step}))
    if "rng" in extra:
        torch.set_rng_state(extra["rng"])
    if extra.get("sync") is not None and extra.get("replicas") == w.topo.replicas:
        w.sync.load_state_dict(extra["sync"])  # else: fresh sync state (EF21's reset rule: a dense round)
    if w.lane_sync and extra.get("lane_sync") is not None and extra.get("lanes") == w.topo.lanes:
        w.lane_sync.load_state_dict(extra["lane_sync"])
    w.lr_scale, w.edge_copy = extra.get("lr_scale", 1.0), extra.get("edge_copy", {})


def open_log(w: Worker) -> None:
    """The run's log from the current step (records of steps that will be replayed are dropped first)."""
    if w.log:
        w.log.rollback(w.committed)
    else:
        w.log = RunLog(w.cfg.log.run_dir, w.grid_rank, w.replica, w.stage, w.topo.stages, w.committed, w.cfg.log.tensorboard,
                       tokens_per_step=w.meter.tokens_per_step, lane=w.lane)


def announce(w: Worker, resumed_from: str | None) -> None:
    """The run's first console line (a collective over the replica: called by every rank at the start)."""
    cfg = w.cfg
    if w.rank == 0:
        with open(os.path.join(cfg.log.run_dir, "config.yaml"), "w") as fh:
            fh.write(to_yaml(cfg))
    n_params = torch.tensor([float(sum(p.numel() for p in w.module.parameters()))])
    w.comm.all_reduce(n_params, w.groups.replica, "setup")
    lanes = f" x {w.topo.lanes} lanes (sp {cfg.parallel.sp})" if w.topo.lanes > 1 else ""
    w.log.say(f"flotilla: {w.topo.replicas} replica(s) x {w.topo.stages} stage(s){lanes}, {cfg.parallel.schedule} with "
              f"{cfg.parallel.microbatches} micro-batches | sync {cfg.sync.method}"
              f"{'+' + cfg.sync.compress if cfg.sync.compress != 'none' else ''} | model {n_params.item() / 1e6:.2f}M "
              f"params | corpus {len(w.corpus.train)} train / {len(w.corpus.val)} val windows of {cfg.data.seq_len} "
              f"tokens | unigram entropy {w.corpus.unigram_entropy:.3f} nats"
              + (f" | resumed from {resumed_from}" if resumed_from else ""))


def evaluate(w: Worker, batches) -> float:
    """Mean validation token loss of this replica's model on the held-out batches (meaningful on the last stage;
    with lanes, each lane evaluates every L-th batch along its own stages and the last stage's lanes add up)."""
    w.module.eval()
    loss_sum = sum(eval_step(w.module, [mb.to(w.device) for mb in b.split(w.cfg.parallel.microbatches)], w.replica,
                             w.groups, w.comm) for b in batches[w.lane::w.topo.lanes])
    w.module.train()
    return lanes_sum(w, loss_sum) / sum(b.n_tokens for b in batches)


def save_checkpoint(w: Worker, done: int) -> str:
    extra = {"rng": torch.get_rng_state(), "loader": w.loader.state_dict(), "step": done, "sync": w.sync.state_dict(),
             "replicas": w.topo.replicas, "lr_scale": w.lr_scale, "edge_copy": w.edge_copy, "lanes": w.topo.lanes,
             "lane_sync": w.lane_sync.state_dict() if w.lane_sync else None}
    try:
        return checkpoint.save(w.ckpt_root, done, w.module, w.optimizer, extra, (w.replica, w.stage, w.lane),
                               w.cfg.checkpoint.keep, replicas_differ=w.cfg.sync.method != "ddp")
    except RuntimeError as err:  # a peer died during the save (DCP's transfers are not polled)
        if w.member is None or isinstance(err, CheckpointError):
            raise
        raise GenerationLost(f"checkpoint save failed: {str(err).splitlines()[0]}", True) from None


@dataclass
class StepWork:
    """This rank's share of one step: micro-batches, their pipeline hops, how to run them, the SP plan."""
    microbatches: list
    hops: list[tuple[int, int]]
    n_tokens: float  # each micro-batch's loss is divided by this
    run: object = run_rows
    plan: object = None


def split_batch(w: Worker, batch, step: int) -> StepWork:
    """Micro-batches of this replica's batch: rows split n ways (routed between replicas with sync.routing), or,
    with lanes, this lane's shards of the batch's documents by the SP plan (losses scaled by L: lanes average)."""
    cfg, topo = w.cfg, w.topo
    if topo.lanes == 1:
        microbatches, hops = local_microbatches(batch, w.loader, step, cfg.parallel.microbatches, w.replica, w.stage,
                                                topo.replicas, topo.stages, cfg.train.seed, cfg.sync.routing)
        return StepWork([mb.to(w.device) for mb in microbatches], hops, batch.n_tokens)
    segs = segments(batch)
    planned = plan_batch(segs, topo.lanes, cfg.parallel.sp, w.sp_cost,
                         cfg.parallel.microbatches if cfg.parallel.microbatches > 1 else None)
    microbatches = [mb.to(w.device) for mb in lane_microbatches(batch, segs, planned, w.lane)]
    return StepWork(microbatches, [(w.replica, w.replica)] * len(microbatches), batch.n_tokens / topo.lanes,
                    w.lane_runner, planned)


def lanes_sum(w: Worker, value: float) -> float:
    """A last-stage value summed over the lanes of the stage (as it is with one lane, and on other stages)."""
    if w.topo.lanes == 1 or not w.module.last:
        return value
    total = torch.tensor([value], dtype=torch.float64)
    w.comm.all_reduce(total, w.groups.lanes, LANE)
    return float(total)


def train(w: Worker) -> None:
    """Steps from w.committed to the end. A step reads top to bottom; with recovery on, a lost peer raises
    GenerationLost out of any transfer and the step is replayed in the next generation."""
    cfg, topo, module, params, meter = w.cfg, w.topo, w.module, list(w.module.parameters()), w.meter
    val_batches = validation_batches(w.corpus.val, w.corpus.eos, cfg.log.eval_batches, cfg.train.batch_size, 0, 1)
    loss_sum_interval, steps_interval = 0.0, 0
    for step in range(w.committed, cfg.train.steps):
        t0 = time.perf_counter()
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
        if step == cfg.fault.kill_at_step and (not cfg.fault.kill_ranks or w.grid_rank in cfg.fault.kill_ranks):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die mid-step, before the update
        if w.lane_sync:
            w.lane_sync.before_update()  # the lanes of this stage first: then every lane holds the same gradient
        w.sync.before_update()
        grad_norm, w.grad_norm = clip_global_grad_norm(params, cfg.optim.grad_clip, w.groups.replica, w.comm,
                                                       topo.stages)
        lr = lr_at(step, cfg.optim, cfg.train.steps) * w.lr_scale
        set_lr(w.optimizer, lr)
        if w.member:
            w.undo = snapshot.take(module, w.optimizer, w.sync)  # so a half-committed step can be taken back
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=False)
        w.applied = True
        done = step + 1
        synced = w.sync.after_update(done)
        if cfg.recovery.swap and done % cfg.recovery.edge_copy_every == 0:
            refresh_edge_copies(w, w.comm, topo.stages)
        w.committed, w.applied = done, False
        seconds = time.perf_counter() - t0
        meter.add(seconds)

        # the step is committed: record it
        if synced:
            w.log.record_sync(done, synced, params, w.comm)
        w.log.record_step(step, loss=loss, lr=lr, grad_norm=grad_norm,
                          **(log_plan(w, done, work.plan, seconds) if work.plan else {}))
        loss_sum_interval, steps_interval = loss_sum_interval + loss, steps_interval + 1
        if done % cfg.log.log_every == 0 or done == cfg.train.steps:
            mean_loss = loss_sum_interval / steps_interval  # replica 0's: no cross-replica traffic for metrics
            tps = meter.interval()
            sent = w.comm.totals()
            w.log.scalars(done, {"train/loss": mean_loss, "train/lr": lr, "train/tokens_per_s": tps,
                                 "train/grad_norm": grad_norm})
            w.log.comm_scalars(done, w.comm)
            w.log.say(f"step {done}/{cfg.train.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                      f"grad {grad_norm:.3f} | sent intra {sent['intra_replica'] / 1e6:.1f} MB, "
                      f"cross {sent[CROSS] / 1e6:.1f} MB")
            loss_sum_interval, steps_interval = 0.0, 0
        if w.replica == 0 and cfg.log.eval_every and (done % cfg.log.eval_every == 0 or done == cfg.train.steps):
            w.val_loss = evaluate(w, val_batches)
            w.log.scalars(done, {"val/loss": w.val_loss, "val/ppl": math.exp(w.val_loss)})
            w.log.record_step(step, val_loss=w.val_loss, cross_bytes=w.comm.bytes_sent[CROSS])
            w.log.say(f"step {done} | val loss {w.val_loss:.4f} | val ppl {math.exp(w.val_loss):.2f}")
        if (cfg.checkpoint.every and done % cfg.checkpoint.every == 0) or done == cfg.train.steps:
            w.log.say(f"step {done} | checkpoint {save_checkpoint(w, done)}")


def log_plan(w: Worker, done: int, planned, seconds: float) -> dict:
    """The step's SP plan to TensorBoard (group sizes, predicted vs measured seconds, predicted imbalance);
    returns the same for metrics.jsonl."""
    sizes = [sorted((g.size for g in groups), reverse=True) for groups in planned.microbatches]
    record = {"sp_groups": sizes, "sp_predicted_s": planned.predicted, "sp_measured_s": seconds,
              "sp_imbalance": imbalance(planned, w.topo.lanes)}
    w.log.scalars(done, {"sp/predicted_s": planned.predicted, "sp/measured_s": seconds,
                         "sp/imbalance": record["sp_imbalance"], "sp/passes": len(sizes),
                         "sp/groups": sum(map(len, sizes)) / len(sizes), "sp/largest_group": max(map(max, sizes))})
    return record


def finish(w: Worker) -> dict:
    cfg = w.cfg
    summary = {"event": "done", "steps": cfg.train.steps, "tokens_per_s": w.meter.overall(),
               "val_loss": None if math.isnan(w.val_loss) else w.val_loss,
               "unigram_entropy": w.corpus.unigram_entropy, "bytes_sent": w.comm.totals(),
               "world_size": w.topo.world_size, "sync": cfg.sync.method, "collectives": dict(w.comm.calls),
               "p2p": dict(w.comm.p2p)}
    if w.log.is_logger:
        with open(os.path.join(cfg.log.run_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh)
    w.log.say(json.dumps(summary))
    w.log.close()
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = load_config(argv)
    if cfg.recovery.coordinator:
        return run_with_recovery(cfg)
    rank, world, device = init_processes(cfg)
    check_world(cfg, world)
    topo = Topology(cfg.parallel.replicas, cfg.parallel.stages, lanes=cfg.parallel.lanes)
    w = build_worker(cfg, topo, *topo.slot(rank), device, load_corpus(cfg.data), None, topo.lane(rank))
    connect(w)
    os.makedirs(cfg.log.run_dir, exist_ok=True)
    path, step = choose_checkpoint(w.ckpt_root, cfg.checkpoint.resume)
    if path:
        load_checkpoint(w, path, step)
    open_log(w)
    announce(w, path)
    if path and w.log.is_logger:
        w.log.event("resumed", step=step, checkpoint=path)
    train(w)
    summary = finish(w)
    if w.wan:
        w.wan.shutdown()
    dist.destroy_process_group()
    return summary


# ---- with a coordinator: generations, rollback, stage rebuild ----

def check_timeouts(cfg: Config, settings: dict) -> None:
    """Timeouts nest: heartbeat interval x 3 <= heartbeat timeout < join timeout < collective (group) timeout."""
    hb, hb_timeout, join = cfg.recovery.heartbeat_s, settings["heartbeat_timeout_s"], settings["join_timeout_s"]
    if not (3 * hb <= hb_timeout < join < cfg.parallel.timeout_s):
        raise ConfigError(f"timeouts must nest: 3 x recovery.heartbeat_s ({3 * hb:g}s) <= coordinator heartbeat timeout "
                          f"({hb_timeout:g}s) < coordinator join timeout ({join:g}s) < parallel.timeout_s "
                          f"({cfg.parallel.timeout_s:g}s): lower recovery.heartbeat_s or raise parallel.timeout_s")
    if (settings["replicas"], settings["stages"]) != (cfg.parallel.replicas, cfg.parallel.stages):
        raise ConfigError(f"the coordinator runs {settings['replicas']} replica(s) x {settings['stages']} stage(s) but "
                          f"this worker has parallel.replicas={cfg.parallel.replicas}, parallel.stages="
                          f"{cfg.parallel.stages}: start both with the same grid")


def my_info(w: Worker, fresh: bool) -> RankInfo:
    """What this rank tells the others when they agree on a state."""
    return RankInfo(w.replica, w.stage, fresh, w.committed + w.applied, w.undo is not None, w.grad_norm)


def take_back(w: Worker, decision: Decision) -> None:
    """Go to the agreed step: undo this rank's last update if it was ahead."""
    if (w.replica, w.stage) in decision.undo:
        snapshot.restore(w.undo, w.module, w.optimizer, w.sync)
    w.committed = decision.target


def recover(w: Worker, fresh: bool, gen: int, t_gen: float) -> None:
    """Agree with every rank of the new generation on one state: roll back, rebuild fresh stages, or load a checkpoint."""
    cfg, topo = w.cfg, w.topo
    w.module.zero_grad(set_to_none=False)
    decision = decide(gather_infos(my_info(w, fresh), w.comm), topo.stages, cfg.recovery.rebuild, cfg.recovery.swap)
    resumed_from = None
    if decision.target is None or decision.checkpoint:  # a new run, or no slot can be rebuilt in memory
        resume = cfg.checkpoint.resume if decision.target is None else "latest"
        resumed_from, step = choose_checkpoint(w.ckpt_root, resume)
        if resumed_from:
            load_checkpoint(w, resumed_from, step)
        elif decision.target is not None:  # nothing saved yet: start over from the initial weights
            w.module.load_state_dict(build_stage(w.module.cfg, w.stage, topo.stages, cfg.data.seq_len,
                                                 cfg.train.seed).state_dict())
            w.optimizer = build_optimizer(w.module, cfg.optim)
            w.committed, w.lr_scale, w.edge_copy = 0, 1.0, {}
        method = "checkpoint" if decision.target is not None else None
    else:
        take_back(w, decision)
        method = run_transfers(decision, topo, w, w.comm, cfg.recovery.checkfree_weight, cfg.recovery.lr_boost)
        if any(slot[1] == w.stage for slot, _, _ in decision.sources) and getattr(w.sync, "ef", None):
            w.sync.ef.reset()  # a replica of this stage changed: error feedback restarts with a dense round
    w.applied, w.undo = False, None
    w.loader.step = w.committed
    if w.rank == 0 and decision.target is not None:  # a replica that sits out cannot roll its own ledger back
        for r in set(range(topo.replicas)) - set(topo.members):
            truncate_jsonl(ledger_path(cfg.log.run_dir, r), decision.target)
    open_log(w)
    if decision.target is None:
        announce(w, resumed_from)
    if cfg.recovery.swap:
        refresh_edge_copies(w, w.comm, topo.stages)
    if decision.target is not None:
        if method:
            w.log.event("rebuilt", gen=gen, replica=w.replica, stage=w.stage, method=method)
        w.log.event("resumed", gen=gen, step=w.committed, undo=list(map(list, decision.undo)),
                    seconds=round(time.monotonic() - t_gen, 3))
        w.log.say(f"generation {gen}: resumed at step {w.committed}; rebuilt "
                  f"{[(list(s), m) for s, m, _ in decision.sources] or 'nothing'}"
                  + (" from the checkpoint" if decision.checkpoint else ""))


def save_and_stop(w: Worker) -> None:
    """The coordinator is gone: agree with the others on a step, checkpoint it, and stop with one line."""
    deadline = threading.Event()
    timer = threading.Timer(w.cfg.recovery.abort_timeout_s, deadline.set)
    timer.daemon = True
    timer.start()
    w.comm.abort = deadline
    where = f"the coordinator at {w.cfg.recovery.coordinator} is gone"
    try:
        decision = decide(gather_infos(my_info(w, False), w.comm), w.topo.stages)
        if decision.checkpoint:
            raise GenerationLost("no common step", False)
        take_back(w, decision)
        w.loader.step = w.committed
        if w.log:
            w.log.rollback(w.committed)
        path = save_checkpoint(w, w.committed)
    except (GenerationLost, RuntimeError):
        raise CoordinatorLost(f"{where} and the workers could not agree on a final checkpoint: restart the "
                              f"coordinator and relaunch with checkpoint.resume=latest (the last saved one)") from None
    finally:
        timer.cancel()
    raise CoordinatorLost(f"{where}; saved {path} at step {w.committed}: restart the coordinator and relaunch the "
                          f"workers with checkpoint.resume=latest")


def run_with_recovery(cfg: Config) -> dict:
    """Generations: wait for the coordinator's plan, join its world, agree on a state, train until done or lost."""
    member = Member(cfg.recovery.coordinator, cfg.recovery.run_id, cfg.recovery.heartbeat_s)
    check_timeouts(cfg, member.settings)
    backend = choose_backend(cfg)
    device = torch.device("cuda" if cfg.train.device == "cuda" else "cpu")
    corpus = load_corpus(cfg.data)  # before the first plan: a replacement is ready to train when it gets a slot
    w = None
    while True:
        plan = member.next_plan(cfg.parallel.timeout_s)
        t_gen = time.monotonic()
        replica, stage = plan.slots[member.uid]
        topo = Topology(cfg.parallel.replicas, cfg.parallel.stages, plan.active)  # a replica may sit out
        os.environ["RANK"] = str(topo.rank(replica, stage))  # for warn() and the console logger
        start_generation(member.raw, plan.gen, topo.rank(replica, stage), topo.world_size, backend,
                         cfg.parallel.timeout_s, keep=(w.groups,) if w else ())
        if w is None:
            w = build_worker(cfg, topo, replica, stage, device, corpus, member)
            os.makedirs(cfg.log.run_dir, exist_ok=True)
        w.topo = topo
        try:
            connect(w)
            recover(w, member.uid in plan.fresh, plan.gen, t_gen)
            train(w)
            break
        except GenerationLost as err:
            if member.lost.is_set():
                save_and_stop(w)
            if err.transfer_failed:
                member.report_trouble()
            if w.log:
                w.log.event("aborted", gen=plan.gen, step=w.committed, reason=str(err)[:120])
            warn(f"generation {plan.gen} ended at step {w.committed}: {str(err)[:120]}")
    summary = finish(w)
    member.leave()
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
