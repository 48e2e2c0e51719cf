"""Atomic, verified checkpoints with torch.distributed.checkpoint (DCP).

Layout: <root>/step_<N>/ holds the DCP shards of every stage's model and optimizer (global parameter
names, so a checkpoint re-shards onto another stage split; optimizer hyper-parameters come from the
config, only its per-parameter state is saved), one `extra-r<replica>s<stage>.pt` per rank
(RNG, loader position, step) and `manifest.json` (step and the sha256 of every file). Everything is
written into `.tmp-step_<N>-g<generation>/` and renamed in one step once the manifest is on disk, so a crash
during a save never leaves a checkpoint that looks valid, and a save abandoned by an ended generation (its
thread may still be writing) never mixes with the next one; a file that no longer matches its checksum marks
the checkpoint corrupt and the previous one is used. Older checkpoints are deleted only after their successor
is sealed, and keep=0 keeps them all. Every wait is pollable (`Comm`), so a peer dying mid-save ends the
generation within one poll instead of the group timeout.
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

from torch.distributed.checkpoint.api import CheckpointException

from dist.comm import GenerationLost
from recovery import hooks

MANIFEST = "manifest.json"
SALVAGE = "salvage"


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
         replicas_differ: bool, comm, gen: int = 0, fence=lambda: None) -> str:
    """Collective over the default group: every rank writes its shards, rank 0 seals and renames.

    Weights live under `replica<r>.`: replicas that may differ (DiLoCo, NoLoCo) each save their own;
    identical replicas (DDP) all save as replica 0, which DCP writes once. `fence()` raises when this
    worker's generation has ended: rank 0 calls it just before sealing.
    """
    final, tmp = step_dir(root, step), os.path.join(root, f".tmp-step_{step:08d}-g{gen}")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    comm.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    namespace = f"replica{slot[0] if replicas_differ else 0}"
    try:
        comm.blocking(lambda: dcp.save({namespace: {"model": model_sd, "optim": optim_sd["state"]}},
                                       checkpoint_id=tmp), "checkpoint save")
    except (RuntimeError, CheckpointException) as err:  # DCP's collectives failed: a peer died during the save
        if comm.abort is None or isinstance(err, GenerationLost):
            raise
        raise GenerationLost(f"checkpoint save failed: {str(err).splitlines()[0][:120]}", True) from None
    torch.save(extra, os.path.join(tmp, extra_name(slot)))
    hooks.at("saving", step=step, rank=dist.get_rank())
    comm.barrier()
    if dist.get_rank() == 0:
        fence()
        seal(root, tmp, final, step)
        for old in list_checkpoints(root)[keep:] if keep > 0 else ():  # keep=0: keep every checkpoint
            shutil.rmtree(old, ignore_errors=True)
        for name in os.listdir(root):  # saves abandoned by ended generations
            if name.startswith(".tmp-step_") and os.path.join(root, name) != tmp:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        shutil.rmtree(os.path.join(root, SALVAGE), ignore_errors=True)  # a sealed checkpoint supersedes them
    comm.barrier()
    return final


def seal(root: str, tmp: str, final: str, step: int) -> None:
    """Write the manifest and rename the folder into place (a step sealed before stays as it was)."""
    files = sorted(f for f in os.listdir(tmp) if f != MANIFEST)
    manifest = {"step": step, "files": {f: _sha256(os.path.join(tmp, f)) for f in files}}
    with open(os.path.join(tmp, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    if os.path.isdir(final):
        try:
            verify(final)
            shutil.rmtree(tmp, ignore_errors=True)  # the same step, already sealed by an earlier generation
            return
        except CheckpointError:
            shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    _fsync_dir(root)


def salvage(root: str, step: int, model, optimizer, extra: dict, slot: tuple[int, ...]) -> str:
    """This rank's own state at `step`, written without any collective (the coordinator died while no world
    existed to agree in): <root>/salvage/step_<N>/<extra name>. `choose` takes a set of them that covers every
    stage (and lane) at one step, newer than the newest sealed checkpoint, as a checkpoint of its own."""
    return salvage_state(root, step, {"model": model.state_dict(), "optim": optimizer.state_dict(), "extra": extra},
                         slot)


def salvage_state(root: str, step: int, state: dict, slot: tuple[int, ...]) -> str:
    """Write one slot's {model, optim, extra} into the salvage set of `step` (complete or absent)."""
    folder = os.path.join(root, SALVAGE, f"step_{step:08d}")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, extra_name(slot))
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _salvaged(folder: str) -> dict[tuple[int, int, int], dict]:
    """(replica, stage, lane) -> extra of every readable state in a salvage folder (an unreadable one is absent)."""
    found = {}
    for name in os.listdir(folder):
        if name.endswith(".pt"):
            try:
                found[parse_extra_name(name)] = torch.load(os.path.join(folder, name), weights_only=False)["extra"]
            except Exception:
                continue
    return found


def salvage_step(folder: str, replicas: set[int] = frozenset()) -> int | None:
    """The step of a complete salvage set, or None: every stage and lane of the grid present. When replicas
    differ (DiLoCo / NoLoCo) and the set is not at an outer step, also every stage of each replica in `replicas`
    (those that saved any state since the newest sealed checkpoint): no replica takes another's state between
    outer steps and skips steps of its own. At an outer step a replica may take another's stage, as a rewind does."""
    found = _salvaged(folder)
    if not found:
        return None
    extra = next(iter(found.values()))
    stages, lanes = extra["stages"], extra.get("lanes", 1)
    grid = [(s, ln) for s in range(stages) for ln in range(lanes)]
    if not {(s, ln) for _, s, ln in found} >= set(grid):
        return None
    if extra.get("replicas_differ") and not all(e.get("at_outer_step") for e in found.values()) and \
            not all((r, s, ln) in found for r in replicas for s, ln in grid):
        return None
    return int(os.path.basename(folder).split("_")[1])


def parse_extra_name(name: str) -> tuple[int, int, int]:
    """extra-r<r>s<s>[l<l>].pt -> (replica, stage, lane)."""
    body = name.removeprefix("extra-r").removesuffix(".pt")
    replica, _, rest = body.partition("s")
    stage, _, lane = rest.partition("l")
    return int(replica), int(stage), int(lane or 0)


def list_checkpoints(root: str) -> list[str]:
    """Sealed checkpoint folders, newest first (half-written .tmp folders are never listed)."""
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if n.startswith("step_")), reverse=True)
    return [os.path.join(root, n) for n in names]


def verify(path: str) -> int:
    """The checkpoint's step, or CheckpointError naming what is wrong with it."""
    if os.path.basename(os.path.dirname(path)) == SALVAGE:
        step = salvage_step(path)
        if step is None:
            raise CheckpointError(f"salvaged states in {path} do not cover every stage: resume from a sealed checkpoint")
        return step
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
    sealed, sealed_step = None, -1
    for path in list_checkpoints(root):
        try:
            sealed, sealed_step = path, verify(path)
            break
        except CheckpointError as err:
            log(f"skipping bad checkpoint: {err}; trying the previous one")
    folder = os.path.join(root, SALVAGE)
    names = [n for n in sorted(os.listdir(folder), reverse=True) if int(n.split("_")[1]) > sealed_step] \
        if os.path.isdir(folder) else []  # newer than every sealed checkpoint: the ranks' own saves
    replicas = {r for n in names for r, _, _ in _salvaged(os.path.join(folder, n))}
    for name in names:
        if salvage_step(os.path.join(folder, name), replicas) is not None:
            return os.path.join(folder, name)
    return sealed


def load(path: str, model, optimizer, slot: tuple[int, ...], comm, grace_s: float = 0.0) -> dict:
    """Load this rank's stage (re-sharded by parameter name) and optimizer from its replica's weights, or
    replica 0's when the checkpoint has none of its own; returns its extra state (its replica's, else replica
    0's of the same stage, else {}; a checkpoint saved with another stage split has none). A failure while the
    generation ends (the abort flag is set within grace_s) is a lost generation, any other a bad checkpoint."""
    if os.path.basename(os.path.dirname(path)) == SALVAGE:
        return load_salvaged(path, model, optimizer, slot)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        saved = {k.split(".", 1)[0] for k in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
    except Exception as err:  # DCP raises many types; name the checkpoint and the cause
        raise CheckpointError(f"checkpoint {path} could not be loaded: {str(err).splitlines()[0]}") from None
    namespace = f"replica{slot[0]}" if f"replica{slot[0]}" in saved else "replica0"
    state = {namespace: {"model": model_sd, "optim": optim_sd["state"]}}
    try:
        comm.blocking(lambda: dcp.load(state, checkpoint_id=path), "checkpoint load")
    except GenerationLost:
        raise
    except (Exception, CheckpointException) as err:  # DCP raises many types; name the checkpoint and the cause
        if comm.abort is not None and comm.abort.wait(grace_s):
            raise GenerationLost(f"checkpoint load failed: {str(err).splitlines()[0][:120]}", True) from None
        raise CheckpointError(f"checkpoint {path} could not be loaded: {str(err).splitlines()[0]}") from None
    set_state_dict(model, optimizer, model_state_dict=state[namespace]["model"],
                   optim_state_dict={"state": state[namespace]["optim"], "param_groups": optim_sd["param_groups"]})
    lane = slot[2] if len(slot) > 2 else 0
    for name in (extra_name(slot), extra_name((0, slot[1], lane))):  # a replica new to this run: replica 0's state
        if os.path.exists(os.path.join(path, name)):
            return torch.load(os.path.join(path, name), weights_only=False)
    return {}


def load_salvaged(folder: str, model, optimizer, slot: tuple[int, ...]) -> dict:
    """This slot's salvaged state, or the same stage and lane of another replica (identical under DDP)."""
    lane = slot[2] if len(slot) > 2 else 0
    names = sorted(n for n in os.listdir(folder) if n.endswith(".pt") and parse_extra_name(n)[1:] == (slot[1], lane))
    mine = extra_name(slot)
    name = mine if mine in names else names[0]
    state = torch.load(os.path.join(folder, name), weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])
    return state["extra"]
