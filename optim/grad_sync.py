"""Per-step gradient handling across processes: the DDP all-reduce across replicas and global-norm clipping."""
from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dist.comm import CROSS, INTRA, Comm


def allreduce_gradients(params: list[torch.Tensor], group, comm: Comm, replicas: int) -> None:
    """DDP baseline: average each gradient over the same stage of every replica, in one flat bucket."""
    if replicas == 1:
        return
    grads = [p.grad for p in params]
    flat = _flatten_dense_tensors(grads)
    comm.all_reduce(flat, group, CROSS)
    flat.div_(replicas)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


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
