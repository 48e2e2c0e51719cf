"""Named points in a worker's life where a test may act (torchft's idea: fault injection lives in the tests).

The product only calls `at(point, **where)`; nothing happens unless a test installed a hook, either in-process
with `install(fn)` or in a worker process through FLOTILLA_HOOKS=<module>:<function>, which is called once with
`install` at start-up. Points: "forming" (before joining a generation's world), "connecting" (between the world
and its groups), "agreeing", "rebuilding", "step" (mid-step: after backward, before the update), "updated" (after the
update, before the sync after it: DiLoCo's outer exchange), "saving"
(shards written, not sealed), "plan" (waiting for the next plan), "all_to_all" (an all-to-all of a group of
group_size ranks done, this rank having sent nbytes to the others: bench/slow_link.py delays it).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

Hook = Callable[[str, dict], None]
_HOOKS: list[Hook] = []


def install(hook: Hook) -> None:
    _HOOKS.append(hook)


def install_from_env() -> None:
    spec = os.environ.get("FLOTILLA_HOOKS", "")
    if spec:
        module, _, fn = spec.partition(":")
        getattr(importlib.import_module(module), fn)(install)


def at(point: str, **where) -> None:
    for hook in _HOOKS:
        hook(point, where)
