"""Bring a new generation to one consistent state: roll back a half-committed step, rebuild fresh stages.

Every rank gathers every rank's `RankInfo` and computes the same `Decision` (pure function, tested on its
own): the step everyone resumes from, and for each fresh (replacement) slot (replica, stage, lane) where its
stage comes from, tried in order:
  lane        another lane of the same stage of the same replica (lanes hold the same weights, Adam and sync
              state: exact in every sync mode)
  copy        the same stage of another replica (weights, Adam and sync state: exact for DDP; under DiLoCo the
              outer state is exact and the replica's local progress on that stage since the last outer step
              is replaced by the source replica's)
  checkfree   an interior stage = neighbours' layers averaged with weights from their last gradient norms
  checkfree+  an edge stage = its neighbour's layers (which learned to stand in on swapped micro-batches)
              plus the neighbour's copy of the embedding / output head
  checkpoint  every rank reloads the latest checkpoint (or restarts from scratch without one)

DiLoCo and NoLoCo replicas meet only at outer steps, so they do not share a step to roll back to; each replica
resumes on its own (`decide_per_replica`). A replica that lost a stage (or sat out, or missed an outer step's
commit) rewinds to the newest outer step: its survivors restore their own snapshot of that step, the lost
stage takes another replica's snapshot of it ("rewind": DiLoCo's anchor and outer momentum are the same on
every replica, so the weights are exact; the inner Adam moments are the source replica's). Under DiLoCo with
recovery.rejoin=skip it then joins the next outer step with a zero pseudo-gradient (its weights are the
anchor; `join_step`), otherwise it replays its inner steps with the same data. The other replicas go on from
their own committed step (routed replicas, which exchange activations every step, all rewind together).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from dist.comm import Comm
from dist.generation import park
from dist.topology import Topology
from recovery import snapshot
from recovery.state import RankState

RECOVERY = "recovery"  # link class of recovery traffic in the byte counters
EDGE_KEYS = {"E": ("embed.weight",), "H": ("norm.weight", "head.weight")}


@dataclass(frozen=True)
class RankInfo:
    replica: int
    stage: int
    fresh: bool
    state_step: int  # steps whose update is in this rank's weights
    can_undo: bool  # holds the state before its last update
    grad_norm: float  # its stage's own last gradient norm (CheckFree's weight)
    outer_step: int = -1  # step of its snapshot at the last outer step (DiLoCo / NoLoCo; -1: none)
    applied: bool = False  # the last update is in the weights but its step did not finish (the sync after it)
    lane: int = 0

    @property
    def slot(self) -> tuple[int, int, int]:
        return self.replica, self.stage, self.lane

    @property
    def done(self) -> int:
        """Steps this rank finished."""
        return self.state_step - self.applied

    def pack(self) -> torch.Tensor:
        return torch.tensor([self.replica, self.stage, self.fresh, self.state_step, self.can_undo, self.grad_norm,
                             self.outer_step, self.applied, self.lane], dtype=torch.float64)

    @staticmethod
    def unpack(t: torch.Tensor) -> "RankInfo":
        r, s, f, step, undo, g, outer, applied, lane = t.tolist()
        return RankInfo(int(r), int(s), bool(f), int(step), bool(undo), g, int(outer), bool(applied), int(lane))


@dataclass(frozen=True)
class Decision:
    target: int | None  # step every rank resumes from (None: a fresh start)
    undo: tuple[tuple[int, int, int], ...]  # slots that take back their last update
    sources: tuple[tuple[tuple[int, int, int], str, tuple[tuple[int, int, int], ...]], ...]  # (fresh slot, method,
    # from slots)
    checkpoint: bool  # some slot has no source: everyone reloads the latest checkpoint
    replica_targets: tuple[tuple[int, int], ...] = ()  # per replica (DiLoCo / NoLoCo): (replica, step it resumes at)
    rewind: tuple[int, ...] = ()  # replicas that go back to their snapshot of the last outer step
    skip: tuple[int, ...] = ()  # rewound replicas that skip to the outer step at `join` (DiLoCo, recovery.rejoin=skip)
    join: int | None = None

    def target_of(self, replica: int) -> int | None:
        return dict(self.replica_targets).get(replica, self.target)

REBUILDS = ("auto", "checkfree", "checkpoint")  # recovery.rebuild: what `decide` may choose from
REJOINS = ("skip", "replay")  # recovery.rejoin of a DiLoCo replica that lost a stage (`join_step`)


def decide(infos: list[RankInfo], stages: int, mode: str = "auto", swap: bool = False) -> Decision:
    survivors = {i.slot: i for i in infos if not i.fresh}
    fresh = sorted(i.slot for i in infos if i.fresh)
    if not survivors:
        return Decision(None, (), (), False)
    target = min(i.done for i in survivors.values())  # an unfinished step is taken back even if every rank applied it
    undo = tuple(sorted(s for s, i in survivors.items() if i.state_step == target + 1 and i.can_undo))
    if any(i.state_step > target + 1 or (i.state_step == target + 1 and not i.can_undo) for i in survivors.values()):
        return Decision(target, (), (), True)  # no single step to agree on: only the checkpoint is common ground
    sources = []
    for r, s, lane in fresh:
        sibling = sorted(ll for rr, ss, ll in survivors if (rr, ss) == (r, s))
        other = sorted(rr for rr, ss, ll in survivors if ss == s and ll == lane and rr != r)
        below, above, edge_keeper = (r, s - 1, lane), (r, s + 1, lane), (r, 1 if s == 0 else stages - 2, lane)
        if mode != "checkpoint" and sibling:
            sources.append(((r, s, lane), "lane", ((r, s, sibling[0]),)))
        elif mode == "auto" and other:
            sources.append(((r, s, lane), "copy", ((other[0], s, lane),)))
        elif mode != "checkpoint" and 0 < s < stages - 1 and below in survivors and above in survivors:
            sources.append(((r, s, lane), "checkfree", (below, above)))
        elif mode != "checkpoint" and swap and stages > 1 and s in (0, stages - 1) and edge_keeper in survivors:
            sources.append(((r, s, lane), "checkfree+", (edge_keeper,)))
        else:
            return Decision(target, undo, (), True)
    return Decision(target, undo, tuple(sources), False)


def join_step(newest: int, H: int, steps: int, checkpoint_every: int) -> int | None:
    """The outer step a rewound DiLoCo replica can rejoin at without its unfinished inner steps: the next one,
    if its snapshot is of an outer step (weights = anchor: a zero pseudo-gradient; not a checkpoint loaded between
    two) and the run gets there with no checkpoint in between (a save needs every replica in its step)."""
    join = newest + H
    saves_between = checkpoint_every and any(c % checkpoint_every == 0 for c in range(newest + 1, join))
    if newest % H or join > steps or saves_between:
        return None
    return join


def decide_per_replica(infos: list[RankInfo], coupled: bool = False, join: Callable[[int], int | None] | None = None
                       ) -> Decision:
    """DiLoCo / NoLoCo: every replica resumes on its own (see the module docstring). A fresh lane whose stage kept
    another lane is copied from it (exact); a replica whose ranks then all hold the newest outer step goes on from
    its own committed step; any other (it lost a stage, sat out while the others took outer steps, or missed an
    outer step's commit) rewinds to the newest outer step: its ranks that hold it restore their own snapshot, the
    rest get a sibling lane's or a live replica's. Whole-world fallbacks: no survivor (target None), or no outer
    step to rewind to / no replica holding it for a stage (checkpoint). coupled (random routing: micro-batches
    cross replicas every step): replicas move in lockstep, so all resume at one step, and if one rewinds, all
    rewind to the newest outer step. join (DiLoCo, recovery.rejoin=skip): newest outer step -> the outer step a
    rewound replica rejoins at (`join_step`) instead of replaying its inner steps, or None where it must replay."""
    survivors = {i.slot: i for i in infos if not i.fresh}
    if not survivors:
        return Decision(None, (), (), False)
    newest = max(i.outer_step for i in survivors.values())
    fallback = Decision(min(i.done for i in survivors.values()), (), (), True)
    targets, undo, sources, rewind = [], [], [], []
    for r in sorted({i.replica for i in infos}):
        mine = [i for i in infos if i.replica == r]
        sibling = {(i.stage, i.lane): sorted(j.lane for j in mine if j.stage == i.stage and j.slot in survivors
                                             and j.outer_step == newest) for i in mine}
        if all(sibling[i.stage, i.lane] if i.fresh else i.outer_step == newest for i in mine):
            kept = [i for i in mine if not i.fresh]  # within a replica the pipeline keeps its stages one step apart
            t = min(i.done for i in kept)
            if any(i.state_step > t + 1 or (i.state_step == t + 1 and not i.can_undo) for i in kept):
                return fallback
            undo += [i.slot for i in kept if i.state_step == t + 1]
            sources += [(i.slot, "lane", ((r, i.stage, sibling[i.stage, i.lane][0]),)) for i in mine if i.fresh]
            targets.append((r, t))
            continue
        if newest == -1:
            return fallback
        for i in (i for i in mine if i.fresh or i.outer_step != newest):
            src = [(r, i.stage, lane) for lane in sibling[i.stage, i.lane]] or \
                  sorted((rr, ss, ll) for (rr, ss, ll), si in survivors.items() if ss == i.stage and ll == i.lane
                         and rr != r and si.outer_step == newest)
            if not src:
                return fallback
            sources.append((i.slot, "rewind", (src[0],)))
        targets.append((r, newest))
        rewind.append(r)
    join_at = join(newest) if join and rewind and len(rewind) < len(targets) and not coupled else None  # someone
    # must have trained towards the next outer step for the others to skip to it
    if join_at is not None:
        return Decision(min(t for _, t in targets), tuple(sorted(undo)), tuple(sources), False, tuple(targets),
                        tuple(rewind), tuple(rewind), join_at)
    if coupled and rewind:
        return Decision(newest, (), tuple(sources), False, tuple((r, newest) for r, _ in targets),
                        tuple(r for r, _ in targets))
    if coupled:
        return decide(infos, 1)  # no fresh rank: one common step, a half-committed update taken back
    return Decision(min(t for _, t in targets), tuple(sorted(undo)), tuple(sources), False, tuple(targets),
                    tuple(rewind))


def gather_infos(me: RankInfo, comm: Comm) -> list[RankInfo]:
    return [RankInfo.unpack(t) for t in comm.all_gather(me.pack().to(comm.device), None, RECOVERY)]


def _layers(module) -> list[dict]:
    return [{k: v.detach().clone() for k, v in layer.state_dict().items()} for layer in module.layers.values()]


def payload(method: str, w: RankState) -> dict:
    """What a source sends for one fresh slot."""
    if method == "rewind":  # its snapshot of the last outer step
        return {**w.outer_snapshot, "lr_scale": w.lr_scale, "edge_copy": w.edge_copy, "grad_norm": w.grad_norm}
    if method in ("copy", "lane"):  # with the sync state: DiLoCo's anchor and outer momentum are the same on every replica
        return {"module": w.module.state_dict(), "optim": w.optimizer.state_dict(), "lr_scale": w.lr_scale,
                "edge_copy": w.edge_copy, "grad_norm": w.grad_norm, "sync": w.sync.state_dict(),
                "outer_snapshot": w.outer_snapshot}  # a sibling lane's: its point to rewind to
    out = {"layers": _layers(w.module), "grad_norm": w.grad_norm}
    if method == "checkfree+":
        out["edge"] = w.edge_copy  # the (de)embedding this neighbour keeps for the lost edge stage
    return out


CHECKFREE_WEIGHTS = {"grad_norm": lambda g: g + 1e-4, "grad_norm_sq": lambda g: g ** 2 + 1e-4,
                     "uniform": lambda g: 1.0}  # recovery.checkfree_weight


def weight(grad_norm: float, rule: str) -> float:
    """CheckFree's neighbour weight: the less converged neighbour (larger gradient) counts more."""
    return CHECKFREE_WEIGHTS[rule](grad_norm)


@torch.no_grad()
def apply(method: str, received: list[dict], w: RankState, rule: str, lr_boost: float) -> None:
    """Install what the sources sent into this fresh rank's stage."""
    if method == "rewind":
        got = received[0]
        w.outer_snapshot = {k: got[k] for k in ("module", "optim", "sync", "step")}
        snapshot.restore(w.outer_snapshot, w.module, w.optimizer, w.sync)
        w.sync.reset_error_feedback()
        w.lr_scale, w.edge_copy, w.grad_norm = got["lr_scale"], got["edge_copy"], got["grad_norm"]
        return
    if method in ("copy", "lane"):
        got = received[0]
        w.module.load_state_dict(got["module"])
        w.optimizer.load_state_dict(got["optim"])
        w.sync.load_state_dict(got["sync"], same_group=False)  # error feedback restarts with a dense round
        w.lr_scale, w.edge_copy, w.grad_norm = got["lr_scale"], got["edge_copy"], got["grad_norm"]
        w.outer_snapshot = got["outer_snapshot"]
        return
    weights = [weight(r["grad_norm"], rule) for r in received]
    for k, layer in enumerate(w.module.layers.values()):
        for name, p in layer.state_dict().items():
            mix = sum(wt * r["layers"][min(k, len(r["layers"]) - 1)][name] for wt, r in zip(weights, received))
            p.copy_(mix / sum(weights))
    if method == "checkfree+":
        params = dict(w.module.named_parameters())
        for name, t in received[0]["edge"].items():
            if name in params:  # a middle stage of 3 keeps both edges' copies
                params[name].copy_(t)
    w.lr_scale *= lr_boost  # the paper: the rebuilt stage learns a little faster; its Adam starts fresh
    w.sync.restart_from_weights()  # DiLoCo / NoLoCo: the outer state starts from the rebuilt weights


def run_transfers(decision: Decision, topo: Topology, w: RankState, comm: Comm, rule: str, lr_boost: float,
                  form_timeout_s: float, timeout_s: float) -> str | None:
    """Every rank creates the same 2-rank groups in the same order (each formed within form_timeout_s, then
    given the full transfer timeout), then sources send and fresh ranks apply. Returns this rank's rebuild
    method if it was rebuilt."""
    me = w.slot
    transfers = [(dst, method, src) for dst, method, srcs in decision.sources for src in srcs]
    groups = [dist.new_group([topo.rank(*src), topo.rank(*dst)], timeout=timedelta(seconds=form_timeout_s))
              for dst, _, src in transfers]
    park(*groups)  # never destroyed on this thread, even if a transfer fails half-way
    for g in groups:
        if not c10d._rank_not_in_group(g):
            c10d._set_pg_timeout(timedelta(seconds=timeout_s), g)
    received, mine = [], None
    for (dst, method, src), group in zip(transfers, groups):
        if src == me:
            comm.broadcast_object(payload(method, w), topo.rank(*me), group, RECOVERY)
        elif dst == me:
            received.append(comm.broadcast_object(None, topo.rank(*src), group, RECOVERY))
            mine = method
    if mine:
        apply(mine, received, w, rule, lr_boost)
    return mine


@torch.no_grad()
def refresh_edge_copies(w: RankState, comm: Comm, stages: int) -> None:
    """CheckFree+: the first stage's embedding goes to stage 1, the last stage's norm and head to stage S-2."""
    if stages < 2:
        return
    cfg = w.module.cfg
    shapes = {"embed.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,), "head.weight": (cfg.vocab_size, cfg.dim)}
    for owner, keeper, part in ((0, 1, "E"), (stages - 1, stages - 2, "H")):
        if w.stage not in (owner, keeper):
            continue
        link = w.groups.near[keeper if w.stage == owner else owner]
        params = dict(w.module.named_parameters())
        for name in EDGE_KEYS[part]:
            if w.stage == owner:
                comm.wait(comm.send(params[name].detach().contiguous(), link.group, RECOVERY), RECOVERY)
            else:
                w.edge_copy[name] = comm.recv(torch.empty(shapes[name], device=w.device), link.group, link.peer,
                                              RECOVERY)
