"""Bad input fails at start-up with one clear line naming the fix; nothing already trained is lost."""
import os
import re
import shutil
import sys

import pytest
from omegaconf import OmegaConf

from config import RANGES, Config, ConfigError, _all_keys, check_world, in_range, load_config
from tests.procs import run, train_cmd
from tests.test_resume import TINY


def one_line_error(proc, torchrun: bool = False) -> str:
    """Exactly one 'flotilla: error:' line (from rank 0 only); exit status 2 (torchrun turns it into 1)."""
    assert proc.returncode == (1 if torchrun else 2), proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("flotilla: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert torchrun or "Traceback" not in proc.stderr
    return lines[0]


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer' \(did you mean 'model.n_layers'\?\)"):
        load_config(["model.n_layer=8"])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"bad value for config key 'train.steps'"):
        load_config(["train.steps=lots"])


def test_overrides_and_presets_apply():
    cfg = load_config(["model.n_layers=8", "parallel.stages=2", "parallel.replicas=1"])
    assert cfg.model.n_layers == 8 and cfg.parallel.stages == 2
    for preset in ("llama-125m", "llama-1b"):
        big = load_config([f"config={preset}"])
        assert big.model.dim >= 768 and big.train.device == "cuda"


@pytest.mark.parametrize("override,needle", [
    (["parallel.stages=5"], "exceeds model.n_layers=4"),
    (["train.batch_size=10", "parallel.microbatches=4"], "equal micro-batches"),
    (["model.n_heads=3"], "must divide"),
    (["parallel.schedule=zb"], "choose gpipe or 1f1b"),
    (["data.source=path", "data.path=/no/such/folder"], "data.path='/no/such/folder' is not a folder"),
    (["checkpoint.resume=/no/such/ckpt"], "is not a checkpoint folder"),
    (["sync.method=allreduce"], "choose ddp, diloco or noloco"),
    (["sync.compress=ef21-top5"], "e.g. ef21-topk"),
    (["sync.method=noloco", "sync.compress=ef21-topk"], "set sync.compress=none with sync.method=noloco"),
    (["sync.method=noloco", "sync.alpha=0.8"], "needs beta > alpha"),
    (["sync.method=noloco", "sync.gamma=1.6"], "alpha < gamma < sqrt(2 + alpha^2)"),
    (["sync.method=diloco", "sync.precision=int2"], "choose fp32, bf16, int8 or int4"),
    (["sync.method=diloco", "sync.H=4", "sync.fragments=5"], "1 <= fragments <= H"),
    (["sync.compress=ef21-topk", "sync.chunk=65536"], "sync.chunk=65536 must be in (0, 32768]"),
    (["sync.lane_compress=topk"], "sync.lane_compress='topk'"),
    (["parallel.lanes=4", "parallel.sp=static:3"], "must be a power of two that divides parallel.lanes=4"),
    (["parallel.lanes=4", "parallel.sp=ulysses"], "choose adaptive or static:<d>"),
    (["parallel.lanes=8"], "model.n_heads=4 must divide by the largest SP group (8 lanes"),
    (["parallel.lanes=2", "sync.routing=true"], "parallel.lanes > 1 with sync.routing is not supported"),
    (["recovery.coordinator=h:1", "sync.method=diloco", "sync.H=4", "sync.fragments=2"], "set sync.fragments=1"),
    (["checkpoint.keep=-1"], "checkpoint.keep=-1 must be >= 0: set e.g. checkpoint.keep=2"),
    (["sync.compress=ef21sgdm-topk"], "set optim.beta1=0 so AdamW does not apply momentum on top of it"),
    (["sync.method=diloco", "sync.compress=ef14-topk"], "set sync.outer_momentum=0"),
    (["model.attention=flex"], "set model.attention=sdpa, or train.device=cuda"),
    (["train.precision=fp16"], "train.precision='fp16': choose fp32 or bf16"),
    (["recovery.coordinator=h:1", "recovery.phase_margin_s=0"], "recovery.phase_margin_s=0.0 must be > 0"),
    (["model.n_heads=0"], "model.n_heads=0 must be >= 1"),
    (["model.dim=12", "model.n_heads=4"], "into an even head size"),
    (["optim.beta2=1"], "optim.beta2=1.0 must be in [0, 1)"),
    (["optim.eps=0"], "optim.eps=0.0 must be > 0"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1 must be >= 0"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0 must be >= 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 must be >= 0"),
    (["optim.min_lr=0.01"], "optim.min_lr=0.01 exceeds optim.lr=0.003"),
    (["optim.lr=nan"], "optim.lr=nan must be > 0"),
    (["train.batch_size=0"], "train.batch_size=0 must be >= 1"),
    (["log.eval_batches=0"], "log.eval_batches=0 must be >= 1"),
    (["parallel.timeout_s=0"], "parallel.timeout_s=0.0 must be > 0"),
    (["data.val_percent=100"], "data.val_percent=100.0 must be in (0, 100)"),
    (["sync.outer_momentum=1"], "sync.outer_momentum=1.0 must be in [0, 1)"),
    (["wan.port=70000"], "wan.port=70000 must be in [0, 65536)"),
    (["recovery.rebuild=magic"], "recovery.rebuild='magic': choose auto, checkfree or checkpoint"),
    (["data.tokenizer=wordpiece"], "data.tokenizer='wordpiece': choose byte or bpe"),
])
def test_bad_values_are_refused(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(override)


def test_every_numeric_option_has_a_range():
    defaults = OmegaConf.to_container(OmegaConf.structured(Config))
    numeric = {f"{section}.{key}" for section, fields in defaults.items() for key, v in fields.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numeric == set(RANGES)
    cfg = Config()
    assert all(in_range(getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]), rule) for k, rule in RANGES.items())


def test_cli_bad_values_are_one_line_and_touch_no_checkpoint(tmp_path):
    """Through the real command line: one error line naming the fix, exit 2, no traceback, and an existing run's
    checkpoints left as they were."""
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "step_00000005"
    ckpt.mkdir(parents=True)
    (ckpt / "manifest.json").write_text('{"step": 5, "files": {}}')
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    cases = [("log.log_every=0", "log.log_every=0 must be >= 1: set e.g. log.log_every=10"),
             ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
             ("optim.lr=-1", "optim.lr=-1.0 must be > 0"),
             ("train.steps=-5", "train.steps=-5 must be >= 1"),
             ("parallel.backend=mpi", "parallel.backend='mpi': choose auto, gloo or nccl"),
             ("train.device=gpu", "train.device='gpu': choose cpu or cuda")]
    for override, needle in cases:
        proc = run(train_cmd(1, "parallel.replicas=1", "parallel.stages=1", f"log.run_dir={run_dir}",
                             "checkpoint.resume=latest", override), check=False)
        assert needle in one_line_error(proc), override
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before


def test_help_lists_every_key_with_its_default_and_meaning():
    proc = run([sys.executable, "train.py", "--help"])
    assert proc.stdout.startswith("usage: python train.py")
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.startswith("  ") and "=" in ln.split()[0]}
    defaults = OmegaConf.structured(Config)
    for key in _all_keys(OmegaConf.to_container(defaults)):
        if "." not in key:
            continue
        default = OmegaConf.select(defaults, key)
        shown = str(default).lower() if isinstance(default, bool) else "''" if default == "" else str(default)
        assert f"{key}={shown}" in lines, key
        assert len(lines[f"{key}={shown}"].split()) > 1, f"{key} has no one-line comment in config.py"


def test_print_config_prints_the_resolved_yaml_and_starts_nothing(tmp_path):
    run_dir = tmp_path / "never"
    proc = run([sys.executable, "train.py", "--print-config", "parallel.stages=1", "train.steps=7",
                f"log.run_dir={run_dir}"])
    printed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(proc.stdout)))
    assert printed == load_config(["parallel.stages=1", "train.steps=7", f"log.run_dir={run_dir}"])
    assert not run_dir.exists()


def test_world_size_must_fit_topology():
    cfg = load_config([])
    check_world(cfg, 4)
    with pytest.raises(ConfigError, match=r"world size 3 does not fit parallel.replicas=2 x parallel.stages=2 x "
                                          r"parallel.lanes=1 = 4 processes: launch with torchrun --nproc-per-node=4"):
        check_world(cfg, 3)


def test_cli_bad_key_is_one_line():
    line = one_line_error(run(train_cmd(1, "model.n_layer=8"), check=False))
    assert "did you mean 'model.n_layers'" in line


def test_cli_plain_python_on_the_2x2_default_names_torchrun():
    line = one_line_error(run(train_cmd(1), check=False))
    assert "world size 1 does not fit" in line and "torchrun --nproc-per-node=4" in line


def test_cli_wrong_world_size_under_torchrun():
    line = one_line_error(run(train_cmd(2, "parallel.replicas=2", "parallel.stages=2"), check=False), torchrun=True)
    assert "world size 2 does not fit" in line


def test_cli_missing_data_path():
    line = one_line_error(run(train_cmd(1, "data.source=path", "data.path=/no/such/folder"), check=False))
    assert "data.path" in line


def test_corrupt_checkpoint_falls_back_to_previous_and_explicit_one_is_refused(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    common = TINY + ["parallel.replicas=1", "parallel.stages=1", f"data.cache_dir={corpus_cache}",
                     f"log.run_dir={run_dir}", "checkpoint.keep=3"]
    run(train_cmd(1, *common, "train.steps=10"))
    ckpts = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["step_00000005", "step_00000010"]
    newest = os.path.join(ckpts, "step_00000010")
    shard = next(f for f in os.listdir(newest) if f.endswith(".distcp"))
    with open(os.path.join(newest, shard), "r+b") as fh:  # flip bytes in the middle of the shard
        fh.seek(os.path.getsize(fh.name) // 2)
        fh.write(b"\xff\x00\xff\x00")
    # a half-written save (killed before it was sealed) is never taken for a checkpoint
    os.makedirs(os.path.join(ckpts, ".tmp-step_00000015"))

    line = one_line_error(run(train_cmd(1, *common, "train.steps=12", f"checkpoint.resume={newest}"), check=False))
    assert "does not match its checksum" in line and "checkpoint.resume=" in line
    assert os.path.exists(newest)  # nothing trained is deleted

    resumed = run(train_cmd(1, *common, "train.steps=12", "checkpoint.resume=latest"))
    assert "skipping bad checkpoint" in resumed.stderr and "step_00000010" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step_00000005" in resumed.stdout


def test_partial_checkpoint_without_manifest_is_refused(tmp_path, corpus_cache):
    run_dir = str(tmp_path / "run")
    common = TINY + ["parallel.replicas=1", "parallel.stages=1", f"data.cache_dir={corpus_cache}",
                     f"log.run_dir={run_dir}"]
    run(train_cmd(1, *common, "train.steps=5"))
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000005")
    os.remove(os.path.join(ckpt, "manifest.json"))
    line = one_line_error(run(train_cmd(1, *common, "train.steps=6", f"checkpoint.resume={ckpt}"), check=False))
    assert "partial" in line
    fresh = run(train_cmd(1, *common, "train.steps=6", "checkpoint.resume=latest"))
    assert "skipping bad checkpoint" in fresh.stderr and "resumed from" not in fresh.stdout
    shutil.rmtree(run_dir)
