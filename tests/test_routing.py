"""Random pipeline routing: bijections every stage, consistent hops, deterministic."""
import pytest

from dist.routing import hops, route


@pytest.mark.parametrize("members,stages", [((0, 1), 2), ((0, 1, 2), 3), ((0, 1, 2, 3), 2), ((0, 1, 2, 3), 4),
                                           ((0, 2, 3), 3)])  # the last: replica 1 sits out and is routed around
def test_every_stage_holds_each_microbatch_once_and_hops_agree(members, stages):
    moved = 0
    for step in range(5):
        for mb in range(3):
            paths = route(members, 7, step, mb, stages)
            assert paths == route(members, 7, step, mb, stages)
            for s in range(stages):
                assert sorted(p[s] for p in paths) == list(members)  # a bijection among the members at every stage
            for d, path in zip(members, paths):
                moved += path[-1] != d
                for s, r in enumerate(path):
                    origin, prev_r, next_r = hops(members, 7, step, mb, stages, r, s)
                    assert origin == d
                    assert prev_r == (path[s - 1] if s else None)
                    assert next_r == (path[s + 1] if s < stages - 1 else None)
    assert moved > 0  # routes really mix replicas


def test_routing_under_ddp_trains_the_same_model(tmp_path, corpus_cache):
    """With DDP every replica holds the same weights, so routing only reorders the sum of micro-batch
    gradients: the trained weights must match a run without routing up to float rounding."""
    import torch

    from tests.procs import run, train_cmd
    from tests.test_lowcomm_dist import LOWCOMM
    from metrics import read_log
    from tests.test_resume import final_weights

    plain, routed = str(tmp_path / "plain"), str(tmp_path / "routed")
    common = [*LOWCOMM, "train.steps=6", f"data.cache_dir={corpus_cache}"]
    run(train_cmd(4, *common, f"log.run_dir={plain}"))
    run(train_cmd(4, *common, "sync.routing=true", f"log.run_dir={routed}"))
    a, b = final_weights(plain, 6, tmp_path)["replica0"]["model"], final_weights(routed, 6, tmp_path)["replica0"]["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    for r in (0, 1):  # routing moves activations, not the samples each replica's loader consumes
        taken = [[(x["step"], x["samples"]) for x in read_log(f"{run}/ledger/replica{r}.jsonl")] for run in (plain, routed)]
        assert taken[0] == taken[1]
    losses_plain = [x["loss"] for x in read_log(f"{plain}/metrics.jsonl") if "loss" in x]
    losses_routed = [x["loss"] for x in read_log(f"{routed}/metrics.jsonl") if "loss" in x]
    assert losses_plain != losses_routed  # replica 0's last stage really saw other micro-batches


def test_noloco_with_routing_runs_without_collectives(tmp_path, corpus_cache):
    import json

    from tests.procs import run, train_cmd
    from tests.test_lowcomm_dist import LOWCOMM

    run_dir = str(tmp_path / "run")
    run(train_cmd(4, *LOWCOMM, "sync.method=noloco", "sync.H=4", "sync.routing=true",
                  f"data.cache_dir={corpus_cache}", f"log.run_dir={run_dir}"))
    s = json.load(open(f"{run_dir}/summary.json"))
    assert "cross_replica" not in s["collectives"]
    # 3 pair exchanges, plus activations and their gradients that the routes sent to another replica
    assert s["p2p"]["cross_replica"] > 3
