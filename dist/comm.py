"""Every transfer goes through here: torch.distributed calls wrapped with a byte and call counter per link class."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

INTRA = "intra_replica"  # between stages of one replica (activations, gradients of activations)
CROSS = "cross_replica"  # between replicas of one stage (gradient / weight sync)


class Comm:
    """Counts bytes this rank sends per link class, and collective calls per link class.

    An all-reduce over n ranks is counted as a ring would send it: 2 (n - 1) / n of the tensor.
    """

    def __init__(self):
        self.bytes_sent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def all_reduce(self, tensor: torch.Tensor, group, link: str, op=dist.ReduceOp.SUM) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            return
        self.bytes_sent[link] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
        self.calls[link] += 1
        dist.all_reduce(tensor, op=op, group=group)

    def send(self, tensor: torch.Tensor, pair, link: str = INTRA):
        """Start sending to the other rank of a 2-rank group; returns the pending work to wait on later."""
        self.bytes_sent[link] += tensor.numel() * tensor.element_size()
        return dist.broadcast(tensor, src=dist.get_rank(), group=pair, async_op=True)

    def recv(self, tensor: torch.Tensor, pair, src: int) -> torch.Tensor:
        """Receive into `tensor` from global rank `src` of a 2-rank group (broadcast: pollable on gloo)."""
        dist.broadcast(tensor, src=src, group=pair, async_op=True).wait()
        return tensor

    def totals(self) -> dict[str, float]:
        return {INTRA: self.bytes_sent[INTRA], CROSS: self.bytes_sent[CROSS]}
