"""bench/slow_link.py's delay arithmetic and dist/sp_cost.py's fixed-cost fit (no processes)."""
import pytest

from bench import slow_link
from dist.sp_cost import SPCost, fit_fixed


def test_delay_is_the_off_node_bytes_over_the_node_bandwidth_and_matches_the_cost_model():
    link = slow_link.parse("1:0.05")
    assert link == slow_link.SlowLink(1, 5e7)
    assert link.delay(1e6, 1) == 0.0  # a group of one lane never leaves its node
    assert link.delay(1e6, 2) == pytest.approx(0.02)  # 1 MB at 50 MB/s
    four = slow_link.parse("2:1")
    assert four.delay(3e6, 2) == 0.0  # inside one node of 2 lanes
    assert four.delay(3e6, 4) == pytest.approx(2 * 3e6 * 2 / 3 / 1e9)  # 2 of 3 peers off the node, 2 lanes share
    # the cost model's cross-node comm for a sequence whose all-to-all bytes per lane are v (d - 1) / d
    cost = SPCost(quad=0, lin=0, bytes_per_token=3.0, bandwidth=1e12, tokens_per_lane=10 ** 6, lanes_per_node=2,
                  node_bandwidth=1e9)
    s, d = 4096, 4
    nbytes = cost.bytes_per_token * s / d * (d - 1) / d
    assert cost.time(s, d) == pytest.approx(four.delay(nbytes, d))


@pytest.mark.parametrize("spec", ["", "2", "0:1", "1:0", "a:1", "1:x"])
def test_a_malformed_link_is_refused_naming_the_form(spec):
    with pytest.raises(ValueError, match="<lanes_per_node>:<GB/s>"):
        slow_link.parse(spec)


def test_the_hook_sleeps_only_after_all_to_alls_of_groups_across_nodes(monkeypatch):
    slept = []
    monkeypatch.setenv(slow_link.ENV, "1:0.001")
    monkeypatch.setattr(slow_link.time, "sleep", slept.append)
    hooks = []
    slow_link.install(hooks.append)
    hooks[0]("step", {"step": 1})
    hooks[0]("all_to_all", {"nbytes": 500.0, "group_size": 1})
    hooks[0]("all_to_all", {"nbytes": 500.0, "group_size": 2})
    assert slept == [pytest.approx(5e-4)]


def test_fit_fixed_takes_the_least_residual():
    assert fit_fixed([0.11, 0.10, 0.5, -0.02, 0.12]) == pytest.approx(-0.02)  # 0.5: a loaded step; < 0: profile high
