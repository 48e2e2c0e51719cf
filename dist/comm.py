"""Every transfer goes through here: torch.distributed calls wrapped with a byte and call counter per link class."""
from __future__ import annotations

import io
import threading
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from recovery import hooks

INTRA = "intra_replica"  # between stages of one replica (activations, gradients of activations)
CROSS = "cross_replica"  # between replicas of one stage (gradient / weight sync)
LANE = "intra_stage"  # between lanes of one stage (gradient sync)
SP = "sequence_parallel"  # the all-to-alls of sequence-parallel attention, between lanes (counted apart from totals)
IN_REPLICA = (INTRA, LANE, SP)  # links whose peers are all of this rank's replica


class GenerationLost(RuntimeError):
    """A transfer failed (a peer died) or the coordinator ended this generation: abandon the step."""

    def __init__(self, msg: str, transfer_failed: bool, within_replica: bool = True):
        super().__init__(msg)
        self.transfer_failed = transfer_failed  # False: the coordinator (or a deadline) ended it
        self.within_replica = within_replica  # the failed transfer's peer may be of this replica (not only another)


class WrongDevice(RuntimeError):
    """A tensor handed to a collective is not on the device its group's backend works on (a bug, not a fault)."""


class Comm:
    """Counts bytes this rank sends per link class, collective calls and point-to-point transfers.

    Bytes are counted as a ring would send them: an all-reduce over n ranks sends 2 (n - 1) / n of
    the tensor, an all-gather (n - 1) times this rank's part; a point-to-point transfer its size.
    Every tensor handed to a transfer must live on `device` (NCCL takes only this rank's GPU; we hold gloo to
    the same rule, so a CPU run catches what would fail on GPUs).
    """

    def __init__(self, abort=None, ending=None, lease=None, device: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self.abort = abort  # threading.Event set when the generation ends (recovery on); None: plain blocking waits
        self.lease = lease  # called before every transfer: returns once membership is confirmed (or abort is set)
        self.ending = ending  # set while this rank's replica trains on to its next outer step after the generation
        # ended elsewhere (DiLoCo): transfers inside the replica go on, any other raises GenerationLost
        self.bytes_sent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)  # collectives
        self.p2p: dict[str, int] = defaultdict(int)  # point-to-point transfers
        self.blocked_s: dict[str, float] = defaultdict(float)  # seconds spent waiting for transfers, per link class

    def all_reduce(self, tensor: torch.Tensor, group, link: str, op=dist.ReduceOp.SUM) -> None:
        work = self.start_all_reduce(tensor, group, link, op)
        if work is not None:
            self.wait(work, link)

    def start_all_reduce(self, tensor: torch.Tensor, group, link: str, op=dist.ReduceOp.SUM):
        """Start an in-place all-reduce and return its pending work (None for a group of one): `wait` it later,
        and leave `tensor` alone until then (an exchange overlapped with compute)."""
        n = dist.get_world_size(group)
        if n == 1:
            return None
        work = self._issue(dist.all_reduce, tensor, op=op, group=group, async_op=True)
        self.bytes_sent[link] += 2 * (n - 1) / n * tensor.numel() * tensor.element_size()
        self.calls[link] += 1
        return work

    def all_gather(self, tensor: torch.Tensor, group, link: str) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape everywhere), in group rank order."""
        out, work = self.start_all_gather(tensor, group, link)
        if work is not None:
            self.wait(work, link)
        return out

    def start_all_gather(self, tensor: torch.Tensor, group, link: str) -> tuple[list[torch.Tensor], object]:
        """Start an all-gather: (the list it fills, its pending work, None for a group of one)."""
        n = dist.get_world_size(group)
        if n == 1:
            return [tensor], None
        out = [torch.empty_like(tensor) for _ in range(n)]
        work = self._issue(dist.all_gather, out, tensor, group=group, async_op=True)
        self.bytes_sent[link] += (n - 1) * tensor.numel() * tensor.element_size()
        self.calls[link] += 1
        return out, work

    def all_to_all(self, tensor: torch.Tensor, group, link: str = SP) -> torch.Tensor:
        """Row i of `tensor` (first dimension: the group size) to group rank i; row j of the result from rank j."""
        n = dist.get_world_size(group)
        out = torch.empty_like(tensor)
        work = self._issue(dist.all_to_all_single, out, tensor.contiguous(), group=group, async_op=True)
        nbytes = (n - 1) / n * tensor.numel() * tensor.element_size()  # what this rank sends to the others
        self.bytes_sent[link] += nbytes
        self.calls[link] += 1
        self.wait(work, link)
        hooks.at("all_to_all", nbytes=nbytes, group_size=n)  # benches emulate a slower link here
        return out

    def send(self, tensor: torch.Tensor, pair, link: str = INTRA):
        """Start sending to the other ranks of a group (a 2-rank group: its peer); returns the pending work."""
        work = self._issue(dist.broadcast, tensor, src=dist.get_rank(), group=pair, async_op=True)
        self.bytes_sent[link] += tensor.numel() * tensor.element_size()
        self.p2p[link] += 1
        return work

    def recv(self, tensor: torch.Tensor, pair, src: int, link: str = INTRA) -> torch.Tensor:
        """Receive into `tensor` from global rank `src` of a 2-rank group (broadcast: pollable on gloo)."""
        self.wait(self._issue(dist.broadcast, tensor, src=src, group=pair, async_op=True), link)
        return tensor

    def exchange(self, tensor: torch.Tensor, pair, peer: int, link: str = CROSS) -> torch.Tensor:
        """Swap equal-shaped tensors with the other rank of a 2-rank group (point to point, no collective)."""
        me = dist.get_rank()
        theirs = torch.empty_like(tensor)
        for src in sorted((me, peer)):  # both ends issue the two transfers in the same order
            if src == me:
                self.wait(self.send(tensor, pair, link), link)
            else:
                self.recv(theirs, pair, src, link)
        return theirs

    def barrier(self, group=None, link: str = "control") -> None:
        """Every rank of the group got here (an all-reduce of one number: pollable, unlike dist.barrier)."""
        self.all_reduce(torch.zeros(1, device=self.device), group, link)

    def broadcast_object(self, obj, src: int, group=None, link: str = "control"):
        """`obj` of global rank `src` on every rank of the group: its size, then its bytes (broadcasts, so every
        wait is pollable, unlike dist.broadcast_object_list). The source gets its own object back."""
        if dist.get_rank() == src:
            buf = io.BytesIO()
            torch.save(obj, buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8).to(self.device)
            self.wait(self.send(torch.tensor([data.numel()], device=self.device), group, link), link)
            self.wait(self.send(data, group, link), link)
            return obj
        n = self.recv(torch.zeros(1, dtype=torch.int64, device=self.device), group, src, link)
        data = self.recv(torch.empty(int(n), dtype=torch.uint8, device=self.device), group, src, link)
        return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=False, map_location=self.device)

    def blocking(self, fn, what: str):
        """Run a call that makes its own collectives we cannot poll (DCP's save and load): on a thread, watching
        the abort flag, so an ended generation does not wait for the group timeout. Returns fn's result or raises
        its error (the caller tells a peer's failure from its own)."""
        if self.abort is None:
            return fn()
        box: dict = {}

        def target():
            try:
                box["result"] = fn()
            except BaseException as err:  # handed to the caller's thread
                box["error"] = err

        thread = threading.Thread(target=target, name=what, daemon=True)  # abandoned on abort: its groups are parked
        thread.start()
        while thread.is_alive():
            if self.abort.is_set() or (self.ending is not None and self.ending.is_set()):
                raise GenerationLost(f"the generation ended during {what}", False)
            thread.join(0.01)
        if "error" in box:
            raise box["error"]
        return box["result"]

    def count(self, link: str, nbytes: float) -> None:
        """A collective made outside torch.distributed (hivemind's averaging across sites), counted like the others."""
        self.bytes_sent[link] += nbytes
        self.calls[link] += 1

    def _issue(self, fn, *args, **kwargs):
        for arg in args:
            for t in arg if isinstance(arg, list) else (arg,):
                if isinstance(t, torch.Tensor) and t.device != self.device:
                    raise WrongDevice(f"a {t.dtype} tensor on {t.device} was handed to {fn.__name__} of a group on "
                                      f"{self.device}: create it with device=comm.device")
        if self.lease is not None:
            self.lease()
            if self.abort.is_set():
                raise GenerationLost("the coordinator ended this generation", False)
        try:
            return fn(*args, **kwargs)
        except RuntimeError as err:
            if self.abort is None:
                raise
            raise GenerationLost(str(err).splitlines()[0], True) from None

    def wait(self, work, link: str = INTRA) -> None:
        """Wait for a transfer; with recovery on, poll it so that a dead peer or an ended generation
        raises GenerationLost instead of blocking until the group timeout (while `ending`, only a transfer
        between the stages or lanes of this replica may go on). The time spent here is counted in blocked_s."""
        start = time.perf_counter()
        try:
            self._wait(work, link)
        finally:
            self.blocked_s[link] += time.perf_counter() - start

    def _wait(self, work, link: str) -> None:
        if self.abort is None:
            work.wait()
            return
        if self.ending is not None and self.ending.is_set() and link not in IN_REPLICA:
            raise GenerationLost(f"the generation ended: this replica stops at its {link} transfer", False)
        pause = 5e-5
        while not work.is_completed():
            if self.abort.is_set() or (self.ending is not None and self.ending.is_set() and link not in IN_REPLICA):
                raise GenerationLost("the coordinator ended this generation", False)
            time.sleep(pause)
            pause = min(2 * pause, 5e-4)  # short: every wait adds up to one pause of latency to the step
        try:
            work.wait()
        except RuntimeError as err:
            raise GenerationLost(str(err).splitlines()[0], True, link in IN_REPLICA) from None

    def blocked(self) -> tuple[float, float]:
        """Seconds blocked so far (waiting on this replica's peers: pipeline, SP, control; syncing: between replicas
        and between the lanes of a stage)."""
        syncing = self.blocked_s[CROSS] + self.blocked_s[LANE]
        return sum(self.blocked_s.values()) - syncing, syncing

    def totals(self) -> dict[str, float]:
        out = {INTRA: self.bytes_sent[INTRA], CROSS: self.bytes_sent[CROSS]}
        if LANE in self.bytes_sent:
            out[LANE] = self.bytes_sent[LANE]
        return out
