"""Snapshots of a rank's state. The undo log of one step: the state before the last optimizer update, so a step
that some ranks applied and others did not can be taken back on every rank (the commit rule) and replayed with
the same data. The outer-step snapshot (DiLoCo / NoLoCo): the state right after the last outer step, which a
replica that lost a stage rewinds to (recovery/rebuild.py).

On a GPU a snapshot lives in pinned host memory, copied without waiting: the per-step undo copy then costs no
second copy of the weights and Adam state on the device, and the copy overlaps the optimizer step (a copy is
queued on the stream before the update, so it reads the state from before it)."""
from __future__ import annotations

import copy

import torch


def take(module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync, step: int = -1, wait: bool = True) -> dict:
    """A copy of the rank's state (step: the step it belongs to, for the outer-step snapshot). wait=False leaves
    GPU -> host copies in flight: restoring on this device is stream-ordered after them, but reading the copy on
    the host (saving it, sending it) needs wait=True."""
    state = _copy({"module": module.state_dict(), "optim": optimizer.state_dict(), "sync": sync.state_dict(),
                   "step": step}, torch.device("cpu"), {})
    if wait and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()
    return state


def restore(snapshot: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer, sync) -> None:
    """Put the state back; the snapshot stays intact (the module copies into its parameters; the optimizer and
    the sync layer keep the tensors they are given, so they get copies, the sync layer's on this device)."""
    device = next(module.parameters()).device
    module.load_state_dict(snapshot["module"])
    optimizer.load_state_dict(_copy(snapshot["optim"], None, {}))  # it moves them where its policy wants them
    sync.load_state_dict(_copy(snapshot["sync"], device, {}))


def _copy(obj, device: torch.device | None, memo: dict):
    """A deep copy with every tensor on `device` (None: where it is; GPU -> host into pinned memory, without
    waiting); a tensor reached twice is copied once (aliases stay aliases)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            target = device or obj.device
            if obj.is_cuda and target.type == "cpu":
                memo[id(obj)] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True).copy_(obj, non_blocking=True)
            elif target == obj.device:
                memo[id(obj)] = obj.clone()
            else:
                memo[id(obj)] = obj.to(target, non_blocking=obj.is_pinned())
        return memo[id(obj)]
    if isinstance(obj, dict):
        out = type(obj)((k, _copy(v, device, memo)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a module state dict's per-module versions
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_copy(v, device, memo) for v in obj)
    return copy.deepcopy(obj)
