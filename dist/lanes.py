"""Sequence parallelism across the lanes of a stage: a replica's batch -> its documents -> each lane's shards.

Attention and RoPE positions never cross a document boundary, so every document piece of a batch (a
"sequence" here) can run on any lane, alone, with the same result as inside its window. Per step every
lane of every stage plans the same batch (the planner is deterministic), finds the SP group that holds it
in each pass, and takes its contiguous slice of each of the group's sequences (padded to a multiple of the
group size; padding sits at the end, so causal attention never lets a real token see it, and its targets
are ignored). A lane's shards of one pass travel between stages as one tensor, lane i to lane i.

A group runs its sequences packed, as one call per layer: sequence k of n_k tokens on a group of d lanes is
cut into d slices of c_k = ceil(n_k / d) tokens, lane i holding places [i c_k, (i + 1) c_k) of every sequence,
back to back. Ulysses' all-to-all concatenates the lanes' tokens in lane order, so attention sees

    lane 0: seq 0 [0, c_0), seq 1 [0, c_1), ... | lane 1: seq 0 [c_0, 2 c_0), seq 1 [c_1, 2 c_1), ... | ...

of T = d sum_k c_k tokens. Within one sequence that order is its own order, so the document mask over the
sequence ids in this order, M[q, j] = (doc[q] == doc[j]) and (q >= j), is causal inside each sequence and
nothing across them; RoPE takes each token's place in its sequence. One all-to-all per layer moves the group's
whole pack (each lane sends (d - 1) / d of its sum_k c_k tokens' q, k, v and gets its output back).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from data.loader import Batch
from dist.comm import Comm
from dist.sp_cost import SPCost
from dist.sp_attention import Ulysses
from dist.sp_planner import Plan, PlanError, plan, static_plan
from model.stages import Stage

IGNORE = -100  # cross-entropy's ignore_index: padding targets


@dataclass(frozen=True)
class Segment:
    """One document piece of a batch: row `row`, tokens [start, end)."""
    row: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class LaneMicrobatch:
    """A lane's part of one pass of the plan: its slice of each of its SP group's sequences, back to back."""
    inputs: torch.Tensor  # (1, sum c_k) token ids (0 on padding)
    targets: torch.Tensor  # (1, sum c_k) next tokens (IGNORE on padding)
    positions: torch.Tensor  # (1, sum c_k) each token's place in its sequence: i c_k + [0, c_k) (RoPE)
    group: tuple[int, int]  # (start lane, size d) of the SP group
    chunks: tuple[int, ...]  # c_k: this lane's tokens of each sequence (every lane of the group holds as many)

    def to(self, device) -> "LaneMicrobatch":
        return LaneMicrobatch(self.inputs.to(device), self.targets.to(device), self.positions.to(device), self.group,
                              self.chunks)

    def gathered_doc_ids(self) -> torch.Tensor:
        """(1, d sum c_k): the sequence of every token in the order attention sees the group's pack (lane-major)."""
        own = torch.repeat_interleave(torch.arange(len(self.chunks), device=self.inputs.device),
                                      torch.tensor(self.chunks, device=self.inputs.device))
        return own.repeat(self.group[1])[None]

    def per_sequence(self) -> list["LaneMicrobatch"]:
        """One micro-batch per sequence: the unpacked baseline (every sequence its own calls and all-to-alls)."""
        cuts = [0, *itertools.accumulate(self.chunks)]
        return [LaneMicrobatch(self.inputs[:, a:b], self.targets[:, a:b], self.positions[:, a:b], self.group, (b - a,))
                for a, b in zip(cuts[:-1], cuts[1:])]


def segments(batch: Batch) -> list[Segment]:
    """The batch's document pieces in row order."""
    out = []
    for r, row in enumerate(batch.doc_ids.cpu()):
        cuts = ((row[1:] != row[:-1]).nonzero().flatten() + 1).tolist()
        bounds = [0, *cuts, row.numel()]
        out += [Segment(r, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def parse_sp(mode: str) -> int | None:
    """parallel.sp -> None (adaptive) or the static degree; ValueError for anything else."""
    if mode == "adaptive":
        return None
    kind, _, degree = mode.partition(":")
    if kind != "static" or not degree.isdigit() or int(degree) < 1:
        raise ValueError(f"parallel.sp='{mode}': choose adaptive or static:<d>, e.g. parallel.sp=static:2")
    return int(degree)


def plan_batch(segs: list[Segment], lanes: int, mode: str, cost: SPCost, passes: int | None,
               time_limit_s: float = 0.0) -> Plan:
    lengths = [s.length for s in segs]
    degree = parse_sp(mode)
    need = cost.min_degree(max(lengths))
    if degree is not None and need > degree:
        raise PlanError(f"a sequence of {max(lengths)} tokens needs an SP group of {need} lanes ({cost.tokens_per_lane} "
                        f"tokens per lane) but parallel.sp={mode}: use parallel.sp=adaptive or static:{need}")
    try:
        if degree is None:
            return plan(lengths, lanes, cost, time_limit_s=time_limit_s, passes=passes)
        return static_plan(lengths, lanes, degree, cost, passes=passes)
    except PlanError as err:
        raise PlanError(f"{err} (parallel.sp={mode}, cost model tokens_per_lane={cost.tokens_per_lane})") from None


def lane_microbatches(batch: Batch, segs: list[Segment], planned: Plan, lane: int) -> list[LaneMicrobatch]:
    """This lane's micro-batch in every pass of the plan (empty when its group got no sequence)."""
    out = []
    for groups in planned.microbatches:
        g = next(g for g in groups if g.start <= lane < g.start + g.size)
        i = lane - g.start
        inputs, targets, positions, chunks = [], [], [], []
        for k in g.seqs:
            seg = segs[k]
            c = math.ceil(seg.length / g.size)
            lo = min(i * c, seg.length)
            hi = min(lo + c, seg.length)
            pad = c - (hi - lo)
            row = slice(seg.start + lo, seg.start + hi)
            inputs.append(torch.nn.functional.pad(batch.inputs[seg.row, row], (0, pad), value=0))
            targets.append(torch.nn.functional.pad(batch.targets[seg.row, row], (0, pad), value=IGNORE))
            positions.append(torch.arange(i * c, i * c + c))
            chunks.append(c)
        empty = batch.inputs.new_zeros(0)
        out.append(LaneMicrobatch(torch.cat(inputs or [empty])[None], torch.cat(targets or [empty])[None],
                                  torch.cat(positions or [empty])[None], (g.start, g.size), tuple(chunks)))
    return out


class LaneRunner:
    """Runs a stage on a lane's micro-batch, its group's sequences packed into one call (module docstring), with
    Ulysses attention in groups of > 1 lane (one per SP group, made once from the groups built in dist/groups.py)."""

    def __init__(self, sp_groups: dict[tuple[int, int], object], comm: Comm):
        self.attention = {key: Ulysses(group, comm) for key, group in sp_groups.items()}

    def attend(self, group: tuple[int, int]) -> Ulysses | None:
        return self.attention[group] if group[1] > 1 else None

    def __call__(self, module: Stage, x: torch.Tensor, mb: LaneMicrobatch) -> torch.Tensor:
        return module(x, module.prepare_packed(mb.positions, mb.gathered_doc_ids(), self.attend(mb.group)))


def imbalance(planned: Plan, lanes: int) -> float:
    """Predicted slowest group over the mean lane's busy time, summed over passes (1 = perfectly balanced)."""
    busy = sum(g.time * g.size for groups in planned.microbatches for g in groups) / lanes
    return planned.predicted / busy if busy > 0 else 1.0
