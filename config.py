"""Run configuration: dataclass schema, YAML presets and CLI dotlist overrides (OmegaConf)."""
from __future__ import annotations

import difflib
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = taken from the tokenizer
    dim: int = 128  # hidden size of every layer
    n_layers: int = 4  # decoder layers, split over parallel.stages
    n_heads: int = 4  # attention heads; dim / n_heads is the head size (even: RoPE rotates pairs)
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); n_heads must divide by it
    ffn_dim: int = 0  # 0 = 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32  # the automatic ffn_dim is rounded up to a multiple of this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base (positions restart at every document)
    init_std: float = 0.02  # std of the normal init (output projections / sqrt(2 n_layers))
    attention: str = "sdpa"  # sdpa: dense document mask | flex: FlexAttention, a block mask built once per micro-batch


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (this Python's own library sources) or "path"
    path: str = ""  # folder of .txt / .jsonl files when source=path
    tokenizer: str = "byte"  # byte | bpe
    bpe_vocab_size: int = 2048  # vocabulary of the BPE tokenizer trained on the corpus (tokenizer=bpe)
    seq_len: int = 256  # tokens per training sequence (documents packed; attention stays within one)
    val_percent: float = 2.0  # share of documents held out for validation
    cache_dir: str = ".cache/flotilla"  # tokenised corpus cache, reused by runs on the same data


@dataclass
class ParallelConfig:
    replicas: int = 1  # data-parallel copies of the pipeline, kept together by sync:
    stages: int = 1  # pipeline stages per replica: model.n_layers split over this many processes
    microbatches: int = 1  # micro-batches per step in the pipeline; train.batch_size must divide by it
    schedule: str = "1f1b"  # gpipe | 1f1b
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 300.0  # torch.distributed timeout of any collective or transfer
    lanes: int = 1  # devices per stage sharing its weights; > 1 splits each batch's sequences over them (SP)
    sp: str = "adaptive"  # with lanes > 1: adaptive (per-batch plan) | static:<d> (every SP group of d lanes)
    sp_cost: str = ".cache/flotilla/sp_cost.json"  # the SP cost model, fitted by `python bench/profile_sp.py`
    sp_plan_ahead: bool = True  # adaptive SP: one rank per replica plans the next batch while this step runs
    sp_time_limit_s: float = 0.0  # adaptive SP: > 0 adds the per-pass MILP under this time limit (needs sp_plan_ahead)


@dataclass
class SyncConfig:
    """How replicas of a stage stay together (optim/sync.py)."""
    method: str = "ddp"  # ddp: average gradients every step | diloco | noloco
    compress: str = "none"  # none | <ef21|ef21sgdm|ef14>-<topk|randk|int8>: gradients (ddp) or pseudo-gradients (diloco) | sparseloco (diloco: Top-K + 2-bit values + decaying error feedback)
    ratio: float = 0.01  # K / d for topk, randk and sparseloco
    ef_eta: float = 0.1  # EF21-SGDM worker momentum
    ef_decay: float = 0.95  # sparseloco: the error-feedback accumulator's decay (it replaces outer momentum)
    dense_warmup: int = 0  # with compress: the first steps average densely (fp32) before compression starts
    chunk: int = 32768  # Top-K picks K = ratio * chunk values in every chunk (<= 32768: int16 offsets)
    H: int = 50  # inner steps between outer steps (diloco, noloco)
    outer_lr: float = 0.7  # diloco: outer SGD learning rate on the pseudo-gradient
    outer_momentum: float = 0.9  # diloco: outer momentum (0 with sync.compress)
    nesterov: bool = True  # diloco: Nesterov outer momentum
    fragments: int = 1  # diloco streaming: > 1 syncs the stage in this many staggered fragments
    overlap: int = 0  # diloco: the outer exchange runs in the background for this many inner steps, then applies (0 = blocking)
    precision: str = "fp32"  # diloco pseudo-gradient on the wire: fp32 | bf16 | int8 | int4
    alpha: float = 0.5  # noloco momentum
    beta: float = 0.7  # noloco step on the pair-mean of theta - phi
    gamma: float = 0.7  # noloco pull towards the pair-mean of phi
    routing: bool = False  # noloco's random pipeline routing: micro-batches change replica between stages
    final_average: bool = False  # diloco/noloco: one all-reduce of the weights at the last step (one model to export)
    transport: str = "torch"  # diloco/noloco outer exchange: torch (one world) | hivemind (across sites, see wan:)
    lane_compress: str = "none"  # gradient sync across the lanes of a stage (every step): none | <ef21|ef21sgdm|ef14>-<topk|randk|int8>


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak AdamW learning rate (after warm-up; cosine decay to min_lr)
    min_lr: float = 3e-4  # learning rate at the last step (<= lr)
    warmup_steps: int = 50  # linear warm-up steps up to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only, not norm gains)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 = off
    fused: bool = False  # fused AdamW (one kernel for every parameter's update; the GPU presets' choice)


@dataclass
class TrainConfig:
    steps: int = 600  # optimizer steps: the run ends when this many are done
    batch_size: int = 16  # sequences per replica per step
    seed: int = 1234  # weights' init, data order and every random choice
    device: str = "cpu"  # cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    precision: str = "fp32"  # fp32 | bf16: autocast matmuls to bf16 (fp32 weights, optimizer state and loss; bf16 pipeline transfers)
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward (memory for compute)
    compile: bool = False  # torch.compile each layer (GPU presets; the first steps pay the compile)


@dataclass
class LogConfig:
    run_dir: str = "runs/default"  # where config.yaml, metrics.jsonl, checkpoints/ and tb/ go
    log_every: int = 10  # steps between train lines (console, TensorBoard, metrics.jsonl loss)
    eval_every: int = 100  # steps between validation evals, and one at the last step; 0 = never
    eval_batches: int = 8  # validation batches per eval (train.batch_size sequences each)
    tensorboard: bool = True  # write TensorBoard event files under <run_dir>/tb


@dataclass
class CheckpointConfig:
    every: int = 200  # steps between checkpoints (one is always saved at the last step); 0 = only at the end
    keep: int = 2  # sealed checkpoints kept (an old one is deleted only after its successor is sealed); 0 = all
    resume: str = "none"  # none | latest | <checkpoint directory>


@dataclass
class RecoveryConfig:
    """In-process recovery from lost workers (recovery/runtime.py): on when `coordinator` is set.

    Workers are then started by `launch/chaos.py` or a node agent (not torchrun) with the secret in the
    FLOTILLA_SECRET environment variable; ranks come from the coordinator, which decides membership.
    """
    coordinator: str = ""  # host:port of `python -m recovery.coordinator`; empty = off
    run_id: str = "flotilla"  # the coordinator's name for this run (the same on every worker)
    heartbeat_s: float = 0.2  # how often a worker beats; the coordinator's heartbeat timeout must be >= 3x
    rebuild: str = "auto"  # auto: copy from another replica > CheckFree(+) > checkpoint | checkfree | checkpoint
    checkfree_weight: str = "grad_norm"  # neighbour weights: grad_norm (the paper) | grad_norm_sq | uniform
    lr_boost: float = 1.1  # a CheckFree-rebuilt stage's learning rate is multiplied by this
    swap: bool = False  # CheckFree+: odd micro-batches swap the first two / last two stages (edges recoverable)
    edge_copy_every: int = 10  # CheckFree+: steps between refreshing the (de)embedding copies on the neighbours
    abort_timeout_s: float = 20.0  # coordinator lost: how long survivors try to agree on a final checkpoint
    phase_margin_s: float = 5.0  # forming a world / building groups may take the heartbeat timeout plus this
    rejoin: str = "skip"  # DiLoCo, a replica that lost a stage: skip (it joins the next outer step without its
    # unfinished inner steps: the others never wait) | replay (it redoes them from the last outer step: exact, the
    # others wait for it at the next outer step). NoLoCo always replays


@dataclass
class WanConfig:
    """Replicas at different sites (sync.transport=hivemind, optim/wan.py): each site is its own torchrun group;
    every rank is a hivemind peer that finds the same stage of the other sites through a DHT."""
    run_id: str = "flotilla"  # DHT key prefix: the same on every site of a run, a new one for a new run
    site: int = 0  # this site: it reads the data of replica `site` of `sites`
    sites: int = 1  # sites taking part (each runs parallel.replicas replicas)
    initial_peers: list[str] = field(default_factory=list)  # running peers (site 0 prints its multiaddr); [] = new DHT
    host: str = "0.0.0.0"  # listen address
    port: int = 0  # rank k of the site listens on port + k; 0 = any free port
    announce_host: str = ""  # address the other sites dial, when not the listen address (NAT with port forwarding)
    client_mode: bool = False  # behind NAT without forwarding: outgoing connections only
    identity_path: str = ""  # site rank 0's key file (made if missing): a fixed peer id other sites can list in advance
    startup_s: float = 240.0  # joining the DHT retries, and the first outer step waits for every other site, this long
    matchmaking_s: float = 30.0  # later outer steps wait this long for the others, then go alone
    averaging_s: float = 120.0  # one exchange once its group formed (a peer silent for a third of it is dropped)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    wan: WanConfig = field(default_factory=WanConfig)


class ConfigError(ValueError):
    """A configuration problem, described in one line that names the fix."""


# The range of every numeric option (checked first, so later checks can divide by them): ">= a", "> a" or an
# interval "[a, b)". tests/test_bad_input.py holds every int and float field of the schema to a row here.
RANGES = {
    "model.vocab_size": ">= 0", "model.dim": ">= 1", "model.n_layers": ">= 1", "model.n_heads": ">= 1",
    "model.n_kv_heads": ">= 1", "model.ffn_dim": ">= 0", "model.multiple_of": ">= 1", "model.norm_eps": "> 0",
    "model.rope_theta": "> 0", "model.init_std": "> 0",
    "data.bpe_vocab_size": ">= 257", "data.seq_len": ">= 1", "data.val_percent": "(0, 100)",
    "parallel.replicas": ">= 1", "parallel.stages": ">= 1", "parallel.microbatches": ">= 1",
    "parallel.timeout_s": "> 0", "parallel.lanes": ">= 1", "parallel.sp_time_limit_s": ">= 0",
    "sync.ratio": "(0, 1]", "sync.ef_eta": "(0, 1]", "sync.ef_decay": "[0, 1]", "sync.dense_warmup": ">= 0",
    "sync.chunk": "(0, 32768]", "sync.H": ">= 1", "sync.outer_lr": "> 0", "sync.outer_momentum": "[0, 1)",
    "sync.fragments": ">= 1", "sync.overlap": ">= 0", "sync.alpha": "[0, 1)", "sync.beta": "> 0",
    "sync.gamma": "> 0",
    "optim.lr": "> 0", "optim.min_lr": ">= 0", "optim.warmup_steps": ">= 0", "optim.weight_decay": ">= 0",
    "optim.beta1": "[0, 1)", "optim.beta2": "[0, 1)", "optim.eps": "> 0", "optim.grad_clip": ">= 0",
    "train.steps": ">= 1", "train.batch_size": ">= 1", "train.seed": ">= 0", "train.threads": ">= 0",
    "log.log_every": ">= 1", "log.eval_every": ">= 0", "log.eval_batches": ">= 1",
    "checkpoint.every": ">= 0", "checkpoint.keep": ">= 0",
    "recovery.heartbeat_s": "> 0", "recovery.lr_boost": "> 0", "recovery.edge_copy_every": ">= 1",
    "recovery.abort_timeout_s": "> 0", "recovery.phase_margin_s": "> 0",
    "wan.site": ">= 0", "wan.sites": ">= 1", "wan.port": "[0, 65536)", "wan.startup_s": "> 0",
    "wan.matchmaking_s": "> 0", "wan.averaging_s": "> 0",
}


def in_range(value: float, rule: str) -> bool:
    """Whether `value` (finite) satisfies a RANGES rule."""
    if not math.isfinite(value):
        return False
    if rule.startswith(">"):
        bound = float(rule.lstrip(">= "))
        return value >= bound if rule.startswith(">=") else value > bound
    lo, hi = (float(x) for x in rule[1:-1].split(","))
    return (lo <= value if rule[0] == "[" else lo < value) and (value <= hi if rule[-1] == "]" else value < hi)


def validate_ranges(cfg: Config) -> None:
    defaults = Config()
    for key, rule in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not in_range(value, rule):
            default = getattr(getattr(defaults, section), name)
            raise ConfigError(f"{key}={value} must be {'' if rule[0] == '>' else 'in '}{rule}: set e.g. "
                              f"{key}={default} (the default)")


def choose(key: str, value: str, choices, hint: str = "") -> None:
    """A one-line error unless `value` is one of `choices` (owned by the module that implements them)."""
    if value not in choices:
        listed = ", ".join(choices[:-1]) + f" or {choices[-1]}"
        raise ConfigError(f"{key}='{value}': choose {listed}{hint}")


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
        raise ConfigError(f"argument '{bad[0]}' is not key=value: write overrides like model.n_layers=8 "
                          f"(python train.py --help lists every key)")
    try:
        cfg = OmegaConf.structured(Config)
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path), OmegaConf.from_dotlist(argv))
        obj: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    """Checks that need no processes: ranges, shapes and choices. The choices are imported from the modules
    that implement them (here, not at the top: config.py itself loads without torch)."""
    from data.corpus import SOURCES
    from data.tokenizer import TOKENIZERS
    from dist.pipeline import SCHEDULES
    from model.llama import ATTENTIONS
    from model.stages import PRECISIONS
    from recovery.runtime import BACKENDS, DEVICES
    validate_ranges(cfg)
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.dim % m.n_heads or m.n_heads % m.n_kv_heads or (m.dim // m.n_heads) % 2:
        raise ConfigError(f"model.dim={m.dim}, n_heads={m.n_heads}, n_kv_heads={m.n_kv_heads}: dim must divide by n_heads "
                          f"into an even head size and n_heads by n_kv_heads")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr={cfg.optim.min_lr:g} exceeds optim.lr={cfg.optim.lr:g}: the schedule decays "
                          f"from lr to min_lr; lower optim.min_lr")
    if p.stages > m.n_layers:
        raise ConfigError(f"parallel.stages={p.stages} exceeds model.n_layers={m.n_layers}: use at most one stage per layer")
    if t.batch_size % p.microbatches:
        raise ConfigError(f"train.batch_size={t.batch_size} must divide into parallel.microbatches={p.microbatches} equal micro-batches")
    choose("parallel.schedule", p.schedule, SCHEDULES)
    choose("parallel.backend", p.backend, BACKENDS)
    choose("model.attention", m.attention, ATTENTIONS)
    choose("train.precision", t.precision, PRECISIONS)
    choose("train.device", t.device, DEVICES)
    if m.attention == "flex" and t.device != "cuda":
        raise ConfigError("model.attention=flex trains only on GPUs (FlexAttention has no backward on a CPU): set "
                          "model.attention=sdpa, or train.device=cuda")
    validate_sync(cfg.sync)
    feeds_adamw = [v for v in ((cfg.sync.compress if cfg.sync.method == "ddp" else "none"), cfg.sync.lane_compress)
                   if v.startswith("ef21sgdm")]  # an estimate that AdamW steps on directly (not a pseudo-gradient)
    if feeds_adamw and cfg.optim.beta1 != 0:
        raise ConfigError(f"{feeds_adamw[0]} already averages gradients with momentum (sync.ef_eta): set optim.beta1=0 "
                          f"so AdamW does not apply momentum on top of it")
    validate_lanes(cfg)
    validate_wan(cfg)
    if cfg.sync.routing and (p.stages < 2 or p.replicas < 2):
        raise ConfigError("sync.routing moves micro-batches between replicas at stage boundaries: it needs "
                          "parallel.stages >= 2 and parallel.replicas >= 2")
    choose("data.tokenizer", cfg.data.tokenizer, TOKENIZERS)
    choose("data.source", cfg.data.source, SOURCES, " (with data.path=<folder>)")
    if cfg.data.source == "path" and not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path='{cfg.data.path}' is not a folder: point data.path at a folder of .txt/.jsonl files")
    validate_recovery(cfg)
    if cfg.checkpoint.resume not in ("none", "latest") and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume='{cfg.checkpoint.resume}' is not a checkpoint folder: use none, latest or a path under <run_dir>/checkpoints")


def validate_sync(s: SyncConfig) -> None:
    from optim.noloco import check_bounds
    from optim.reduce import PRECISIONS
    from optim.ef21 import COMPRESSORS, KINDS
    from optim.sync import COMPRESSIONS, METHODS
    choose("sync.method", s.method, METHODS)
    for key, value in (("compress", s.compress), ("lane_compress", s.lane_compress)):
        if value not in COMPRESSIONS:
            raise ConfigError(f"sync.{key}='{value}': use {', '.join(COMPRESSIONS[:2])} or <{'|'.join(KINDS)}>-"
                              f"<{'|'.join(COMPRESSORS)}>, e.g. ef21-topk")
    if "sparseloco" in (s.compress, s.lane_compress) and (s.method != "diloco" or s.lane_compress == "sparseloco"):
        raise ConfigError("sync.compress=sparseloco compresses DiLoCo's pseudo-gradients: set sync.method=diloco (and "
                          "keep it out of sync.lane_compress)")
    if s.overlap:
        if s.method != "diloco" or s.overlap >= s.H:
            raise ConfigError(f"sync.overlap={s.overlap} overlaps DiLoCo's outer exchange with the next inner steps: "
                              f"use sync.method=diloco and sync.overlap < sync.H={s.H}")
        if s.precision != "fp32" or s.compress not in ("none", "sparseloco") or s.transport != "torch":
            raise ConfigError("sync.overlap runs the fp32 or sparseloco exchange in the background: set "
                              "sync.precision=fp32, sync.compress=none or sparseloco, sync.transport=torch")
    if s.compress != "none":
        if s.method == "noloco":
            raise ConfigError("sync.compress applies to ddp gradients and diloco pseudo-gradients: set "
                              "sync.compress=none with sync.method=noloco")
        if s.precision != "fp32":
            raise ConfigError("sync.compress and sync.precision both set the wire format: keep one (sync.precision=fp32)")
        if s.method == "diloco" and s.outer_momentum != 0:  # measured: bench/lowcomm.py, docs/lowcomm.md
            raise ConfigError("sync.compress with diloco: the error-feedback state is the outer step's memory, outer "
                              "momentum on top of it trains worse: set sync.outer_momentum=0")
    choose("sync.precision", s.precision, PRECISIONS)
    if s.fragments > s.H:
        raise ConfigError(f"sync.H={s.H} and sync.fragments={s.fragments}: need 1 <= fragments <= H")
    if s.method == "noloco":
        try:
            check_bounds(s.alpha, s.beta, s.gamma)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def validate_lanes(cfg: Config) -> None:
    from dist.lanes import parse_sp
    p = cfg.parallel
    try:
        degree = parse_sp(p.sp)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if p.sp_time_limit_s < 0 or (p.sp_time_limit_s > 0 and not p.sp_plan_ahead):
        raise ConfigError(f"parallel.sp_time_limit_s={p.sp_time_limit_s}: use 0 (the fast planner) or a positive limit "
                          f"with parallel.sp_plan_ahead=true (a time-limited solve is made on one rank and shared)")
    if p.lanes == 1:
        return
    largest = degree or 1 << (p.lanes.bit_length() - 1)
    if degree and (largest & (largest - 1) or p.lanes % largest):
        raise ConfigError(f"parallel.sp={p.sp}: the SP degree must be a power of two that divides parallel.lanes={p.lanes}")
    if cfg.model.n_heads % largest:
        raise ConfigError(f"model.n_heads={cfg.model.n_heads} must divide by the largest SP group ({largest} lanes: "
                          f"Ulysses splits heads over the group): use fewer lanes or parallel.sp=static:<d>")
    if cfg.sync.routing:
        raise ConfigError("parallel.lanes > 1 with sync.routing is not supported (a routed micro-batch would have to "
                          "carry its SP plan across replicas): use one of them")


def validate_wan(cfg: Config) -> None:
    from optim.sync import TRANSPORTS
    s, w = cfg.sync, cfg.wan
    choose("sync.transport", s.transport, TRANSPORTS)
    if s.transport == "torch":
        if w.sites != 1 or w.site != 0 or w.initial_peers:
            raise ConfigError("wan.site/sites/initial_peers apply to sync.transport=hivemind: set it, or drop them")
        return
    if importlib.util.find_spec("hivemind") is None:  # an extra: only runs across sites need it
        raise ConfigError("sync.transport=hivemind needs hivemind, which is not installed: pip install -e .[wan]")
    from optim.wan import WIRE
    if s.method == "ddp":
        raise ConfigError("sync.transport=hivemind carries the outer step of diloco or noloco (ddp would average "
                          "across sites every step): set sync.method=diloco or noloco")
    unsupported = [fix for bad, fix in ((s.compress != "none", "sync.compress=none"),
                                        (s.fragments != 1, "sync.fragments=1"),
                                        (s.final_average, "sync.final_average=false"),
                                        (s.routing, "sync.routing=false"),
                                        (s.precision not in WIRE, f"sync.precision={' or '.join(WIRE)}"),
                                        (cfg.parallel.lanes > 1, "parallel.lanes=1")) if bad]
    if unsupported:
        raise ConfigError(f"sync.transport=hivemind does not support this yet: set {', '.join(unsupported)}")
    if not 0 <= w.site < w.sites:
        raise ConfigError(f"wan.site={w.site} must be in 0..wan.sites-1 (wan.sites={w.sites}): number sites 0, 1, ...")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", w.run_id):
        raise ConfigError(f"wan.run_id='{w.run_id}' prefixes DHT keys: use only letters, digits, _ and -")
    if w.announce_host and not w.port:
        raise ConfigError("wan.announce_host needs a fixed wan.port (the one forwarded to this machine): set wan.port")
    if w.client_mode and not w.initial_peers:
        raise ConfigError("wan.client_mode=true accepts no connections, so it cannot start a DHT: give "
                          "wan.initial_peers of a reachable site")
    if w.startup_s >= cfg.parallel.timeout_s:
        raise ConfigError(f"wan.startup_s={w.startup_s:g} must be below parallel.timeout_s={cfg.parallel.timeout_s:g} "
                          f"(the site's other ranks wait in a torch.distributed call meanwhile): lower or raise one")
    if w.initial_peers:
        from hivemind.utils.multiaddr import Multiaddr
        for peer in w.initial_peers:
            try:
                ok = "p2p" in [p.name for p in Multiaddr(peer).protocols()]
            except Exception:  # the parser raises several kinds
                ok = False
            if not ok:
                raise ConfigError(f"wan.initial_peers entry '{peer}' is not a peer multiaddr like "
                                  f"/ip4/10.0.0.1/tcp/31337/p2p/12D3KooW...: copy the one site 0 prints at start-up")


def validate_recovery(cfg: Config) -> None:
    from recovery.rebuild import CHECKFREE_WEIGHTS, REBUILDS, REJOINS
    r = cfg.recovery
    choose("recovery.rejoin", r.rejoin, REJOINS)
    choose("recovery.rebuild", r.rebuild, REBUILDS)
    choose("recovery.checkfree_weight", r.checkfree_weight, tuple(CHECKFREE_WEIGHTS))
    if not r.coordinator:
        if r.swap:
            raise ConfigError("recovery.swap (CheckFree+) only matters with recovery.coordinator=<host:port>: set both or neither")
        return
    host, _, port = r.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"recovery.coordinator='{r.coordinator}' is not host:port, e.g. recovery.coordinator=10.0.0.1:29400")
    if cfg.sync.transport != "torch":
        raise ConfigError("recovery.coordinator with sync.transport=hivemind is not supported yet: each site runs its "
                          "own torchrun job; use sync.transport=torch or no recovery.coordinator")
    if cfg.sync.overlap:
        raise ConfigError("recovery.coordinator with sync.overlap is not supported yet (an exchange in flight would "
                          "have to be rolled back with the step): set sync.overlap=0")
    if cfg.sync.method == "diloco" and cfg.sync.fragments > 1:
        raise ConfigError("recovery.coordinator with streaming DiLoCo (sync.fragments > 1) is not supported yet (a "
                          "replica that loses a stage rewinds to one outer step shared by the whole stage): set "
                          "sync.fragments=1")
    if r.swap and cfg.sync.routing:
        raise ConfigError("recovery.swap and sync.routing both reorder the pipeline: use one")


def check_world(cfg: Config, world_size: int) -> None:
    """The launched world must be exactly replicas x stages x lanes processes."""
    p = cfg.parallel
    need = p.replicas * p.stages * p.lanes
    if world_size != need:
        raise ConfigError(
            f"world size {world_size} does not fit parallel.replicas={p.replicas} x parallel.stages={p.stages}"
            f" x parallel.lanes={p.lanes} = {need} processes: launch with torchrun --nproc-per-node={need} "
            f"or set parallel.replicas/stages/lanes so their product is {world_size}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
