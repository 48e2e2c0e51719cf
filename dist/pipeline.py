"""Pipeline execution of one step: GPipe and 1F1B schedules over our own point-to-point links.

We run our own schedule rather than torch.distributed.pipelining because recovery must abort a step
mid-flight and rebuild the links on new groups, and CheckFree+ must run some micro-batches through
stages in a swapped order; transfers are broadcasts on 2-rank groups, which gloo can poll.
"""
from __future__ import annotations

import torch

from data.loader import Batch
from dist.comm import Comm
from dist.groups import Groups
from model.stages import Stage, token_loss_sum


def schedule(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The ordered ("F"|"B", micro-batch) actions of one stage."""
    if kind == "gpipe":
        return [("F", i) for i in range(microbatches)] + [("B", i) for i in range(microbatches)]
    warmup = min(stages - stage - 1, microbatches)
    actions = [("F", i) for i in range(warmup)]
    for i in range(warmup, microbatches):
        actions += [("F", i), ("B", i - warmup)]
    actions += [("B", i) for i in range(microbatches - warmup, microbatches)]
    return actions


def _activation(mb: Batch, dim: int) -> torch.Tensor:
    return torch.empty(*mb.inputs.shape, dim)


def train_step(module: Stage, microbatches: list[Batch], groups: Groups, comm: Comm, kind: str,
               stage: int, stages: int, n_tokens: int) -> float:
    """Forward and backward of every micro-batch; leaves gradients in `module`.

    Returns this replica's mean token loss on the last stage (nan elsewhere). Each micro-batch's loss is
    divided by the whole batch's token count, so gradients equal those of the full batch at once.
    """
    pending, saved = [], {}
    loss = torch.zeros(())
    for op, i in schedule(kind, stage, stages, len(microbatches)):
        mb = microbatches[i]
        if op == "F":
            if module.first:
                x = mb.inputs
            else:
                x = comm.recv(_activation(mb, module.cfg.dim), groups.recv_fwd.group, groups.recv_fwd.peer)
                x.requires_grad_(True)
            out = module(x, module.prepare(mb.doc_ids))
            if module.last:
                out = token_loss_sum(out, mb.targets) / n_tokens
                loss += out.detach()
            else:
                pending.append(comm.send(out.detach(), groups.send_fwd.group))
            saved[i] = (x, out)
        else:
            x, out = saved.pop(i)
            if module.last:
                out.backward()
            else:
                grad = comm.recv(torch.empty_like(out), groups.recv_bwd.group, groups.recv_bwd.peer)
                out.backward(grad)
            if not module.first:
                pending.append(comm.send(x.grad, groups.send_bwd.group))
    for work in pending:
        work.wait()
    return float(loss) if module.last else float("nan")


@torch.no_grad()
def eval_step(module: Stage, microbatches: list[Batch], groups: Groups, comm: Comm) -> float:
    """Forward only; returns the summed token loss on the last stage (0 elsewhere)."""
    pending, loss_sum = [], 0.0
    for mb in microbatches:
        x = mb.inputs if module.first else comm.recv(_activation(mb, module.cfg.dim), groups.recv_fwd.group,
                                                       groups.recv_fwd.peer)
        out = module(x, module.prepare(mb.doc_ids))
        if module.last:
            loss_sum += float(token_loss_sum(out, mb.targets))
        else:
            pending.append(comm.send(out, groups.send_fwd.group))
    for work in pending:
        work.wait()
    return loss_sum
