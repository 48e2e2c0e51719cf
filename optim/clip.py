"""Global gradient-norm clipping across the stages of a replica."""
from __future__ import annotations

import torch
from dist.comm import INTRA, Comm


def clip_global_grad_norm(params: list[torch.Tensor], max_norm: float, replica_group, comm: Comm,
                          stages: int) -> tuple[float, float]:
    """(norm of the whole model's gradient over all stages of this replica, this stage's own norm), both
    before clipping; the gradient is clipped to max_norm when > 0."""
    grads = [p.grad for p in params]
    own = torch.nn.utils.get_total_norm(grads)
    norm = own
    if stages > 1:
        sq = own.pow(2).reshape(1)
        comm.all_reduce(sq, replica_group, INTRA)
        norm = sq.sqrt()[0]
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return float(norm), float(own)
