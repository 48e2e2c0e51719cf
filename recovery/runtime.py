"""One runtime for every run: form a world, lose it, agree on a state, rebuild, resume.

A plain run (`python train.py`, or torchrun) is one generation without a coordinator. With
`recovery.coordinator` a run is a sequence of generations: wait for the coordinator's plan, form that
generation's world and groups, agree on one state (roll back a half-committed step, rebuild fresh stages,
or load the newest sealed checkpoint), train until done or lost. Every phase is abortable and bounded:
forming and group building use a group timeout of the coordinator's heartbeat timeout plus
`recovery.phase_margin_s` (raised to `parallel.timeout_s` once formed), agreeing, rebuilding and saving
poll the abort flag, and the plan wait ends only when the coordinator is gone or its loop stalls. Any
failure in any phase ends the generation the same way: report it, wait for the next plan.

The training step itself is the caller's (`train.py`): `run(cfg, train)` returns the trained RankState.
"""
from __future__ import annotations

import contextlib
import os
import re
from functools import partial
import tempfile
import threading
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from config import Config, ConfigError, check_world, to_yaml
from data.dataset import load_corpus
from dist.comm import INTRA, LANE, GenerationLost
from dist.generation import start_generation
from dist.groups import Groups, build_groups
from dist.lanes import LaneRunner
from dist.plan_ahead import SPPlanner, batch_planner
from dist.sp_cost import SPCost
from dist.topology import Topology
from metrics import RunLog, ledger_path, truncate_jsonl, warn
from model.stages import build_stage
from optim.inner import build_optimizer
from optim.sync import build_lane_sync, build_sync
from recovery import checkpoint, hooks, snapshot
from recovery.checkpoint import CheckpointError
from recovery.membership import CoordinatorLost, Member, Plan
from recovery.rebuild import (Decision, RankInfo, decide, decide_per_replica, gather_infos, join_step,
                              refresh_edge_copies, run_transfers)
from recovery.state import RankState, build_state

TrainLoop = Callable[[RankState], None]

BACKENDS = ("auto", "gloo", "nccl")  # parallel.backend (auto: nccl on GPUs, gloo on CPUs)
DEVICES = ("cpu", "cuda")  # train.device


def choose_backend(cfg: Config) -> str:
    """gloo or nccl (the config's, or by device); also applies train.threads. Checks a GPU is there if asked."""
    use_cuda = cfg.train.device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible: use train.device=cpu")
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and cfg.recovery.coordinator:  # we abort NCCL groups ourselves when a generation ends;
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")  # the watchdog would kill the survivors
    return backend


def choose_device(cfg: Config, backend: str) -> torch.device:
    """This worker's device: the GPU of its local slot (torchrun's LOCAL_RANK, a node agent's worker index), set
    once. NCCL needs a GPU per rank; gloo ranks may share one (slot modulo the GPUs: tests on one GPU)."""
    if cfg.train.device != "cuda":
        return torch.device("cpu")
    slot, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if "nccl" not in backend:
        slot %= visible
    elif slot >= visible:
        raise ConfigError(f"worker slot {slot} of this node has no GPU ({visible} visible): start at most {visible} "
                          f"worker(s) per node (torchrun --nproc-per-node, node_agent --workers)")
    device = torch.device(f"cuda:{slot}")
    torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def lost_on_failure(phase: str):
    """A torch.distributed or store failure in a phase (a peer died, the group timed out) ends the generation."""
    try:
        yield
    except (GenerationLost, CheckpointError):
        raise
    except RuntimeError as err:
        if type(err) is not RuntimeError and not isinstance(err, dist.DistError):
            raise
        raise GenerationLost(f"{phase} failed: {str(err).splitlines()[0][:160]}", True) from None


def raise_timeouts(groups: list, timeout_s: float) -> None:
    """Groups are formed with the short phase timeout; their transfers get the full collective timeout."""
    for g in groups:
        if g is not None and not c10d._rank_not_in_group(g):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), g)


def connect(w: RankState, phase_s: float) -> None:
    """This generation's process groups (formed within phase_s), and the sync layer on them (state carried over)."""
    cfg = w.cfg
    w.groups = build_groups(w.topo, w.rank, phase_s, replica_pairs=cfg.sync.method == "noloco",
                            routing=cfg.sync.routing, swap=cfg.recovery.swap)
    raise_timeouts([None, *all_groups(w.groups)], cfg.parallel.timeout_s)
    state = w.sync.state_dict() if w.sync else None
    if cfg.sync.transport == "hivemind" and w.wan is None:
        from optim.wan import join_sites  # imports hivemind: only runs that use it pay for that
        w.wan = join_sites(cfg, w.module, w.stage, w.replica, w.topo.replicas, w.comm, w.grid_rank)
    w.sync = build_sync(cfg.sync, w.module, w.groups, w.comm, w.replica, len(w.topo.members), w.stage,
                        cfg.train.seed, cfg.train.steps, w.wan, w.topo.members)
    if state:
        w.sync.load_state_dict(state)
    if w.topo.lanes > 1:
        for p in w.module.parameters():  # a lane that got no sequence in a step still joins the gradient sync
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        w.lane_sync = build_lane_sync(cfg.sync, w.module, w.groups, w.comm, w.topo.lanes, w.stage, cfg.train.seed)
        w.lane_runner = LaneRunner(w.groups.sp, w.comm)
        w.sp_cost = load_sp_cost(w, cfg.parallel.sp_cost)
        if w.sp_planner:
            w.sp_planner.close()
        planner = batch_planner(w.loader, w.topo.lanes, cfg.parallel.sp, w.sp_cost,
                                cfg.parallel.microbatches if cfg.parallel.microbatches > 1 else None,
                                cfg.parallel.sp_time_limit_s)
        w.sp_planner = SPPlanner(planner, cfg.parallel.sp_plan_ahead, cfg.train.steps, w.stage == 0 and w.lane == 0,
                                 w.comm, w.groups.whole_replica, w.topo.rank(w.replica, 0, 0))


def all_groups(groups: Groups) -> list:
    links = [*groups.replica_pairs.values(), *groups.near.values()]
    for neighbours in (*groups.next.values(), *groups.prev.values()):
        links += [neighbours.fwd, neighbours.bwd]
    return [groups.stage, groups.replica, groups.lanes, groups.whole_replica, *(groups.sp or {}).values(),
            *(link.group for link in links)]


def load_sp_cost(w: RankState, path: str) -> SPCost:
    """Rank 0 reads the SP cost model and every rank gets its copy, so all plan with the same numbers."""
    cost = w.comm.broadcast_object(SPCost.load(path) if w.rank == 0 and os.path.exists(path) else None, 0)
    if cost is None:
        raise ConfigError(f"no SP cost model at parallel.sp_cost={path}: run `python bench/profile_sp.py --out {path}` "
                          f"on this machine first (or point parallel.sp_cost at a fitted one)")
    return cost


def choose_checkpoint(w: RankState, resume: str) -> tuple[str | None, int]:
    """Rank 0 picks (and verifies) the checkpoint to resume from; every rank gets its path and step or its error."""
    choice = None
    if w.rank == 0:
        try:
            path = checkpoint.choose(w.ckpt_root, resume, warn)
            choice = ("ok", path, checkpoint.verify(path) if path else 0)
        except CheckpointError as err:
            choice = ("error", str(err), 0)
    status, path, step = w.comm.broadcast_object(choice, 0)
    if status == "error":
        raise CheckpointError(f"{path}; resume from another one (checkpoint.resume=latest or a path) "
                              f"or start fresh with checkpoint.resume=none")
    return path, step


def load_checkpoint(w: RankState, path: str, step: int, grace_s: float = 0.0) -> None:
    extra = checkpoint.load(path, w.module, w.optimizer, w.slot, w.comm, grace_s)
    w.committed = step
    w.loader.load_state_dict(extra.get("loader", {"step": step}))
    if "rng" in extra:
        torch.set_rng_state(extra["rng"])
    # Outer state: restored from the saved state (any replica's: DiLoCo's is the same on all), error feedback only
    # for the same replica count (else a dense round); with none saved, taken from the loaded weights - never
    # the initial weights the sync layer was built from
    if extra.get("sync") is not None and extra.get("stages", w.topo.stages) == w.topo.stages:
        w.sync.load_state_dict(extra["sync"], same_group=extra.get("replicas") == w.topo.replicas)
    else:
        w.sync.restart_from_weights()
    if w.lane_sync and extra.get("lane_sync") is not None:
        w.lane_sync.load_state_dict(extra["lane_sync"], same_group=extra.get("lanes") == w.topo.lanes)
    w.lr_scale, w.edge_copy = extra.get("lr_scale", 1.0), extra.get("edge_copy", {})


def checkpoint_extra(w: RankState, done: int) -> dict:
    """This rank's own state beside its weights: RNG, data position, sync state, recovery state."""
    return {"rng": torch.get_rng_state(), "loader": w.loader.state_dict(), "step": done, "sync": w.sync.state_dict(),
            "replicas": w.topo.replicas, "lr_scale": w.lr_scale, "edge_copy": w.edge_copy, "lanes": w.topo.lanes,
            "stages": w.topo.stages, "lane_sync": w.lane_sync.state_dict() if w.lane_sync else None,
            "replicas_differ": w.cfg.sync.method != "ddp",
            "at_outer_step": bool(w.outer_snapshot) and w.outer_snapshot["step"] == done}


def save_checkpoint(w: RankState, done: int) -> str:
    """A sealed checkpoint of every rank's state at step `done` (a collective; fenced and abortable)."""
    return checkpoint.save(w.ckpt_root, done, w.module, w.optimizer, checkpoint_extra(w, done),
                           w.slot,
                           w.cfg.checkpoint.keep, replicas_differ=w.cfg.sync.method != "ddp", comm=w.comm,
                           gen=w.gen, fence=w.fence)


def open_log(w: RankState) -> None:
    """The run's log from the current step (records of steps that will be replayed are dropped first)."""
    if w.log:
        w.log.rollback(w.committed, w.generation_id)
    else:
        w.log = RunLog(w.cfg.log.run_dir, w.grid_rank, w.replica, w.stage, w.topo.stages, w.committed,
                       w.cfg.log.tensorboard, tokens_per_step=w.meter.tokens_per_step, lane=w.lane,
                       gen=w.generation_id, fence=w.fence)


def announce(w: RankState, resumed_from: str | None) -> None:
    """The run's first console line (a collective over the replica: called by every rank at the start)."""
    cfg = w.cfg
    if w.rank == 0:
        w.fence()
        with open(os.path.join(cfg.log.run_dir, "config.yaml"), "w") as fh:
            fh.write(to_yaml(cfg))
    n_params = torch.tensor([float(sum(p.numel() for p in w.module.parameters()))], device=w.device)
    w.comm.all_reduce(n_params, w.groups.replica, "setup")
    lanes = f" x {w.topo.lanes} lanes (sp {cfg.parallel.sp})" if w.topo.lanes > 1 else ""
    w.log.say(f"flotilla: {w.topo.replicas} replica(s) x {w.topo.stages} stage(s){lanes}, {cfg.parallel.schedule} with "
              f"{cfg.parallel.microbatches} micro-batches | sync {cfg.sync.method}"
              f"{'+' + cfg.sync.compress if cfg.sync.compress != 'none' else ''} | model {n_params.item() / 1e6:.2f}M "
              f"params | corpus {len(w.corpus.train)} train / {len(w.corpus.val)} val windows of {cfg.data.seq_len} "
              f"tokens | unigram entropy {w.corpus.unigram_entropy:.3f} nats"
              + (f" | resumed from {resumed_from}" if resumed_from else ""))


def run(cfg: Config, train: TrainLoop) -> RankState:
    """Train to the end: one generation (no coordinator) or as many as the faults need."""
    if cfg.recovery.coordinator:
        return run_generations(cfg, train)
    return run_once(cfg, train)


def run_once(cfg: Config, train: TrainLoop) -> RankState:
    """A plain run: join the torchrun world (or a world of one), resume as checkpoint.resume says, train."""
    backend = choose_backend(cfg)
    timeout = timedelta(seconds=cfg.parallel.timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = os.path.join(tempfile.mkdtemp(prefix="flotilla-"), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1, timeout=timeout)
    check_world(cfg, dist.get_world_size())
    rank = dist.get_rank()
    topo = Topology(cfg.parallel.replicas, cfg.parallel.stages, lanes=cfg.parallel.lanes)
    w = build_state(cfg, topo, *topo.slot(rank), choose_device(cfg, backend), load_corpus(cfg.data), None, topo.lane(rank))
    connect(w, cfg.parallel.timeout_s)
    w.launch = w.comm.broadcast_object(time.time(), 0)
    os.makedirs(cfg.log.run_dir, exist_ok=True)
    path, step = choose_checkpoint(w, cfg.checkpoint.resume)
    if path:
        load_checkpoint(w, path, step)
        if w.rank == 0:
            roll_back_absent(w)  # a run resumed with fewer replicas: the others' uncommitted records
    open_log(w)
    announce(w, path)
    if path and w.log.is_logger:
        w.log.event("resumed", step=step, checkpoint=path)
    train(w)
    return w


def close(w: RankState) -> None:
    """The run is over on this rank: leave the coordinator's run, or the torchrun world."""
    if w.wan:
        w.wan.shutdown()
    if w.sp_planner:
        w.sp_planner.close()
    if w.member:
        w.member.leave()
    else:
        dist.destroy_process_group()


# ---- with a coordinator: generations ----

def check_timeouts(cfg: Config, settings: dict) -> None:
    """Timeouts nest: heartbeat interval x 3 <= heartbeat timeout < heartbeat timeout + phase margin < join timeout
    < collective (group) timeout."""
    hb, hb_timeout, join = cfg.recovery.heartbeat_s, settings["heartbeat_timeout_s"], settings["join_timeout_s"]
    phase = hb_timeout + cfg.recovery.phase_margin_s
    if not (3 * hb <= hb_timeout < phase < join < cfg.parallel.timeout_s):
        raise ConfigError(f"timeouts must nest: 3 x recovery.heartbeat_s ({3 * hb:g}s) <= coordinator heartbeat timeout "
                          f"({hb_timeout:g}s) < that + recovery.phase_margin_s ({phase:g}s) < coordinator join timeout "
                          f"({join:g}s) < parallel.timeout_s ({cfg.parallel.timeout_s:g}s): lower recovery.heartbeat_s "
                          f"or recovery.phase_margin_s, or raise the join timeout or parallel.timeout_s")
    grid = (settings["replicas"], settings["stages"], settings.get("lanes", 1))
    if grid != (cfg.parallel.replicas, cfg.parallel.stages, cfg.parallel.lanes):
        raise ConfigError(f"the coordinator runs {grid[0]} replica(s) x {grid[1]} stage(s) x {grid[2]} lane(s) but this "
                          f"worker has parallel.replicas={cfg.parallel.replicas}, parallel.stages={cfg.parallel.stages}, "
                          f"parallel.lanes={cfg.parallel.lanes}: start both with the same grid")


def run_generations(cfg: Config, train: TrainLoop) -> RankState:
    """Wait for a plan, form its world, agree on a state, train until done or lost; again after every loss."""
    member = Member(cfg.recovery.coordinator, cfg.recovery.run_id, cfg.recovery.heartbeat_s)
    check_timeouts(cfg, member.settings)
    backend = choose_backend(cfg)
    device = choose_device(cfg, backend)
    corpus = load_corpus(cfg.data)  # before the first plan: a replacement is ready to train when it gets a slot
    phase_s = member.settings["heartbeat_timeout_s"] + cfg.recovery.phase_margin_s
    w: RankState | None = None
    while True:
        try:
            hooks.at("plan", gen=member.gen)
            plan = member.next_plan(stall_s=max(phase_s, 10.0))
        except CoordinatorLost:
            raise salvage_and_stop(w) from None
        t_gen = time.monotonic()
        try:
            w = form(cfg, plan, member, w, backend, device, corpus, phase_s)
            recover(w, member.uid in plan.fresh, plan.gen, t_gen, phase_s)
            train(w)
            return w
        except GenerationLost as err:
            if member.lost.is_set():
                save_and_stop(w)
            if err.transfer_failed or (member.ending.is_set() and member.abort.is_set()):
                member.report_trouble(err.within_replica)  # a failed transfer, or stopped while its replica trained on
            if w and w.log:
                w.log.event("aborted", fenced=False, gen=plan.gen, step=w.committed, reason=str(err)[:120])
            warn(f"generation {plan.gen} ended at step {w.committed if w else 0}: {str(err)[:120]}")


def form(cfg: Config, plan: Plan, member: Member, w: RankState | None, backend: str, device: torch.device, corpus,
         phase_s: float) -> RankState:
    """Join the plan's world and build its groups, each within phase_s; the rank state is made once and kept."""
    replica, stage, lane = plan.slots[member.uid]
    topo = Topology(cfg.parallel.replicas, cfg.parallel.stages, plan.active, cfg.parallel.lanes)  # a replica may sit out
    rank = topo.rank(replica, stage, lane)
    os.environ["RANK"] = str(rank)  # for warn() and the console logger
    hooks.at("forming", gen=plan.gen, grid_rank=topo.grid_rank(replica, stage, lane))
    member.hold_lease()  # frozen since the plan was read: its generation may have ended (then nobody waits for it)
    if member.abort.is_set():
        raise GenerationLost(f"generation {plan.gen} ended before this worker joined it", False)
    with lost_on_failure("forming the world"):
        start_generation(member.raw, plan.gen, rank, topo.world_size, backend, phase_s, keep=(w.groups,) if w else ())
        raise_timeouts([None], cfg.parallel.timeout_s)
    if w is None:
        w = build_state(cfg, topo, replica, stage, device, corpus, member, lane)
        w.launch = member.launch
        os.makedirs(cfg.log.run_dir, exist_ok=True)
    w.topo, w.gen = topo, plan.gen
    if cfg.sync.method == "diloco" and cfg.recovery.rejoin == "skip" and not cfg.sync.routing:
        member.defer_replica = replica  # a loss elsewhere: train on to the next outer step (the lost replica
        # rejoins there), then form the next generation
    hooks.at("connecting", gen=plan.gen, grid_rank=w.grid_rank)
    with lost_on_failure("building groups"):
        connect(w, phase_s)
    return w


def my_info(w: RankState, fresh: bool) -> RankInfo:
    """What this rank tells the others when they agree on a state. A rank that never completed an agreement
    (new, or its rebuild was cut short by the next failure) is fresh whatever the plan says: it holds nothing."""
    return RankInfo(w.replica, w.stage, fresh or not w.has_state, w.committed + w.applied, w.undo is not None,
                    w.grad_norm, w.outer_snapshot["step"] if w.outer_snapshot and w.has_state else -1, w.applied,
                    w.lane)


def take_back(w: RankState, decision: Decision) -> None:
    """Go to the agreed step: undo this rank's last update if it was ahead, or rewind to the last outer step
    (a replica that lost a stage under DiLoCo / NoLoCo; a fresh rank gets its snapshot from a source)."""
    if w.replica in decision.rewind:
        if w.has_state:
            snapshot.restore(w.outer_snapshot, w.module, w.optimizer, w.sync)
    elif w.slot in decision.undo:
        snapshot.restore(w.undo, w.module, w.optimizer, w.sync)
    w.committed, w.applied, w.undo = decision.target_of(w.replica), False, None


def stop_before_world_step(w: RankState, done: int) -> None:
    """Training on after the generation ended elsewhere (DiLoCo): stop before an inner step that ends in an outer
    step or a checkpoint, which need the next generation (its update would only be taken back). The ranks of the
    replica decide together (a max over the replica): each learns of the end on its own heartbeat, and a rank
    that stopped alone would leave the others waiting in that step's pipeline transfers."""
    cfg = w.cfg
    if w.member is None or w.member.defer_replica is None or not (
            done % cfg.sync.H == 0 or done == cfg.train.steps or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0)):
        return
    ending = torch.tensor([float(w.member.ending.is_set())], device=w.device)
    w.comm.all_reduce(ending, w.groups.replica, INTRA, op=dist.ReduceOp.MAX)  # the stages of this lane,
    w.comm.all_reduce(ending, w.groups.lanes, LANE, op=dist.ReduceOp.MAX)  # then the lanes: every rank of the replica
    if ending.item():
        raise GenerationLost(f"the generation ended: this replica stops before step {done} (it needs the others)",
                             False)


def keep_outer_snapshot(w: RankState, step: int) -> None:
    """DiLoCo / NoLoCo with recovery on: the state at an agreed point every replica shares (an outer step, or a
    start), which a replica that loses a stage rewinds to."""
    if w.member and w.cfg.sync.method != "ddp":
        w.outer_snapshot = snapshot.take(w.module, w.optimizer, w.sync, step)


def recover(w: RankState, fresh: bool, gen: int, t_gen: float, phase_s: float) -> None:
    """Agree with every rank of the new generation on one state: roll back, rebuild fresh stages, or load a
    checkpoint. With no survivor, the newest sealed checkpoint is the state (checkpoint.resume only governs
    the first generation): trained progress is never thrown away."""
    cfg, topo = w.cfg, w.topo
    w.module.zero_grad(set_to_none=False)
    w.join_at = None
    hooks.at("agreeing", gen=gen, grid_rank=w.grid_rank)
    with lost_on_failure("agreeing"):
        infos = gather_infos(my_info(w, fresh), w.comm)
        if cfg.sync.method == "ddp":
            decision = decide(infos, topo.stages, cfg.recovery.rebuild, cfg.recovery.swap)
        else:
            join = None
            if cfg.sync.method == "diloco" and cfg.recovery.rejoin == "skip":
                join = partial(join_step, H=cfg.sync.H, steps=cfg.train.steps, checkpoint_every=cfg.checkpoint.every)
            decision = decide_per_replica(infos, coupled=cfg.sync.routing, join=join)
        first_start = decision.target is None and gen == 1
        resumed_from, method = None, None
        if decision.target is None or decision.checkpoint:  # nothing in memory to agree on, or a slot has no source
            resumed_from, step = choose_checkpoint(w, cfg.checkpoint.resume if first_start else "latest")
            if resumed_from:
                load_checkpoint(w, resumed_from, step, grace_s=phase_s)
            elif not first_start:  # nothing sealed yet: start over from the initial weights
                restart_from_scratch(w)
            method = None if first_start else "checkpoint"
            keep_outer_snapshot(w, w.committed)  # every replica is at this step: the point to rewind to
        else:
            take_back(w, decision)
            hooks.at("rebuilding", gen=gen, grid_rank=w.grid_rank)
            method = run_transfers(decision, topo, w, w.comm, cfg.recovery.checkfree_weight, cfg.recovery.lr_boost,
                                   phase_s, cfg.parallel.timeout_s)
            if any(slot[1] == w.stage for slot, _, _ in decision.sources):
                w.sync.reset_error_feedback()  # a replica of this stage changed: a dense round first
            if w.lane_sync and (w.replica in decision.rewind or
                                any(slot[:2] == (w.replica, w.stage) for slot, _, _ in decision.sources)):
                w.lane_sync.reset_error_feedback()  # so did a lane of it, or this replica went back
            if decision.skip:  # the replicas that rejoin send zeros at the join step: a dense round, a mean over
                w.sync.reset_error_feedback()  # the replicas that trained
                w.sync.expect_contributors(decision.join, len(topo.members) - len(decision.skip))
            w.join_at = decision.join if w.replica in decision.skip else None
        agree_on_data(w, infos, decision)
    w.applied, w.undo, w.has_state = False, None, True
    w.loader.step = w.committed
    if w.rank == 0:
        w.fence()
        roll_back_absent(w)
    open_log(w)
    with lost_on_failure("agreeing"):
        if first_start:
            announce(w, resumed_from)
        if cfg.recovery.swap:
            refresh_edge_copies(w, w.comm, topo.stages)
        w.comm.barrier()  # every rank has rolled its files back before any records a new step
    if first_start and resumed_from and w.log.is_logger:
        w.log.event("resumed", gen=gen, step=w.committed, checkpoint=resumed_from)
    if not first_start:
        if method:
            w.log.event("rebuilt", gen=gen, replica=w.replica, stage=w.stage, lane=w.lane, method=method)
        w.log.event("resumed", gen=gen, replica=w.replica, step=w.committed, undo=list(map(list, decision.undo)),
                    rejoin_at=w.join_at,
                    checkpoint=resumed_from, seconds=round(time.monotonic() - t_gen, 3))
        w.log.say(f"generation {gen}: resumed at step {w.committed}; rebuilt "
                  f"{[(list(s), m) for s, m, _ in decision.sources] or 'nothing'}"
                  + (f"; replica(s) {list(decision.skip)} rejoin at the outer step {decision.join}" if decision.skip
                     else "")
                  + (f" from {resumed_from}" if resumed_from else ""))


def agree_on_data(w: RankState, infos: list[RankInfo], decision: Decision) -> None:
    """Every rank takes the data schedule of a rank that holds it (the first survivor; rank 0 after a checkpoint
    load or at the start) and records this generation's replicas from the step they take effect: the common
    step (replicas in lockstep), or under DiLoCo / NoLoCo the next outer step (a replica finishes the window it
    is in with the replicas it started it with). So the slots of a replica that sits out are read by the others,
    and every sample once per epoch."""
    cfg, topo = w.cfg, w.topo
    from_checkpoint = decision.target is None or decision.checkpoint  # every rank holds what it loaded
    held = [topo.rank(*i.slot) for i in infos if not i.fresh]
    src = min(held) if held and not from_checkpoint else 0
    schedule = w.comm.broadcast_object(w.loader.schedule if w.rank == src else None, src)
    if cfg.sync.method == "ddp" or cfg.sync.routing or from_checkpoint:
        effective = w.committed if from_checkpoint else decision.target
    else:
        newest = max(i.outer_step for i in infos if not i.fresh)
        effective = newest + cfg.sync.H
    w.loader.schedule = schedule
    w.loader.rejoin(effective, topo.members)


def restart_from_scratch(w: RankState) -> None:
    cfg = w.cfg
    w.module.load_state_dict(build_stage(w.module.cfg, w.stage, w.topo.stages, cfg.data.seq_len,
                                         cfg.train.seed).state_dict())
    w.optimizer = build_optimizer(w.module, cfg.optim)
    w.committed, w.lr_scale, w.edge_copy = 0, 1.0, {}
    w.loader.step = 0
    w.sync = build_sync(cfg.sync, w.module, w.groups, w.comm, w.replica, len(w.topo.members), w.stage,
                        cfg.train.seed, cfg.train.steps, w.wan, w.topo.members)


def roll_back_absent(w: RankState) -> None:
    """Rank 0 rolls back the files of slots not in this generation (a replica that sits out cannot do it
    itself, nor one a run resumed with fewer replicas no longer has; the logger's metrics when replica 0 sits
    out), leaving a marker of this generation in each: to its
    committed step (replicas move in lockstep), or under DiLoCo / NoLoCo to its newest outer step."""
    run_dir, topo = w.cfg.log.run_dir, w.topo
    # DiLoCo / NoLoCo: what an absent replica did after the newest outer step never reached one (not committed)
    step = w.outer_snapshot["step"] if w.outer_snapshot else w.committed  # kept only under DiLoCo / NoLoCo
    ledgers = os.path.join(run_dir, "ledger")
    gone = {int(m.group(1)) for m in map(re.compile(r"replica(\d+)\.jsonl$").match,
                                         os.listdir(ledgers) if os.path.isdir(ledgers) else ()) if m}
    for r in (set(range(topo.replicas)) - set(topo.members)) | {r for r in gone if r >= topo.replicas}:
        truncate_jsonl(ledger_path(run_dir, r), step, w.generation_id)
        for s in range(topo.stages):
            for lane in range(topo.lanes):
                truncate_jsonl(os.path.join(run_dir, "sync", f"rank{topo.grid_rank(r, s, lane)}.jsonl"), step + 1,
                               w.generation_id)
        if r == 0:
            truncate_jsonl(os.path.join(run_dir, "metrics.jsonl"), step + 1, w.generation_id)


def save_and_stop(w: RankState | None) -> None:
    """The coordinator is gone during training: agree with the others on a step, checkpoint it, and stop with
    one line. Raises CoordinatorLost."""
    where = f"the coordinator at {w.cfg.recovery.coordinator} is gone" if w else "the coordinator is gone"
    if w is None or w.groups is None:
        raise CoordinatorLost(f"{where}: restart it and relaunch the workers with checkpoint.resume=latest")
    deadline = threading.Event()
    timer = threading.Timer(w.cfg.recovery.abort_timeout_s, deadline.set)
    timer.daemon = True
    timer.start()
    w.comm.abort = deadline
    w.member = None  # no generation to be fenced by any more: these ranks hold the run's last state
    try:
        decision = decide(gather_infos(my_info(w, False), w.comm), w.topo.stages)
        if decision.checkpoint:
            raise GenerationLost("no common step", False)
        take_back(w, decision)
        w.loader.step = w.committed
        if w.log:
            w.log.rollback(w.committed, w.generation_id)
        path = save_checkpoint(w, w.committed)
    except (GenerationLost, RuntimeError):
        raise salvage_and_stop(w) from None  # could not agree: every rank keeps its own state
    finally:
        timer.cancel()
    raise CoordinatorLost(f"{where}; saved {path} at step {w.committed}: restart the coordinator and relaunch the "
                          f"workers with checkpoint.resume=latest")


def salvage_and_stop(w: RankState | None) -> CoordinatorLost:
    """The coordinator is gone with no world to agree in (it died while a generation formed): every rank saves
    its own state at its committed step, without collectives; a later start assembles a checkpoint from a set
    that covers every stage at one step (checkpoint.choose). Returns the one-line error to raise."""
    where = f"the coordinator{' at ' + w.cfg.recovery.coordinator if w else ''} is gone"
    if w is None or not w.has_state:
        return CoordinatorLost(f"{where}: restart it and relaunch the workers with checkpoint.resume=latest")
    if w.applied and w.undo:  # the in-flight step's update is not committed: take it back
        snapshot.restore(w.undo, w.module, w.optimizer, w.sync)
    w.applied, w.undo = False, None
    w.loader.step = w.committed
    path = checkpoint.salvage(w.ckpt_root, w.committed, w.module, w.optimizer, checkpoint_extra(w, w.committed),
                              w.slot)
    outer = w.outer_snapshot  # kept only under DiLoCo / NoLoCo
    if outer and outer["step"] < w.committed:  # DiLoCo / NoLoCo: replicas may stop at different steps, but all
        # passed the newest outer step: its snapshot is a set every replica can resume from (checkpoint.choose)
        extra = {**checkpoint_extra(w, outer["step"]), "sync": outer["sync"],
                 "loader": {**w.loader.state_dict(), "step": outer["step"]}, "at_outer_step": True}
        checkpoint.salvage_state(w.ckpt_root, outer["step"], {"model": outer["module"], "optim": outer["optim"],
                                                              "extra": extra}, w.slot)
    return CoordinatorLost(f"{where}; saved this rank's state at step {w.committed} ({path}): "
                           f"restart the coordinator and relaunch the workers with checkpoint.resume=latest")

