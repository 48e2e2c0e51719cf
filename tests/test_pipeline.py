"""Pipeline schedules, and equivalence of S = 2 / 3 real processes with one process (loss and gradients)."""
import os

import pytest
import torch

from dist.pipeline import schedule, swap_route
from model.stages import build_stage, token_loss_sum
from tests.procs import run, torchrun_cmd
from tests.tiny import tiny_batch, tiny_model_config


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,m", [(1, 1), (2, 4), (3, 2), (4, 8)])
def test_schedule_runs_every_microbatch_once_forward_before_backward(kind, stages, m):
    for s in range(stages):
        actions = schedule(kind, s, stages, m)
        assert sorted(actions) == sorted([("F", i) for i in range(m)] + [("B", i) for i in range(m)])
        for i in range(m):
            assert actions.index(("F", i)) < actions.index(("B", i))
        assert [i for op, i in actions if op == "B"] == list(range(m))  # same order on every stage


def test_1f1b_bounds_activations_in_flight():
    stages, m = 4, 8
    for s in range(stages):
        live, peak = 0, 0
        for op, _ in schedule("1f1b", s, stages, m):
            live += 1 if op == "F" else -1
            peak = max(peak, live)
        assert peak == stages - s  # GPipe would hold all 8


def reference(replica: int):
    """One process, whole model, whole batch: the loss and gradients the pipeline must reproduce."""
    cfg = tiny_model_config()
    model = build_stage(cfg, 0, 1, max_seq_len=32, seed=7)
    batch = tiny_batch(cfg, seed=replica)
    loss = token_loss_sum(model(batch.inputs, model.prepare(batch.doc_ids)), batch.targets) / batch.n_tokens
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def reference_swapped(replica: int, stages: int, m: int):
    """One process holding every stage, each micro-batch run through its CheckFree+ route."""
    cfg = tiny_model_config()
    parts = [build_stage(cfg, s, stages, max_seq_len=32, seed=7) for s in range(stages)]
    batch = tiny_batch(cfg, seed=replica)
    loss = 0.0
    for i, mb in enumerate(batch.split(m)):
        h = mb.inputs
        for s, blocks in swap_route(stages, i):
            h = parts[s].forward_parts(h, parts[s].prepare(mb.doc_ids), blocks)
        loss = loss + token_loss_sum(h, mb.targets) / batch.n_tokens
    loss.backward()
    return loss.item(), {n: p.grad for part in parts for n, p in part.named_parameters()}


@pytest.mark.parametrize("stages,kind,m,nproc", [(2, "1f1b", 4, 4), (3, "gpipe", 2, 3), (3, "1f1b", 4, 3),
                                                 (3, "swap", 4, 3), (2, "swap", 2, 2)])
def test_pipeline_over_processes_matches_single_process(tmp_path, stages, kind, m, nproc):
    run(torchrun_cmd(nproc, "tests/workers/pipeline_step.py", str(tmp_path), str(stages), kind, str(m)))
    replicas = nproc // stages
    for r in range(replicas):
        ref_loss, ref_grads = reference_swapped(r, stages, m) if kind == "swap" else reference(r)
        got = {}
        for s in range(stages):
            out = torch.load(os.path.join(tmp_path, f"rank{r * stages + s}.pt"))
            got.update(out["grads"])
            if s == stages - 1:
                assert abs(out["loss"] - ref_loss) < 1e-5
            if stages > 1:
                assert out["bytes"]["intra_replica"] > 0
        assert got.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5, msg=name)
