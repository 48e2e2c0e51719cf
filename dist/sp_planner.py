"""Per-batch plan for heterogeneity-adaptive sequence parallelism (FlexSP-style).

Given a batch's sequence lengths and L lanes, choose SP groups (power-of-two sizes tiling the lanes,
placed on contiguous aligned lane ranges) and assign every sequence to one group, so that the slowest
group finishes first. A batch that does not fit in one pass is cut into micro-batches (longest first,
balanced tokens). Per pass: every tiling of L into powers of two gets a lower bound; the most promising
are packed greedily (longest sequence first onto the group that would finish earliest) and the best
tiling's assignment is then improved by a small MILP on length buckets (HiGHS via scipy, under a time
limit), kept only if better. The plan is a pure function of its inputs: every rank computes the same one.
`exact=True` solves the per-sequence MILP for every tiling (small instances: the tests' reference).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from dist.sp_cost import SPCost


GOOD_ENOUGH = 0.01  # stop trying more passes once a plan is within 1% of the lower bound


class PlanError(ValueError):
    """A batch that cannot be planned, described in one line with the fix."""


@dataclass(frozen=True)
class Group:
    start: int  # first lane
    size: int  # lanes (SP degree)
    seqs: tuple[int, ...]  # indices into the batch's lengths
    time: float  # predicted seconds


@dataclass(frozen=True)
class Plan:
    microbatches: tuple[tuple[Group, ...], ...]
    predicted: float  # sum over micro-batches of the slowest group's time
    solver: str  # greedy | milp | exact

    def assignment(self) -> dict[int, tuple[int, int, int]]:
        """sequence -> (micro-batch, group start lane, group size)."""
        return {k: (m, g.start, g.size) for m, groups in enumerate(self.microbatches) for g in groups for k in g.seqs}


@lru_cache(maxsize=None)
def tilings(lanes: int, largest: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Every way to write `lanes` as a sum of powers of two (each <= largest), largest first."""
    largest = largest or 1 << (lanes.bit_length() - 1)
    if lanes == 0:
        return ((),)
    out = []
    d = largest
    while d >= 1:
        if d <= lanes:
            out += [(d, *rest) for rest in tilings(lanes - d, d)]
        d //= 2
    return tuple(out)


def static_plan(lengths: list[int], lanes: int, degree: int, cost: SPCost, passes: int | None = None) -> Plan:
    """Every group of one size (the baseline): lanes / degree groups, sequences packed greedily."""
    if lanes % degree:
        raise PlanError(f"static SP degree {degree} does not divide {lanes} lanes")
    return _plan_passes(lengths, lanes, cost, tiling_choices=lambda: [(degree,) * (lanes // degree)], passes=passes)


def plan(lengths: list[int], lanes: int, cost: SPCost, time_limit_s: float = 0.0, candidates: int = 3,
         exact: bool = False, passes: int | None = None) -> Plan:
    """The adaptive plan for one batch (see the module docstring). time_limit_s > 0 adds the bucket MILP (its
    result can depend on the machine's speed: then plan on one rank and broadcast). passes fixes the number
    of micro-batches (default: the fewest that fit, and up to a few more when that predicts faster)."""
    return _plan_passes(lengths, lanes, cost, lambda: tilings(lanes) if exact else None, time_limit_s, candidates,
                        exact, passes)


def _plan_passes(lengths, lanes, cost, tiling_choices, time_limit_s=0.0, candidates=3, exact=False,
                 passes=None) -> Plan:
    lengths = [int(s) for s in lengths]
    capacity = lanes * cost.tokens_per_lane
    too_long = [s for s in lengths if s > capacity]
    if too_long:
        raise PlanError(f"a sequence of {max(too_long)} tokens does not fit on {lanes} lanes of "
                        f"{cost.tokens_per_lane} tokens each: raise parallel.lanes or the memory per lane, "
                        f"or cut sequences to <= {capacity} tokens")
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    first = passes or max(1, math.ceil(sum(lengths) / capacity))
    best = None
    full = PassTable.build(list(range(len(lengths))), lengths, lanes, cost)  # every sequence on every degree, once
    floor = full.area_bound(lanes)
    for m in (first,) if passes else (first, first + 1, first + 2):
        if best is not None and best.predicted <= floor * (1 + GOOD_ENOUGH):
            break  # more passes could gain at most GOOD_ENOUGH: the plan is within it of the lane-seconds bound
        planned = []
        todo = _chunks(order, lengths, m)[::-1]
        while todo:
            chunk = todo.pop()
            done = _plan_pass(full.subset(chunk), lanes, cost, tiling_choices(), time_limit_s, candidates, exact)
            if done:
                planned.append(done)
            elif len(chunk) > 1 and not passes:  # does not fit in memory: halve it (tokens), keep the order
                todo += _chunks(chunk, lengths, 2)[::-1]
            else:
                break
        else:
            total = sum(t for t, _, _ in planned)
            if best is None or total < best.predicted - 1e-12:
                solver = "exact" if exact else ("milp" if any(s == "milp" for _, _, s in planned) else "greedy")
                best = Plan(tuple(g for _, g, _ in planned), total, solver)
    if best is None:
        raise PlanError(f"the batch ({len(lengths)} sequences, {sum(lengths)} tokens) could not be split into "
                        f"{passes or 'a few'} pass(es) that fit {lanes} lanes of {cost.tokens_per_lane} tokens: allow more")
    return best


def _chunks(order: list[int], lengths: list[int], m: int) -> list[list[int]]:
    """Longest first, cut into m consecutive chunks of about equal tokens (none empty)."""
    total, out, cur, acc = sum(lengths[k] for k in order), [], [], 0
    for i, k in enumerate(order):
        cur.append(k)
        acc += lengths[k]
        left = len(order) - i - 1
        if len(out) < m - 1 and (acc >= total * (len(out) + 1) / m or left == m - 1 - len(out)) and left > 0:
            out.append(cur)
            cur = []
    return out + [cur] if cur else out


@lru_cache(maxsize=None)
def _tiling_arrays(lanes: int):
    """For every tiling of `lanes` (in lexicographic order): its set of degrees (an index into `member`, which
    marks each set's degrees) and, per degree d, the lanes in its groups of size >= d."""
    ts = sorted(tilings(lanes))
    degrees = [1 << i for i in range(lanes.bit_length()) if 1 << i <= lanes]
    sets = sorted({tuple(sorted(set(t))) for t in ts})
    index = {st: i for i, st in enumerate(sets)}
    set_of = np.array([index[tuple(sorted(set(t)))] for t in ts])
    member = np.array([[d in st for d in degrees] for st in sets])
    lanes_ge = np.array([[sum(x for x in t if x >= d) for d in degrees] for t in ts], dtype=float)
    return ts, set_of, member, lanes_ge


def _rank(table: "PassTable", lanes: int) -> list[tuple[int, ...]]:
    """Tilings of `lanes`, most promising first, by a lower bound on the makespan: the slowest sequence on the
    largest group it may use, and for every degree d the lane-seconds of the sequences that need >= d lanes
    spread over the lanes of groups >= d (the sequence sums depend only on the tiling's set of degrees).
    Ties keep the tilings' lexicographic order."""
    ts, set_of, member, lanes_ge = _tiling_arrays(lanes)
    deg = np.array(table.degrees, dtype=float)
    masked = np.where(member[:, :, None], table.times[None], np.inf)  # (sets, degrees, sequences)
    cheapest = masked.min(axis=1)
    usable = np.isfinite(cheapest).all(axis=1)  # every sequence has a legal degree in the set
    area = (masked * deg[None, :, None]).min(axis=1)
    area[~usable] = 0.0
    work = area @ (table.legal[:, None] >= deg[None, :]).astype(float)  # (sets, degrees)
    spread = np.where(member[set_of], work[set_of] / np.where(member[set_of], lanes_ge, 1.0), 0.0).max(axis=1)
    bound = np.maximum(np.where(usable[:, None], cheapest, 0.0).max(axis=1)[set_of], spread)
    keep = np.flatnonzero(usable[set_of])
    return [ts[i] for i in keep[np.argsort(bound[keep], kind="stable")]]


@dataclass
class PassTable:
    """Predicted times of one pass's sequences on every degree (inf where a sequence does not fit)."""
    seqs: list[int]
    lengths: list[int]
    degrees: list[int]
    times: np.ndarray  # (degrees, sequences)
    legal: np.ndarray  # smallest degree per sequence

    @staticmethod
    def build(seqs: list[int], lengths: list[int], lanes: int, cost: SPCost) -> "PassTable":
        degrees = [1 << i for i in range(lanes.bit_length()) if 1 << i <= lanes]
        lens = np.array([lengths[k] for k in seqs], dtype=float)
        legal = np.array([cost.min_degree(lengths[k]) for k in seqs])
        times = np.stack([np.where(legal <= d, cost.time(lens, d), np.inf) for d in degrees])
        return PassTable(seqs, [lengths[k] for k in seqs], degrees, times, legal)

    def subset(self, seqs: list[int]) -> "PassTable":
        """The table of some of the batch's sequences (this table must hold the whole batch in order)."""
        return PassTable(seqs, [self.lengths[k] for k in seqs], self.degrees, self.times[:, seqs], self.legal[seqs])

    def area_bound(self, lanes: int) -> float:
        """No plan is faster than every sequence's cheapest lane-seconds spread evenly over the lanes."""
        area = (self.times * np.array(self.degrees, dtype=float)[:, None]).min(axis=0)
        return float(area.sum()) / lanes


def _greedy(table: PassTable, sizes: tuple[int, ...], cost: SPCost):
    """Longest first onto the group that would finish earliest among those that can hold it; None if memory fails.
    Returns (makespan, members as positions in the pass)."""
    rows = {d: table.times[table.degrees.index(d)].tolist() for d in set(sizes)}
    heaps: dict[int, list] = {d: [] for d in sorted(set(sizes), reverse=True)}
    for p, d in enumerate(sizes):
        heaps[d].append((0.0, p))
    loads, tokens, members = [0.0] * len(sizes), [0] * len(sizes), [[] for _ in sizes]
    for i, s in enumerate(table.lengths):  # the pass is sorted longest first
        choice = None
        for d, heap in heaps.items():
            t = rows[d][i]
            if t == math.inf:
                continue
            load, p = heap[0]
            if tokens[p] + s > d * cost.tokens_per_lane:  # the least loaded is full: any with room
                room = [(loads[q], q) for _, q in heap if tokens[q] + s <= d * cost.tokens_per_lane]
                if not room:
                    continue
                load, p = min(room)
            if choice is None or load + t < choice[0] - 1e-15:
                choice = (load + t, p, d)
        if choice is None:
            return None
        finish, p, d = choice
        heap = heaps[d]
        heap.remove((loads[p], p))
        heapq.heapify(heap)
        heapq.heappush(heap, (finish, p))
        loads[p], tokens[p] = finish, tokens[p] + s
        members[p].append(i)
    return max(loads), members


def _groups(sizes: tuple[int, ...], members: list[list[int]], table: PassTable) -> tuple[Group, ...]:
    """Groups on aligned lane ranges (largest first: every group starts on a multiple of its size)."""
    out, start = [], 0
    for d, positions in zip(sizes, members):
        row = table.times[table.degrees.index(d)]
        out.append(Group(start, d, tuple(sorted(table.seqs[i] for i in positions)), float(sum(row[i] for i in positions))))
        start += d
    return tuple(out)


def _plan_pass(table: "PassTable", lanes, cost, choices, time_limit_s, candidates, exact):
    """(makespan, groups, solver) for one micro-batch, or None if it cannot fit."""
    if len(table.seqs) == 1 and choices is None:  # adaptive, one sequence: its fastest legal group (optimal)
        i = int(np.argmin(table.times[:, 0]))
        if not np.isfinite(table.times[i, 0]):
            return None
        d = table.degrees[i]
        sizes = tuple(sorted((d, *(1 << k for k in range((lanes - d).bit_length()) if (lanes - d) >> k & 1)),
                             reverse=True))
        members = [[] for _ in sizes]
        members[sizes.index(d)] = [0]
        return float(table.times[i, 0]), _groups(sizes, members, table), "greedy"
    if exact:
        found = [r for r in (_exact(table, sizes, cost) for sizes in choices) if r]
        if not found:
            return None
        t, sizes, members = min(found, key=lambda r: (r[0], r[1]))
        return t, _groups(sizes, members, table), "exact"
    if choices is None:  # adaptive: the best-bounded tilings, and every single-degree tiling as a safety net
        ranked = _rank(table, lanes)
        feasible = set(ranked)
        singles = [(d,) * (lanes // d) for d in table.degrees]
        choices = list(dict.fromkeys(ranked[:candidates] + [t for t in singles if t in feasible]))
    best = None
    for sizes in choices:
        packed = _greedy(table, sizes, cost)
        if packed and (best is None or packed[0] < best[0] - 1e-15):
            best = (packed[0], sizes, packed[1])
    if best is None:
        return None
    solver = "greedy"
    if time_limit_s > 0:
        improved = _bucket_milp(table, best[1], cost, time_limit_s, best[0])
        if improved and improved[0] < best[0] - 1e-12:
            best, solver = (improved[0], best[1], improved[1]), "milp"
    return best[0], _groups(best[1], best[2], table), solver


def _milp_rows(n_items: int, sizes: tuple[int, ...], counts, times, tokens, legal_ok, cost: SPCost):
    """A MILP over x[i, p] (items to groups) and the makespan C: each item's count placed, every group's time
    <= C and tokens <= its memory; x[i, p] = 0 where item i may not use group p."""
    g = len(sizes)
    nv = n_items * g + 1
    rows, lo, hi = [], [], []
    for i in range(n_items):
        r = np.zeros(nv)
        r[i * g:(i + 1) * g] = 1
        rows.append(r), lo.append(counts[i]), hi.append(counts[i])
    upper = np.full(nv, np.inf)
    for p, d in enumerate(sizes):
        t, m = np.zeros(nv), np.zeros(nv)
        for i in range(n_items):
            if legal_ok(i, d):
                t[i * g + p], m[i * g + p] = times(i, d), tokens(i)
            else:
                upper[i * g + p] = 0
        t[-1] = -1
        rows += [t, m]
        lo += [-np.inf, -np.inf]
        hi += [0, d * cost.tokens_per_lane]
    c = np.zeros(nv)
    c[-1] = 1.0
    integrality = np.ones(nv)
    integrality[-1] = 0
    return c, LinearConstraint(np.array(rows), lo, hi), integrality, Bounds(np.zeros(nv), upper)


def _exact(table: PassTable, sizes: tuple[int, ...], cost: SPCost):
    """Per-sequence MILP for one tiling (small instances)."""
    n, g = len(table.seqs), len(sizes)
    row = {d: table.times[table.degrees.index(d)] for d in set(sizes)}
    c, cons, integrality, bounds = _milp_rows(n, sizes, [1] * n, lambda i, d: row[d][i], lambda i: table.lengths[i],
                                              lambda i, d: table.legal[i] <= d, cost)
    res = milp(c, constraints=cons, integrality=integrality, bounds=bounds)
    if res.status != 0:
        return None
    x = np.round(res.x[:-1]).reshape(n, g)
    members = [[i for i in range(n) if x[i, p] > 0.5] for p in range(g)]
    return float(max(sum(row[d][i] for i in ks) for ks, d in zip(members, sizes))), sizes, members


def _bucket_milp(table: PassTable, sizes: tuple[int, ...], cost: SPCost, time_limit_s: float, incumbent: float):
    """Integer counts per (length bucket, group) for a fixed tiling, each bucket costed at its longest sequence,
    under a time limit; the counts are filled with the real sequences longest first. (makespan, members) or None."""
    n = len(table.seqs)
    edges = np.linspace(0, n, min(16, n) + 1).round().astype(int)
    buckets = [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]  # the pass is sorted longest first
    row = {d: table.times[table.degrees.index(d)] for d in set(sizes)}
    c, cons, integrality, bounds = _milp_rows(
        len(buckets), sizes, [len(b) for b in buckets], lambda i, d: row[d][buckets[i][0]],
        lambda i: table.lengths[buckets[i][0]], lambda i, d: table.legal[buckets[i][0]] <= d, cost)
    res = milp(c, constraints=cons, integrality=integrality, bounds=bounds, options={"time_limit": time_limit_s})
    if res.x is None or res.x[-1] >= incumbent:
        return None
    counts = np.round(res.x[:-1]).reshape(len(buckets), len(sizes)).astype(int)
    members = [[] for _ in sizes]
    for b, items in enumerate(buckets):
        it = iter(items)
        for p in range(len(sizes)):
            members[p] += [next(it) for _ in range(counts[b, p])]
    if any(sum(table.lengths[i] for i in ks) > d * cost.tokens_per_lane for ks, d in zip(members, sizes)):
        return None
    return float(max(sum(row[d][i] for i in ks) for ks, d in zip(members, sizes))), members
