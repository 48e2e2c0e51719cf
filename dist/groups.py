"""Process groups for one rank, built in one place so that recovery can rebuild them after a failure."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from dist.topology import Topology


@dataclass
class Link:
    """A 2-rank group to one pipeline neighbour for one direction of traffic."""
    group: object
    peer: int  # global rank of the other end


@dataclass
class Groups:
    stage: object  # this stage on every replica (cross-replica)
    replica: object  # every stage of this replica (intra-replica)
    send_fwd: Link | None  # activations to the next stage
    recv_fwd: Link | None  # activations from the previous stage
    send_bwd: Link | None  # activation gradients to the previous stage
    recv_bwd: Link | None  # activation gradients from the next stage
    replica_pairs: dict[int, Link]  # other replica -> 2-rank group with its copy of this stage (NoLoCo)


def build_groups(topo: Topology, rank: int, timeout_s: float, replica_pairs: bool = False) -> Groups:
    """Every rank calls new_group for every group in the same order (torch.distributed's rule).

    replica_pairs: also a 2-rank group between every two replicas of each stage (for NoLoCo).
    """
    timeout = timedelta(seconds=timeout_s)
    replica, stage = topo.slot(rank)
    mine = {}
    for s in range(topo.stages):
        g = dist.new_group(topo.stage_ranks(s), timeout=timeout)
        if s == stage:
            mine["stage"] = g
    for r in range(topo.replicas):
        g = dist.new_group(topo.replica_ranks(r), timeout=timeout)
        if r == replica:
            mine["replica"] = g
    for r in range(topo.replicas):
        for s in range(topo.stages - 1):
            a, b = topo.rank(r, s), topo.rank(r, s + 1)
            fwd = dist.new_group([a, b], timeout=timeout)
            bwd = dist.new_group([a, b], timeout=timeout)
            if rank == a:
                mine["send_fwd"], mine["recv_bwd"] = Link(fwd, b), Link(bwd, b)
            if rank == b:
                mine["recv_fwd"], mine["send_bwd"] = Link(fwd, a), Link(bwd, a)
    pairs = {}
    for s in range(topo.stages) if replica_pairs else ():
        for a in range(topo.replicas):
            for b in range(a + 1, topo.replicas):
                ra, rb = topo.rank(a, s), topo.rank(b, s)
                g = dist.new_group([ra, rb], timeout=timeout)
                if rank in (ra, rb):
                    pairs[b if rank == ra else a] = Link(g, rb if rank == ra else ra)
    return Groups(mine["stage"], mine["replica"], mine.get("send_fwd"), mine.get("recv_fwd"),
                  mine.get("send_bwd"), mine.get("recv_bwd"), pairs)
