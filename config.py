"""Run configuration: dataclass schema, YAML presets and CLI dotlist overrides (OmegaConf)."""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = taken from the tokenizer
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0  # 0 = 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (this Python's own library sources) or "path"
    path: str = ""  # folder of .txt / .jsonl files when source=path
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 2048
    seq_len: int = 256
    val_percent: float = 2.0  # share of documents held out for validation
    cache_dir: str = ".cache/flotilla"


@dataclass
class ParallelConfig:
    replicas: int = 1
    stages: int = 1
    microbatches: int = 1
    schedule: str = "1f1b"  # gpipe | 1f1b
    backend: str = "auto"  # auto | gloo | nccl
    sync: str = "ddp"  # ddp: all-reduce gradients across replicas every step
    timeout_s: float = 300.0


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # sequences per replica per step
    seed: int = 1234
    device: str = "cpu"  # cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default


@dataclass
class LogConfig:
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    tensorboard: bool = True


@dataclass
class CheckpointConfig:
    every: int = 200  # steps; 0 = only at the end
    keep: int = 2
    resume: str = "none"  # none | latest | <checkpoint directory>


@dataclass
class FaultConfig:
    """Deterministic fault injection for tests and chaos runs."""
    kill_at_step: int = -1  # SIGKILL the process in the middle of this step (-1 = never)
    kill_ranks: list[int] = field(default_factory=list)  # empty = every rank


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the fix."""


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if hasattr(v, "items"):
            keys += _all_keys(v, name + ".")
    return keys


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    msg = str(err).splitlines()[0]
    if "not in struct" in msg or "Key '" in msg and "not" in msg:
        known = _all_keys(OmegaConf.to_container(OmegaConf.structured(Config)))
        hint = difflib.get_close_matches(key, known, n=1)
        fix = f" (did you mean '{hint[0]}'?)" if hint else " (see config.py for the schema)"
        return f"unknown config key '{key}'{fix}"
    return f"bad value for config key '{key}': {msg}"


def load_config(argv: list[str] | None = None) -> Config:
    """Defaults <- configs/default.yaml (or config=<name|path>) <- CLI dotlist overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "default"
    for a in list(argv):
        if a.startswith("config="):
            preset = a.split("=", 1)[1]
            argv.remove(a)
    path = preset if preset.endswith(".yaml") else os.path.join(CONFIG_DIR, f"{preset}.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"config preset '{preset}' not found at {path}: use config=<name in configs/ or a .yaml path>")
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"argument '{bad[0]}' is not key=value: write overrides like model.n_layers=8")
    try:
        cfg = OmegaConf.structured(Config)
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path), OmegaConf.from_dotlist(argv))
        obj: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    """Checks that need no processes: shapes and choices."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.dim % m.n_heads or m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.dim={m.dim}, n_heads={m.n_heads}, n_kv_heads={m.n_kv_heads}: dim must divide by n_heads and n_heads by n_kv_heads")
    if p.stages < 1 or p.replicas < 1:
        raise ConfigError("parallel.stages and parallel.replicas must be >= 1")
    if p.stages > m.n_layers:
        raise ConfigError(f"parallel.stages={p.stages} exceeds model.n_layers={m.n_layers}: use at most one stage per layer")
    if p.microbatches < 1 or t.batch_size % p.microbatches:
        raise ConfigError(f"train.batch_size={t.batch_size} must divide into parallel.microbatches={p.microbatches} equal micro-batches")
    if p.schedule not in ("gpipe", "1f1b"):
        raise ConfigError(f"parallel.schedule='{p.schedule}': choose gpipe or 1f1b")
    if p.sync != "ddp":
        raise ConfigError(f"parallel.sync='{p.sync}': only ddp is available")
    if cfg.data.tokenizer not in ("byte", "bpe"):
        raise ConfigError(f"data.tokenizer='{cfg.data.tokenizer}': choose byte or bpe")
    if cfg.data.source not in ("stdlib", "path"):
        raise ConfigError(f"data.source='{cfg.data.source}': choose stdlib or path (with data.path=<folder>)")
    if cfg.data.source == "path" and not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path='{cfg.data.path}' is not a folder: point data.path at a folder of .txt/.jsonl files")
    if cfg.checkpoint.resume not in ("none", "latest") and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume='{cfg.checkpoint.resume}' is not a checkpoint folder: use none, latest or a path under <run_dir>/checkpoints")


def check_world(cfg: Config, world_size: int) -> None:
    """The launched world must be exactly replicas x stages processes."""
    need = cfg.parallel.replicas * cfg.parallel.stages
    if world_size != need:
        raise ConfigError(
            f"world size {world_size} does not fit parallel.replicas={cfg.parallel.replicas} x parallel.stages="
            f"{cfg.parallel.stages} = {need} processes: launch with torchrun --nproc-per-node={need} "
            f"or set parallel.replicas/parallel.stages so their product is {world_size}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
