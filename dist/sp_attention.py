"""Sequence-parallel attention inside one SP group: Ulysses all-to-all over heads.

Each lane holds a contiguous slice of the sequence (q, k, v shaped (s/d, b, heads, head_dim)); the
all-to-all gives every lane the whole sequence for heads/d heads, local attention runs with the full
document mask, and the inverse all-to-all returns each lane's slice of the output. Heads (and KV heads)
must divide by the group size. Groups are created once per (start lane, size) and reused.

Our own two all-to-alls, not DeepSpeed's DistributedAttention: its all-to-alls block in C++, so a lane whose
peer left at a generation's end waited out the whole group timeout; ours go through `Comm`, whose waits are
polled and end with the generation like every other transfer.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dist.comm import Comm
from model.llama import attention


class MaskedAttention(nn.Module):
    """Local attention on (s, b, h, d) tensors with the whole sequence's mask (a (b, 1, s, s) boolean tensor,
    DocumentBins or a BlockMask: causal, within documents)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # -> (b, h, s, d)
        y = attention(q, k, v, mask)
        return y.permute(2, 0, 1, 3)  # -> (s, b, h, d)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, comm: Comm) -> torch.Tensor:
    """x cut into n chunks along scatter_dim, chunk i to rank i of the group; the chunks received from ranks
    0..n-1, joined along gather_dim."""
    n = dist.get_world_size(group)
    received = comm.all_to_all(torch.stack(x.chunk(n, dim=scatter_dim)), group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _SeqAllToAll(torch.autograd.Function):
    """all_to_all with its inverse (scatter and gather swapped) as the backward."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group, comm: Comm):
        ctx.args = scatter_dim, gather_dim, group, comm
        return all_to_all(x, scatter_dim, gather_dim, group, comm)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim, group, comm = ctx.args
        return all_to_all(grad, gather_dim, scatter_dim, group, comm), None, None, None, None


class Ulysses:
    """Attention over `group` (a torch.distributed group of the lanes that share these sequences)."""

    def __init__(self, group, comm: Comm | None = None):
        self.group, self.comm, self.local = group, comm or Comm(), MaskedAttention()

    def __call__(self, q, k, v, mask) -> torch.Tensor:
        """q, k, v: this lane's slice (s/d, b, h, head_dim), sequence first; mask: the whole sequence's (b, 1, s, s)."""
        whole = [_SeqAllToAll.apply(t, 2, 0, self.group, self.comm) for t in (q, k, v)]  # (s, b, h/d, head_dim)
        return _SeqAllToAll.apply(self.local(*whole, mask), 0, 2, self.group, self.comm)
