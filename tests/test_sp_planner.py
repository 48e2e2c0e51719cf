"""The adaptive SP planner against brute force on small instances, and its invariants on large ones."""
import itertools
import random
import subprocess
import sys
from functools import lru_cache

import numpy as np
import pytest

from dist.sp_cost import SPCost, fit, fit_measured, lane_tokens, preset
from dist.sp_planner import PassTable, PlanError, _buckets, _runs, plan, static_plan, tilings

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
    total = sum(max(sum(cost.time(lengths[k], g.size) for k in g.seqs) for g in groups) + cost.per_pass
                for groups in p.microbatches)
    assert total == pytest.approx(p.predicted)


def pass_optimum(lengths, lanes, cost):
    """The best single-pass makespan of these sequences (inf if they do not fit), every tiling and assignment."""
    s = np.array(lengths, dtype=float)
    best = np.inf
    for sizes in tilings(lanes):
        assign = np.array(list(itertools.product(range(len(sizes)), repeat=len(s))))[:, :, None]  # (A, n, 1)
        d = np.array(sizes)[None, None, :]
        onehot = assign == np.arange(len(sizes))[None, None, :]  # (A, n, groups)
        legal = np.array([cost.min_degree(x) for x in s])[None, :, None] <= d
        times = np.stack([cost.time(s, x) for x in sizes], axis=1)[None]  # (1, n, groups)
        fits = ((onehot * s[None, :, None]).sum(1) <= d[0] * cost.tokens_per_lane).all(1)
        ok = (legal | ~onehot).all(axis=(1, 2)) & fits
        if ok.any():
            best = min(best, float((onehot * times).sum(1).max(1)[ok].min()))
    return best


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield part[:i] + [[first, *part[i]]] + part[i + 1:]


def multi_pass_optimum(lengths, lanes, cost):
    """The optimal step: every split into passes, each pass at its optimum, plus per_pass per pass."""
    single = lru_cache(maxsize=None)(lambda ks: pass_optimum([lengths[k] for k in ks], lanes, cost))
    return min(sum(single(tuple(b)) for b in part) + cost.per_pass * len(part)
               for part in set_partitions(list(range(len(lengths)))))


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


def random_instance(rng):
    """A small instance: 2 or 4 lanes, 2 lanes per node with a slow cross-node link, 2-5 sequences, a per-pass cost."""
    lanes = rng.choice([2, 4])
    cost = SPCost(quad=2e-9, lin=1e-6, bytes_per_token=2e4, bandwidth=2e9, tokens_per_lane=2048,
                  per_pass=rng.choice([0.0, 1e-3, 5e-3]), lanes_per_node=2, node_bandwidth=2e8)
    lengths = [min(rng.choice([64, 300, 1000, 2500, 5000, 8000]), lanes * 2048) for _ in range(rng.randint(2, 5))]
    return lengths, lanes, cost


def test_plans_are_valid_and_within_5_percent_of_the_optimum_on_average_over_200_random_instances():
    rng = random.Random(0)
    ratios = []
    for _ in range(200):
        lengths, lanes, cost = random_instance(rng)
        got = plan(lengths, lanes, cost)
        check_valid(got, lengths, lanes, cost)
        want = multi_pass_optimum(lengths, lanes, cost)
        assert got.predicted >= want - 1e-12
        ratios.append(got.predicted / want)
    assert np.mean(ratios) <= 1.05, (np.mean(ratios), max(ratios))


def test_pairing_long_with_short_needs_fewer_passes_than_consecutive_chunks():
    """Capacity 2 x 1000 tokens: longest-first consecutive halves put 1200 + 1100 together (over capacity, so a third
    pass), pairing 1200 + 700 and 1100 + 800 fits two; with a per-pass cost two passes are the cheaper plan."""
    cost = SPCost(quad=1e-9, lin=1e-6, bytes_per_token=1e4, bandwidth=1e9, tokens_per_lane=1000, per_pass=0.01)
    lengths = [1200, 1100, 800, 700]
    order = [0, 1, 2, 3]
    assert [sum(lengths[k] for k in run) for run in _runs(order, np.array(lengths, float), 2)] == [2300, 1500]
    got = plan(lengths, 2, cost)
    check_valid(got, lengths, 2, cost)
    assert len(got.microbatches) == 2
    assert sorted(sorted(lengths[k] for g in mb for k in g.seqs) for mb in got.microbatches) == [[700, 1200],
                                                                                               [800, 1100]]
    three = plan(lengths, 2, cost, passes=3)
    assert got.predicted < three.predicted
    assert got.predicted == pytest.approx(multi_pass_optimum(lengths, 2, cost))


def test_the_per_pass_milp_under_limits_returns_valid_plans_no_worse_than_greedy():
    rng = np.random.default_rng(1)
    cost = SPCost(quad=2e-9, lin=1e-6, bytes_per_token=2e4, bandwidth=2e9, tokens_per_lane=1024, per_pass=1e-3,
                  lanes_per_node=4, node_bandwidth=4e8)
    lengths = [int(x) for x in np.clip(rng.pareto(1.2, 60) * 300, 16, 8 * 1024)]
    greedy = plan(lengths, 8, cost)
    for kw in ({"node_limit": 200}, {"node_limit": 200, "buckets": 0}, {"time_limit_s": 2.0}):
        got = plan(lengths, 8, cost, **kw)
        check_valid(got, lengths, 8, cost)
        assert got.predicted <= greedy.predicted + 1e-12 and got.solver in ("greedy", "milp")
    assert repr(plan(lengths, 8, cost, node_limit=200)) == repr(plan(lengths, 8, cost, node_limit=200))


def test_buckets_cover_the_pass_in_order_and_cut_where_lengths_jump():
    lengths = [9000, 8990, 3000, 2990, 2980, 100, 90, 80]
    table = PassTable.build(list(range(8)), lengths, [1, 2, 4, 8, 16], COST)
    assert _buckets(table, 3) == [[0, 1], [2, 3, 4], [5, 6, 7]]
    assert _buckets(table, 16) == [[k] for k in range(8)]


def test_cross_node_groups_share_the_nodes_links():
    cost = SPCost(quad=0.0, lin=0.0, bytes_per_token=1.0, bandwidth=100.0, tokens_per_lane=10, lanes_per_node=8,
                  node_bandwidth=40.0, bandwidths={"64": 5.0})
    assert cost.link(8) == 100.0 and cost.link(2) == 100.0
    assert cost.link(16) == pytest.approx(40.0 * 15 / (8 * 8))  # 8 lanes each send half their data off the node
    assert cost.link(64) == 5.0  # measured
    assert cost.time(1600, 16) == pytest.approx(1600 / 16 * 15 / 16 / cost.link(16))
    with pytest.raises(ValueError, match="node_bandwidth is not set"):
        SPCost(quad=0, lin=0, bytes_per_token=1, bandwidth=1, tokens_per_lane=1, lanes_per_node=2).time(10, 4)


def test_lane_tokens_from_model_states_and_activations():
    assert lane_tokens(10e9, 1e6, params=1e8, state_shards=4) == (10e9 - 16 * 1e8 / 4) // 1e6
    with pytest.raises(ValueError, match="shard the states over more lanes"):
        lane_tokens(1e9, 1e6, params=1e8)


def test_flexsp_preset_holds_the_published_figures():
    cost = preset("flexsp-a100-64")
    assert cost.tokens_per_lane == 6696  # 30 GB / 4.48 MB per token
    assert cost.min_degree(192 * 1024) == 32 and cost.min_degree(384 * 1024) == 64  # FlexSP's static baselines
    assert [round(cost.link(d) / 1e9, 1) for d in (2, 4, 8, 16, 32, 64)] == [119.5, 104.1, 96.5, 10.3, 5.9, 4.9]
    assert cost.time(1000, 1) == pytest.approx(5.128e-9 * 1e6 + 0.184)
    with pytest.raises(ValueError, match="unknown SP cost preset 'x': use one of flexsp-a100-64"):
        preset("x")


def test_lane_tokens_with_attention_scores_kept_is_the_largest_sequence_that_fits():
    e = lane_tokens(1e9, 1000.0, quadratic=2.0)
    assert 1000.0 * e + 2.0 * e * e <= 1e9 < 1000.0 * (e + 1) + 2.0 * (e + 1) ** 2
