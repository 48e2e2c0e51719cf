"""DiLoCo: H inner steps of local AdamW, then an outer Nesterov step on the replica-averaged pseudo-gradient.

  Delta = mean_i (theta - theta_i)      (theta: weights at the last sync; averaged over replicas of a stage)
  m <- mu m + Delta ;  theta <- theta - lr (Delta + mu m)      (Nesterov, as torch.optim.SGD)
Streaming mode syncs the stage in P fragments (layer l in fragment l mod P) on a staggered schedule,
fragment f at steps f H / P + k H, so no single sync moves the whole stage. The pseudo-gradient can
travel in bf16 / int8 / int4 (fp32 accumulation), through EF21 error feedback or as SparseLoCo's 2-bit Top-K
(optim/sparseloco.py); or, between sites, over hivemind (a `transport`: optim/wan.py).
Overlap (Streaming DiLoCo's delayed application): the exchange started after step t is applied after step
t + tau, on the anchor, and the tau local steps taken meanwhile stay on top:
  theta_i <- anchor' + (theta_i(t + tau) - theta_i(t))
so the link's time hides behind tau steps of compute.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from optim.ef21 import ErrorFeedback
from optim.reduce import PendingMean, mean_over_group, start_mean_over_group
from optim.sparseloco import SparseLoCo


def fragment_of(name: str, fragments: int) -> int:
    """Streaming fragment of a parameter: its layer index mod P (embedding with fragment 0, head with the last)."""
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) % fragments
    return 0 if name.startswith("embed") else fragments - 1


def nesterov_step(anchor: torch.Tensor, momentum: torch.Tensor, delta: torch.Tensor, lr: float, mu: float,
                  nesterov: bool) -> None:
    """In place: the outer SGD step torch.optim.SGD(momentum=mu, nesterov=...) would take with gradient delta."""
    momentum.mul_(mu).add_(delta)
    anchor.sub_(delta + mu * momentum if nesterov else momentum, alpha=lr)


@dataclass
class Exchange:
    """A fragment's outer exchange in flight: started after `started` inner steps, applied after `apply_at`."""
    mean: PendingMean
    apply_at: int
    contributors: int  # replicas that trained towards it (fewer than n when one rejoins at this outer step)
    weights: list[torch.Tensor] | None  # the fragment's weights when it started (overlap: local progress since)


class DiLoCo:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], H: int, lr: float, mu: float,
                 nesterov: bool, fragments: int, precision: str, ef: list[ErrorFeedback | SparseLoCo] | None, comm,
                 group, link: str, n: int, transport=None, should_commit=None, overlap: int = 0, dense_warmup: int = 0,
                 total_steps: int = 0):
        """should_commit: with recovery on, a world-wide agreement called after the exchange and before the
        outer step is applied (raises if any rank failed), so an outer step is applied everywhere or nowhere.
        overlap: the exchange runs in the background for this many inner steps (delayed application: the outer
        step lands on the anchor and the local steps taken meanwhile are kept on top); every exchange still in
        flight is applied at `total_steps`. dense_warmup: outer steps within the first steps skip compression."""
        self.H, self.lr, self.mu, self.nesterov, self.precision = H, lr, mu, nesterov, precision
        self.comm, self.group, self.link, self.n, self.transport = comm, group, link, n, transport
        self.should_commit, self.overlap, self.dense_warmup, self.total_steps = should_commit, overlap, dense_warmup, total_steps
        self.contributors: dict[int, int] = {}  # outer step -> replicas contributing to it, when fewer than n
        self.P = max(1, fragments)
        self.params = [p for _, p in named_params]
        self.members = [[i for i, (name, _) in enumerate(named_params) if fragment_of(name, self.P) == f]
                        for f in range(self.P)]
        self.ef = ef  # one error-feedback (or SparseLoCo) state per fragment (fragments differ in size)
        self.in_flight: dict[int, Exchange] = {}
        self.restart_from_weights()

    def restart_from_weights(self) -> None:
        """Outer state from the weights as they are now: anchor = weights, momentum = 0, a dense EF round."""
        self.anchor = [p.detach().clone().float() for p in self.params]
        self.momentum = [torch.zeros_like(a) for a in self.anchor]
        self.last_update_norm = 0.0  # ||anchor change|| of the latest outer step (all fragments synced then)
        self.in_flight = {}
        for e in self.ef or ():
            e.reset()

    def due(self, done: int) -> list[int]:
        """Fragments whose sync falls after `done` completed inner steps: fragment f at f H / P + k H, and every
        fragment at the last step (the run ends with one synced model to export)."""
        offsets = [f * self.H // self.P for f in range(self.P)]
        return [f for f in range(self.P) if self.members[f] and done > 0 and done >= offsets[f]
                and ((done - offsets[f]) % self.H == 0 or done == self.total_steps)]

    def _start(self, f: int, done: int, k: int) -> Exchange:
        """Send fragment f's pseudo-gradient Delta_i = anchor - theta_i (the mean may still be in flight)."""
        idx = self.members[f]
        delta = _flatten_dense_tensors([self.anchor[i] - self.params[i].detach().float() for i in idx])
        if self.ef:
            mean = self.ef[f].start(delta, dense=done <= self.dense_warmup)
        elif self.transport:  # between sites: a site that averaged alone takes the group's outer state back
            anchors, moms = [self.anchor[i] for i in idx], [self.momentum[i] for i in idx]
            outer = [_flatten_dense_tensors(anchors), _flatten_dense_tensors(moms)]
            mean = PendingMean.done(self.transport.mean(delta, done, outer))
            for mine, new in zip(anchors + moms, [*_unflatten_dense_tensors(outer[0], anchors),
                                                  *_unflatten_dense_tensors(outer[1], moms)]):
                mine.copy_(new)
        elif self.precision == "fp32":
            mean = start_mean_over_group(delta, self.comm, self.group, self.link, self.n)
        else:
            mean = PendingMean.done(mean_over_group(delta, self.precision, self.comm, self.group, self.link, self.n))
        weights = [self.params[i].detach().clone() for i in idx] if self.overlap else None
        return Exchange(mean, done + self.overlap, k, weights)

    @torch.no_grad()
    def after_update(self, done: int) -> list[int]:
        """Start the outer exchange of every fragment due now, and apply every exchange whose time has come (all
        of them at the last step); returns the fragments applied."""
        k = self.contributors.pop(done, self.n)
        for f in self.due(done):
            self.in_flight[f] = self._start(f, done, k)
        return self._land(done, everything=done >= self.total_steps > 0)

    @torch.no_grad()
    def _land(self, done: int, everything: bool) -> list[int]:
        """Wait for and apply the exchanges due by `done` (or every one in flight); returns their fragments."""
        ready = {f: self.in_flight.pop(f) for f in sorted(self.in_flight)
                 if everything or self.in_flight[f].apply_at <= done}
        averages = {f: x.mean.result() for f, x in ready.items()}
        for f, avg in averages.items():  # a replica rejoining at this outer step sends a zero pseudo-gradient (its
            avg.mul_(self.n / ready[f].contributors)  # weights are the anchor): the mean is over the k that trained
        if ready and self.should_commit:
            self.should_commit()  # every rank's exchange succeeded, or none applies it (recovery on)
        moved = sum(self._apply(f, avg, ready[f].weights) for f, avg in averages.items())
        if ready:
            self.last_update_norm = moved ** 0.5
        return list(ready)

    def _apply(self, f: int, avg: torch.Tensor, started: list[torch.Tensor] | None = None) -> float:
        """The outer step on fragment f's anchor; the weights become the new anchor (plus, overlapped, the local
        progress since the exchange started). Returns the squared norm of the anchor's change."""
        idx = self.members[f]
        anchors, moms = [self.anchor[i] for i in idx], [self.momentum[i] for i in idx]
        moved = 0.0
        for a, m, d in zip(anchors, moms, _unflatten_dense_tensors(avg, anchors)):
            before = a.clone()
            nesterov_step(a, m, d, self.lr, self.mu, self.nesterov)
            moved += float((a - before).square().sum())
        for j, i in enumerate(idx):
            local = self.params[i] - started[j] if started else None
            self.params[i].copy_(self.anchor[i])
            if local is not None:
                self.params[i].add_(local)
        return moved

    def state_dict(self) -> dict:
        """The outer state with no exchange in flight: an overlapped one is applied now (checkpoints are taken at
        the same step on every replica, so the replicas still apply the same outer steps)."""
        self._land(0, everything=True)
        return {"anchor": self.anchor, "momentum": self.momentum,
                "ef": [e.state_dict() for e in self.ef] if self.ef else None}

    def load_state_dict(self, state: dict, same_group: bool = True) -> None:
        """Anchor and outer momentum (the same on every replica of a stage, so valid for any replica count);
        error feedback only when the group is the one it was saved in (else a dense round)."""
        self.anchor, self.momentum = state["anchor"], state["momentum"]
        if state.get("ef") and self.ef and same_group:
            for e, s in zip(self.ef, state["ef"]):
                e.load_state_dict(s)
        else:
            for e in self.ef or ():
                e.reset()
