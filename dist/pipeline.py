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
    return torch.empty(*mb.inputs.shape, dim, device=mb.inputs.device)


def train_step(module: Stage, microbatches: list[Batch], hops: list[tuple[int, int]], groups: Groups, comm: Comm,
               kind: str, stage: int, stages: int, n_tokens: int) -> float:
    """Forward and backward of every micro-batch; leaves gradients in `module`.

    hops[i] = (replica of the previous stage, replica of the next stage) for micro-batch i: this replica
    for plain pipelines, others under random routing. Returns the summed micro-batch losses on the last
    stage (nan elsewhere); each is divided by the whole batch's token count, so gradients equal those of
    the full batch at once.
    """
    pending, saved = [], {}
    loss = torch.zeros((), device=microbatches[0].inputs.device)
    for op, i in schedule(kind, stage, stages, len(microbatches)):
        mb, (prev_r, next_r) = microbatches[i], hops[i]
        if op == "F":
            if module.first:
                x = mb.inputs
            else:
                link = groups.prev[prev_r].fwd
                x = comm.recv(_activation(mb, module.cfg.dim), link.group, link.peer)
                x.requires_grad_(True)
            out = module(x, module.prepare(mb.doc_ids))
            if module.last:
                out = token_loss_sum(out, mb.targets) / n_tokens
                loss += out.detach()
            else:
                link = groups.next[next_r].fwd
                pending.append(comm.send(out.detach(), link.group, link.kind))
            saved[i] = (x, out)
        else:
            x, out = saved.pop(i)
            if module.last:
                out.backward()
            else:
                link = groups.next[next_r].bwd
                out.backward(comm.recv(torch.empty_like(out), link.group, link.peer))
            if not module.first:
                link = groups.prev[prev_r].bwd
                pending.append(comm.send(x.grad, link.group, link.kind))
    for work in pending:
        work.wait()
    return float(loss) if module.last else float("nan")


@torch.no_grad()
def eval_step(module: Stage, microbatches: list[Batch], replica: int, groups: Groups, comm: Comm) -> float:
    """Forward only, along this replica's own stages; returns the summed token loss on the last stage (0 elsewhere)."""
    pending, loss_sum = [], 0.0
    for mb in microbatches:
        if module.first:
            x = mb.inputs
        else:
            link = groups.prev[replica].fwd
            x = comm.recv(_activation(mb, module.cfg.dim), link.group, link.peer)
        out = module(x, module.prepare(mb.doc_ids))
        if module.last:
            loss_sum += float(token_loss_sum(out, mb.targets))
        else:
            pending.append(comm.send(out, groups.next[replica].fwd.group))
    for work in pending:
        work.wait()
    return loss_sum
