"""One generation of the world: a fresh default process group on its own store prefix.

Old groups may still hold a transfer that will never finish; destroying them would block for the group
timeout, so they are kept (the graveyard) until the process ends with `exit_process`. NCCL groups are aborted
instead: a NCCL kernel waiting on a dead peer never returns, and would hold the GPU's next communicators.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

_GRAVEYARD: list = []


def start_generation(store, gen: int, rank: int, world: int, backend: str, timeout_s: float, keep: tuple = ()) -> None:
    """Leave the previous generation's groups behind and join generation `gen` as `rank` of `world`; a peer
    that never arrives fails the call after timeout_s (the caller raises it afterwards for transfers)."""
    if dist.is_initialized() and "nccl" in dist.get_backend():  # a kernel may wait on a dead peer for ever and
        _GRAVEYARD.append(keep)  # cannot be polled out of it: abort every communicator (and forget the groups)
        c10d._abort_process_group()
    elif dist.is_initialized():
        _GRAVEYARD.append((c10d._get_default_group(), *keep))
        dist.destroy_process_group()  # also resets the counter that names unnamed groups
    else:
        _GRAVEYARD.append(keep)
    c10d._world.group_count = 0  # a failed init advanced it without a world to destroy: group names would differ
    # between ranks, so no later generation could ever form
    dist.init_process_group(backend, store=dist.PrefixStore(f"gen{gen}/", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def park(*groups) -> None:
    """Keep groups alive until the process ends (a transfer on them may still be pending after a failure)."""
    _GRAVEYARD.append(groups)


def exit_process(code: int) -> None:
    """End the process without running destructors: abandoned groups would wait on dead peers, and store
    clients whose server is gone abort the interpreter's shutdown. Files are closed by then; flush the rest."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
