"""The SP plan of the next batch, made while this step runs (FlexSP plans one step ahead, off the critical path).

One rank of each replica plans (its stage 0, lane 0): a solver with a time limit need not give two ranks the
same answer, so one rank decides and the replica's other ranks receive its plan (one small broadcast inside
the replica, the batch's plan and how long the planner rank waited for it). The planner rank plans step t + 1
on a background thread as soon as it has taken the plan of step t; the planning overlaps the step's forward
and backward (torch releases the GIL in its kernels). After a rewind (recovery) the step asked for is not the
one planned ahead: it is planned at once. Without planning ahead every rank plans each step itself, in the step
(the fast planner is deterministic, so the plans agree).
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from data.loader import ReplicaLoader
from dist.comm import Comm
from dist.lanes import plan_batch, segments
from dist.sp_cost import SPCost
from dist.sp_planner import Plan


def batch_planner(loader: ReplicaLoader, lanes: int, mode: str, cost: SPCost, passes: int | None,
                  time_limit_s: float) -> Callable[[int], Plan]:
    """position -> the SP plan of this replica's batch at that loader position (reads the batch, moves nothing)."""
    return lambda position: plan_batch(segments(loader.batch_at(position)), lanes, mode, cost, passes, time_limit_s)


class SPPlanner:
    def __init__(self, plan_step: Callable[[int], Plan], ahead: bool, last_step: int, is_planner: bool, comm: Comm,
                 group, src: int):
        """plan_step(step): the plan of the batch at loader position `step` (pure: the same on any thread);
        ahead: plan one step ahead on the planner rank and broadcast; src: the global rank of the planner in
        `group` (this replica's ranks)."""
        self.plan_step, self.ahead_on, self.last_step = plan_step, ahead, last_step
        self.comm, self.group, self.src = comm, group, src
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="sp-plan-ahead") if ahead and is_planner else None
        self.ahead: tuple[int, Future] | None = None

    def plan(self, step: int) -> tuple[Plan, float]:
        """The plan of `step` on every rank of the replica, and the seconds the planner rank waited for it (0
        when every rank plans in the step)."""
        if not self.ahead_on:
            return self.plan_step(step), 0.0
        shared = None
        if self.executor:
            start = time.perf_counter()
            ahead, self.ahead = self.ahead, None
            planned = ahead[1].result() if ahead and ahead[0] == step else self.plan_step(step)
            shared = (planned, time.perf_counter() - start)
            if step + 1 < self.last_step:
                self.ahead = (step + 1, self.executor.submit(self.plan_step, step + 1))
        return self.comm.broadcast_object(shared, self.src, self.group)

    def close(self) -> None:
        if self.executor:
            self.executor.shutdown(wait=False, cancel_futures=True)
