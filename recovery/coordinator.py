"""The run's coordinator: a TCPStore on a stable host plus one loop that decides membership.

Workers say hello (run id + an HMAC of their uid under the shared secret), beat, and follow plans.
Every state-changing value in the store is signed with the secret (`SignedStore`: HMAC over run id, key
and value) and every reader verifies it, so a client without the secret cannot admit itself, end a
generation, forge a plan or finish the run: the bare TCPStore is a transport, not the trust boundary.
The loop admits or refuses hellos, declares a worker dead when its heartbeat stops (or, on this host,
when its pid is gone), ends the generation (`epoch` += 1: every worker aborts its step), waits until
every live member is ready and every free slot has a replacement (or the join timeout passed), and
writes `plan/<gen>`: who holds which (replica, stage, lane) slot and who is fresh. Keys are write-once per
generation; all live under `flotilla/<run_id>/`.

  python -m recovery.coordinator --port 29400 --replicas 2 --stages 3 [--lanes 2]   (secret in FLOTILLA_SECRET)
"""
from __future__ import annotations

import os

os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # before torch loads (see train.py)

import argparse
import hashlib
import hmac
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


def mac(secret: str, run_id: str, message: str) -> str:
    return hmac.new(secret.encode(), f"{run_id}/{message}".encode(), hashlib.sha256).hexdigest()


class SignedStore:
    """The run's store where every value is `value|HMAC(run id, key, value)`: a value that does not verify
    (written by a client without the secret) reads as absent. Keys bind the signature, so a signed value
    cannot be replayed under another key; counters that must not be replayed carry their count in the value."""

    def __init__(self, store, secret: str, run_id: str):
        self.raw, self.secret, self.run_id = store, secret, run_id

    def _tag(self, key: str, value: str) -> str:
        return mac(self.secret, self.run_id, f"{key}={value}")[:32]

    def put(self, key: str, value: str) -> None:
        self.raw.set(key, f"{value}|{self._tag(key, value)}")

    def get(self, key: str) -> str | None:
        """The verified value, or None when the key is missing or its value is not signed with the secret."""
        if not has(self.raw, key):
            return None
        value, _, tag = self.raw.get(key).decode(errors="replace").rpartition("|")
        return value if hmac.compare_digest(tag, self._tag(key, value)) else None

    def has(self, key: str) -> bool:
        return self.get(key) is not None


def run_store(host: str, port: int, run_id: str, is_master: bool, timeout_s: float = 10.0):
    """A client (or the server) of the run's store, under the run's key prefix."""
    store = dist.TCPStore(host, port, is_master=is_master, wait_for_workers=False, timeout=timedelta(seconds=timeout_s),
                          use_libuv=True)
    return store, dist.PrefixStore(f"flotilla/{run_id}/", store)


def has(store, key: str) -> bool:
    return store.check([key])


@dataclass
class Worker:
    uid: str
    pid: int
    host: str
    beats: int = 0
    seen: float = field(default_factory=time.monotonic)  # last time its (signed) heartbeat counter moved


@dataclass
class Coordinator:
    port: int
    run_id: str
    secret: str
    replicas: int
    stages: int
    heartbeat_timeout_s: float = 2.0
    join_timeout_s: float = 60.0
    events_path: str = ""
    host: str = "0.0.0.0"
    lanes: int = 1

    def __post_init__(self):
        if self.join_timeout_s <= self.heartbeat_timeout_s:
            raise ValueError(f"join timeout {self.join_timeout_s}s must exceed the heartbeat timeout "
                             f"{self.heartbeat_timeout_s}s (timeouts nest: heartbeat < join)")
        self.server, self.store = run_store(self.host, self.port, self.run_id, is_master=True)
        self.signed = SignedStore(self.store, self.secret, self.run_id)
        self.workers: dict[str, Worker] = {}
        self.waiting: list[str] = []  # admitted, no slot yet (in arrival order)
        self.members: dict[str, tuple[int, int, int]] = {}  # uid -> (replica, stage, lane) slot in the current (or forming) generation
        self.gen, self.forming, self.since = 0, True, time.monotonic()
        self.hellos = 0  # every hello up to this one is handled
        self.hellos_done: set[int] = set()  # handled hellos after a gap
        self.hellos_missing: dict[int, float] = {}  # counted, not written yet: since when
        self.ticked = 0.0
        self.left: set[str] = set()
        self.previous: set[str] = set()  # members of the last plan (the others in a plan are fresh)
        self.active: list[int] = list(range(self.replicas))  # replicas training in the current generation
        self.affected: set[int] = set()  # replicas that lost a member since the last generation ended
        self.hostname = socket.gethostname()
        self.signed.put("run", json.dumps({"replicas": self.replicas, "stages": self.stages, "lanes": self.lanes,
                                           "heartbeat_timeout_s": self.heartbeat_timeout_s,
                                           "join_timeout_s": self.join_timeout_s, "launch": time.time()}))
        self.signed.put("epoch", "1")
        self.event("coordinator-up", port=self.port)

    def event(self, kind: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": kind, **fields})
        print(f"coordinator: {line}", flush=True)
        if self.events_path:
            with open(self.events_path, "a") as fh:
                fh.write(line + "\n")

    def admit(self) -> None:
        """Hellos in any order; one counted but never written (a client without the secret) is dropped after 5 s
        without holding up those after it."""
        n, now = int(self.store.add("hello/count", 0)), time.monotonic()
        for i in range(self.hellos + 1, n + 1):
            if i in self.hellos_done:
                continue
            if has(self.store, f"hello/{i}"):
                self.read_hello(f"hello/{i}")
                self.hellos_done.add(i)
            elif now - self.hellos_missing.setdefault(i, now) > 5.0:
                self.event("refused", hello=i, reason="counted but never written")
                self.hellos_done.add(i)
        while self.hellos + 1 in self.hellos_done:
            self.hellos += 1
            self.hellos_done.discard(self.hellos)
            self.hellos_missing.pop(self.hellos, None)

    def read_hello(self, key: str) -> None:
        try:
            hello = json.loads(self.store.get(key))
            uid, ok = str(hello["uid"]), hmac.compare_digest(str(hello["mac"]), mac(self.secret, self.run_id, hello["uid"]))
        except (ValueError, KeyError, TypeError):
            self.event("refused", key=key, reason="not a hello")
            return
        if ok and uid not in self.workers:
            self.signed.put(f"welcome/{uid}", "ok")
            self.workers[uid] = Worker(uid, int(hello["pid"]), str(hello["host"]))
            self.waiting.append(uid)
            self.event("hello", uid=uid, host=hello["host"])
        else:
            self.store.set(f"welcome/{uid}", "refused: wrong secret for this run")
            self.event("refused", uid=uid, host=hello.get("host"))

    def alive(self, w: Worker) -> bool:
        beats = int(self.signed.get(f"hb/{w.uid}") or 0)  # signed counts: a replayed or forged beat does not move it
        if beats > w.beats:
            w.beats, w.seen = beats, time.monotonic()
        if w.host == self.hostname:
            try:
                os.kill(w.pid, 0)  # same host: a vanished pid is dead now, no need to wait for the timeout
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return time.monotonic() - w.seen < self.heartbeat_timeout_s

    def end_generation(self, reason: str, replicas: set[int], **fields) -> None:
        """End the generation (once), naming the replicas that lost a member: `ending/<gen+1>`, signed, written
        before the epoch moves and grown by later losses while the next one forms. Workers of other replicas may
        train on to their next outer step (DiLoCo) before they get ready."""
        if not self.forming:
            self.forming, self.since, self.affected = True, time.monotonic(), set(replicas)
            self.signed.put(f"ending/{self.gen + 1}", json.dumps(sorted(self.affected)))
            self.signed.put("epoch", str(self.gen + 1))
            self.event("generation-ended", gen=self.gen, reason=reason, replicas=sorted(replicas), **fields)
        elif not replicas <= self.affected:
            self.affected |= replicas
            self.signed.put(f"ending/{self.gen + 1}", json.dumps(sorted(self.affected)))

    def check_members(self) -> None:
        for uid in list(self.members):
            if self.signed.has(f"left/{uid}"):  # finished its run cleanly
                self.left.add(uid)
                del self.members[uid]
                continue
            if not self.alive(self.workers[uid]):
                slot = self.members.pop(uid)
                self.event("detect", uid=uid, replica=slot[0], stage=slot[1], lane=slot[2],
                           silent_s=round(time.monotonic() - self.workers[uid].seen, 3))
                self.end_generation("lost", {slot[0]}, uid=uid)
        self.waiting = [u for u in self.waiting if self.alive(self.workers[u])]
        reports = {u: self.signed.get(f"trouble/{self.gen}/{u}") for u in self.members}
        reporters = [u for u, kind in reports.items() if kind]
        if reporters:  # a worker saw a transfer fail (or stopped while its replica trained on): end the generation;
            # its replica re-forms at once if the peer may have been one of its own (the dead are found meanwhile)
            self.end_generation("reported", {self.members[u][0] for u in reporters if reports[u] == "replica"},
                                by=reporters[0])
        if not self.forming and self.waiting and len(self.active) < self.replicas:
            self.end_generation("rejoin", set())  # a replacement for a replica that sits out: bring it back

    def try_plan(self) -> None:
        taken = set(self.members.values())
        free = [(r, s, lane) for r in range(self.replicas) for s in range(self.stages) for lane in range(self.lanes)
                if (r, s, lane) not in taken]
        while free and self.waiting:
            uid = self.waiting.pop(0)
            self.members[uid] = free.pop(0)
            replica, stage, lane = self.members[uid]
            self.event("assigned", uid=uid, pid=self.workers[uid].pid, replica=replica, stage=stage, lane=lane)
        active = sorted({r for r in range(self.replicas)} - {r for r, _, _ in free})
        if free:
            if self.gen == 0 or time.monotonic() - self.since < self.join_timeout_s:
                return
            if not active:  # nothing can train without a replacement: keep waiting
                self.event("waiting-for-replacement", free=free, seconds=round(time.monotonic() - self.since, 1))
                self.since = time.monotonic()
                return
            # no replacement in time: replicas missing a stage sit out (they wait, idle) and the others go on
        gen = self.gen + 1
        plan_members = {u: s for u, s in self.members.items() if s[0] in active}
        late = [uid for uid in plan_members if not self.signed.has(f"ready/{gen}/{uid}")]
        stuck = [uid for uid in late if uid in self.previous  # members of the last plan (a newcomer is ready at
                 and not self.signed.has(f"deferring/{gen}/{uid}")]  # once; one training on to an outer step beats)
        if stuck and time.monotonic() - self.since > self.join_timeout_s:
            for uid in stuck:  # alive but stuck in a phase for longer than any phase may take: its slot is given away
                slot = self.members.pop(uid)
                self.event("detect", uid=uid, replica=slot[0], stage=slot[1], lane=slot[2], reason="not ready")
                self.end_generation("not ready", {slot[0]})
            self.since = time.monotonic()
            return
        if late:
            return
        plan = {"gen": gen, "members": {u: list(s) for u, s in plan_members.items()}, "active": active,
                "fresh": [u for u in plan_members if u not in self.previous],  # new, or back from sitting out
                "idle": [u for u in self.members if u not in plan_members]}
        self.signed.put(f"plan/{gen}", json.dumps(plan))
        self.gen, self.forming, self.previous, self.active = gen, False, set(plan_members), active
        self.event("re-formed" if gen > 1 else "formed", gen=gen, fresh=plan["fresh"], active=active,
                   seconds=round(time.monotonic() - self.since, 3))

    def finished(self) -> bool:
        """Every worker of the last plan left cleanly (idle ones still waiting are told `finished`)."""
        return bool(self.left) and not (self.previous - self.left)

    def guard(self) -> None:
        """Undo a client without the secret overwriting the epoch; show waiting workers the loop is alive."""
        if self.signed.get("epoch") != str(self.gen + 1 if self.forming else self.gen):
            self.signed.put("epoch", str(self.gen + 1 if self.forming else self.gen))
            self.event("tampered", key="epoch")
        if time.monotonic() - self.ticked > 0.5:
            self.ticked = time.monotonic()
            self.signed.put("tick", str(self.ticked))

    def serve(self, poll_s: float = 0.02, exit_when_done: bool = True) -> None:
        while not (exit_when_done and self.finished()):
            self.admit()
            self.check_members()
            if self.forming:
                self.try_plan()
            self.guard()
            time.sleep(poll_s)
        self.signed.put("finished", "1")
        self.event("run-finished", gen=self.gen)
        time.sleep(2.0)  # spares still waiting read `finished` and leave cleanly


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=29400)
    ap.add_argument("--run-id", default="flotilla")
    ap.add_argument("--replicas", type=int, required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--lanes", type=int, default=1, help="workers per stage of a replica (parallel.lanes)")
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--join-timeout", type=float, default=60.0)
    ap.add_argument("--events", default="", help="append events (JSON lines) to this file")
    args = ap.parse_args(argv)
    secret = os.environ.get("FLOTILLA_SECRET", "")
    if not secret:
        sys.exit("coordinator: error: set FLOTILLA_SECRET (the run's shared secret) in the environment")
    try:
        coord = Coordinator(args.port, args.run_id, secret, args.replicas, args.stages, args.heartbeat_timeout,
                            args.join_timeout, args.events, args.host, args.lanes)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"coordinator: error: {str(err).splitlines()[0]}")
    coord.serve()


if __name__ == "__main__":
    main()
