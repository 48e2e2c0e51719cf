"""The adaptive SP planner against brute force on small instances, and its invariants on large ones."""
import itertools
import random
import subprocess
import sys

import numpy as np
import pytest

from dist.sp_cost import SPCost, fit, fit_measured
from dist.sp_planner import PlanError, plan, static_plan, tilings

COST = SPCost(quad=2e-9, lin=1e-6, bytes_per_token=2e4, bandwidth=2e9, tokens_per_lane=1024)


def brute_force(lengths, lanes, cost):
    """Every tiling, every assignment of every sequence to a group: the optimal single-pass makespan."""
    best = np.inf
    for sizes in tilings(lanes):
        for assign in itertools.product(range(len(sizes)), repeat=len(lengths)):
            loads, tokens = [0.0] * len(sizes), [0] * len(sizes)
            ok = True
            for s, p in zip(lengths, assign):
                d = sizes[p]
                if d < cost.min_degree(s):
                    ok = False
                    break
                loads[p] += cost.time(s, d)
                tokens[p] += s
            if ok and all(t <= d * cost.tokens_per_lane for t, d in zip(tokens, sizes)):
                best = min(best, max(loads))
    return best


def check_valid(p, lengths, lanes, cost):
    assigned = [k for groups in p.microbatches for g in groups for k in g.seqs]
    assert sorted(assigned) == list(range(len(lengths)))  # every sequence exactly once
    for groups in p.microbatches:
        assert sum(g.size for g in groups) == lanes
        for g in groups:
            assert g.start % g.size == 0  # aligned lane ranges
            assert sum(lengths[k] for k in g.seqs) <= g.size * cost.tokens_per_lane  # memory
            assert all(cost.min_degree(lengths[k]) <= g.size for k in g.seqs)
    total = sum(max(cost.time(lengths[k], g.size) * 0 + sum(cost.time(lengths[j], g.size) for j in g.seqs)
                    for g in groups for k in g.seqs[:1]) for groups in p.microbatches)
    assert total == pytest.approx(p.predicted)


def test_tilings_are_the_power_of_two_partitions():
    assert tilings(4) == ((4,), (2, 2), (2, 1, 1), (1, 1, 1, 1))
    assert len(tilings(32)) == 202 and len(tilings(64)) == 1828  # binary partitions (OEIS A018819)
    assert all(sum(t) == 64 for t in tilings(64))


@pytest.mark.parametrize("seed", range(12))
def test_exact_plan_equals_brute_force_and_greedy_is_close(seed):
    rng = random.Random(seed)
    lanes = rng.choice([2, 4])
    cost = SPCost(quad=2e-9, lin=1e-6, bytes_per_token=2e4, bandwidth=2e9, tokens_per_lane=4096)
    lengths = [rng.choice([64, 300, 1000, 2500, 5000, 8000]) for _ in range(rng.randint(2, 5))]
    if sum(lengths) > lanes * cost.tokens_per_lane:
        lengths = lengths[:2]
    want = brute_force(lengths, lanes, cost)
    exact = plan(lengths, lanes, cost, exact=True, passes=1)
    assert exact.predicted == pytest.approx(want, rel=1e-9)
    check_valid(exact, lengths, lanes, cost)
    greedy = plan(lengths, lanes, cost, passes=1)
    check_valid(greedy, lengths, lanes, cost)
    assert want - 1e-12 <= greedy.predicted <= 1.5 * want
    assert plan(lengths, lanes, cost).predicted <= greedy.predicted + 1e-12  # more passes only when faster


def test_large_batch_is_split_into_passes_that_fit_and_beats_static_on_a_long_tail():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.pareto(1.2, 512) * 300, 16, 16 * 1024)]
    lanes = 16
    adaptive = plan(lengths, lanes, COST)
    check_valid(adaptive, lengths, lanes, COST)
    assert len(adaptive.microbatches) >= sum(lengths) / (lanes * COST.tokens_per_lane)
    statics = [static_plan(lengths, lanes, d, COST) for d in (1, 2, 4, 8, 16)
               if max(COST.min_degree(s) for s in lengths) <= d]
    for s in statics:
        check_valid(s, lengths, lanes, COST)
    assert adaptive.predicted < min(s.predicted for s in statics)


def test_a_sequence_that_fits_nowhere_names_its_length_and_the_memory():
    with pytest.raises(PlanError, match=r"5000 tokens does not fit on 4 lanes of 1024 tokens"):
        plan([100, 5000], 4, COST)


def test_every_process_computes_the_same_plan():
    code = ("import numpy as np; from dist.sp_planner import plan; from tests.test_sp_planner import COST; "
            "rng = np.random.default_rng(3); L = [int(x) for x in np.clip(rng.pareto(1.2, 300) * 300, 16, 8192)]; "
            "print(repr(plan(L, 8, COST)))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1 and "Plan(" in outs.pop()


def test_fit_recovers_known_coefficients():
    true = SPCost(quad=3e-9, lin=2e-6, bytes_per_token=1e4, bandwidth=1e9, tokens_per_lane=2048, latency=8 * 1e-4)
    compute = [(s, true.quad * s * s + true.lin * s) for s in (256, 512, 1024, 2048, 4096)]
    alltoall = [(b, 1e-4 + b / true.bandwidth) for b in (1e3, 1e5, 1e6, 1e7)]
    got = fit(compute, alltoall, true.bytes_per_token, true.tokens_per_lane, alltoalls_per_sequence=8)
    assert got.quad == pytest.approx(true.quad, rel=1e-6) and got.lin == pytest.approx(true.lin, rel=1e-6)
    assert got.bandwidth == pytest.approx(true.bandwidth, rel=1e-6) and got.latency == pytest.approx(true.latency)
    assert got.time(1000, 1) == pytest.approx(true.quad * 1e6 + true.lin * 1e3)  # one lane: no all-to-all


def test_static_plans_use_only_their_degree_even_for_single_sequence_passes():
    lengths = [2000, 1900, 1800]  # 2 passes of 4 lanes x 1024 tokens, the first with one sequence
    p = static_plan(lengths, 4, 2, COST)  # (a group of 4 would run a 2000-token sequence faster here)
    assert len(p.microbatches) >= 2 and {g.size for groups in p.microbatches for g in groups} == {2}
    adaptive = plan(lengths, 4, COST)
    check_valid(adaptive, lengths, 4, COST)
    assert 4 in {g.size for groups in adaptive.microbatches for g in groups if g.seqs}


def test_measured_group_times_replace_the_analytic_model():
    runs = {1: [(s, 1e-7 * s * s + 2e-4 * s) for s in (128, 512, 2048)],
            2: [(s, 5e-8 * s * s + 1e-4 * s + 0.01) for s in (128, 512, 2048)]}
    cost = SPCost(quad=1e-7, lin=2e-4, bytes_per_token=1e4, bandwidth=1e9, tokens_per_lane=4096,
                  measured=fit_measured(runs))
    assert cost.time(1000, 2) == pytest.approx(5e-8 * 1e6 + 1e-4 * 1000 + 0.01, rel=1e-6)
    assert cost.time(1000, 4) == pytest.approx(cost.analytic().time(1000, 4))  # not measured: analytic
    assert cost.analytic().time(1000, 2) != pytest.approx(cost.time(1000, 2))
