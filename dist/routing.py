"""NoLoCo's random pipeline routing: at every stage boundary a micro-batch may move to another replica.

For step t, micro-batch i and boundary s (stage s -> s + 1), `perm[d]` is the replica whose stage s + 1
takes what replica d's stage s produced. It is a bijection seeded by (seed, t, i, s), so every rank
computes the same routes, each stage still processes exactly one copy of every micro-batch index,
and the backward pass retraces the forward path.
"""
from __future__ import annotations

import torch

from data.loader import Batch, ReplicaLoader


def boundary_perm(replicas: int, seed: int, step: int, microbatch: int, boundary: int) -> list[int]:
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + microbatch) * 101 + boundary)
    return torch.randperm(replicas, generator=g).tolist()


def route(members: tuple[int, ...], seed: int, step: int, microbatch: int, stages: int) -> list[list[int]]:
    """paths[k] = the replica holding, at each stage, the micro-batch that started on replica members[k]. Routes
    run among the replicas in the world, so a replica that sits out (or is rebuilding) is routed around."""
    n, paths = len(members), []
    for d in range(n):
        path = [d]
        for s in range(stages - 1):
            path.append(boundary_perm(n, seed, step, microbatch, s)[path[-1]])
        paths.append([members[k] for k in path])
    return paths


def hops(members: tuple[int, ...], seed: int, step: int, microbatch: int, stages: int, replica: int, stage: int
         ) -> tuple[int, int | None, int | None]:
    """For the copy of `microbatch` at (replica, stage): (replica whose data it is, replica of the previous
    stage that sends it here or None, replica of the next stage it goes to or None)."""
    for path in route(members, seed, step, microbatch, stages):
        if path[stage] == replica:
            prev_r = path[stage - 1] if stage > 0 else None
            next_r = path[stage + 1] if stage < stages - 1 else None
            return path[0], prev_r, next_r
    raise AssertionError("routes are bijections: every (replica, stage) holds one copy")


def local_microbatches(batch: Batch, loader: ReplicaLoader, step: int, n: int, replica: int, stage: int,
                       members: tuple[int, ...], stages: int, seed: int, routing: bool) -> tuple[list[Batch], list[tuple[int, int]]]:
    """This rank's micro-batches of a step and, for each, (previous-stage replica, next-stage replica).

    Without routing: this replica's batch split n ways, along its own stages. With routing: micro-batch i
    is the copy that the route brings here, cut from its origin replica's batch (every rank can read any
    replica's batch: the loader is a pure function of the step).
    """
    if not routing:
        return batch.split(n), [(replica, replica)] * n
    split = {replica: batch.split(n)}
    microbatches, links = [], []
    for i in range(n):
        origin, prev_r, next_r = hops(members, seed, step, i, stages, replica, stage)
        if origin not in split:
            split[origin] = loader.batch_at(step, origin).split(n)
        microbatches.append(split[origin][i])
        links.append((prev_r, next_r))
    return microbatches, links
