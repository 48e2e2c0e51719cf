"""A worker's side of membership: hello to the coordinator, signed heartbeats, abort on a new epoch, fencing,
waiting for plans. Every value this worker trusts or writes in the store is signed (coordinator.SignedStore)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from dist.comm import GenerationLost
from recovery.coordinator import SignedStore, has, mac, run_store


class MembershipError(RuntimeError):
    """Refused, evicted or cut off from the coordinator; one line naming the fix."""


class CoordinatorLost(MembershipError):
    pass


class RunFinished(Exception):
    """The run ended while this worker waited as a spare."""


@dataclass
class Plan:
    gen: int
    slots: dict[str, tuple[int, int, int]]  # uid -> (replica, stage, lane)
    fresh: list[str]  # new workers, and workers back from sitting out: their stage is rebuilt
    active: tuple[int, ...]  # replicas in this generation


class Member:
    """This process in the run. `abort` is set when the generation ends (or the coordinator is gone):
    every wait on a transfer polls it, so a blocked step ends within one poll. `check_fence()` raises once
    this worker's generation has ended: called before every write, so an evicted worker that wakes up
    (SIGCONT after its slot was given away) appends nothing."""

    def __init__(self, address: str, run_id: str, heartbeat_s: float, hello_timeout_s: float = 30.0):
        host, _, port = address.rpartition(":")
        self.address, self.run_id, self.heartbeat_s = address, run_id, heartbeat_s
        self.uid = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.abort, self.lost, self._stop = threading.Event(), threading.Event(), threading.Event()
        self.ending = threading.Event()  # the generation ended elsewhere; this replica trains on to an outer step
        self.defer_replica: int | None = None  # this worker's replica, when it may train on (DiLoCo, rejoin=skip)
        self.gen = 0
        self._lock = threading.Lock()  # gen and abort change together
        secret = os.environ.get("FLOTILLA_SECRET", "")
        try:
            raw, store = run_store(host, int(port), run_id, is_master=False)
        except RuntimeError as err:
            raise CoordinatorLost(f"cannot reach the coordinator at {address} ({str(err).splitlines()[0][:80]}): "
                                  f"start it (python -m recovery.coordinator) or fix recovery.coordinator") from None
        self.raw, self.store, self.signed = raw, store, SignedStore(store, secret, run_id)
        with self._store_errors():
            self._hello(secret, hello_timeout_s)
            self._beat_store = SignedStore(run_store(host, int(port), run_id, is_master=False)[1], secret, run_id)
        self.confirmed = time.monotonic()  # when a heartbeat last found this worker's generation current
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def _store_errors(self):
        """A store call that fails (the coordinator went away mid-call) ends in CoordinatorLost, one line."""
        try:
            yield
        except MembershipError:
            raise
        except RuntimeError as err:
            self.lost.set()
            raise CoordinatorLost(f"the coordinator at {self.address} is gone ({str(err).splitlines()[0][:80]})") \
                from None

    def _hello(self, secret: str, hello_timeout_s: float) -> None:
        address, run_id = self.address, self.run_id
        if not has(self.store, "run"):
            raise MembershipError(f"no run '{run_id}' at the coordinator {address}: check recovery.run_id")
        i = int(self.store.add("hello/count", 1))
        self.store.set(f"hello/{i}", json.dumps({"uid": self.uid, "mac": mac(secret, run_id, self.uid),
                                                  "pid": os.getpid(), "host": socket.gethostname()}))
        deadline = time.monotonic() + hello_timeout_s
        while not has(self.store, f"welcome/{self.uid}"):
            if time.monotonic() > deadline:
                raise CoordinatorLost(f"the coordinator at {address} did not answer within {hello_timeout_s:.0f}s")
            time.sleep(0.02)
        if self.signed.get(f"welcome/{self.uid}") != "ok":
            answer = self.store.get(f"welcome/{self.uid}").decode(errors="replace").rpartition("|")[0] or "refused"
            raise MembershipError(f"refused by the coordinator at {address}: {answer.removeprefix('refused: ')} "
                                  f"(set FLOTILLA_SECRET to the run's secret)")
        settings = self.signed.get("run")
        if settings is None:
            raise MembershipError(f"the run settings at {address} are not signed with this secret: check "
                                  f"FLOTILLA_SECRET and recovery.run_id")
        self.settings = json.loads(settings)

    @property
    def launch(self) -> float:
        """When the coordinator started: with the generation, it orders every record across relaunches."""
        return float(self.settings["launch"])

    def epoch(self, store: SignedStore | None = None) -> int:
        """The coordinator's current epoch (a value not signed with the secret is ignored: reads as unchanged)."""
        value = (store or self.signed).get("epoch")
        return int(value) if value is not None else self.gen

    def _beat(self) -> None:
        beats = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                beats += 1
                self._beat_store.put(f"hb/{self.uid}", str(beats))
                epoch = self.epoch(self._beat_store)
            except Exception:  # any store failure: the coordinator is gone
                self.lost.set()
                self.abort.set()
                return
            with self._lock:
                if epoch > self.gen and not self.abort.is_set():
                    self._on_ended(epoch, self._beat_store)
            self.confirmed = started
            self._stop.wait(self.heartbeat_s)

    def hold_lease(self) -> None:
        """Return once a heartbeat of the last 3 intervals found this worker's generation current, or `abort` is set.
        The coordinator evicts only after a silence of >= 3 intervals, so a worker that was frozen (SIGSTOP) longer
        must hear from it before it sends again: on its old groups, others may hold receives they abandoned, and
        gloo aborts the process that gets data of another size than it posted."""
        while time.monotonic() - self.confirmed > 3 * self.heartbeat_s and not self.abort.is_set() and \
                self._thread.is_alive():
            time.sleep(self.heartbeat_s / 20)

    def _on_ended(self, epoch: int, store: SignedStore) -> None:
        """The generation ended: abort now, unless this worker may train on to its replica's next outer step (its
        replica lost no one: `ending/<epoch>` lists the replicas that did) - then say so, so the coordinator waits
        for it instead of evicting it, and abort as soon as its replica is listed after all."""
        try:
            hit = store.get(f"ending/{epoch}") if self.defer_replica is not None else None
            if epoch == self.gen + 1 and hit is not None and self.defer_replica not in json.loads(hit):
                if not self.ending.is_set():
                    store.put(f"deferring/{epoch}/{self.uid}", "1")
                    self.ending.set()
                return
        except Exception:  # the store failed: handled on the next beat
            pass
        self.abort.set()

    def check_fence(self) -> None:
        """Raise GenerationLost unless this worker is still a member of the current generation (asks the store)."""
        try:
            current = self.epoch() if not self.abort.is_set() else self.gen + 1
            if current > self.gen:
                with self._lock:  # the same decision the heartbeat thread makes, if it has not made it yet
                    if not self.abort.is_set():
                        self._on_ended(current, self.signed)
            if current == self.gen + 1 and self.ending.is_set() and not self.abort.is_set() and \
                    not self.signed.has(f"plan/{current}"):
                current = self.gen  # training on to its outer step: the next plan cannot be made without it
        except RuntimeError:
            self.lost.set()
            current = self.gen + 1
        if current != self.gen:
            self.abort.set()
            raise GenerationLost(f"generation {self.gen} has ended (fenced: nothing more is written)", False)

    def report_trouble(self, within_replica: bool = True) -> None:
        """A transfer failed here: ask the coordinator to end this generation (it finds out who died). Its peer was
        of this replica (a pipeline transfer: this replica re-forms at once), or only of others (an outer step)."""
        try:
            self.signed.put(f"trouble/{self.gen}/{self.uid}", "replica" if within_replica else "elsewhere")
        except Exception:
            self.lost.set()

    def next_plan(self, stall_s: float) -> Plan:
        """Say ready for the next generation and wait for a plan that includes this worker. A spare (never a
        member yet) and an idle member (its replica sits out) wait through plans without them; any other
        member left out was evicted. The wait has its own deadline: it ends only when the coordinator is gone
        (its store fails) or its loop stopped ticking for stall_s (longer than any phase it waits on)."""
        with self._store_errors():
            return self._next_plan(stall_s)

    def _next_plan(self, stall_s: float) -> Plan:
        seen = self.gen
        while True:
            epoch = self._wait_epoch_after(seen)
            self.signed.put(f"ready/{epoch}/{self.uid}", "1")
            tick, ticked = None, time.monotonic()
            while not self.signed.has(f"plan/{epoch}") and self.epoch() == epoch:
                self._check_lost()
                now_tick = self.signed.get("tick")
                if now_tick != tick:
                    tick, ticked = now_tick, time.monotonic()
                elif time.monotonic() - ticked > stall_s:
                    raise CoordinatorLost(f"the coordinator at {self.address} stopped answering (no plan for "
                                          f"generation {epoch} and no sign of life for {stall_s:.0f}s)")
                time.sleep(0.02)
            plan = self.signed.get(f"plan/{epoch}")
            if plan is None:
                seen = epoch  # someone died while this generation was forming: the next one
                continue
            raw = json.loads(plan)
            if self.epoch() != epoch:  # read late (this worker was frozen): that generation has ended already
                seen = epoch
                continue
            if self.uid in raw["members"]:
                with self._lock:
                    self.gen = epoch
                    self.ending.clear()
                    if not self.lost.is_set():
                        self.abort.clear()
                return Plan(epoch, {u: tuple(s) for u, s in raw["members"].items()}, raw["fresh"],
                            tuple(raw["active"]))
            if self.uid in raw["idle"]:  # its replica lost a stage and no replacement came: wait to be brought back
                seen = epoch
                continue
            if self.gen:
                raise MembershipError(f"this worker ({self.uid}) is not in generation {epoch}: the coordinator declared "
                                      f"it dead (missed heartbeats) and gave its slot away; start a new worker to rejoin")
            seen = epoch

    def _wait_epoch_after(self, seen: int) -> int:
        while True:
            self._check_lost()
            if self.signed.has("finished"):
                raise RunFinished()
            epoch = self.epoch()
            if epoch > seen:
                return epoch
            time.sleep(0.02)

    def _check_lost(self) -> None:
        if self.lost.is_set():
            raise CoordinatorLost(f"the coordinator at {self.address} is gone")

    def leave(self) -> None:
        """A clean exit at the end of the run (not a failure)."""
        self._stop.set()
        try:
            self.signed.put(f"left/{self.uid}", "done")
        except Exception:
            pass
