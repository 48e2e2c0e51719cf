"""The replicas x stages x lanes grid: which rank holds which (replica, stage, lane) slot."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    replicas: int  # configured replicas (the data is split this many ways)
    stages: int
    active: tuple[int, ...] = ()  # replicas in the current world; empty = all (one may be out, waiting for a stage)
    lanes: int = 1  # devices per stage sharing its weights (sequence parallelism)

    @property
    def members(self) -> tuple[int, ...]:
        return self.active or tuple(range(self.replicas))

    @property
    def world_size(self) -> int:
        return len(self.members) * self.stages * self.lanes

    def rank(self, replica: int, stage: int, lane: int = 0) -> int:
        """Lanes of a stage, then stages of a replica, sit on consecutive ranks (one node per replica when they fit)."""
        return (self.members.index(replica) * self.stages + stage) * self.lanes + lane

    def grid_rank(self, replica: int, stage: int, lane: int = 0) -> int:
        """The slot's place in the full grid (whoever sits out): a stable name for files, logs, fault injection."""
        return (replica * self.stages + stage) * self.lanes + lane

    def slot(self, rank: int) -> tuple[int, int]:
        """rank -> (replica, stage)."""
        i, stage = divmod(rank // self.lanes, self.stages)
        return self.members[i], stage

    def lane(self, rank: int) -> int:
        return rank % self.lanes

    def stage_ranks(self, stage: int, lane: int = 0) -> list[int]:
        """The same stage (and lane) on every replica: they sync gradients / weights (cross-replica link)."""
        return [self.rank(r, stage, lane) for r in self.members]

    def replica_ranks(self, replica: int, lane: int = 0) -> list[int]:
        """Every stage of one replica in one lane: they pass activations (intra-replica link)."""
        return [self.rank(replica, s, lane) for s in range(self.stages)]

    def lane_ranks(self, replica: int, stage: int) -> list[int]:
        """Every lane of one stage of one replica: they share its weights and split its sequences."""
        return [self.rank(replica, stage, lane) for lane in range(self.lanes)]
