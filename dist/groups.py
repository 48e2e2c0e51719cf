"""Process groups for one rank, built in one place so that recovery can rebuild them after a failure."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from dist.comm import CROSS, INTRA
from dist.topology import Topology


def sp_ranges(lanes: int) -> list[tuple[int, int]]:
    """Every aligned lane range (start, size) an SP group of size >= 2 can sit on (the planner's placements)."""
    return [(start, size) for size in (1 << i for i in range(1, lanes.bit_length())) if size <= lanes
            for start in range(0, lanes - size + 1, size)]


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
    lanes: object = None  # every lane of this stage of this replica (gradient sync); None with one lane
    sp: dict[tuple[int, int], object] = None  # (start lane, size) -> SP group of this stage's lanes holding this lane
    whole_replica: object = None  # every stage and lane of this replica (the SP plan's broadcast); None with one lane


def build_groups(topo: Topology, rank: int, timeout_s: float, replica_pairs: bool = False,
                 routing: bool = False, swap: bool = False) -> Groups:
    """Every rank calls new_group for every group in the same order (torch.distributed's rule).

    replica_pairs: also a 2-rank group between every two replicas of each stage (NoLoCo's exchange).
    routing: links from every replica's stage s to every replica's stage s + 1 (random routing).
    swap: links between stages one or two apart in each replica (CheckFree+'s swapped micro-batches).
    With lanes, every group above exists once per lane (lane i of stage s talks to lane i of stage s + 1),
    plus the lanes of each stage, an SP group for every aligned lane range, and each replica's whole set of
    ranks, created once here.
    """
    timeout = timedelta(seconds=timeout_s)
    replica, stage = topo.slot(rank)
    lane, lanes = topo.lane(rank), range(topo.lanes)
    mine: dict = {"next": {}, "prev": {}, "lanes": None, "sp": {}, "whole_replica": None}
    for s in range(topo.stages):
        for ln in lanes:
            g = dist.new_group(topo.stage_ranks(s, ln), timeout=timeout)
            if (s, ln) == (stage, lane):
                mine["stage"] = g
    for r in topo.members:
        for ln in lanes:
            g = dist.new_group(topo.replica_ranks(r, ln), timeout=timeout)
            if (r, ln) == (replica, lane):
                mine["replica"] = g
    for s in range(topo.stages - 1):
        for ra in topo.members:
            for rb in topo.members if routing else (ra,):
                for ln in lanes:
                    a, b = topo.rank(ra, s, ln), topo.rank(rb, s + 1, ln)
                    fwd, bwd = dist.new_group([a, b], timeout=timeout), dist.new_group([a, b], timeout=timeout)
                    kind = INTRA if ra == rb else CROSS
                    if rank == a:
                        mine["next"][rb] = NeighbourLinks(Link(fwd, b, kind), Link(bwd, b, kind))
                    if rank == b:
                        mine["prev"][ra] = NeighbourLinks(Link(fwd, a, kind), Link(bwd, a, kind))
    for r in topo.members if topo.lanes > 1 else ():
        for s in range(topo.stages):
            ranks = topo.lane_ranks(r, s)
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine["lanes"] = g
            for start, size in sp_ranges(topo.lanes):
                g = dist.new_group(ranks[start:start + size], timeout=timeout)
                if rank in ranks[start:start + size]:
                    mine["sp"][start, size] = g
    for r in topo.members if topo.lanes > 1 else ():
        ranks = [topo.rank(r, s, ln) for s in range(topo.stages) for ln in lanes]
        g = dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine["whole_replica"] = g
    pairs = {}
    for s in range(topo.stages) if replica_pairs else ():
        for a in topo.members:
            for b in (b for b in topo.members if b > a):
                for ln in lanes:
                    ra, rb = topo.rank(a, s, ln), topo.rank(b, s, ln)
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
    return Groups(mine["stage"], mine["replica"], mine["next"], mine["prev"], pairs, near, mine["lanes"], mine["sp"],
                  mine["whole_replica"])
