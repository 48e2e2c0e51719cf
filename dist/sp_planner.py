"""Per-batch plan for heterogeneity-adaptive sequence parallelism (FlexSP-style).

Given a batch's sequence lengths and L lanes, choose SP groups (power-of-two sizes tiling the lanes,
placed on contiguous aligned lane ranges) and assign every sequence to one group. A batch that does not
fit in one pass is cut into passes (micro-batches); the step costs
    sum over passes of (slowest group's time + cost.per_pass) + cost.per_step
and no plan beats the lane-seconds bound  sum_k min_d d * time(s_k, d) / L + passes * per_pass + per_step.
Passes: from the fewest that hold the batch's tokens (M = ceil(tokens / (L * tokens_per_lane))) up to
MORE_PASSES more, stopping once the bound of the next count cannot gain GOOD_ENOUGH. Each count is tried
with up to three splits (`_splits`), the best kept: the sorted batch cut into consecutive runs of equal
tokens or of equal lane-seconds (long sequences share a pass's large groups, the other passes need little
all-to-all), and long paired with short (each sequence, longest first, into the pass with the fewest
lane-seconds that has room: holds the batch where consecutive runs would overflow and force an extra pass).
Per pass: every tiling of L into powers of two gets a lower bound; the most promising
are packed greedily (longest sequence first onto the group that would finish earliest). With a MILP limit
(time_limit_s or node_limit) the pass is then solved as FlexSP's MILP (`_milp`: the solver picks the
tiling too) on length buckets and kept only if better. `exact=True` solves that MILP per sequence without
limits (small instances: the tests' reference). Without a time limit the plan is a pure function of its
inputs: every rank computes the same one (node_limit keeps that; a time limit does not).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from dist.sp_cost import SPCost


GOOD_ENOUGH = 0.01  # stop trying more passes once a plan is within 1% of the next count's lower bound
MORE_PASSES = 2  # pass counts tried beyond the fewest that fit
BUCKETS = 16  # length buckets of the MILP (FlexSP's figure)


class PlanError(ValueError):
    """A batch that cannot be planned, described in one line with the fix."""


@dataclass(frozen=True)
class Group:
    start: int  # first lane
    size: int  # lanes (SP degree)
    seqs: tuple[int, ...]  # indices into the batch's lengths
    time: float  # predicted seconds of its sequences (the pass adds cost.per_pass)


@dataclass(frozen=True)
class Plan:
    microbatches: tuple[tuple[Group, ...], ...]
    predicted: float  # sum over micro-batches of the slowest group's time + cost.per_pass, + cost.per_step
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
    need = cost.min_degree(max(lengths))
    if need > degree:
        raise PlanError(f"a sequence of {max(lengths)} tokens needs an SP group of {need} lanes "
                        f"({cost.tokens_per_lane} tokens per lane): use a static degree >= {need}")
    return _plan_passes(lengths, lanes, cost, degree, passes=passes)


def plan(lengths: list[int], lanes: int, cost: SPCost, time_limit_s: float = 0.0, candidates: int = 3,
         exact: bool = False, passes: int | None = None, node_limit: int = 0, buckets: int = BUCKETS) -> Plan:
    """The adaptive plan for one batch (see the module docstring). time_limit_s > 0 or node_limit > 0 adds the
    per-pass MILP on `buckets` length buckets (0: one item per sequence) under those limits (a time limit makes
    the result depend on the machine's speed: then plan on one rank and broadcast). passes fixes the number of
    micro-batches (default: the fewest that fit, and a few more when that predicts faster)."""
    limits = {k: v for k, v in (("time_limit", time_limit_s), ("node_limit", node_limit)) if v > 0}
    return _plan_passes(lengths, lanes, cost, None, limits, candidates, exact, passes, buckets)


def _plan_passes(lengths, lanes, cost, degree, limits=None, candidates=3, exact=False, passes=None,
                 buckets=BUCKETS) -> Plan:
    lengths = [int(s) for s in lengths]
    capacity = lanes * cost.tokens_per_lane
    too_long = [s for s in lengths if s > capacity]
    if too_long:
        raise PlanError(f"a sequence of {max(too_long)} tokens does not fit on {lanes} lanes of "
                        f"{cost.tokens_per_lane} tokens each: raise parallel.lanes or the memory per lane, "
                        f"or cut sequences to <= {capacity} tokens")
    degrees = [degree] if degree else [1 << i for i in range(lanes.bit_length()) if 1 << i <= lanes]
    full = PassTable.build(list(range(len(lengths))), lengths, degrees, cost)  # every sequence on every degree, once
    area = full.area()
    floor = float(area.sum()) / lanes
    m, best, counts = passes or max(1, math.ceil(sum(lengths) / capacity)), None, 0
    while counts <= (0 if passes else MORE_PASSES) and m <= len(lengths):
        if best is not None and best.predicted <= (floor + m * cost.per_pass + cost.per_step) * (1 + GOOD_ENOUGH):
            break  # m or more passes could gain at most GOOD_ENOUGH over the best plan
        found = False
        for parts in _splits(lengths, area, m, capacity):
            planned = []
            for part in parts:
                done = _plan_pass(full.subset(part), lanes, cost, degree, limits, candidates, exact, buckets)
                if done is None:  # a static degree's groups cannot hold this pass
                    break
                planned.append(done)
            if len(planned) < m:
                continue
            found = True
            total = sum(t for t, _, _ in planned) + m * cost.per_pass + cost.per_step
            if best is None or total < best.predicted - 1e-12:
                solver = "exact" if exact else ("milp" if any(s == "milp" for _, _, s in planned) else "greedy")
                best = Plan(tuple(g for _, g, _ in planned), total, solver)
        counts += found
        if passes:
            break
        m += 1
    if best is None:
        raise PlanError(f"the batch ({len(lengths)} sequences, {sum(lengths)} tokens) could not be split into "
                        f"{passes or 'a few'} pass(es) that fit {lanes} lanes of {cost.tokens_per_lane} tokens: "
                        f"allow more")
    return best


def _splits(lengths: list[int], area: np.ndarray, m: int, capacity: int) -> list[list[list[int]]]:
    """The ways tried to cut the batch into m passes (each pass longest first; only those whose passes hold
    <= capacity tokens). Sequences in order of lane-seconds, most first, either cut into m consecutive runs of
    about equal tokens or equal lane-seconds (long sequences together: they share the large groups while the
    other passes need little all-to-all), or each put into the pass with the fewest lane-seconds that still
    has room (long paired with short: fewer passes can hold the batch)."""
    order = sorted(range(len(lengths)), key=lambda k: (-area[k], -lengths[k], k))
    ways = [_runs(order, np.array(lengths, dtype=float), m), _runs(order, area, m)]
    loads, tokens, paired = [0.0] * m, [0] * m, [[] for _ in range(m)]
    for k in order:
        room = [p for p in range(m) if tokens[p] + lengths[k] <= capacity]
        if not room:
            break
        p = min(room, key=lambda p: (loads[p], p))
        loads[p], tokens[p] = loads[p] + area[k], tokens[p] + lengths[k]
        paired[p].append(k)
    else:
        ways.append(paired)
    out = []
    for parts in ways:
        if all(parts) and all(sum(lengths[k] for k in p) <= capacity for p in parts):
            parts = [sorted(p, key=lambda k: (-lengths[k], k)) for p in parts]
            if parts not in out:
                out.append(parts)
    return out


def _runs(order: list[int], weight: np.ndarray, m: int) -> list[list[int]]:
    """`order` cut into m consecutive runs of about equal total weight (none empty when there are >= m)."""
    total, runs, acc, p = float(weight.sum()), [[] for _ in range(m)], 0.0, 0
    for i, k in enumerate(order):  # no run skipped, and one sequence left for every later run
        p = max(min(int(acc / total * m) if total > 0 else 0, p + 1, m - 1), p, m - (len(order) - i))
        runs[p].append(k)
        acc += weight[k]
    return runs


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
    """Predicted times of one pass's sequences on every allowed degree (inf where a sequence does not fit)."""
    seqs: list[int]
    lengths: list[int]
    degrees: list[int]
    times: np.ndarray  # (degrees, sequences)
    legal: np.ndarray  # smallest degree per sequence

    @staticmethod
    def build(seqs: list[int], lengths: list[int], degrees: list[int], cost: SPCost) -> "PassTable":
        lens = np.array([lengths[k] for k in seqs], dtype=float)
        legal = np.array([cost.min_degree(lengths[k]) for k in seqs])
        times = np.stack([np.where(legal <= d, cost.time(lens, d), np.inf) for d in degrees])
        return PassTable(seqs, [lengths[k] for k in seqs], degrees, times, legal)

    def subset(self, seqs: list[int]) -> "PassTable":
        """The table of some of the batch's sequences (this table must hold the whole batch in order)."""
        return PassTable(seqs, [self.lengths[k] for k in seqs], self.degrees, self.times[:, seqs], self.legal[seqs])

    def area(self) -> np.ndarray:
        """Every sequence's cheapest lane-seconds, min_d d * time(s, d): no plan spends less on it."""
        return (self.times * np.array(self.degrees, dtype=float)[:, None]).min(axis=0)


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


def _plan_pass(table: PassTable, lanes, cost, degree, limits, candidates, exact, buckets):
    """(makespan, groups, solver) for one micro-batch, or None if it cannot fit."""
    if degree:
        packed = _greedy(table, (degree,) * (lanes // degree), cost)
        return packed and (packed[0], _groups((degree,) * (lanes // degree), packed[1], table), "greedy")
    if len(table.seqs) == 1:  # one sequence: its fastest legal group (optimal)
        i = int(np.argmin(table.times[:, 0]))
        d = table.degrees[i]
        sizes = tuple(sorted((d, *(1 << k for k in range((lanes - d).bit_length()) if (lanes - d) >> k & 1)),
                             reverse=True))
        members = [[] for _ in sizes]
        members[sizes.index(d)] = [0]
        return float(table.times[i, 0]), _groups(sizes, members, table), "greedy"
    if exact:
        found = _milp(table, lanes, cost, [[i] for i in range(len(table.seqs))], {})
        return found and (found[0], _groups(found[1], found[2], table), "exact")
    ranked = _rank(table, lanes)  # the best-bounded tilings, and every single-degree tiling as a safety net
    feasible = set(ranked)
    singles = [(d,) * (lanes // d) for d in table.degrees]
    best = None
    for sizes in dict.fromkeys(ranked[:candidates] + [t for t in singles if t in feasible]):
        packed = _greedy(table, sizes, cost)
        if packed and (best is None or packed[0] < best[0] - 1e-15):
            best = (packed[0], sizes, packed[1])
    if best is None:
        return None
    solver = "greedy"
    if limits:
        items = _buckets(table, buckets) if buckets else [[i] for i in range(len(table.seqs))]
        improved = _milp(table, lanes, cost, items, limits, best[0])
        if improved and improved[0] < best[0] - 1e-12:
            best, solver = improved, "milp"
    return best[0], _groups(best[1], best[2], table), solver


def _buckets(table: PassTable, n: int) -> list[list[int]]:
    """min(n, sequences) buckets of consecutive sequences (the pass is sorted longest first), each costed at its
    longest: the cuts minimise the lane-seconds that costing adds, sum over buckets of area(first) - area(k) over
    their members, by dynamic programming: f_r(j) = min_i f_(r-1)(i) + extra(i, j) over buckets [i, j)."""
    w = table.area()
    size = len(w)
    prefix = np.concatenate([[0.0], np.cumsum(w)])
    i, j = np.arange(size + 1)[:, None], np.arange(size + 1)[None, :]
    first = np.append(w, 0.0)[:, None]
    extra = np.where(j > i, (j - i) * first - (prefix[j] - prefix[np.minimum(i, size)]), np.inf)
    f = np.full(size + 1, np.inf)
    f[0] = 0.0
    cuts = []
    for _ in range(min(n, size)):
        both = f[:, None] + extra
        cuts.append(both.argmin(axis=0))
        f = both.min(axis=0)
    out, end = [], size
    for cut in reversed(cuts):
        out.append(list(range(int(cut[end]), end)))
        end = int(cut[end])
    return out[::-1]


def _milp(table: PassTable, lanes: int, cost: SPCost, items: list[list[int]], limits: dict,
          incumbent: float = math.inf):
    """FlexSP's per-pass MILP. Candidate groups: lanes / d of every degree d (p = 1..G); items: buckets of the
    pass's sequences, each costed at its first (longest) member. Variables x[i, p] >= 0 integer (members of
    item i on group p), u[p] binary (group p used), makespan C. Minimise C subject to
        sum_p x[i, p] = |item i|                              every sequence placed once
        sum_i time(s_i, d_p) x[i, p] <= C                     every group finishes by C
        sum_i s_i x[i, p] <= d_p * tokens_per_lane * u[p]     memory (and no work on unused groups)
        sum_p d_p u[p] = lanes,  u[p] >= u[p + 1] within a degree,  x[i, p] = 0 below item i's legal degree,
        C <= incumbent.
    Returns (makespan of the real sequences, sizes, members) or None (infeasible, or no solution in the limits)."""
    sizes = [d for d in sorted(table.degrees, reverse=True) for _ in range(lanes // d)]
    n, g = len(items), len(sizes)
    first = [it[0] for it in items]
    row = {d: table.times[table.degrees.index(d)] for d in table.degrees}
    nv = n * g + g + 1
    A, lo, hi = [], [], []
    for i in range(n):
        r = np.zeros(nv)
        r[i * g:(i + 1) * g] = 1
        A.append(r), lo.append(len(items[i])), hi.append(len(items[i]))
    upper = np.concatenate([np.repeat([len(it) for it in items], g).astype(float), np.ones(g), [incumbent]])
    for p, d in enumerate(sizes):
        t, mem = np.zeros(nv), np.zeros(nv)
        for i, k in enumerate(first):
            if table.legal[k] <= d:
                t[i * g + p], mem[i * g + p] = row[d][k], table.lengths[k]
            else:
                upper[i * g + p] = 0
        t[-1], mem[n * g + p] = -1, -d * cost.tokens_per_lane
        A += [t, mem]
        lo += [-np.inf, -np.inf]
        hi += [0, 0]
        if p + 1 < g and sizes[p + 1] == d:
            r = np.zeros(nv)
            r[n * g + p], r[n * g + p + 1] = 1, -1
            A.append(r), lo.append(0), hi.append(np.inf)
    tiling = np.zeros(nv)
    tiling[n * g:n * g + g] = sizes
    A.append(tiling), lo.append(lanes), hi.append(lanes)
    c = np.zeros(nv)
    c[-1] = 1.0
    integrality = np.ones(nv)
    integrality[-1] = 0
    res = milp(c, constraints=LinearConstraint(np.array(A), lo, hi), integrality=integrality,
               bounds=Bounds(np.zeros(nv), upper), options=limits)
    if res.x is None:
        return None
    x = np.round(res.x[:n * g]).astype(int).reshape(n, g)
    used = [p for p in range(g) if res.x[n * g + p] > 0.5]
    members = [[] for _ in used]
    for i, it in enumerate(items):
        rest = iter(it)
        for q, p in enumerate(used):
            members[q] += [next(rest) for _ in range(x[i, p])]
    chosen = tuple(sizes[p] for p in used)
    return float(max(sum(row[d][k] for k in ks) for ks, d in zip(members, chosen))), chosen, members
