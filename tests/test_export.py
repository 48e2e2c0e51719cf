"""`python -m recovery.export`: a 2-stage x 2-replica run's checkpoint as one model file (Hugging Face Llama names)
that a single process loads back and that reproduces the validation loss of the weights it holds."""
import json
import os
import shutil
import sys

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data.dataset import load_corpus
from data.loader import validation_batches
from model.llama import apply_rope, rope_tables
from model.stages import build_stage, token_loss_sum
from recovery.export import load_model, rope_rows
from tests.procs import run, train_cmd
from tests.test_bad_input import one_line_error
from tests.test_resume import TINY

TOPO = ["parallel.replicas=2", "parallel.stages=2", "log.eval_every=12", "log.eval_batches=2"]


def val_loss(module, cfg) -> float:
    """Mean validation token loss on one process, over the batches a run evaluates (train.evaluate)."""
    corpus = load_corpus(cfg.data)
    batches = validation_batches(corpus.val, corpus.eos, cfg.log.eval_batches, cfg.train.batch_size, 0, 1)
    with torch.no_grad():
        total = sum(float(token_loss_sum(module(b.inputs, module.prepare(b.doc_ids)), b.targets)) for b in batches)
    return total / sum(b.n_tokens for b in batches)


def export_cmd(*args):
    return [sys.executable, "-m", "recovery.export", *map(str, args)]


def trained(tmp_path_factory, cache, name, *overrides):
    run_dir = str(tmp_path_factory.mktemp(name))
    run(train_cmd(4, *TINY, *TOPO, f"data.cache_dir={cache}", f"log.run_dir={run_dir}", *overrides))
    return run_dir


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, corpus_cache):
    return trained(tmp_path_factory, corpus_cache, "ddp")


def test_ddp_export_reproduces_the_runs_val_loss(ddp_run, tmp_path):
    out = tmp_path / "export"
    proc = run(export_cmd(os.path.join(ddp_run, "checkpoints", "step_00000012"), out))
    assert "model.pt" in proc.stdout
    module, cfg = load_model(str(out))
    assert cfg.model.vocab_size > 0 and set(map(int, module.layers)) == {0, 1}  # both stages' layers
    with open(os.path.join(ddp_run, "summary.json")) as fh:
        expected = json.load(fh)["val_loss"]
    assert abs(val_loss(module, cfg) - expected) < 1e-4


def test_diloco_export_is_the_replicas_mean(tmp_path_factory, tmp_path, corpus_cache):
    """Checkpoints at steps 8 and 12, outer steps at 5, 10 and the last: at step 8 the replicas differ and the
    export is their mean; at the end they are one model and the export reproduces the run's val loss."""
    run_dir = trained(tmp_path_factory, corpus_cache, "diloco", "sync.method=diloco", "sync.H=5", "checkpoint.every=4")
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000008")
    run(export_cmd(ckpt, tmp_path / "mid"))
    module, cfg = load_model(str(tmp_path / "mid"))
    dcp_to_torch_save(ckpt, tmp_path / "whole.pt")  # the reference, read by DCP's own converter
    saved = torch.load(tmp_path / "whole.pt", weights_only=False)
    replicas = [saved[f"replica{r}"]["model"] for r in range(2)]
    assert not torch.equal(replicas[0]["head.weight"], replicas[1]["head.weight"])
    reference = build_stage(cfg.model, 0, 1, cfg.data.seq_len, cfg.train.seed)
    reference.load_state_dict({k: (replicas[0][k] + replicas[1][k]) / 2 for k in replicas[0]})
    for name, p in reference.state_dict().items():
        assert torch.allclose(module.state_dict()[name], p, atol=1e-7), name
    assert abs(val_loss(module, cfg) - val_loss(reference, cfg)) < 1e-5

    run(export_cmd(os.path.join(run_dir, "checkpoints", "step_00000012"), tmp_path / "end"))
    with open(os.path.join(run_dir, "summary.json")) as fh:
        assert abs(val_loss(*load_model(str(tmp_path / "end"))) - json.load(fh)["val_loss"]) < 1e-4


def test_hf_rope_layout_keeps_attention_scores():
    """q_proj rows permuted for Hugging Face's half-and-half RoPE give the same rotated vectors, reordered."""
    heads, hd, dim, t = 2, 8, 16, 5
    g = torch.Generator().manual_seed(0)
    wq, x = torch.randn(heads * hd, dim, generator=g), torch.randn(t, dim, generator=g)
    cos, sin = rope_tables(hd, t, 10000.0)
    ours = apply_rope((x @ wq.T).view(t, heads, hd).transpose(0, 1)[None], cos[None, None], sin[None, None])[0]
    q = (x @ rope_rows(wq, heads, to_hf=True).T).view(t, heads, hd).transpose(0, 1)
    hf = q * torch.cat([cos, cos], -1) + torch.cat([-q[..., hd // 2:], q[..., :hd // 2]], -1) * torch.cat([sin, sin], -1)
    assert torch.allclose(ours[..., 0::2], hf[..., :hd // 2], atol=1e-5)
    assert torch.allclose(ours[..., 1::2], hf[..., hd // 2:], atol=1e-5)
    assert torch.equal(rope_rows(rope_rows(wq, heads, to_hf=True), heads, to_hf=False), wq)


def test_bad_checkpoint_is_one_line(ddp_run, tmp_path):
    line = one_line_error(run(export_cmd(tmp_path, tmp_path / "out"), check=False))
    assert "is not a checkpoint folder" in line
    corrupt = tmp_path / "run"
    shutil.copytree(ddp_run, corrupt)
    ckpt = corrupt / "checkpoints" / "step_00000012"
    shard = next(p for p in ckpt.iterdir() if p.suffix == ".distcp")
    with open(shard, "r+b") as fh:
        fh.seek(shard.stat().st_size // 2)
        fh.write(b"\xff\x00\xff\x00")
    line = one_line_error(run(export_cmd(ckpt, tmp_path / "out"), check=False))
    assert "does not match its checksum" in line
    assert not (tmp_path / "out").exists()
