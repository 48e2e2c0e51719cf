"""What one rank holds: a typed home that outlives generations (after a failure only its groups and sync are
rebuilt). The training step reads it; recovery (runtime, rebuild) changes it."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from config import Config, ConfigError
from data.dataset import Corpus
from data.loader import ReplicaLoader
from dist.comm import Comm
from dist.groups import Groups
from dist.lanes import LaneRunner
from dist.plan_ahead import SPPlanner
from dist.sp_cost import SPCost
from dist.topology import Topology
from metrics import RunLog, Throughput
from model.stages import Stage, build_stage, set_fast_path
from optim.inner import build_optimizer
from optim.sync import Sync
from recovery.membership import Member

if TYPE_CHECKING:
    from optim.wan import SitePeer  # imports hivemind: only runs across sites load it


@dataclass
class RankState:
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
    member: Member | None = None  # None: a plain torchrun run (one generation, no coordinator)
    lane: int = 0  # this rank's lane of its stage (sequence parallelism)
    gen: int = 0  # the generation this rank is in (0 without a coordinator)
    launch: float = 0.0  # when the run (its coordinator, or rank 0 of a torchrun job) started
    groups: Groups | None = None
    sync: Sync | None = None
    wan: SitePeer | None = None  # this rank's hivemind peer, when sites exchange over it (sync.transport=hivemind)
    lane_sync: Sync | None = None  # gradient averaging across the lanes of this stage (lanes > 1)
    lane_runner: LaneRunner | None = None  # runs this lane's sequence shards, Ulysses attention in SP groups
    sp_cost: SPCost | None = None  # the planner's cost model (lanes > 1)
    sp_planner: SPPlanner | None = None  # each batch's SP plan, made one step ahead by default (lanes > 1)
    log: RunLog | None = None
    lr_scale: float = 1.0  # CheckFree raises it on a rebuilt stage
    grad_norm: float = 0.0  # this stage's own last gradient norm (CheckFree's weight)
    edge_copy: dict = field(default_factory=dict)  # CheckFree+: a neighbour's (de)embedding, kept for recovery
    has_state: bool = False  # holds an agreed state: set when a generation's agreement completes on this rank
    committed: int = 0  # steps whose every transfer succeeded here
    applied: bool = False  # the in-flight step's update is already in the weights
    undo: dict | None = None  # the state before the last update (recovery on)
    outer_snapshot: dict | None = None  # DiLoCo / NoLoCo with recovery on: the state at the last outer step
    join_at: int | None = None  # DiLoCo: this replica skips its inner steps and rejoins at this outer step
    val_loss: float = float("nan")
    meter: Throughput | None = None

    @property
    def rank(self) -> int:
        """This generation's rank (shifts while a replica sits out)."""
        return self.topo.rank(self.replica, self.stage, self.lane)

    @property
    def grid_rank(self) -> int:
        """The slot's place in the full replicas x stages x lanes grid: a stable name for logs and fault injection."""
        return self.topo.grid_rank(self.replica, self.stage, self.lane)

    @property
    def slot(self) -> tuple[int, int, int]:
        return self.replica, self.stage, self.lane

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.cfg.log.run_dir, "checkpoints")

    @property
    def generation_id(self) -> list:
        """[launch, generation]: stamped on every record this rank writes; orders them across relaunches."""
        return [self.launch, self.gen]

    def fence(self) -> None:
        """Raise GenerationLost if this rank's generation has ended (no-op without a coordinator)."""
        if self.member:
            self.member.check_fence()


def model_config(cfg: Config, tokenizer_vocab: int):
    """The model's vocabulary: the tokenizer's, rounded up to a multiple of 64, unless set larger."""
    vocab = cfg.model.vocab_size or 64 * math.ceil(tokenizer_vocab / 64)
    if vocab < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer's {tokenizer_vocab}: "
                          f"set model.vocab_size=0 (automatic)")
    return dataclasses.replace(cfg.model, vocab_size=vocab)


def build_state(cfg: Config, topo: Topology, replica: int, stage: int, device, corpus: Corpus,
                member: Member | None, lane: int = 0) -> RankState:
    module = build_stage(model_config(cfg, corpus.vocab_size), stage, topo.stages, cfg.data.seq_len,
                         cfg.train.seed).to(device)
    set_fast_path(module, cfg.train.precision, cfg.train.activation_checkpointing, cfg.train.compile)
    shard = cfg.wan.site * topo.replicas + replica, cfg.wan.sites * topo.replicas  # site k reads like replica k
    loader = ReplicaLoader(corpus.train, corpus.eos, cfg.train.seed, *shard, cfg.train.batch_size)
    comm = Comm(member.abort, member.ending, member.hold_lease, device) if member else Comm(device=device)
    meter = Throughput(topo.replicas * cfg.train.batch_size * cfg.data.seq_len)
    return RankState(cfg, topo, replica, stage, device, corpus, module, build_optimizer(module, cfg.optim), loader,
                     comm, member, lane, meter=meter)
