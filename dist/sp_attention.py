"""Sequence-parallel attention inside one SP group: DeepSpeed-Ulysses all-to-all over heads.

Each lane holds a contiguous slice of the sequence (q, k, v shaped (s/d, b, heads, head_dim)); the
all-to-all gives every lane the whole sequence for heads/d heads, local attention runs with the full
document mask, and the inverse all-to-all returns each lane's slice of the output. Heads (and KV heads)
must divide by the group size. Groups are created once per (start lane, size) and reused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.sequence.layer import DistributedAttention
from torch import nn


class MaskedAttention(nn.Module):
    """Local attention on (s, b, h, d) tensors with a (b, 1, s, s) boolean mask (causal, within documents)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # -> (b, h, s, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
        return y.permute(2, 0, 1, 3)  # -> (s, b, h, d)


def ulysses(group, num_kv_heads: int | None = None) -> DistributedAttention:
    """Attention over `group` (a torch.distributed group of the lanes that share these sequences)."""
    return DistributedAttention(MaskedAttention(), group, scatter_idx=2, gather_idx=0, num_kv_heads=num_kv_heads)


def sp_attention(attn: DistributedAttention, q, k, v, mask) -> torch.Tensor:
    """q, k, v: this lane's slice (s/d, b, h, head_dim); mask: the whole sequence's (b, 1, s, s)."""
    return attn(q, k, v, 1, None, mask)
