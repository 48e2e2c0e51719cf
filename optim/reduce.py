"""Averaging a flat fp32 vector over a group, optionally in low precision on the wire (fp32 accumulation)."""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dist.comm import Comm
from optim import compress

PRECISIONS = ("fp32", "bf16", "int8", "int4")


class PendingMean:
    """An exchange that may still be in flight: `result()` waits for it and returns the group mean (identical on
    every rank). Blocking exchanges hand back a finished one."""

    def __init__(self, finish):
        self._finish = finish

    @classmethod
    def done(cls, mean: torch.Tensor) -> "PendingMean":
        return cls(lambda: mean)

    def result(self) -> torch.Tensor:
        return self._finish()


def start_mean_over_group(vec: torch.Tensor, comm: Comm, group, link: str, n: int) -> PendingMean:
    """The fp32 group mean of `vec`, its all-reduce left running (DiLoCo's overlapped outer exchange)."""
    out = vec.clone()
    work = None if n == 1 else comm.start_all_reduce(out, group, link)

    def finish() -> torch.Tensor:
        if work is not None:
            comm.wait(work, link)
        return out.div_(n)
    return PendingMean(finish)


def mean_over_group(vec: torch.Tensor, precision: str, comm: Comm, group, link: str, n: int) -> torch.Tensor:
    """The group mean of `vec`, identical on every rank.

    fp32 is an all-reduce; the low-precision forms all-gather each rank's encoded vector and sum the
    decoded parts in fp32, in rank order, so every rank computes the same bits.
    """
    if n == 1:
        return vec.clone()
    if precision == "fp32":
        return start_mean_over_group(vec, comm, group, link, n).result()
    d = vec.numel()
    if precision == "bf16":
        parts = [p.float() for p in comm.all_gather(vec.to(torch.bfloat16), group, link)]
    elif precision == "int8":
        q, scale = compress.int8_encode(vec)
        parts = [compress.int8_decode(qq, ss, d) for qq, ss in
                 zip(comm.all_gather(q, group, link), comm.all_gather(scale, group, link))]
    elif precision == "int4":
        q, scale = compress.int4_encode(vec)
        parts = [compress.int4_decode(qq, ss, d) for qq, ss in
                 zip(comm.all_gather(q, group, link), comm.all_gather(scale, group, link))]
    else:
        raise ValueError(f"unknown precision {precision}: choose one of {PRECISIONS}")
    total = vec.new_zeros(d, dtype=torch.float32)
    for p in parts:
        total += p
    return total.div_(n)


def copy_flat_(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Write a flat vector back into the tensors it was flattened from."""
    for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.copy_(new)


@torch.no_grad()
def average_in_place_(tensors: list[torch.Tensor], comm: Comm, group, link: str, n: int) -> None:
    """Replace each tensor by its mean over the group, with one fp32 all-reduce of the flattened bucket."""
    copy_flat_(tensors, mean_over_group(_flatten_dense_tensors([t.float() for t in tensors]), "fp32", comm, group,
                                        link, n))
