"""An emulated slow link between nodes for the all-to-alls of sequence parallelism (a bench hook, not product code).

Installed in worker processes with FLOTILLA_HOOKS=bench.slow_link:install and
FLOTILLA_SLOW_LINK="<lanes_per_node>:<GB/s>" (`env`): after every all-to-all of a group of d > n lanes
(n = lanes_per_node; recovery/hooks.py's "all_to_all" point) the rank sleeps what the off-node part of its
bytes would take on the node's links, shared by the node's n lanes:
    delay = n * nbytes * (d - n) / (d - 1) / B
where nbytes is what the rank sent to the other d - 1 ranks (each gets the same share, d - n of them on other
nodes) and B the node's bandwidth (bytes/s). This is dist/sp_cost.py's cross-node comm, v (d - 1) / d / B_d
with B_d = B (d - 1) / (n (d - n)). n = 1: every group of 2 or more lanes crosses nodes, delay = nbytes / B.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

ENV = "FLOTILLA_SLOW_LINK"


@dataclass(frozen=True)
class SlowLink:
    lanes_per_node: int
    bandwidth: float  # bytes per second of one node's links to the others

    def delay(self, nbytes: float, group_size: int) -> float:
        """Seconds one all-to-all of a group_size-lane group waits, this rank having sent nbytes (docstring)."""
        n, d = self.lanes_per_node, group_size
        if d <= n:
            return 0.0
        return n * nbytes * (d - n) / (d - 1) / self.bandwidth


def parse(spec: str) -> SlowLink:
    """'<lanes_per_node>:<GB/s>' -> SlowLink; ValueError naming the form otherwise."""
    lanes, _, gbps = spec.partition(":")
    try:
        link = SlowLink(int(lanes), float(gbps) * 1e9)
    except ValueError:
        link = None
    if link is None or link.lanes_per_node < 1 or link.bandwidth <= 0:
        raise ValueError(f"{ENV}={spec!r}: write <lanes_per_node>:<GB/s> with both > 0, e.g. {ENV}=1:0.05")
    return link


def env(spec: str) -> dict:
    """The environment that installs this link in train.py or bench/profile_sp.py workers."""
    parse(spec)
    return {"FLOTILLA_HOOKS": "bench.slow_link:install", ENV: spec}


def install(register) -> None:
    link = parse(os.environ.get(ENV, ""))

    def hook(at: str, where: dict) -> None:
        if at == "all_to_all":
            wait = link.delay(where["nbytes"], where["group_size"])
            if wait > 0:
                time.sleep(wait)

    register(hook)
