"""Deterministic, resumable batches: the samples of a step are a pure function of (seed, step, replica)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next tokens
    doc_ids: torch.Tensor  # (B, T) document index inside each window (for masking and RoPE positions)
    sample_ids: list[int]  # window indices in the split: the ledger of what was consumed

    @property
    def n_tokens(self) -> int:
        return self.targets.numel()

    def to(self, device) -> "Batch":
        return Batch(self.inputs.to(device), self.targets.to(device), self.doc_ids.to(device), self.sample_ids)

    def split(self, n: int) -> list["Batch"]:
        """Up to n micro-batches of near-equal size (sizes differ by at most one row; no row dropped, none empty)."""
        bounds = np.linspace(0, len(self.sample_ids), n + 1).round().astype(int)
        return [Batch(self.inputs[a:b], self.targets[a:b], self.doc_ids[a:b], self.sample_ids[a:b])
                for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def make_batch(windows: np.ndarray, ids: np.ndarray, eos: int) -> Batch:
    w = torch.from_numpy(windows[ids].astype(np.int64))
    inputs, targets = w[:, :-1], w[:, 1:]
    ends = (inputs == eos).long()
    doc_ids = torch.cumsum(ends, dim=1) - ends  # an end-of-document token belongs to the document it ends
    return Batch(inputs, targets, doc_ids, [int(i) for i in ids])


class ReplicaLoader:
    """Replica r of R takes its own slice of every global batch; epochs are seeded permutations.

    The only state is the next step, saved in every checkpoint: a resumed run reads exactly the
    samples an uninterrupted run would, with none lost or repeated.
    """

    def __init__(self, windows: np.ndarray, eos: int, seed: int, replica: int, replicas: int, batch_size: int):
        self.windows, self.eos, self.seed = windows, eos, seed
        self.replica, self.replicas, self.batch_size = replica, replicas, batch_size
        self.step = 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))
            self._perm_epoch = epoch
        return self._perm

    def sample_ids(self, step: int, replica: int | None = None) -> np.ndarray:
        """The window indices replica (default: this one) reads at step."""
        n = len(self.windows)
        replica = self.replica if replica is None else replica
        start = (step * self.replicas + replica) * self.batch_size
        positions = np.arange(start, start + self.batch_size)
        return np.array([self._permutation(int(p // n))[p % n] for p in positions])

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int, replica: int | None = None) -> Batch:
        """Any replica's batch of any step, without moving this loader (random routing reads others')."""
        return make_batch(self.windows, self.sample_ids(step, replica), self.eos)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "replicas": self.replicas, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def validation_batches(windows: np.ndarray, eos: int, n_batches: int, batch_size: int,
                       replica: int, replicas: int) -> list[Batch]:
    """A fixed held-out set (the first n_batches x batch_size windows), split across replicas."""
    total = min(len(windows), n_batches * batch_size)
    ids = np.arange(total)[replica::replicas]
    return [make_batch(windows, ids[i:i + batch_size], eos) for i in range(0, len(ids), batch_size)]
