"""Atomic, verified checkpoints with torch.distributed.checkpoint (DCP).

Layout: <root>/step_<N>/ holds the DCP shards of every stage's model and optimizer (global parameter
names, so a checkpoint re-shards onto another stage split; optimizer hyper-parameters come from the
config, only its per-parameter state is saved), one `extra-r<replica>s<stage>.pt` per rank
(RNG, loader position, step) and `manifest.json` (step and the sha256 of every file). Everything is
written into `.tmp-step_<N>/` and renamed in one step once the manifest is on disk, so a crash during
a save never leaves a checkpoint that looks valid; a file that no longer matches its checksum marks
the checkpoint corrupt and the previous one is used.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, described in one line."""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def extra_name(slot: tuple[int, ...]) -> str:
    """A rank's own state file: (replica, stage) or (replica, stage, lane); lane 0 keeps the two-part name."""
    lane = slot[2] if len(slot) > 2 else 0
    return f"extra-r{slot[0]}s{slot[1]}" + (f"l{lane}" if lane else "") + ".pt"


def save(root: str, step: int, model, optimizer, extra: dict, slot: tuple[int, ...], keep: int,
         replicas_differ: bool) -> str:
    """Collective over the default group: every rank writes its shards, rank 0 seals and renames.

    Weights live under `replica<r>.`: replicas that may differ (DiLoCo, NoLoCo) each save their own;
    identical replicas (DDP) all save as replica 0, which DCP writes once.
    """
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-step_{step:08d}")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    namespace = f"replica{slot[0] if replicas_differ else 0}"
    dcp.save({namespace: {"model": model_sd, "optim": optim_sd["state"]}}, checkpoint_id=tmp)
    torch.save(extra, os.path.join(tmp, extra_name(slot)))
    dist.barrier()
    if dist.get_rank() == 0:
        files = sorted(f for f in os.listdir(tmp) if f != MANIFEST)
        manifest = {"step": step, "files": {f: _sha256(os.path.join(tmp, f)) for f in files}}
        with open(os.path.join(tmp, MANIFEST), "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_checkpoints(root: str) -> list[str]:
    """Sealed checkpoint folders, newest first (half-written .tmp folders are never listed)."""
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if n.startswith("step_")), reverse=True)
    return [os.path.join(root, n) for n in names]


def verify(path: str) -> int:
    """The checkpoint's step, or CheckpointError naming what is wrong with it."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is partial (a save was interrupted)")
    try:
        with open(manifest_path) as fh:
            manifest = json.load(fh)
        files, step = manifest["files"], int(manifest["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} has an unreadable {MANIFEST} ({err}): it is corrupt") from None
    for name, digest in files.items():
        f = os.path.join(path, name)
        if not os.path.exists(f):
            raise CheckpointError(f"checkpoint {path} is missing {name}: it is partial")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum: it is corrupt")
    return step


def choose(root: str, resume: str, log) -> str | None:
    """The checkpoint to resume from: resume=latest takes the newest that verifies (logging any it skips);
    an explicit path must verify or CheckpointError is raised."""
    if resume == "none":
        return None
    if resume != "latest":
        verify(resume)
        return resume
    for path in list_checkpoints(root):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            log(f"skipping bad checkpoint: {err}; trying the previous one")
    return None


def load(path: str, model, optimizer, slot: tuple[int, ...]) -> dict:
    """Load this rank's stage (re-sharded by parameter name) and optimizer from its replica's weights, or
    replica 0's when the checkpoint has none of its own; returns its extra state (or {})."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        saved = {k.split(".", 1)[0] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
        namespace = f"replica{slot[0]}" if f"replica{slot[0]}" in saved else "replica0"
        state = {namespace: {"model": model_sd, "optim": optim_sd["state"]}}
        dcp.load(state, checkpoint_id=path)
    except Exception as err:  # DCP raises many types; name the checkpoint and the cause
        raise CheckpointError(f"checkpoint {path} could not be loaded: {str(err).splitlines()[0]}") from None
    set_state_dict(model, optimizer, model_state_dict=state[namespace]["model"],
                   optim_state_dict={"state": state[namespace]["optim"], "param_groups": optim_sd["param_groups"]})
    extra = os.path.join(path, extra_name(slot))
    return torch.load(extra, weights_only=False) if os.path.exists(extra) else {}
