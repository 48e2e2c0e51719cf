"""How the replicas of a stage stay together: one object per rank, built from `sync:` in the config.

  before_update(done): after backward of step `done`, before the inner step (DDP: average the gradients, maybe
    EF21-compressed; densely while done <= sync.dense_warmup)
  after_update(done): after the inner step (DiLoCo / NoLoCo: an outer step every H steps)
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch._utils import _flatten_dense_tensors

from config import SyncConfig
from dist.comm import CROSS, LANE, Comm
from dist.groups import Groups
from optim.diloco import DiLoCo
from optim.ef21 import COMPRESSORS, KINDS, ErrorFeedback
from optim.noloco import NoLoCo
from optim.reduce import average_in_place_, copy_flat_
from optim.sparseloco import SparseLoCo

METHODS = ("ddp", "diloco", "noloco")  # sync.method
TRANSPORTS = ("torch", "hivemind")  # sync.transport of the outer exchange (hivemind: optim/wan.py)
COMPRESSIONS = ("none", "sparseloco", *(f"{k}-{c}" for k in KINDS for c in COMPRESSORS))  # sync.(lane_)compress


class Sync(Protocol):
    """What the step and recovery need of any sync layer."""

    def before_update(self, done: int) -> None: ...

    def after_update(self, done: int) -> list: ...

    def reset_error_feedback(self) -> None:
        """A replica of this stage changed: error feedback restarts with a dense round."""

    def restart_from_weights(self) -> None:
        """No saved outer state fits: take it from the weights as they are (DiLoCo's anchor = weights and
        momentum = 0, NoLoCo's slow weights = weights); error feedback restarts with a dense round."""

    def outer_update_norm(self) -> float:
        """How far the latest outer step moved this rank's weights (0 for per-step sync)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, same_group: bool = True) -> None:
        """same_group=False: saved with another replica count, so group-bound state (error feedback) is dropped."""


class DDPSync:
    """Average every gradient over a group (the same stage of all replicas, or the lanes of a stage), every step,
    in one flat bucket."""

    def __init__(self, params: list[torch.nn.Parameter], ef: ErrorFeedback | None, comm: Comm, group, n: int,
                 link: str = CROSS, dense_warmup: int = 0):
        self.params, self.ef, self.comm, self.group, self.n, self.link = params, ef, comm, group, n, link
        self.dense_warmup = dense_warmup

    @torch.no_grad()
    def before_update(self, done: int) -> None:
        if self.n == 1:
            return
        grads = [p.grad for p in self.params]
        if self.ef:
            copy_flat_(grads, self.ef.aggregate(_flatten_dense_tensors(grads), dense=done <= self.dense_warmup))
        else:
            average_in_place_(grads, self.comm, self.group, self.link, self.n)

    def after_update(self, done: int) -> list[int]:
        return []

    def reset_error_feedback(self) -> None:
        if self.ef:
            self.ef.reset()

    def restart_from_weights(self) -> None:
        self.reset_error_feedback()

    def outer_update_norm(self) -> float:
        return 0.0

    def state_dict(self) -> dict:
        return {"ef": self.ef.state_dict() if self.ef else None}

    def load_state_dict(self, state: dict, same_group: bool = True) -> None:
        if self.ef and state.get("ef") and same_group:
            self.ef.load_state_dict(state["ef"])
        else:
            self.reset_error_feedback()


class OuterSync:
    """DiLoCo or NoLoCo: nothing per step, an outer step every H steps; optionally, at the last step, one
    all-reduce that averages the replicas' weights so the run ends with a single model to export."""

    def __init__(self, outer: DiLoCo | NoLoCo, params: list[torch.nn.Parameter], average_at: int | None,
                 comm: Comm, group, n: int):
        self.outer, self.params, self.average_at = outer, params, average_at
        self.comm, self.group, self.n = comm, group, n

    def before_update(self, done: int) -> None:
        pass

    @torch.no_grad()
    def after_update(self, done: int) -> list:
        synced = self.outer.after_update(done)
        if done == self.average_at:
            average_in_place_(self.params, self.comm, self.group, CROSS, self.n)
            synced = [*synced, "average"]
        return synced

    def expect_contributors(self, step: int, k: int) -> None:
        """DiLoCo: only k replicas trained towards the outer step at `step` (the others rejoin at it)."""
        self.outer.contributors = {step: k}

    def reset_error_feedback(self) -> None:
        for ef in getattr(self.outer, "ef", None) or ():  # NoLoCo has none
            ef.reset()

    def restart_from_weights(self) -> None:
        self.outer.restart_from_weights()

    def outer_update_norm(self) -> float:
        return self.outer.last_update_norm

    def state_dict(self) -> dict:
        return self.outer.state_dict()

    def load_state_dict(self, state: dict, same_group: bool = True) -> None:
        self.outer.load_state_dict(state, same_group)


def _error_feedback(cfg: SyncConfig, seed: int, comm: Comm, group, n: int, compress: str | None = None,
                    link: str = CROSS) -> ErrorFeedback | SparseLoCo:
    compress = compress or cfg.compress
    if compress == "sparseloco":
        return SparseLoCo(cfg.ratio, cfg.chunk, cfg.ef_decay, comm, group, link, n)
    kind, _, compressor = compress.partition("-")
    return ErrorFeedback(kind, compressor, cfg.ratio, cfg.ef_eta, cfg.chunk, seed, comm, group, link, n)


def build_lane_sync(cfg: SyncConfig, module: torch.nn.Module, groups: Groups, comm: Comm, lanes: int, stage: int,
                    seed: int) -> DDPSync:
    """The lanes of a stage average their gradients every step (before the replicas' sync), EF21 optional."""
    params = list(module.parameters())
    ef = (_error_feedback(cfg, seed * 7919 + stage, comm, groups.lanes, lanes, cfg.lane_compress, LANE)
          if cfg.lane_compress != "none" and lanes > 1 else None)
    return DDPSync(params, ef, comm, groups.lanes, lanes, LANE, cfg.dense_warmup)


def build_sync(cfg: SyncConfig, module: torch.nn.Module, groups: Groups, comm: Comm, replica: int, replicas: int,
               stage: int, seed: int, total_steps: int, transport=None, members: tuple[int, ...] = ()) -> Sync:
    """transport: the hivemind peer that carries diloco/noloco's outer exchange between sites (optim/wan.py);
    members: the replicas in this generation (default: all `replicas`). With recovery on (the comm watches an
    abort flag) an outer step is applied only once every rank of the world agrees its exchange succeeded."""
    params = list(module.parameters())
    should_commit = comm.barrier if comm.abort is not None and transport is None else None
    stage_seed = seed * 7919 + stage  # the same on every replica of this stage (Rand-K's shared index set)
    ef = cfg.compress != "none"
    if cfg.method == "ddp":
        return DDPSync(params, _error_feedback(cfg, stage_seed, comm, groups.stage, replicas) if ef else None,
                       comm, groups.stage, replicas, CROSS, cfg.dense_warmup)
    if cfg.method == "diloco":
        efs = ([_error_feedback(cfg, stage_seed + f, comm, groups.stage, replicas) for f in range(cfg.fragments)]
               if ef else None)
        outer = DiLoCo(list(module.named_parameters()), cfg.H, cfg.outer_lr, cfg.outer_momentum, cfg.nesterov,
                       cfg.fragments, cfg.precision, efs, comm, groups.stage, CROSS, replicas, transport, should_commit,
                       cfg.overlap, cfg.dense_warmup, total_steps)
    else:
        outer = NoLoCo(params, cfg.H, cfg.alpha, cfg.beta, cfg.gamma, replica, members or tuple(range(replicas)), seed,
                       comm, groups.replica_pairs, transport, should_commit)
    return OuterSync(outer, params, total_steps if cfg.final_average else None, comm, groups.stage, replicas)
