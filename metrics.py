"""What a run reports: console lines, TensorBoard scalars, metrics.jsonl and the per-replica sample ledger.

Steps are numbered by the steps completed (1 for the first) everywhere a run reports one: console, TensorBoard,
metrics.jsonl, sync/rank<k>.jsonl and checkpoint names. The ledger is the exception: a record is the samples
the step at loader position `step` (0 for the first) took, written before that step completes."""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable

from torch.utils.tensorboard import SummaryWriter


def warn(msg: str) -> None:
    """A line on stderr from any rank."""
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path: str) -> list[dict]:
    """Complete records of a JSON-lines file another process may be appending to (a partial last line is skipped)."""
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.endswith("\n") and line.strip()]


def _live_lines(path: str) -> tuple[list[str], list[dict]]:
    """The raw lines (gen kept) and records of read_log, for rewriting a file."""
    lines, records, newest = [], [], ()
    for record in read_jsonl(path):
        gen = tuple(record.get("gen", ()))
        if gen < newest:
            continue
        newest = gen
        if "rollback" in record:
            kept = [(ln, r) for ln, r in zip(lines, records) if r["step"] < record["rollback"]]
            lines, records = [ln for ln, _ in kept], [r for _, r in kept]
        else:
            lines.append(json.dumps(record) + "\n")
            records.append(record)
    return lines, records


def read_log(path: str) -> list[dict]:
    """The live records of a ledger, metrics or sync file, in order: what a reader may trust.

    Every record carries the writer's generation ("gen": [launch time, generation]). A rollback to step T by
    generation g is a marker {"rollback": T, "gen": g}: it drops the records of steps >= T written before it, and
    from then on records of older generations (a fenced worker that woke up and wrote anyway) are ignored.
    Records come back without their "gen".
    """
    return [{k: v for k, v in r.items() if k != "gen"} for r in _live_lines(path)[1]]


def ledger_path(run_dir: str, replica: int) -> str:
    """The samples each step of a replica took (written by its stage 0, lane 0)."""
    return os.path.join(run_dir, "ledger", f"replica{replica}.jsonl")


def truncate_jsonl(path: str, first_step: int, gen: list | None = None) -> None:
    """Drop records of steps >= first_step (steps that were rolled back and will be replayed); with `gen`, also
    leave a rollback marker of that generation, so that a fenced writer's later append is ignored by read_log."""
    if not os.path.exists(path):
        return
    keep = [line for line, r in zip(*_live_lines(path)) if r["step"] < first_step]  # a partial line is dropped
    if gen is not None:
        keep.append(json.dumps({"rollback": first_step, "gen": gen}) + "\n")
    with open(path + ".tmp", "w") as fh:
        fh.writelines(keep)
    os.replace(path + ".tmp", path)  # a reader never sees a half-rewritten file


# TensorBoard's Custom Scalars tab (the logger rank writes it): loss against tokens seen and against the bytes
# sent between replicas (what low-communication sync saves), and recoveries (events so far on each rank).
LAYOUT = {"flotilla": {"loss vs tokens seen": ["Multiline", [r"by_tokens/.*"]],
                       "val loss vs cross-replica bytes sent (logger rank)": ["Multiline", [r"by_bytes/.*"]],
                       "recoveries (rebuilt / resumed events so far, per rank)": ["Multiline", [r"recovery/.*"]]}}


class RunLog:
    """The logger rank (replica 0, last stage) owns the console, train scalars and metrics.jsonl;
    stage 0 of each replica owns that replica's sample ledger; every rank logs its own bytes sent
    and its outer steps (sync/rank<k>.jsonl) and, at every log step, its bytes sent so far (bytes/rank<k>.jsonl:
    summed over ranks, the whole job's traffic)."""

    def __init__(self, run_dir: str, rank: int, replica: int, stage: int, stages: int, start_step: int,
                 tensorboard: bool, tokens_per_step: int = 0, lane: int = 0, gen: list | None = None,
                 fence: Callable[[], None] | None = None):
        self.rank, self.replica, self.tokens_per_step = rank, replica, tokens_per_step
        self.gen = gen or [0.0, 0]  # [launch time, generation]: stamped on every record (see read_log)
        self.fence = fence or (lambda: None)  # raises once this worker is no longer a member: it must not write
        self.recoveries = {"rebuilt": 0, "resumed": 0}
        self.is_logger = replica == 0 and stage == stages - 1 and lane == 0
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
        self.ledger_path = ledger_path(run_dir, replica) if stage == lane == 0 else None
        self.sync_path = os.path.join(run_dir, "sync", f"rank{rank}.jsonl")
        self.bytes_path = os.path.join(run_dir, "bytes", f"rank{rank}.jsonl")
        for path in (self.ledger_path, self.sync_path, self.bytes_path):
            if path:
                os.makedirs(os.path.dirname(path), exist_ok=True)
        self.metrics = self.ledger = self.sync = self.bytes = None
        self.rollback(start_step, self.gen)
        tb = os.path.join(run_dir, "tb")
        self.tb = SummaryWriter(os.path.join(tb, "train")) if tensorboard and self.is_logger else None
        self.tb_comm = SummaryWriter(os.path.join(tb, f"rank{rank}")) if tensorboard else None
        if self.tb:
            self.tb.add_custom_scalars(LAYOUT)

    def rollback(self, step: int, gen: list) -> None:
        """Forget records of steps >= step (they will be replayed) and append from there, as generation `gen`."""
        self.at_step, self.gen = step, gen
        for f in (self.metrics, self.ledger, self.sync, self.bytes):
            if f:
                f.close()
        if self.is_logger:
            truncate_jsonl(self.metrics_path, step + 1, gen)
            self.metrics = open(self.metrics_path, "a")
        if self.ledger_path:
            truncate_jsonl(self.ledger_path, step, gen)
            self.ledger = open(self.ledger_path, "a")
        truncate_jsonl(self.sync_path, step + 1, gen)
        self.sync = open(self.sync_path, "a")
        truncate_jsonl(self.bytes_path, step + 1, gen)
        self.bytes = open(self.bytes_path, "a")

    def event(self, kind: str, fenced: bool = True, **fields) -> None:
        """A recovery event (events.jsonl, shared with the coordinator and the chaos launcher); fenced=False for
        the one event written after a generation ended (that it ended)."""
        if fenced:
            self.fence()
        with open(os.path.join(self.run_dir, "events.jsonl"), "a") as fh:
            fh.write(json.dumps({"t": time.time(), "event": kind, "rank": self.rank, **fields}) + "\n")
        if kind in self.recoveries and self.tb_comm:
            self.recoveries[kind] += 1
            self.tb_comm.add_scalar(f"recovery/{kind}", self.recoveries[kind], self.at_step)

    def say(self, msg: str) -> None:
        if self.is_logger:
            print(msg, flush=True)

    def record_samples(self, step: int, sample_ids: list[int]) -> None:
        if self.ledger:
            self.fence()
            self.ledger.write(json.dumps({"step": step, "samples": sample_ids, "t": time.time(), "gen": self.gen})
                              + "\n")
            self.ledger.flush()

    def record_sync(self, step: int, fragments: list, params, comm, moved: float = 0.0) -> None:
        """An outer step: which fragments (and "average" for a final average), this rank's weights digest
        (replicas compare it), how far the outer step moved the weights (L2), bytes so far."""
        digest = 0
        for p in params:
            digest = zlib.crc32(p.detach().cpu().numpy().tobytes(), digest)
        self.fence()
        self.sync.write(json.dumps({"step": step, "fragments": fragments, "digest": digest, "moved": moved,
                                    "bytes": comm.totals(),
                                    "collectives": dict(comm.calls), "gen": self.gen}) + "\n")
        self.sync.flush()

    def record_step(self, step: int, **values) -> None:
        """A metrics.jsonl record of step `step` (the count of completed steps)."""
        if self.metrics:
            self.fence()
            self.metrics.write(json.dumps({"step": step, **values, "t": time.time(), "gen": self.gen}) + "\n")
            self.metrics.flush()
        if self.tb and "val_loss" in values and "cross_bytes" in values:
            self.tb.add_scalar("by_bytes/val_loss", values["val_loss"], int(values["cross_bytes"]))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb:
            self.fence()
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
                if k in ("train/loss", "val/loss") and self.tokens_per_step:
                    self.tb.add_scalar(f"by_tokens/{k.replace('/', '_')}", v, step * self.tokens_per_step)

    def comm_scalars(self, step: int, comm, replica_loss: float = math.nan) -> None:
        """This rank's bytes sent and collective calls so far, per link class; on a replica's last stage also the
        replica's own training loss (replicas drift apart between DiLoCo / NoLoCo syncs: each shows its own)."""
        self.fence()
        self.bytes.write(json.dumps({"step": step, "sent": comm.totals(), "t": time.time(), "gen": self.gen}) + "\n")
        self.bytes.flush()
        if self.tb_comm:
            if not math.isnan(replica_loss):
                self.tb_comm.add_scalar("train/replica_loss", replica_loss, step)
            for link, b in comm.totals().items():
                self.tb_comm.add_scalar(f"comm/bytes_{link}", b, step)
                self.tb_comm.add_scalar(f"comm/collectives_{link}", comm.calls.get(link, 0), step)

    def close(self) -> None:
        for f in (self.metrics, self.ledger, self.sync, self.bytes, self.tb, self.tb_comm):
            if f:
                f.close()


@dataclass
class Interval:
    """The steps since the previous report: tokens/s and where a step's seconds went (means per step)."""
    tokens_per_s: float
    step_s: float
    waiting_s: float  # blocked on transfers inside the replica (pipeline neighbours, lanes): bubbles and slow peers
    sync_s: float  # blocked on transfers between replicas (gradient / outer-step sync)

    @property
    def compute_s(self) -> float:
        return max(0.0, self.step_s - self.waiting_s - self.sync_s)


class Throughput:
    """Tokens per second over training time only (each step timed on its own; eval and checkpoints excluded), and
    each step's seconds split into compute, waiting on peers of the replica and sync with other replicas."""

    def __init__(self, tokens_per_step: int, skip: int = 2):
        self.tokens_per_step, self.skip = tokens_per_step, skip  # skip: warm-up steps left out of overall()
        self.seconds: list[float] = []
        self.waiting: list[float] = []
        self.syncing: list[float] = []
        self.mark = 0

    def add(self, seconds: float, waiting: float = 0.0, syncing: float = 0.0) -> None:
        self.seconds.append(seconds)
        self.waiting.append(waiting)
        self.syncing.append(syncing)

    def interval(self) -> Interval:
        """The steps since the previous call."""
        start, self.mark = self.mark, len(self.seconds)
        n = max(1, self.mark - start)
        total = sum(self.seconds[start:])
        return Interval(n * self.tokens_per_step / max(total, 1e-9), total / n, sum(self.waiting[start:]) / n,
                        sum(self.syncing[start:]) / n)

    def overall(self) -> float:
        """Steady-state tokens/s: the median step after warm-up (robust to a noisy, shared machine); 0 if none ran."""
        steps = self.seconds[self.skip:] or self.seconds
        return self.tokens_per_step / max(statistics.median(steps), 1e-9) if steps else 0.0
