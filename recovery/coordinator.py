"""The run's coordinator: a TCPStore on a stable host plus one loop that decides membership.

Workers say hello (run id + an HMAC of their uid under the shared secret), beat, and follow plans.
The loop admits or refuses hellos, declares a worker dead when its heartbeat stops (or, on this host,
when its pid is gone), ends the generation (`epoch` += 1: every worker aborts its step), waits until
every live member is ready and every free slot has a replacement (or the join timeout passed), and
writes `plan/<gen>`: who holds which (replica, stage) slot and who is fresh. Keys are write-once per
generation; all live under `flotilla/<run_id>/`.

  python -m recovery.coordinator --port 29400 --replicas 2 --stages 3   (secret in FLOTILLA_SECRET)
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist


def mac(secret: str, run_id: str, uid: str) -> str:
    return hmac.new(secret.encode(), f"{run_id}/{uid}".encode(), hashlib.sha256).hexdigest()


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
    seen: float = field(default_factory=time.monotonic)  # last time its heartbeat counter moved


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

    def __post_init__(self):
        if self.join_timeout_s <= self.heartbeat_timeout_s:
            raise ValueError(f"join timeout {self.join_timeout_s}s must exceed the heartbeat timeout "
                             f"{self.heartbeat_timeout_s}s (timeouts nest: heartbeat < join)")
        self.server, self.store = run_store(self.host, self.port, self.run_id, is_master=True)
        self.workers: dict[str, Worker] = {}
        self.waiting: list[str] = []  # admitted, no slot yet (in arrival order)
        self.members: dict[str, tuple[int, int]] = {}  # uid -> slot in the current (or forming) generation
        self.gen, self.forming, self.since = 0, True, time.monotonic()
        self.hellos = 0
        self.left: set[str] = set()
        self.previous: set[str] = set()  # members of the last plan (the others in a plan are fresh)
        self.active: list[int] = list(range(self.replicas))  # replicas training in the current generation
        self.hostname = socket.gethostname()
        self.store.set("run", json.dumps({"replicas": self.replicas, "stages": self.stages,
                                          "heartbeat_timeout_s": self.heartbeat_timeout_s,
                                          "join_timeout_s": self.join_timeout_s}))
        self.store.set("epoch", "1")
        self.event("coordinator-up", port=self.port)

    def event(self, kind: str, **fields) -> None:
        line = json.dumps({"t": time.time(), "event": kind, **fields})
        print(f"coordinator: {line}", flush=True)
        if self.events_path:
            with open(self.events_path, "a") as fh:
                fh.write(line + "\n")

    def admit(self) -> None:
        n = int(self.store.add("hello/count", 0))
        while self.hellos < n:
            self.hellos += 1
            key = f"hello/{self.hellos}"
            if not has(self.store, key):  # the counter is bumped before the record is written
                self.hellos -= 1
                return
            hello = json.loads(self.store.get(key))
            ok = hmac.compare_digest(hello["mac"], mac(self.secret, self.run_id, hello["uid"]))
            self.store.set(f"welcome/{hello['uid']}", "ok" if ok else "refused: wrong secret for this run")
            self.event("hello" if ok else "refused", uid=hello["uid"], host=hello["host"])
            if ok:
                self.workers[hello["uid"]] = Worker(hello["uid"], hello["pid"], hello["host"])
                self.waiting.append(hello["uid"])

    def alive(self, w: Worker) -> bool:
        beats = int(self.store.add(f"hb/{w.uid}", 0))
        if beats != w.beats:
            w.beats, w.seen = beats, time.monotonic()
        if w.host == self.hostname:
            try:
                os.kill(w.pid, 0)  # same host: a vanished pid is dead now, no need to wait for the timeout
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
        return time.monotonic() - w.seen < self.heartbeat_timeout_s

    def end_generation(self, reason: str, **fields) -> None:
        if not self.forming:
            self.forming, self.since = True, time.monotonic()
            self.store.set("epoch", str(self.gen + 1))
            self.event("generation-ended", gen=self.gen, reason=reason, **fields)

    def check_members(self) -> None:
        for uid in list(self.members):
            if has(self.store, f"left/{uid}"):  # finished its run cleanly
                self.left.add(uid)
                del self.members[uid]
                continue
            if not self.alive(self.workers[uid]):
                slot = self.members.pop(uid)
                self.event("detect", uid=uid, replica=slot[0], stage=slot[1],
                           silent_s=round(time.monotonic() - self.workers[uid].seen, 3))
                self.end_generation("lost", uid=uid)
        self.waiting = [u for u in self.waiting if self.alive(self.workers[u])]
        if not self.forming and int(self.store.add(f"trouble/{self.gen}", 0)) > 0:
            self.end_generation("reported")  # a worker saw a transfer fail: re-form (the dead are found meanwhile)
        if not self.forming and self.waiting and len(self.active) < self.replicas:
            self.end_generation("rejoin")  # a replacement for a replica that sits out: bring it back

    def try_plan(self) -> None:
        taken = set(self.members.values())
        free = [(r, s) for r in range(self.replicas) for s in range(self.stages) if (r, s) not in taken]
        while free and self.waiting:
            uid = self.waiting.pop(0)
            self.members[uid] = free.pop(0)
            self.event("assigned", uid=uid, pid=self.workers[uid].pid, replica=self.members[uid][0],
                       stage=self.members[uid][1])
        active = sorted({r for r in range(self.replicas)} - {r for r, _ in free})
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
        if not all(has(self.store, f"ready/{gen}/{uid}") for uid in plan_members):
            return
        plan = {"gen": gen, "members": {u: list(s) for u, s in plan_members.items()}, "active": active,
                "fresh": [u for u in plan_members if u not in self.previous],  # new, or back from sitting out
                "idle": [u for u in self.members if u not in plan_members]}
        self.store.set(f"plan/{gen}", json.dumps(plan))
        self.gen, self.forming, self.previous, self.active = gen, False, set(plan_members), active
        self.event("re-formed" if gen > 1 else "formed", gen=gen, fresh=plan["fresh"], active=active,
                   seconds=round(time.monotonic() - self.since, 3))

    def finished(self) -> bool:
        """Every worker of the last plan left cleanly (idle ones still waiting are told `finished`)."""
        return bool(self.left) and not (self.previous - self.left)

    def serve(self, poll_s: float = 0.02, exit_when_done: bool = True) -> None:
        while not (exit_when_done and self.finished()):
            self.admit()
            self.check_members()
            if self.forming:
                self.try_plan()
            time.sleep(poll_s)
        self.store.set("finished", "1")
        self.event("run-finished", gen=self.gen)
        time.sleep(2.0)  # spares still waiting read `finished` and leave cleanly


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=29400)
    ap.add_argument("--run-id", default="flotilla")
    ap.add_argument("--replicas", type=int, required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--heartbeat-timeout", type=float, default=2.0)
    ap.add_argument("--join-timeout", type=float, default=60.0)
    ap.add_argument("--events", default="", help="append events (JSON lines) to this file")
    args = ap.parse_args(argv)
    secret = os.environ.get("FLOTILLA_SECRET", "")
    if not secret:
        sys.exit("coordinator: error: set FLOTILLA_SECRET (the run's shared secret) in the environment")
    try:
        coord = Coordinator(args.port, args.run_id, secret, args.replicas, args.stages, args.heartbeat_timeout,
                            args.join_timeout, args.events, args.host)
    except (ValueError, RuntimeError) as err:
        sys.exit(f"coordinator: error: {str(err).splitlines()[0]}")
    coord.serve()


if __name__ == "__main__":
    main()
