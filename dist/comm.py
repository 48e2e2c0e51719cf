"""Every transfer goes through here: torch.distributed calls wrapped with a byte and call counter per link class."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

INTRA = "intra_replica"  # between stages of one replica (activations, gradients of activations)
CROSS = "cross_replica"  # between replicas of one stage (gradient / weight sync)


class Comm:
    """Counts bytes this rank sends per link class, collective calls and point-to-point transfers.

    Bytes are counted as a ring would send them: an all-reduce over n ranks sends 2 (n - 1) / n of
    the tensor, an all-gather (n - 1) times this rank's part; a point-to-point transfer its size.
    """

    def __init__(self):
        self.bytes_sent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # collectives
        self.p2p: dict[str, int] = defaultdict(int)  # point-to-point transfers

    def all_reduce(self, tensor: torch.Tensor, group, link: str, op=dist.ReduceOp.SUM) -> None:
        n = dist.get_world_size(group)
        if n == 1:
            return
        self.bytes_sent[link] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
        self.calls[link] += 1
        dist.all_reduce(tensor, op=op, group=group)

    def all_gather(self, tensor: torch.Tensor, group, link: str) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape everywhere), in group rank order."""
        n = dist.get_world_size(group)
        if n == 1:
            return [tensor]
        self.bytes_sent[link] += (n - 1) * tensor.numel() * tensor.element_size()
        self.calls[link] += 1
        out = [torch.empty_like(tensor) for _ in range(n)]
        dist.all_gather(out, tensor, group=group)
        return out

    def send(self, tensor: torch.Tensor, pair, link: str = INTRA):
        """Start sending to the other rank of a 2-rank group; returns the pending work to wait on later."""
        self.bytes_sent[link] += tensor.numel() * tensor.element_size()
        self.p2p[link] += 1
        return dist.broadcast(tensor, src=dist.get_rank(), group=pair, async_op=True)

    def recv(self, tensor: torch.Tensor, pair, src: int) -> torch.Tensor:
        """Receive into `tensor` from global rank `src` of a 2-rank group (broadcast: pollable on gloo)."""
        dist.broadcast(tensor, src=src, group=pair, async_op=True).wait()
        return tensor

    def exchange(self, tensor: torch.Tensor, pair, peer: int, link: str = CROSS) -> torch.Tensor:
        """Swap equal-shaped tensors with the other rank of a 2-rank group (point to point, no collective)."""
        me = dist.get_rank()
        theirs = torch.empty_like(tensor)
        for src in sorted((me, peer)):  # both ends issue the two transfers in the same order
            if src == me:
                self.send(tensor, pair, link).wait()
            else:
                self.recv(theirs, pair, src)
        return theirs

    def totals(self) -> dict[str, float]:
        return {INTRA: self.bytes_sent[INTRA], CROSS: self.bytes_sent[CROSS]}
