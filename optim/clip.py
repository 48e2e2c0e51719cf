"""Global gradient-norm clipping across the stages of a replica."""
from __future__ import annotations

import torch
from dist.comm import INTRA, Comm


def clip_global_grad_norm(params: list[torch.Tensor], max_norm: float, replica_group, comm: Comm,
                          stages: int) -> float:
    """Norm of the whole model's gradient (all stages of this replica); clipped to max_norm when > 0."""
    grads = [p.grad for p in params]
    norm = torch.nn.utils.get_total_norm(grads)
    if stages > 1:
        sq = norm.pow(2).reshape(1)
        comm.all_reduce(sq, replica_group, INTRA)
        norm = sq.sqrt()[0]
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm)
    return float(norm)
