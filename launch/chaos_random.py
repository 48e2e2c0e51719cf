"""Random chaos: faults of every kind at random moments on a recovery run, and a report that checks the run.

Faults arrive with exponential gaps (mean --mean-gap seconds) until --faults have been injected; each picks a
random live worker and a kind from the mix:
  kill            SIGKILL
  long-stop       SIGSTOP past the heartbeat timeout; the worker is replaced, then woken (it must write nothing)
  short-stop      SIGSTOP for under the heartbeat timeout, then SIGCONT (nothing should happen)
  reform-kill     SIGKILL, then another worker as soon as the generation ends (a fault while the next one forms)
  save-kill       SIGKILL as soon as a checkpoint save has begun
  coordinator     SIGKILL of the coordinator: the workers must save and stop with one line; a new coordinator and
                  a new set of workers then resume with checkpoint.resume=latest
  intruder        a store client without the secret tries to end the generation, forge a plan and finish the run
Replacements start after a random delay in [0, --max-replace-delay] s.

The report (one JSON line, also <run_dir>/chaos.json): faults injected, worker tracebacks and unexpected exit
codes, ledger duplicates and gaps per replica (steps a DiLoCo replica skipped to rejoin at an outer step are
not gaps: they were never committed), rollbacks past the newest sealed checkpoint (or to step 0), the
longest stall without progress (and whether a checkpoint restore explains it), and the final validation loss
against a failure-free run of the same config (--baseline).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import timedelta

from launch.cluster import Cluster
from metrics import read_jsonl, read_log

KINDS = {"kill": 4, "long-stop": 2, "short-stop": 2, "reform-kill": 2, "save-kill": 2, "coordinator": 1, "intruder": 2}
EXPECTED_EXIT_LINES = ("is not in generation", "is gone", "stopped answering",  # evicted, or the coordinator died
                       "cannot reach the coordinator")  # a replacement started just before the coordinator died


@dataclass
class Progress:
    """What the launcher saw while the run went on (polled)."""
    sealed: list[tuple[float, int]] = field(default_factory=list)  # (time first seen, step) of sealed checkpoints
    steps: list[tuple[float, int]] = field(default_factory=list)  # (time, logger's committed steps) on every change
    regressions: list[dict] = field(default_factory=list)  # progress went back past the newest sealed checkpoint

    def newest_sealed(self) -> int:
        return max((s for _, s in self.sealed), default=0)

    def observe(self, run_dir: str) -> None:
        now = time.time()
        root = os.path.join(run_dir, "checkpoints")
        seen = {s for _, s in self.sealed}
        for name in os.listdir(root) if os.path.isdir(root) else ():
            if name.startswith("step_") and os.path.exists(os.path.join(root, name, "manifest.json")):
                step = int(name.split("_")[1])
                if step not in seen:
                    self.sealed.append((now, step))
        records = [r for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
        step = records[-1]["step"] if records else 0
        if not self.steps or step != self.steps[-1][1]:
            if self.steps and step < self.steps[-1][1] and step < self.newest_sealed():
                self.regressions.append({"t": now, "from": self.steps[-1][1], "to": step,
                                         "newest_sealed": self.newest_sealed()})
            self.steps.append((now, step))

    def longest_stall(self, end: float) -> tuple[float, float]:
        """(seconds, start time) of the longest interval in which the committed step did not grow."""
        best, start, times = (0.0, 0.0), None, self.steps + [(end, -1)]
        high = -1
        for t, step in times:
            if step > high:
                if start is not None and t - start > best[0]:
                    best = (t - start, start)
                high, start = step, t
        return best


class RandomChaos:
    def __init__(self, args, overrides: list[str]):
        self.args, self.rng = args, random.Random(args.seed)
        self.cluster = Cluster(args.run_dir, args.replicas, args.stages, overrides, secret=os.environ["FLOTILLA_SECRET"],
                               heartbeat_timeout=args.heartbeat_timeout, join_timeout=args.join_timeout)
        self.progress = Progress()
        self.pending: list[tuple[float, str, object]] = []  # (due time, action, process) for replacements and wakes
        self.faults: list[dict] = []
        self.expected_exit: set[int] = set()  # pids that may exit 2 (evicted, or told the coordinator is gone)
        self.killed: set[int] = set()

    def log(self, kind: str, **fields) -> None:
        line = {"t": time.time(), "event": "fault", "kind": kind, **fields}
        print(f"chaos: {json.dumps(line)}", flush=True)
        with open(self.cluster.events_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    def live_members(self) -> list[subprocess.Popen]:
        """Live workers that hold a slot (the coordinator's latest assignment per slot)."""
        holders = {}
        for e in self.cluster.events("assigned"):
            holders[(e["replica"], e["stage"])] = e["pid"]
        pids = set(holders.values())
        return [p for p in self.cluster.workers if p.pid in pids and p.poll() is None and p.pid not in self.killed]

    def kill(self, proc: subprocess.Popen, kind: str) -> None:
        proc.kill()
        proc.wait()
        self.killed.add(proc.pid)
        self.log(kind, pid=proc.pid, step=self.progress.steps[-1][1] if self.progress.steps else 0)
        self.replace()

    def replace(self) -> None:
        self.pending.append((time.monotonic() + self.rng.uniform(0, self.args.max_replace_delay), "replace", None))

    def inject(self, kind: str) -> bool:
        """Inject one fault; False when there was no live member to hit."""
        members = self.live_members()
        if not members:
            return False
        victim = self.rng.choice(members)
        hb = self.args.heartbeat_timeout
        if kind == "kill":
            self.kill(victim, kind)
        elif kind in ("long-stop", "short-stop"):
            victim.send_signal(signal.SIGSTOP)
            long = kind == "long-stop"
            pause = hb + self.rng.uniform(1.0, 3.0) if long else self.rng.uniform(0.2, 0.6) * hb
            self.log(kind, pid=victim.pid, seconds=round(pause, 2))
            self.pending.append((time.monotonic() + pause, "wake", victim))
            if long:
                self.expected_exit.add(victim.pid)
                self.replace()
        elif kind == "reform-kill":
            ended = len(self.cluster.events("generation-ended"))
            self.kill(victim, kind)
            deadline = time.monotonic() + 3 * hb
            while len(self.cluster.events("generation-ended")) == ended and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(self.rng.uniform(0.0, 0.3))
            others = self.live_members()
            if others:
                self.kill(self.rng.choice(others), "reform-kill-second")
        elif kind == "save-kill":
            root = os.path.join(self.args.run_dir, "checkpoints")
            deadline, tended = time.monotonic() + 60, time.monotonic()
            while time.monotonic() < deadline and not (
                    os.path.isdir(root) and any(n.startswith(".tmp-step_") for n in os.listdir(root))):
                if time.monotonic() - tended > 0.5:  # reading the metrics takes longer than a small save
                    self.tend()
                    tended = time.monotonic()
                time.sleep(0.001)
            members = self.live_members()
            if members:
                self.kill(self.rng.choice(members), kind)
        elif kind == "coordinator":
            self.kill_coordinator()
        else:
            self.intrude()
        return True

    def kill_coordinator(self) -> None:
        c = self.cluster
        live = [p for p in c.workers if p.poll() is None]
        c.coordinator.kill()
        c.coordinator.wait()
        self.log("coordinator", step=self.progress.steps[-1][1] if self.progress.steps else 0)
        self.expected_exit.update(p.pid for p in live)
        for p in live:  # every worker must stop by itself (saving what it holds) within the abort timeout
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                self.log("worker-hung-after-coordinator", pid=p.pid)
        self.pending = [x for x in self.pending if x[1] != "replace"]
        c.restart_coordinator()
        for _ in range(c.replicas * c.stages):
            c.worker("checkpoint.resume=latest")

    def intrude(self) -> None:
        """A client that knows the address and run id but not the secret writes what a member would."""
        import torch.distributed as dist  # here: only this fault needs a store client

        raw = dist.TCPStore("127.0.0.1", self.cluster.port, is_master=False, wait_for_workers=False,
                            timeout=timedelta(seconds=5), use_libuv=True)
        store = dist.PrefixStore(f"flotilla/{self.args.run_id}/", raw)
        gen = max((e["gen"] for e in self.cluster.events() if e["event"] in ("formed", "re-formed")), default=1)
        uids = [e["uid"] for e in self.cluster.events("assigned")]
        for uid in uids:
            store.set(f"trouble/{gen}/{uid}", "1|forged")
            store.set(f"left/{uid}", "done|forged")
        store.set("epoch", str(gen + 5))
        store.set(f"plan/{gen + 1}", json.dumps({"gen": gen + 1, "members": {}, "active": [], "fresh": [], "idle": []}))
        store.set("finished", "1")
        store.add("hello/count", 1)  # a hello that is never written
        self.log("intruder", gen=gen)

    def tend(self) -> None:
        """Start due replacements, wake stopped workers, watch progress."""
        now = time.monotonic()
        for item in [x for x in self.pending if x[0] <= now]:
            self.pending.remove(item)
            if item[1] == "replace":
                self.cluster.worker()
            else:
                item[2].send_signal(signal.SIGCONT)
        self.progress.observe(self.args.run_dir)

    def run(self) -> dict:
        c, args = self.cluster, self.args
        c.start()
        t0 = time.time()
        try:
            for _ in range(c.replicas * c.stages):
                c.worker()
            next_fault = time.monotonic() + self.rng.expovariate(1 / args.mean_gap)
            kinds, weights = list(KINDS), list(KINDS.values())
            while any(p.poll() is None for p in c.workers) or self.pending:
                self.tend()
                if time.time() - self.progress.steps[-1][0] > args.give_up_after:
                    self.log("gave-up", seconds=args.give_up_after)  # no progress at all: a livelock to report
                    break
                if len(self.faults) < args.faults and time.monotonic() >= next_fault and self.progress.steps:
                    kind = self.rng.choices(kinds, weights)[0]
                    if self.inject(kind):
                        self.faults.append({"kind": kind})
                    next_fault = time.monotonic() + self.rng.expovariate(1 / args.mean_gap)
                time.sleep(0.1)
        finally:
            c.stop()
        return self.report(t0)

    def report(self, t0: float) -> dict:
        c, args = self.cluster, self.args
        traceback = [p.log_path for p in c.workers if "Traceback" in open(p.log_path).read()]
        bad_exit = []
        for p in c.workers:
            text = open(p.log_path).read()
            ok = p.returncode == 0 or p.pid in self.killed or (
                p.pid in self.expected_exit and p.returncode == 2 and any(s in text for s in EXPECTED_EXIT_LINES))
            if not ok:
                bad_exit.append({"pid": p.pid, "code": p.returncode, "log": p.log_path})
        steps = args.steps
        events = read_jsonl(c.events_path)
        ledger = {}
        for r in range(args.replicas):
            got = [x["step"] for x in read_log(os.path.join(args.run_dir, "ledger", f"replica{r}.jsonl"))]
            skipped = {k for e in events if e["event"] == "resumed" and e.get("rejoin_at") and e["replica"] == r
                       for k in range(e["step"], e["rejoin_at"])}  # DiLoCo rejoins: never committed, not gaps
            ledger[r] = {"duplicates": len(got) - len(set(got)), "gaps": len(set(range(steps)) - set(got) - skipped),
                         "skipped": len(skipped - set(got))}
        restores = [e for e in events if e["event"] == "resumed" and e.get("checkpoint")]
        rebuilt = sorted({e["method"] for e in events if e["event"] == "rebuilt"})
        stall, stall_start = self.progress.longest_stall(time.time())
        restore_in_stall = any(stall_start <= e["t"] <= stall_start + stall for e in restores)
        summary_path = os.path.join(args.run_dir, "summary.json")
        val = json.load(open(summary_path))["val_loss"] if os.path.exists(summary_path) else None
        return {"seed": args.seed, "seconds": round(time.time() - t0, 1), "faults": len(self.faults),
                "fault_kinds": {k: sum(f["kind"] == k for f in self.faults) for k in KINDS},
                "generations": len([e for e in events if e["event"] in ("formed", "re-formed")]),
                "tracebacks": traceback, "bad_exits": bad_exit, "ledger": ledger,
                "regressions": self.progress.regressions, "longest_stall_s": round(stall, 2),
                "stall_limit_s": 2 * args.join_timeout, "stall_explained_by_restore": restore_in_stall,
                "checkpoint_restores": len(restores), "rebuilt_by": rebuilt, "val_loss": val,
                "tampering_seen": len([e for e in events if e["event"] in ("tampered", "refused")]),
                "gave_up": any(e["event"] == "fault" and e["kind"] == "gave-up" for e in events)}


def baseline(args, overrides: list[str]) -> float | None:
    """The same run without faults (its own run directory): the final validation loss to compare with."""
    run_dir = args.run_dir.rstrip("/") + "-baseline"
    c = Cluster(run_dir, args.replicas, args.stages, overrides, secret=os.environ["FLOTILLA_SECRET"],
                heartbeat_timeout=args.heartbeat_timeout, join_timeout=args.join_timeout).start()
    try:
        codes = c.wait_all([c.worker() for _ in range(args.replicas * args.stages)], timeout=3600)
    finally:
        c.stop()
    path = os.path.join(run_dir, "summary.json")
    return json.load(open(path))["val_loss"] if codes == [0] * len(codes) and os.path.exists(path) else None


def check(result: dict, baseline_loss: float | None) -> dict:
    """The acceptance bar for one seed, each line true or false."""
    copies_only = result["checkpoint_restores"] == 0 and set(result["rebuilt_by"]) <= {"copy"}
    same_loss = None if baseline_loss is None else result["val_loss"] == baseline_loss
    return {"every_rebuild_a_copy": copies_only, "loss_identical": same_loss,
            "loss_identical_when_copied": None if same_loss is None or not copies_only else same_loss, "no_tracebacks": not result["tracebacks"], "no_bad_exits": not result["bad_exits"],
            "ledger_exactly_once": all(v["duplicates"] == v["gaps"] == 0 for v in result["ledger"].values()),
            "never_back_past_sealed": not result["regressions"],
            "stall_ok": result["longest_stall_s"] <= result["stall_limit_s"] or result["stall_explained_by_restore"],
            "finished": result["val_loss"] is not None and not result["gave_up"]}


def main(args, overrides: list[str]) -> int:
    overrides = [*overrides, f"train.steps={args.steps}", f"recovery.run_id={args.run_id}"]
    result = RandomChaos(args, overrides).run()
    base = baseline(args, overrides) if args.baseline else None
    result["baseline_val_loss"] = base
    result["checks"] = check(result, base)
    with open(os.path.join(args.run_dir, "chaos.json"), "w") as fh:
        json.dump(result, fh)
    print(json.dumps(result), flush=True)
    bar = {k: v for k, v in result["checks"].items() if k not in ("every_rebuild_a_copy", "loss_identical")}
    return 0 if all(v is not False for v in bar.values()) else 1
