"""Error-feedback compression across a group: EF21, EF21-SGDM (worker momentum) and classic EF14.

Worker i keeps g_i, every rank keeps g = mean_i g_i (fp32, identical everywhere):
  c_i = C(x_i - g_i)   (EF21-SGDM: v_i <- (1 - eta) v_i + eta x_i, c_i = C(v_i - g_i))
  g_i <- g_i + c_i ;  g <- g + mean_i c_i
The first round is dense (g_i = x_i), and so is every warm-up round (sync.dense_warmup). EF14: p = x_i + e_i, send C(p), e_i <- p - C(p), use mean C(p).
Reset rule: when the group's membership changes (a replica joins or leaves, or a run resumes with
another replica count), every rank drops its state and the next round is dense again.
"""
from __future__ import annotations

import torch

from dist.comm import Comm
from optim import compress
from optim.reduce import PendingMean, mean_over_group

KINDS = ("ef21", "ef21sgdm", "ef14")
COMPRESSORS = ("topk", "randk", "int8")


class ErrorFeedback:
    def __init__(self, kind: str, compressor: str, ratio: float, eta: float, chunk: int, seed: int,
                 comm: Comm, group, link: str, n: int):
        if kind not in KINDS or compressor not in COMPRESSORS:
            raise ValueError(f"unknown error feedback {kind}-{compressor}: kinds {KINDS}, compressors {COMPRESSORS}")
        self.kind, self.compressor, self.ratio, self.eta, self.chunk, self.seed = kind, compressor, ratio, eta, chunk, seed
        self.comm, self.group, self.link, self.n = comm, group, link, n
        self.reset()

    def reset(self) -> None:
        """Drop all state: the next round is dense (the rule for any membership change)."""
        self.g_i = self.g = self.v = self.e = None
        self.rounds = 0

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t] if self.n == 1 else self.comm.all_gather(t, self.group, self.link)

    def _compress_and_mean(self, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(C(vec) as this rank applies it, the group mean of every rank's C(vec_j)), identical on every rank."""
        d = vec.numel()
        if self.compressor == "topk":
            s = compress.topk_encode(vec, self.ratio, self.chunk)
            values = self._gather(s.values)
            # gloo has no int16 collectives: the offsets travel as their raw bytes
            offsets = [o.view(torch.int16) for o in self._gather(s.offsets.contiguous().view(torch.uint8))]
            mean = vec.new_zeros(d)
            for v, o in zip(values, offsets):
                mean += compress.topk_decode(compress.Sparse(v, o), d, self.chunk)
            return compress.topk_decode(s, d, self.chunk), mean.div_(self.n)
        if self.compressor == "randk":
            idx = compress.randk_indices(d, self.ratio, self.seed * 1_000_003 + self.rounds, vec.device)
            own = vec.new_zeros(d)
            own[idx] = vec[idx]
            mean = vec.new_zeros(d)
            mean[idx] = mean_over_group(vec[idx].contiguous(), "fp32", self.comm, self.group, self.link, self.n)
            return own, mean
        q, scale = compress.int8_encode(vec)
        return compress.int8_decode(q, scale, d), mean_over_group(vec, "int8", self.comm, self.group, self.link, self.n)

    def aggregate(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """This rank's fresh vector x_i in (gradient or pseudo-gradient); the shared estimate of mean_i x_i out.
        dense (a warm-up round): the exact fp32 mean, and the state restarts from it."""
        x = x.float()
        if dense:
            self.reset()
        self.rounds += 1
        if self.kind == "ef14":
            if dense:
                return mean_over_group(x, "fp32", self.comm, self.group, self.link, self.n)
            p = x if self.e is None else x + self.e
            sent, mean = self._compress_and_mean(p)
            self.e = p - sent
            return mean
        if self.g is None:  # dense first round
            self.g_i, self.v = x.clone(), x.clone()
            self.g = mean_over_group(x, "fp32", self.comm, self.group, self.link, self.n)
            return self.g.clone()
        if self.kind == "ef21sgdm":
            self.v.mul_(1 - self.eta).add_(x, alpha=self.eta)
            target = self.v
        else:
            target = x
        c_i, mean_c = self._compress_and_mean(target - self.g_i)
        self.g_i += c_i
        self.g += mean_c
        return self.g.clone()

    def start(self, x: torch.Tensor, dense: bool = False) -> PendingMean:
        """`aggregate` as an exchange DiLoCo can wait for later (this one blocks: EF21's estimate needs the mean)."""
        return PendingMean.done(self.aggregate(x, dense))

    def state_dict(self) -> dict:
        return {"g_i": self.g_i, "g": self.g, "v": self.v, "e": self.e, "rounds": self.rounds}

    def load_state_dict(self, state: dict) -> None:
        self.g_i, self.g, self.v, self.e, self.rounds = (state[k] for k in ("g_i", "g", "v", "e", "rounds"))
