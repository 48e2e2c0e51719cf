"""SparseLoCo: DiLoCo's pseudo-gradient as Top-K values in 2 bits, with a decaying error-feedback accumulator
in place of outer momentum (arXiv 2508.15706).

Replica i, at each outer step of a fragment, with pseudo-gradient Delta_i:
  e_i <- beta e_i + Delta_i
  c_i = Q2(TopK(e_i))          (per chunk of `chunk` values: the K = ratio * chunk largest magnitudes)
  e_i <- e_i - c_i             (what was not sent waits for the next outer step, decayed by beta)
  Delta = mean_i c_i ;  theta <- anchor - lr Delta       (DiLoCo's outer step with momentum 0)
Q2 keeps a value's sign and one magnitude bit: per chunk, the larger half of the K magnitudes decodes to
their mean, the smaller half to theirs. Every rank decodes every rank's payload and sums in rank order, so the
replicas apply the same bits.
Wire format per chunk: two fp32 levels, K int16 offsets and K 2-bit codes (packed 4 to a byte over the whole
vector); one all-gather of that byte buffer per outer step (`wire_bytes` is its exact size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dist.comm import Comm
from optim.compress import chunk_k, chunk_rows
from optim.reduce import PendingMean, mean_over_group


@dataclass
class TwoBitTopK:
    """One replica's compressed vector: offsets (n_chunks, k) int16, codes packed uint8, levels (n_chunks, 2) fp32
    (small-half mean, large-half mean)."""
    offsets: torch.Tensor
    codes: torch.Tensor
    levels: torch.Tensor

    def to_wire(self) -> torch.Tensor:
        """One byte buffer: levels, offsets, codes (in that order, so each part starts aligned to its type)."""
        return torch.cat([self.levels.contiguous().view(torch.uint8).view(-1),
                          self.offsets.contiguous().view(torch.uint8).view(-1), self.codes])

    @staticmethod
    def from_wire(buf: torch.Tensor, n_chunks: int, k: int) -> "TwoBitTopK":
        n_levels, n_off = 8 * n_chunks, 2 * n_chunks * k
        levels = buf[:n_levels].view(torch.float32).view(n_chunks, 2)
        offsets = buf[n_levels:n_levels + n_off].view(torch.int16).view(n_chunks, k)
        return TwoBitTopK(offsets, buf[n_levels + n_off:], levels)


def wire_bytes(d: int, ratio: float, chunk: int) -> int:
    """Bytes one replica sends per outer step (before the all-gather's n - 1 copies)."""
    n_chunks, k = -(-d // chunk), chunk_k(d, ratio, chunk)
    return 2 * n_chunks * k + -(-n_chunks * k // 4) + 8 * n_chunks


def encode(vec: torch.Tensor, ratio: float, chunk: int) -> TwoBitTopK:
    assert chunk <= 32768, "offsets are int16"
    rows = chunk_rows(vec, chunk)
    k = chunk_k(vec.numel(), ratio, chunk)
    idx = rows.abs().topk(k, dim=1, sorted=False).indices
    values = rows.gather(1, idx)
    mag = values.abs()
    split = mag.topk(max(1, k // 2), dim=1).values[:, -1:]  # the smallest magnitude of the larger half
    large = mag >= split
    n_large = large.sum(1)
    hi = (mag * large).sum(1) / n_large.clamp_min(1)
    lo = torch.where(n_large < k, (mag * ~large).sum(1) / (k - n_large).clamp_min(1), hi)
    codes = (values < 0).to(torch.uint8) << 1 | large.to(torch.uint8)
    flat = torch.zeros(-(-codes.numel() // 4) * 4, dtype=torch.uint8, device=vec.device)
    flat[:codes.numel()] = codes.view(-1)
    packed = flat[0::4] | flat[1::4] << 2 | flat[2::4] << 4 | flat[3::4] << 6
    return TwoBitTopK(idx.to(torch.int16), packed, torch.stack([lo, hi], dim=1))


def decode(s: TwoBitTopK, d: int, chunk: int) -> torch.Tensor:
    n_chunks, k = s.offsets.shape
    codes = torch.stack([s.codes >> shift & 3 for shift in (0, 2, 4, 6)], dim=1).view(-1)[:n_chunks * k]
    codes = codes.view(n_chunks, k).long()
    values = s.levels.gather(1, codes & 1) * (1 - 2 * (codes >> 1)).float()
    rows = values.new_zeros(n_chunks, chunk)
    rows.scatter_(1, s.offsets.long(), values)
    return rows.view(-1)[:d]


class SparseLoCo:
    """One fragment's SparseLoCo state on one replica: the error-feedback accumulator e_i."""

    def __init__(self, ratio: float, chunk: int, decay: float, comm: Comm, group, link: str, n: int):
        self.ratio, self.chunk, self.decay = ratio, chunk, decay
        self.comm, self.group, self.link, self.n = comm, group, link, n
        self.reset()

    def reset(self) -> None:
        """Drop the accumulator (a membership change: what it held was another group's)."""
        self.e = None

    def start(self, delta: torch.Tensor, dense: bool = False) -> PendingMean:
        """Fold this replica's pseudo-gradient into e_i, send Q2(TopK(e_i)) and keep the rest; dense (a warm-up
        outer step): the plain fp32 mean, the accumulator untouched."""
        if dense:
            mean = mean_over_group(delta.float(), "fp32", self.comm, self.group, self.link, self.n)
            return PendingMean.done(mean)
        d = delta.numel()
        self.e = delta.float().clone() if self.e is None else self.e.mul_(self.decay).add_(delta.float())
        payload = encode(self.e, self.ratio, self.chunk)
        sent = decode(payload, d, self.chunk)
        self.e.sub_(sent)
        if self.n == 1:
            return PendingMean.done(sent)
        parts, work = self.comm.start_all_gather(payload.to_wire(), self.group, self.link)
        n_chunks, k = payload.offsets.shape

        def finish() -> torch.Tensor:
            self.comm.wait(work, self.link)
            total = delta.new_zeros(d, dtype=torch.float32)
            for buf in parts:  # rank order: the same sum on every rank
                total += decode(TwoBitTopK.from_wire(buf, n_chunks, k), d, self.chunk)
            return total.div_(self.n)
        return PendingMean(finish)

    def aggregate(self, delta: torch.Tensor, dense: bool = False) -> torch.Tensor:
        return self.start(delta, dense).result()

    def state_dict(self) -> dict:
        return {"e": self.e}

    def load_state_dict(self, state: dict) -> None:
        self.e = state["e"]
