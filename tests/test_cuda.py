"""On a GPU (`pytest -m cuda`, run by bench/gpu_check.sh; deselected elsewhere): bf16 against fp32 numerics,
compiled FlexAttention against SDPA's math kernel on the same masks, the undo snapshot through pinned host
memory, and a 2-process pipeline on one GPU (gloo with CUDA tensors: one GPU cannot host two NCCL ranks)."""
import json
import os

import pytest
import torch

from config import OptimConfig
from metrics import read_log
from model.llama import attention, document_block_mask, document_mask
from model.stages import build_stage, set_fast_path, token_loss_sum
from optim.inner import build_optimizer
from recovery import snapshot
from tests.procs import run, train_cmd
from tests.tiny import tiny_batch, tiny_model_config

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


def test_a_gpu_is_visible():
    assert torch.cuda.is_available(), "these tests need a GPU: run them on a machine with one (bench/gpu_check.sh)"


def test_compiled_flex_attention_equals_sdpa_math_on_document_masks():
    g = torch.Generator(device=CUDA).manual_seed(0)
    b, t, d = 2, 1024, 64
    doc_ids = (torch.rand(b, t, device=CUDA, generator=g) < 0.004).long().cumsum(1)
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        q = torch.randn(b, 8, t, d, device=CUDA, dtype=dtype, generator=g, requires_grad=True)
        k, v = (torch.randn(b, 2, t, d, device=CUDA, dtype=dtype, generator=g, requires_grad=True) for _ in range(2))
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            expected = attention(q, k, v, document_mask(doc_ids))
            grads = torch.autograd.grad(expected.float().sum(), (q, k, v))
        got = attention(q, k, v, document_block_mask(doc_ids))
        assert (got.float() - expected.float()).abs().max() < tol, dtype
        for a, e in zip(torch.autograd.grad(got.float().sum(), (q, k, v)), grads):
            assert (a.float() - e.float()).abs().max() < 10 * tol, dtype


def train_losses(precision: str, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    cfg = tiny_model_config(n_layers=4)
    module = set_fast_path(build_stage(cfg, 0, 1, 128, seed=1).to(CUDA), precision, False, False)
    optimizer = build_optimizer(module, OptimConfig(lr=3e-3, fused=True))
    losses = []
    for step in range(steps):
        batch = tiny_batch(cfg, seed=step % 4, rows=8, seq_len=128).to(CUDA)
        loss = token_loss_sum(module(batch.inputs, module.prepare(batch.doc_ids)), batch.targets) / batch.n_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_bf16_autocast_trains_like_fp32():
    fp32, bf16 = train_losses("fp32"), train_losses("bf16")
    print("fp32", fp32[-1], "bf16", bf16[-1])
    assert fp32[-1] < fp32[0] - 0.5 and abs(bf16[-1] / fp32[-1] - 1) < 0.03


def test_undo_snapshot_goes_through_pinned_host_memory_and_restores():
    cfg = tiny_model_config(n_layers=2)
    module = build_stage(cfg, 0, 1, 32, seed=1).to(CUDA)
    optimizer = build_optimizer(module, OptimConfig(fused=True))
    batch = tiny_batch(cfg, seed=1, rows=2).to(CUDA)

    class NoSync:
        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    token_loss_sum(module(batch.inputs, module.prepare(batch.doc_ids)), batch.targets).backward()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    undo = snapshot.take(module, optimizer, NoSync(), wait=False)
    optimizer.step()  # queued after the copies: they hold the state from before it
    assert all(t.is_pinned() for t in undo["module"].values())
    snapshot.restore(undo, module, optimizer, NoSync())
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_two_stage_pipeline_on_one_gpu_through_gloo(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    run(train_cmd(2, f"log.run_dir={run_dir}", f"data.cache_dir={corpus_cache}", "parallel.replicas=1",
                  "parallel.stages=2", "parallel.microbatches=2", "parallel.backend=gloo", "train.device=cuda",
                  "train.precision=bf16", "model.attention=flex", "optim.fused=true", "train.steps=30",
                  "train.batch_size=8", "data.seq_len=128", "log.eval_every=30", "log.eval_batches=2",
                  "log.log_every=5", "checkpoint.every=0", "log.tensorboard=false"), timeout=400)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    losses = [r["loss"] for r in read_log(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert len(losses) == 30 and losses[-1] < losses[0] - 1.0 and summary["peak_memory_bytes"] > 0
