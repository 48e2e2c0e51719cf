"""DiLoCo: H inner steps of local AdamW, then an outer Nesterov step on the replica-averaged pseudo-gradient.

  Delta = mean_i (theta - theta_i)      (theta: weights at the last sync; averaged over replicas of a stage)
  m <- mu m + Delta ;  theta <- theta - lr (Delta + mu m)      (Nesterov, as torch.optim.SGD)
Streaming mode syncs the stage in P fragments (layer l in fragment l mod P) on a staggered schedule,
fragment f at steps f H / P + k H, so no single sync moves the whole stage. The pseudo-gradient can
travel in bf16 / int8 / int4 (fp32 accumulation) or through EF21 error feedback; or, between sites, over
hivemind (a `transport`: optim/wan.py).
"""
from __future__ import annotations

import re

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from optim.ef21 import ErrorFeedback
from optim.reduce import mean_over_group


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


class DiLoCo:
    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], H: int, lr: float, mu: float,
                 nesterov: bool, fragments: int, precision: str, ef: list[ErrorFeedback] | None, comm, group, link: str,
                 n: int, transport=None, should_commit=None):
        """should_commit: with recovery on, a world-wide agreement called after the exchange and before the
        outer step is applied (raises if any rank failed), so an outer step is applied everywhere or nowhere."""
        self.H, self.lr, self.mu, self.nesterov, self.precision = H, lr, mu, nesterov, precision
        self.comm, self.group, self.link, self.n, self.transport = comm, group, link, n, transport
        self.should_commit = should_commit
        self.contributors: dict[int, int] = {}  # outer step -> replicas contributing to it, when fewer than n
        self.P = max(1, fragments)
        self.params = [p for _, p in named_params]
        self.members = [[i for i, (name, _) in enumerate(named_params) if fragment_of(name, self.P) == f]
                        for f in range(self.P)]
        self.ef = ef  # one error-feedback state per fragment (fragments differ in size)
        self.restart_from_weights()

    def restart_from_weights(self) -> None:
        """Outer state from the weights as they are now: anchor = weights, momentum = 0, a dense EF round."""
        self.anchor = [p.detach().clone().float() for p in self.params]
        self.momentum = [torch.zeros_like(a) for a in self.anchor]
        self.last_update_norm = 0.0  # ||anchor change|| of the latest outer step (all fragments synced then)
        for e in self.ef or ():
            e.reset()

    def due(self, done: int) -> list[int]:
        """Fragments whose sync falls after `done` completed inner steps: fragment f at f H / P + k H."""
        offsets = [f * self.H // self.P for f in range(self.P)]
        return [f for f in range(self.P) if self.members[f] and done > 0 and done >= offsets[f]
                and (done - offsets[f]) % self.H == 0]

    @torch.no_grad()
    def after_update(self, done: int) -> list[int]:
        """Run the outer step for every fragment due now; returns the fragments synced."""
        synced = self.due(done)
        averages = {}
        for f in synced:
            idx = self.members[f]
            delta = _flatten_dense_tensors([self.anchor[i] - self.params[i].detach().float() for i in idx])
            if self.ef:
                averages[f] = self.ef[f].aggregate(delta)
            elif self.transport:  # between sites: a site that averaged alone takes the group's outer state back
                anchors, moms = [self.anchor[i] for i in idx], [self.momentum[i] for i in idx]
                outer = [_flatten_dense_tensors(anchors), _flatten_dense_tensors(moms)]
                averages[f] = self.transport.mean(delta, done, outer)
                for mine, new in zip(anchors + moms, [*_unflatten_dense_tensors(outer[0], anchors),
                                                      *_unflatten_dense_tensors(outer[1], moms)]):
                    mine.copy_(new)
            else:
                averages[f] = mean_over_group(delta, self.precision, self.comm, self.group, self.link, self.n)
        k = self.contributors.pop(done, self.n)
        for avg in averages.values():  # a replica rejoining at this outer step sends a zero pseudo-gradient (its
            avg.mul_(self.n / k)  # weights are the anchor): the mean is over the k that trained (exact: n / k = 1)
        if synced and self.should_commit:
            self.should_commit()  # every rank's exchange succeeded, or none applies it (recovery on)
        moved = 0.0
        for f, avg in averages.items():
            idx = self.members[f]
            anchors, moms = [self.anchor[i] for i in idx], [self.momentum[i] for i in idx]
            for a, m, d in zip(anchors, moms, _unflatten_dense_tensors(avg, anchors)):
                before = a.clone()
                nesterov_step(a, m, d, self.lr, self.mu, self.nesterov)
                moved += float((a - before).square().sum())
            for i in idx:
                self.params[i].copy_(self.anchor[i])
        if synced:
            self.last_update_norm = moved ** 0.5
        return synced

    def state_dict(self) -> dict:
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
