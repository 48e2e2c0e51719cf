"""Process groups for one rank, built in one place so that recovery can rebuild them after a failure."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from dist.comm import CROSS, INTRA
from dist.topology import Topology


@dataclass
class Link:
    """A 2-rank group to one peer (a pipeline neighbour for one direction of traffic, or a replica)."""
    group: object
    peer: int  # global rank of the other end
    kind: str = INTRA  # link class for byte accounting: INTRA (same replica) or CROSS


@dataclass
class NeighbourLinks:
    """The two 2-rank groups to one rank of a neighbouring stage: activations (fwd), their gradients (bwd)."""
    fwd: Link
    bwd: Link


@dataclass
class Groups:
    stage: object  # this stage on every replica (cross-replica)
    replica: object  # every stage of this replica (intra-replica)
    next: dict[int, NeighbourLinks]  # replica -> links to its next stage (own replica only, unless routing)
    prev: dict[int, NeighbourLinks]  # replica -> links to its previous stage
    replica_pairs: dict[int, Link]  # other replica -> 2-rank group with its copy of this stage (NoLoCo)
    near: dict[int, Link]  # stage -> 2-rank group with that stage of this replica, 1 or 2 stages away (CheckFree+)


def build_groups(topo: Topology, rank: int, timeout_s: float, replica_pairs: bool = False,
                 routing: bool = False, swap: bool = False) -> Groups:
    """Every rank calls new_group for every group in the same order (torch.distributed's rule).

    replica_pairs: also a 2-rank group between every two replicas of each stage (NoLoCo's exchange).
    routing: links from every replica's stage s to every replica's stage s + 1 (random routing).
    swap: links between stages one or two apart in each replica (CheckFree+'s swapped micro-batches).
    """
    timeout = timedelta(seconds=timeout_s)
    replica, stage = topo.slot(rank)
    mine: dict = {"next": {}, "prev": {}}
    for s in range(topo.stages):
        g = dist.new_group(topo.stage_ranks(s), timeout=timeout)
        if s == stage:
            mine["stage"] = g
    for r in topo.members:
        g = dist.new_group(topo.replica_ranks(r), timeout=timeout)
        if r == replica:
            mine["replica"] = g
    for s in range(topo.stages - 1):
        for ra in topo.members:
            for rb in topo.members if routing else (ra,):
                a, b = topo.rank(ra, s), topo.rank(rb, s + 1)
                fwd, bwd = dist.new_group([a, b], timeout=timeout), dist.new_group([a, b], timeout=timeout)
                kind = INTRA if ra == rb else CROSS
                if rank == a:
                    mine["next"][rb] = NeighbourLinks(Link(fwd, b, kind), Link(bwd, b, kind))
                if rank == b:
                    mine["prev"][ra] = NeighbourLinks(Link(fwd, a, kind), Link(bwd, a, kind))
    pairs = {}
    for s in range(topo.stages) if replica_pairs else ():
        for a in topo.members:
            for b in (b for b in topo.members if b > a):
                ra, rb = topo.rank(a, s), topo.rank(b, s)
                g = dist.new_group([ra, rb], timeout=timeout)
                if rank in (ra, rb):
                    pairs[b if rank == ra else a] = Link(g, rb if rank == ra else ra, CROSS)
    near = {}
    for r in topo.members if swap else ():
        for a in range(topo.stages):
            for b in range(a + 1, min(a + 3, topo.stages)):
                ra, rb = topo.rank(r, a), topo.rank(r, b)
                g = dist.new_group([ra, rb], timeout=timeout)
                if rank in (ra, rb):
                    near[b if rank == ra else a] = Link(g, rb if rank == ra else ra, INTRA)
    return Groups(mine["stage"], mine["replica"], mine["next"], mine["prev"], pairs, near)
