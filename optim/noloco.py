"""NoLoCo: no all-reduce. Every H inner steps each replica's stage averages with one random peer's.

Each replica keeps slow weights phi, outer momentum delta and its fast weights theta (inner AdamW
state is never averaged or reset). With Delta = theta - phi and means over the pair:
  delta_i <- alpha delta_i + beta mean(Delta) - gamma (phi_i - mean(phi))
  phi_i   <- phi_i + delta_i ;  theta_i <- phi_i
Pairs come from a permutation seeded by (seed, outer step), so every rank agrees without talking;
with an odd replica count one replica sits out the round (its means are its own values). Between sites
(a hivemind `transport`, optim/wan.py) the pairs are whichever two peers meet first, and the transport
returns the pair means directly.
"""
from __future__ import annotations

import math

import torch
from torch._utils import _flatten_dense_tensors

from optim.reduce import copy_flat_


def partners(replicas: int, seed: int, outer_step: int) -> list[int | None]:
    """partner[r] for every replica r: a perfect matching on a random permutation (None = sits out)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + outer_step)
    perm = torch.randperm(replicas, generator=g).tolist()
    half = replicas // 2
    out: list[int | None] = [None] * replicas
    for a, b in zip(perm[:half], perm[half:2 * half]):
        out[a], out[b] = b, a
    return out


def check_bounds(alpha: float, beta: float, gamma: float) -> None:
    """The paper's conditions: the mean converges if beta > alpha; replica spread stays bounded if
    alpha < gamma < sqrt(2 + alpha^2) (pairs)."""
    if not beta > alpha:
        raise ValueError(f"sync.alpha={alpha}, sync.beta={beta}: NoLoCo needs beta > alpha for the mean to converge: "
                         f"raise sync.beta or lower sync.alpha")
    if not alpha < gamma < math.sqrt(2 + alpha * alpha):
        raise ValueError(f"sync.alpha={alpha}, sync.gamma={gamma}: NoLoCo needs alpha < gamma < sqrt(2 + alpha^2) = "
                         f"{math.sqrt(2 + alpha * alpha):.3f} for bounded replica spread: set sync.gamma in between")


def pair_means(phi: torch.Tensor, theta: torch.Tensor, peer_phi: torch.Tensor | None,
               peer_Delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean phi, mean Delta) over this replica and its peer (flat fp32); alone: its own values."""
    Delta = theta - phi
    mean_Delta = Delta if peer_Delta is None else (Delta + peer_Delta) / 2
    mean_phi = phi if peer_phi is None else (phi + peer_phi) / 2
    return mean_phi, mean_Delta


def noloco_step(phi: torch.Tensor, delta: torch.Tensor, mean_phi: torch.Tensor, mean_Delta: torch.Tensor,
                alpha: float, beta: float, gamma: float) -> None:
    """In place on phi and delta: the outer step given the pair means of phi and Delta."""
    delta.mul_(alpha).add_(mean_Delta, alpha=beta).sub_(phi - mean_phi, alpha=gamma)
    phi.add_(delta)


class NoLoCo:
    def __init__(self, params: list[torch.nn.Parameter], H: int, alpha: float, beta: float, gamma: float,
                 replica: int, members: tuple[int, ...], seed: int, comm, pair_links: dict, transport=None,
                 should_commit=None):
        """members: the replicas in this generation (one that sits out is not paired with); should_commit: see
        DiLoCo (an outer step is applied on every rank or on none)."""
        check_bounds(alpha, beta, gamma)
        self.params, self.H, self.alpha, self.beta, self.gamma = params, H, alpha, beta, gamma
        self.replica, self.members, self.seed, self.comm, self.pair_links = replica, members, seed, comm, pair_links
        self.transport, self.should_commit = transport, should_commit
        self.restart_from_weights()

    def restart_from_weights(self) -> None:
        """Slow weights = the weights as they are now, outer momentum 0."""
        self.phi = _flatten_dense_tensors([p.detach().float() for p in self.params]).clone()
        self.delta = torch.zeros_like(self.phi)
        self.last_update_norm = 0.0  # ||delta|| applied at the latest outer step

    @torch.no_grad()
    def after_update(self, done: int) -> list[int]:
        if done % self.H:
            return []
        theta = _flatten_dense_tensors([p.detach().float() for p in self.params])
        mine = torch.cat([self.phi, theta - self.phi])
        if self.transport:
            mean_phi, mean_Delta = self.transport.pair_mean(mine, done).split(self.phi.numel())
        else:
            peer = partners(len(self.members), self.seed, done // self.H)[self.members.index(self.replica)]
            peer_phi = peer_Delta = None
            if peer is not None:
                link = self.pair_links[self.members[peer]]
                peer_phi, peer_Delta = self.comm.exchange(mine, link.group, link.peer, link.kind).split(self.phi.numel())
            mean_phi, mean_Delta = pair_means(self.phi, theta, peer_phi, peer_Delta)
        if self.should_commit:
            self.should_commit()  # every rank's exchange succeeded, or none applies it (recovery on)
        noloco_step(self.phi, self.delta, mean_phi, mean_Delta, self.alpha, self.beta, self.gamma)
        copy_flat_(self.params, self.phi)
        self.last_update_norm = float(self.delta.norm())
        return [0]

    def state_dict(self) -> dict:
        return {"phi": self.phi, "delta": self.delta}

    def load_state_dict(self, state: dict, same_group: bool = True) -> None:
        self.phi, self.delta = state["phi"], state["delta"]
