"""Snapshots of a rank's state. The undo log of one step: the state before the last optimizer update, so a step
that some ranks applied and others did not can be taken back on every rank (the commit rule) and replayed with
the same data. The outer-step snapshot (DiLoCo / NoLoCo): the state right after the last outer step, which a
replica that lost a stage rewinds to (recovery/rebuild.py)."""
from __future__ import annotations

import copy

import torch


def take(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync, step: int = -1) -> dict:
    """A deep copy of the rank's state (step: the step it belongs to, for the outer-step snapshot)."""
    return copy.deepcopy({"module": module.state_dict(), "optim": optimizer.state_dict(), "sync": sync.state_dict(),
                          "step": step})


def restore(snapshot: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync) -> None:
    """Put the state back; the snapshot stays intact (loading aliases tensors, so it loads a copy)."""
    snapshot = copy.deepcopy(snapshot)
    module.load_state_dict(snapshot["module"])
    optimizer.load_state_dict(snapshot["optim"])
    sync.load_state_dict(snapshot["sync"])
