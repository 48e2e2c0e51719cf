"""The replicas x stages grid: which rank holds which (replica, stage) slot."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    replicas: int  # configured replicas (the data is split this many ways)
    stages: int
    active: tuple[int, ...] = ()  # replicas in the current world; empty = all (one may be out, waiting for a stage)

    @property
    def members(self) -> tuple[int, ...]:
        return self.active or tuple(range(self.replicas))

    @property
    def world_size(self) -> int:
        return len(self.members) * self.stages

    def rank(self, replica: int, stage: int) -> int:
        """Stages of one replica sit on consecutive ranks (one node per replica when they fit)."""
        return self.members.index(replica) * self.stages + stage

    def slot(self, rank: int) -> tuple[int, int]:
        """rank -> (replica, stage)."""
        i, stage = divmod(rank, self.stages)
        return self.members[i], stage

    def stage_ranks(self, stage: int) -> list[int]:
        """The same stage on every replica: they sync gradients / weights (cross-replica link)."""
        return [self.rank(r, stage) for r in self.members]

    def replica_ranks(self, replica: int) -> list[int]:
        """Every stage of one replica: they pass activations (intra-replica link)."""
        return [self.rank(replica, s) for s in range(self.stages)]
