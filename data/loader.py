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

    The global batch of a step is R slots of batch_size samples read in stream order. Replica r reads slot r;
    while replicas are out of the run, the i-th absent replica's slot goes to the (i mod L)-th of the L present
    ones, so every slot of every step is read once whatever the replica count (a replica's batch grows while
    others are out); a run resumed with another R reads on from where the stream stopped. `schedule` holds
    these changes: (first step, stream position at it, slots per step, replicas present) from that step on.
    The state is the next step and the schedule, saved in every checkpoint: a resumed run reads exactly the
    samples an uninterrupted run would, with none lost or repeated.
    """

    def __init__(self, windows: np.ndarray, eos: int, seed: int, replica: int, replicas: int, batch_size: int):
        self.windows, self.eos, self.seed = windows, eos, seed
        self.replica, self.replicas, self.batch_size = replica, replicas, batch_size
        self.step = 0
        self.schedule: list[tuple[int, int, int, tuple[int, ...]]] = [(0, 0, replicas, tuple(range(replicas)))]
        self._perm: tuple[int, np.ndarray | None] = (-1, None)  # (epoch, permutation): one attribute, so a reader
        # on another thread (the SP plan-ahead) never pairs an epoch with another epoch's permutation

    def _entry(self, step: int) -> tuple[int, int, int, tuple[int, ...]]:
        return next(e for e in reversed(self.schedule) if e[0] <= step)

    def _position(self, step: int, slot: int) -> int:
        first, base, slots, _ = self._entry(step)
        return base + ((step - first) * slots + slot) * self.batch_size

    def slots(self, step: int, replica: int) -> list[int]:
        """The slots of step's global batch that `replica` reads (see the class docstring)."""
        _, _, slots, members = self._entry(step)
        if replica not in members:
            return [replica]  # not in the run at that step: what it would have read (it never commits it)
        absent = [r for r in range(slots) if r not in members]
        k = members.index(replica)
        return [replica] + [a for i, a in enumerate(absent) if i % len(members) == k]

    def rejoin(self, step: int, members: tuple[int, ...]) -> None:
        """From `step` on, `members` are the replicas present (every rank of the run records the same)."""
        if self._entry(step)[3] != tuple(members):
            position = self._position(step, 0)
            self.schedule = [e for e in self.schedule if e[0] < step] + [(step, position, self.replicas, tuple(members))]

    def sample_ids(self, step: int, replica: int | None = None) -> np.ndarray:
        """The window indices replica (default: this one) reads at step."""
        n = len(self.windows)
        replica = self.replica if replica is None else replica
        positions = np.concatenate([np.arange(self._position(step, j), self._position(step, j) + self.batch_size)
                                    for j in self.slots(step, replica)])
        return np.array([self._permutation(int(p // n))[p % n] for p in positions])

    def next_batch(self) -> Batch:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def batch_at(self, step: int, replica: int | None = None) -> Batch:
        """Any replica's batch of any step, without moving this loader (random routing reads others')."""
        return make_batch(self.windows, self.sample_ids(step, replica), self.eos)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "replicas": self.replicas, "batch_size": self.batch_size,
                "schedule": [[first, base, slots, list(m)] for first, base, slots, m in self.schedule]}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        saved = [(int(f), int(b), int(n), tuple(m)) for f, b, n, m in state.get("schedule", [])]
        if not saved:  # saved before schedules: R slots per step from the start
            saved = [(0, 0, int(state.get("replicas", self.replicas)), tuple(range(state.get("replicas", self.replicas))))]
        self.schedule = saved
        if saved[-1][2] != self.replicas:  # resumed with another replica count: read on from where the stream is
            self.schedule.append((self.step, self._position(self.step, 0), self.replicas, tuple(range(self.replicas))))

    def _permutation(self, epoch: int) -> np.ndarray:
        cached = self._perm
        if cached[0] != epoch:
            cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)))
            self._perm = cached
        return cached[1]


def validation_batches(windows: np.ndarray, eos: int, n_batches: int, batch_size: int,
                       replica: int, replicas: int) -> list[Batch]:
    """A fixed held-out set (the first n_batches x batch_size windows), split across replicas."""
    total = min(len(windows), n_batches * batch_size)
    ids = np.arange(total)[replica::replicas]
    return [make_batch(windows, ids[i:i + batch_size], eos) for i in range(0, len(ids), batch_size)]
