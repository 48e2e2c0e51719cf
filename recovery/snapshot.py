"""The undo log of one step: the state before the last optimizer update, so a step that some ranks applied
and others did not can be taken back on every rank (the commit rule) and replayed with the same data."""
from __future__ import annotations

import copy

import torch


def take(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync) -> dict:
    return copy.deepcopy({"module": module.state_dict(), "optim": optimizer.state_dict(), "sync": sync.state_dict()})


def restore(snapshot: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync) -> None:
    module.load_state_dict(snapshot["module"])
    optimizer.load_state_dict(snapshot["optim"])
    sync.load_state_dict(snapshot["sync"])
