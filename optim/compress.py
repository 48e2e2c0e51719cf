"""Compressors for what replicas exchange (pure functions on flat fp32 vectors).

Each returns the payload that goes on the wire and a `decode` that every rank applies identically.
Top-K and Rand-K are contractive (E||C(v) - v||^2 <= (1 - K/d) ||v||^2), as EF21 needs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Sparse:
    """Per-chunk Top-K: K values and their int16 offsets inside each chunk of `chunk` elements."""
    values: torch.Tensor  # (n_chunks, k) fp32
    offsets: torch.Tensor  # (n_chunks, k) int16 (chunk <= 32768)

    @property
    def nbytes(self) -> int:
        return self.values.numel() * 4 + self.offsets.numel() * 2


def chunk_k(d: int, ratio: float, chunk: int) -> int:
    """K per chunk: the same on every rank, at least one value per chunk."""
    return max(1, round(ratio * min(chunk, d)))


def chunk_rows(vec: torch.Tensor, chunk: int) -> torch.Tensor:
    """vec as rows of `chunk` values, the last row zero-padded."""
    n_chunks = -(-vec.numel() // chunk)
    out = vec.new_zeros(n_chunks * chunk)
    out[: vec.numel()] = vec
    return out.view(n_chunks, chunk)


def topk_encode(vec: torch.Tensor, ratio: float, chunk: int = 32768) -> Sparse:
    assert chunk <= 32768, "offsets are int16"
    k = chunk_k(vec.numel(), ratio, chunk)
    rows = chunk_rows(vec, chunk)
    idx = rows.abs().topk(k, dim=1, sorted=False).indices
    return Sparse(rows.gather(1, idx), idx.to(torch.int16))


def topk_decode(s: Sparse, d: int, chunk: int = 32768) -> torch.Tensor:
    rows = s.values.new_zeros(s.values.shape[0], chunk)
    rows.scatter_(1, s.offsets.long(), s.values)
    return rows.view(-1)[:d]


def randk_indices(d: int, ratio: float, seed: int, device=None) -> torch.Tensor:
    """The shared random coordinate set for a round (same seed and device type -> same set on every rank), drawn
    on the vector's device (a host permutation of a large model's d would stall every round)."""
    k = max(1, round(ratio * d))
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    return torch.randperm(d, generator=g, device=device or "cpu")[:k]


def _even_chunk(d: int, max_chunk: int) -> int:
    """The smallest even chunk size that splits d into as few chunks as max_chunk would (little padding)."""
    n_chunks = -(-d // max_chunk)
    chunk = -(-d // n_chunks)
    return chunk + chunk % 2


def int8_encode(vec: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-chunk int8: (values int8, scales fp32). Round to nearest: contractive up to rounding."""
    rows = chunk_rows(vec, _even_chunk(vec.numel(), chunk))
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    return (rows / scale).round().clamp(-127, 127).to(torch.int8), scale.view(-1)


def int8_decode(q: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    return (q.float() * scale[:, None]).view(-1)[:d]


def int4_encode(vec: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-chunk 4-bit (levels -7..7), two values packed per byte: (uint8 packed, scales fp32)."""
    rows = chunk_rows(vec, _even_chunk(vec.numel(), chunk))
    scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 7.0
    q = ((rows / scale).round().clamp(-7, 7) + 8).to(torch.uint8).view(-1)
    return q[0::2] | (q[1::2] << 4), scale.view(-1)


def int4_decode(packed: torch.Tensor, scale: torch.Tensor, d: int) -> torch.Tensor:
    q = torch.stack((packed & 0xF, packed >> 4), dim=1).view(-1).float() - 8
    chunk = q.numel() // scale.numel()
    return (q.view(-1, chunk) * scale[:, None]).view(-1)[:d]
