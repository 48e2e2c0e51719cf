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

SCHEDULES = ("gpipe", "1f1b")  # parallel.schedule


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


def _activation(mb: Batch, module: Stage) -> torch.Tensor:
    """A receive buffer for a micro-batch's hidden states, in the dtype they travel in (module.wire_dtype)."""
    return torch.empty(*mb.inputs.shape, module.cfg.dim, device=mb.inputs.device, dtype=module.wire_dtype)


def _received(buffer: torch.Tensor) -> torch.Tensor:
    """Received hidden states as the fp32 input of this stage's layers, a leaf that collects their gradient."""
    return buffer.float().requires_grad_(True)


def run_rows(module: Stage, x: torch.Tensor, mb: Batch) -> torch.Tensor:
    """A stage on whole windows (rows of documents packed with document masks)."""
    return module(x, module.prepare(mb.doc_ids))


def train_step(module: Stage, microbatches: list, hops: list[tuple[int, int]], groups: Groups, comm: Comm,
               kind: str, stage: int, stages: int, n_tokens: float, run=run_rows) -> float:
    """Forward and backward of every micro-batch; leaves gradients in `module`.

    hops[i] = (replica of the previous stage, replica of the next stage) for micro-batch i: this replica
    for plain pipelines, others under random routing. Returns the summed micro-batch losses on the last
    stage (nan elsewhere); each is divided by the whole batch's token count, so gradients equal those of
    the full batch at once. `run(module, x, mb)` runs the stage on a micro-batch (a lane's sequence shards
    under sequence parallelism: dist/lanes.py); an empty micro-batch (no tokens on this lane) is skipped.
    """
    pending, saved = [], {}
    loss = torch.zeros((), device=microbatches[0].inputs.device)
    for op, i in schedule(kind, stage, stages, len(microbatches)):
        mb, (prev_r, next_r) = microbatches[i], hops[i]
        if mb.inputs.numel() == 0:
            continue
        if op == "F":
            if module.first:
                x = mb.inputs
            else:
                link = groups.prev[prev_r].fwd
                x = _received(comm.recv(_activation(mb, module), link.group, link.peer))
            out = run(module, x, mb)
            if module.last:
                out = token_loss_sum(out, mb.targets) / n_tokens
                loss += out.detach()
            else:
                link = groups.next[next_r].fwd
                pending.append(comm.send(out.detach().to(module.wire_dtype), link.group, link.kind))
            saved[i] = (x, out)
        else:
            x, out = saved.pop(i)
            if module.last:
                out.backward()
            else:
                link = groups.next[next_r].bwd
                out.backward(comm.recv(torch.empty_like(out, dtype=module.wire_dtype), link.group, link.peer).to(out.dtype))
            if not module.first:
                link = groups.prev[prev_r].bwd
                pending.append(comm.send(x.grad.to(module.wire_dtype), link.group, link.kind))
    for work in pending:
        comm.wait(work)
    return float(loss) if module.last else float("nan")


def swap_route(stages: int, index: int) -> list[tuple[int, str]]:
    """CheckFree+'s order for the index-th micro-batch of the run: (stage, blocks) segments, blocks from E, L, H.

    Odd micro-batches swap the first two stages' layers and/or the last two (E, S2, S1, S3, ..., Ss, Ss-1, H),
    so that a lost edge stage can be replaced by its neighbour. With 3 or 4 stages both swaps on one
    micro-batch would jump 3 stages, so they alternate; with 2 the two swaps are the same.
    """
    order = list(range(stages))
    if stages >= 2 and index % 2 == 1:
        front = stages == 2 or stages >= 5 or (index // 2) % 2 == 0
        back = stages >= 5 or (stages in (3, 4) and not front)
        if front:
            order[0], order[1] = order[1], order[0]
        if back:
            order[-1], order[-2] = order[-2], order[-1]
    segments: list[tuple[int, str]] = []
    for s, block in [(0, "E"), *[(s, "L") for s in order], (stages - 1, "H")]:
        if segments and segments[-1][0] == s:
            segments[-1] = (s, segments[-1][1] + block)
        else:
            segments.append((s, block))
    return segments


def train_step_routes(module: Stage, microbatches: list[Batch], routes: list[list[tuple[int, str]]], groups: Groups,
                      comm: Comm, stage: int, n_tokens: int) -> float:
    """Like train_step, for micro-batches that may visit this stage twice in any order (CheckFree+).

    Every rank runs its parts in one global order (all forwards by micro-batch then route position,
    then all backwards by micro-batch and reversed position); sends never block, and each receive waits
    for an action earlier in that order, so no schedule deadlocks and every 2-rank link sees its
    transfers in the same order at both ends.
    """
    saved, pending = {}, []
    loss = torch.zeros((), device=microbatches[0].inputs.device)
    for i, (mb, route) in enumerate(zip(microbatches, routes)):
        for k, (s, parts) in enumerate(route):
            if s != stage:
                continue
            if parts[0] == "E":
                x = mb.inputs
            else:
                link = groups.near[route[k - 1][0]]
                x = _received(comm.recv(_activation(mb, module), link.group, link.peer))
            out = module.forward_parts(x, module.prepare(mb.doc_ids), parts)
            if parts[-1] == "H":
                out = token_loss_sum(out, mb.targets) / n_tokens
                loss += out.detach()
            else:
                link = groups.near[route[k + 1][0]]
                pending.append(comm.send(out.detach().to(module.wire_dtype), link.group, link.kind))
            saved[i, k] = (x, out)
    for i, route in enumerate(routes):
        for k in reversed(range(len(route))):
            s, parts = route[k]
            if s != stage:
                continue
            x, out = saved.pop((i, k))
            if parts[-1] == "H":
                out.backward()
            else:
                link = groups.near[route[k + 1][0]]
                out.backward(comm.recv(torch.empty_like(out, dtype=module.wire_dtype), link.group, link.peer).to(out.dtype))
            if parts[0] != "E":
                link = groups.near[route[k - 1][0]]
                pending.append(comm.send(x.grad.to(module.wire_dtype), link.group, link.kind))
    for work in pending:
        comm.wait(work)
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
            x = comm.recv(_activation(mb, module), link.group, link.peer).float()
        out = module(x, module.prepare(mb.doc_ids))
        if module.last:
            loss_sum += float(token_loss_sum(out, mb.targets))
        else:
            pending.append(comm.send(out.to(module.wire_dtype), groups.next[replica].fwd.group))
    for work in pending:
        comm.wait(work)
    return loss_sum
