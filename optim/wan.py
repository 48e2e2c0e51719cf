"""Replicas at different sites (sync.transport=hivemind): the outer exchange over hivemind, not torch.distributed.

Each site is its own torchrun group (its stages talk over torch.distributed as usual). Every rank also runs a
hivemind DHT node and a DecentralizedAverager keyed by `<wan.run_id>_stage<s>`, so stage s only meets stage s
of the other sites. A rank's place among all sites' replicas of its stage is its slot: site x replicas + replica.

DiLoCo (group: every slot) needs the same mean on every member, to the bit, or the sites' weights drift apart;
hivemind's all-reduce hands each peer avg - x_i to add to its own x_i, which rounds differently per peer. So each
peer writes its pseudo-gradient into its own row of a buffer with one row per slot (zeros elsewhere): the
all-reduce then delivers every other member's row divided by the group size m, computed once by the peer that
reduces that part (nothing else is added to it). A peer computes its own row the same way, and everyone adds the
group's rows in slot order. The price: the buffer has one row per slot, so the bytes are slots x a plain
all-reduce's (2x for two sites). NoLoCo (group: pairs) averages [phi, Delta] directly: its replicas differ anyway.
A group that does not form in time (a late or dead site) leaves the peer alone for that outer step: it keeps its
own vector, warns, and training goes on.

Re-sync (DiLoCo): a site that averaged alone moved its anchor and outer momentum by itself, so when it meets the
others again their outer states differ. Every round gathers each member's digest of its outer state; if they
differ, the reference is the digest most members hold (ties: the lowest slot's), and the group runs one more
round on a second averager (`<prefix>_resync`, so no other round can join it) in which only the reference writes
[anchor, momentum]: each member gets it divided by the group size m, computed once by the peer that reduces that
part, and sets its outer state to m times that, the same bits on every member (within rounding of the
reference's). NoLoCo needs none: its replicas differ by design and pairwise averaging pulls them together.
"""
from __future__ import annotations

import collections
import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import re
import signal
import time

import hivemind
import torch
import torch.distributed as dist
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression, NoCompression
from hivemind.utils import get_dht_time

from config import Config, ConfigError, WanConfig
from dist.comm import CROSS, Comm
from metrics import warn

WIRE = {"fp32": NoCompression(), "bf16": Float16Compression()}  # hivemind has no bf16: 16-bit floats instead


def _expected(record: logging.LogRecord) -> bool:
    """hivemind logs a traceback when no group forms; here that is the expected 'averaging alone' (warned once)."""
    return "could not find a group" not in record.getMessage()


logging.getLogger("hivemind.averaging.averager").addFilter(_expected)


class WanError(ConfigError):
    """The DHT could not be joined: a wrong or unreachable wan.initial_peers entry, or a port in use."""


def _follow_rank() -> None:
    """Runs in each process a rank forks for hivemind (DHT node, averager): when the rank dies without shutting
    them down (killed with its site), they go too, with the p2p daemon the DHT node started, instead of lingering
    as orphans that keep the site's ports. Linux (prctl); elsewhere they linger."""
    os.setpgid(0, 0)  # a process group of its own, which its p2p daemon joins
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "prctl"):
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the rank's (forking) thread ends


def maddr(host: str, port: int) -> str:
    """A TCP multiaddr for a host name or an IPv4/IPv6 address."""
    try:
        kind = "ip4" if ipaddress.ip_address(host).version == 4 else "ip6"
    except ValueError:
        kind = "dns"
    return f"/{kind}/{host}/tcp/{port}"


def start_dht(wan: WanConfig, initial_peers: list[str], port: int, identity_path: str | None) -> hivemind.DHT:
    """A DHT node; joining retries for wan.startup_s, so a site may start before the one it joins."""
    announce = [maddr(wan.announce_host, port)] if wan.announce_host else None
    deadline = time.monotonic() + wan.startup_s
    while True:
        try:
            return hivemind.DHT(initial_peers=initial_peers or None, host_maddrs=[maddr(wan.host, port)],
                                announce_maddrs=announce, client_mode=wan.client_mode, identity_path=identity_path,
                                start=True)
        except Exception as err:  # hivemind raises P2PDaemonError, ValueError, TimeoutError, ...
            if initial_peers and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            reason = re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ", "", reason)  # p2pd's timestamp
            raise WanError(f"could not start a DHT peer on {maddr(wan.host, port)} with wan.initial_peers="
                           f"{initial_peers} (tried for wan.startup_s={wan.startup_s:g}s): {reason}: check the "
                           f"multiaddr (site 0 prints it at start-up), that its site is running and reachable "
                           f"(firewall, wan.announce_host), and that wan.port is free") from None


class SitePeer:
    """This rank's hivemind peer: its DHT node and the averager it shares with the same stage of the other sites."""

    def __init__(self, dht: hivemind.DHT, wan: WanConfig, method: str, precision: str, stage: int, slot: int,
                 slots: int, size: int, comm: Comm, record_path: str):
        self.dht, self.wan, self.slot, self.slots, self.comm = dht, wan, slot, slots, comm
        self.record_path = record_path
        self.prefix = f"{wan.run_id}_stage{stage}"
        self.exact = method == "diloco"
        self.wire = WIRE[precision] if self.exact else NoCompression()
        self.request_timeout = min(3.0, wan.matchmaking_s / 3)  # below min_matchmaking_time (hivemind's deadlock rule)
        ctrl_c = signal.getsignal(signal.SIGINT)
        self.averager = DecentralizedAverager(
            [torch.zeros(slots if self.exact else 1, size)], dht, start=True, prefix=self.prefix,
            target_group_size=slots if self.exact else 2, min_group_size=2, min_matchmaking_time=wan.matchmaking_s,
            request_timeout=self.request_timeout, allreduce_timeout=wan.averaging_s,
            next_chunk_timeout=wan.averaging_s / 3, compression=self.wire)
        self.resync = DecentralizedAverager(
            [torch.zeros(1, 2 * size)], dht, start=True, prefix=f"{self.prefix}_resync", target_group_size=slots,
            min_group_size=2, min_matchmaking_time=wan.matchmaking_s, request_timeout=self.request_timeout,
            allreduce_timeout=wan.averaging_s, next_chunk_timeout=wan.averaging_s / 3,
            compression=NoCompression()) if self.exact else None
        signal.signal(signal.SIGINT, ctrl_c)  # hivemind ignores Ctrl-C here, for its child: not for the trainer

    def meet(self) -> None:
        """Wait (up to wan.startup_s) until every slot of this stage has announced itself in the DHT, so that the
        first outer step finds all sites. (A long first matchmaking round would not do: hivemind keeps a peer's
        declaration until its expiry and refuses earlier-expiring ones, which would block the next rounds.)"""
        key, deadline = f"{self.prefix}_slots", time.monotonic() + self.wan.startup_s
        expiry = get_dht_time() + 2 * self.wan.startup_s
        while True:
            self.dht.store(key, subkey=self.slot, value=True, expiration_time=expiry)  # again: a store can fail
            found = self.dht.get(key, latest=True)
            seen = len(found.value) if found is not None and isinstance(found.value, dict) else 0
            if seen >= self.slots:
                return
            if time.monotonic() > deadline:
                warn(f"wan: only {seen} of {self.slots} peers of {self.prefix} showed up within wan.startup_s="
                     f"{self.wan.startup_s:g}s: starting without the others")
                return
            time.sleep(0.5)

    def _round_trip(self, t: torch.Tensor) -> torch.Tensor:
        """t as a peer receives it through the wire format."""
        return self.wire.extract(self.wire.compress(t, None))

    def mean(self, vec: torch.Tensor, step: int, outer: list[torch.Tensor] | None = None) -> torch.Tensor:
        """DiLoCo: vec's mean over this outer step's group, the same bits on every member (vec itself if alone).
        outer: this peer's flat [anchor, momentum]; if the members' differ, every member takes the reference's
        (in place; see the module docstring)."""
        digest = hashlib.blake2b(b"".join(t.detach().cpu().numpy().tobytes() for t in outer),
                                 digest_size=16).hexdigest() if outer else ""
        members, digests = self._exchange(vec, self.slot, step, digest)
        if len(members) == 1:
            return vec.clone()
        with self.averager.get_tensors() as (buf,):
            rows = self._round_trip(buf[members])  # rows this peer reduced itself skipped the wire: round them too
        rows[members.index(self.slot)] = self._round_trip(self._round_trip(vec) / len(members))
        total = torch.zeros_like(vec)
        for row in rows:
            total += row
        if outer and len(set(digests.values())) > 1:
            self._resync(outer, members, digests, step)
        return total

    def _resync(self, outer: list[torch.Tensor], members: list[int], digests: dict[int, str], step: int) -> None:
        """Every member of this round's group takes the reference member's outer state (module docstring)."""
        held = collections.Counter(digests.values())
        reference = min(members, key=lambda s: (-held[digests[s]], s))
        flat, m = torch.cat(outer).cpu(), len(members)
        with self.resync.get_tensors() as (buf,):
            buf.zero_()
            if self.slot == reference:
                buf[0] = flat
        try:
            gathered = self.resync.step(gather=(self.slot, step),
                                        timeout=self.wan.matchmaking_s + 2 * self.request_timeout)
            group = sorted(tuple(v) for v in gathered.values())  # (slot, step) of each member
        except Exception as err:  # the group broke up: stay as is, the next round tries again
            group = [f"{type(err).__name__}"]
        if group != [(s, step) for s in members]:
            warn(f"wan: outer step at step {step}: could not re-sync the outer state with slots {members} ({group})")
            return
        with self.resync.get_tensors() as (buf,):
            row = flat / m if self.slot == reference else buf[0].clone()
        for t, new in zip(outer, (row * m).split([t.numel() for t in outer])):
            t.copy_(new)
        self.comm.count(CROSS, 2 * (m - 1) / m * flat.numel() * 4)
        if self.slot != reference:
            warn(f"wan: outer step at step {step}: outer states differed; took slot {reference}'s")
        with open(self.record_path, "a") as fh:
            fh.write(json.dumps({"step": step, "resync_from": reference, "group": members}) + "\n")

    def pair_mean(self, vec: torch.Tensor, step: int) -> torch.Tensor:
        """NoLoCo: vec's mean with one other peer (vec itself if none came)."""
        members, _ = self._exchange(vec, 0, step)
        if len(members) == 1:
            return vec.clone()
        with self.averager.get_tensors() as (buf,):
            return buf[0].clone()

    def _exchange(self, vec: torch.Tensor, row: int, step: int, digest: str = "") -> tuple[list[int], dict[int, str]]:
        """One hivemind averaging round with vec in `row` of the buffer; returns the group's slots, in order, and
        each member's digest of its outer state."""
        with self.averager.get_tensors() as (buf,):
            buf.zero_()
            buf[row] = self._round_trip(vec)
        t0 = time.monotonic()
        try:
            gathered = self.averager.step(gather=(self.slot, digest),
                                          timeout=self.wan.matchmaking_s + 2 * self.request_timeout)
            digests = dict(gathered.values())
            members, reason = sorted(s for s, _ in gathered.values()), "no other site joined"
        except Exception as err:  # no group in time, or the group broke up: hivemind raises several kinds
            members, reason = [self.slot], f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if len(set(members)) < len(members):
            members, reason = [self.slot], f"two peers share a slot ({members}): give every site its own wan.site"
        if members == [self.slot]:
            digests = {self.slot: digest}
        seconds = time.monotonic() - t0
        sent = 0.0
        if len(members) > 1:  # counted as a butterfly all-reduce of the buffer sends: 2 (m - 1) / m of it
            with self.averager.get_tensors() as (buf,):
                wire_bytes = buf.numel() * (2 if isinstance(self.wire, Float16Compression) else 4)
            sent = 2 * (len(members) - 1) / len(members) * wire_bytes
            self.comm.count(CROSS, sent)
        else:
            warn(f"wan: outer step at step {step}: averaging alone after {seconds:.1f}s ({reason})")
        with open(self.record_path, "a") as fh:
            fh.write(json.dumps({"step": step, "group": members, "seconds": round(seconds, 3), "bytes": sent}) + "\n")
        return members, digests

    def shutdown(self) -> None:
        self.averager.shutdown()
        if self.resync:
            self.resync.shutdown()
        self.dht.shutdown()


def join_sites(cfg: Config, module: torch.nn.Module, stage: int, replica: int, replicas: int, comm: Comm,
               grid_rank: int) -> SitePeer:
    """Start this rank's peer (called by every rank of the site). Site rank 0 joins wan.initial_peers (or starts
    a new DHT) and prints its address; the site's other ranks bootstrap from it too, so a site needs to know one
    address of another site, and a rank that dies takes only its own peer with it."""
    wan, rank = cfg.wan, dist.get_rank()
    os.register_at_fork(after_in_child=_follow_rank)
    port = wan.port + rank if wan.port else 0
    box: list = [None]
    if rank == 0:
        try:
            dht = start_dht(wan, wan.initial_peers, port, wan.identity_path or None)
            box[0] = ("ok", [str(a) for a in dht.get_visible_maddrs()])
        except WanError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    status, found = box[0]
    if status == "error":
        raise WanError(found)
    if rank == 0:
        public = next((a for a in found if not a.startswith(("/ip4/127.", "/ip6/::1/"))), found[0])
        print(f"flotilla: wan site {wan.site}/{wan.sites} DHT peer at {' '.join(found)} "
              f"(other sites: wan.initial_peers=[{public}])", flush=True)
    else:
        dht = start_dht(wan, [*wan.initial_peers, *found], port, None)
    size = sum(p.numel() for p in module.parameters()) * (1 if cfg.sync.method == "diloco" else 2)
    record_path = os.path.join(cfg.log.run_dir, "wan", f"rank{grid_rank}.jsonl")
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    peer = SitePeer(dht, wan, cfg.sync.method, cfg.sync.precision, stage, wan.site * replicas + replica,
                    wan.sites * replicas, size, comm, record_path)
    peer.meet()
    return peer
