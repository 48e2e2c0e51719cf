"""The replicas x stages grid: which rank holds which (replica, stage) slot."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    replicas: int
    stages: int

    @property
    def world_size(self) -> int:
        return self.replicas * self.stages

    def rank(self, replica: int, stage: int) -> int:
        """Stages of one replica sit on consecutive ranks (one node per replica when they fit)."""
        return replica * self.stages + stage

    def slot(self, rank: int) -> tuple[int, int]:
        """rank -> (replica, stage)."""
        return divmod(rank, self.stages)

    def stage_ranks(self, stage: int) -> list[int]:
        """The same stage on every replica: they sync gradients / weights (cross-replica link)."""
        return [self.rank(r, stage) for r in range(self.replicas)]

    def replica_ranks(self, replica: int) -> list[int]:
        """Every stage of one replica: they pass activations (intra-replica link)."""
        return [self.rank(replica, s) for s in range(self.stages)]
