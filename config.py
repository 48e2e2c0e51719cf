"""Run configuration: dataclass schema, YAML presets and CLI dotlist overrides (OmegaConf)."""
from __future__ import annotations

import difflib
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
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 0  # 0 = 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02
    attention: str = "sdpa"  # sdpa: dense document mask | flex: FlexAttention, a block mask built once per micro-batch


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
    timeout_s: float = 300.0
    lanes: int = 1  # devices per stage sharing its weights; > 1 splits each batch's sequences over them (SP)
    sp: str = "adaptive"  # with lanes > 1: adaptive (per-batch plan) | static:<d> (every SP group of d lanes)
    sp_cost: str = ".cache/flotilla/sp_cost.json"  # the SP cost model, fitted by `python bench/profile_sp.py`


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
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
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
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    fused: bool = False  # fused AdamW (one kernel for every parameter's update; the GPU presets' choice)


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # sequences per replica per step
    seed: int = 1234
    device: str = "cpu"  # cpu | cuda
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    precision: str = "fp32"  # fp32 | bf16: autocast matmuls to bf16 (fp32 weights, optimizer state and loss; bf16 pipeline transfers)
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward (memory for compute)
    compile: bool = False  # torch.compile each layer (GPU presets; the first steps pay the compile)


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
    keep: int = 2  # sealed checkpoints kept (an old one is deleted only after its successor is sealed); 0 = all
    resume: str = "none"  # none | latest | <checkpoint directory>


@dataclass
class RecoveryConfig:
    """In-process recovery from lost workers (recovery/runtime.py): on when `coordinator` is set.

    Workers are then started by `launch/chaos.py` or a node agent (not torchrun) with the secret in the
    FLOTILLA_SECRET environment variable; ranks come from the coordinator, which decides membership.
    """
    coordinator: str = ""  # host:port of `python -m recovery.coordinator`; empty = off
    run_id: str = "flotilla"
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
    sites: int = 1
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
    if m.attention not in ("sdpa", "flex"):
        raise ConfigError(f"model.attention='{m.attention}': choose sdpa or flex")
    if m.attention == "flex" and t.device != "cuda":
        raise ConfigError("model.attention=flex trains only on GPUs (FlexAttention has no backward on a CPU): set "
                          "model.attention=sdpa, or train.device=cuda")
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"train.precision='{t.precision}': choose fp32 or bf16")
    if t.device not in ("cpu", "cuda"):
        raise ConfigError(f"train.device='{t.device}': choose cpu or cuda")
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
    if cfg.data.tokenizer not in ("byte", "bpe"):
        raise ConfigError(f"data.tokenizer='{cfg.data.tokenizer}': choose byte or bpe")
    if cfg.data.source not in ("stdlib", "path"):
        raise ConfigError(f"data.source='{cfg.data.source}': choose stdlib or path (with data.path=<folder>)")
    if cfg.data.source == "path" and not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path='{cfg.data.path}' is not a folder: point data.path at a folder of .txt/.jsonl files")
    validate_recovery(cfg)
    if cfg.checkpoint.keep < 0 or cfg.checkpoint.every < 0:
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} and checkpoint.every={cfg.checkpoint.every} must be "
                          f">= 0 (keep=0 keeps every checkpoint, every=0 saves only at the end)")
    if cfg.checkpoint.resume not in ("none", "latest") and not os.path.isdir(cfg.checkpoint.resume):
        raise ConfigError(f"checkpoint.resume='{cfg.checkpoint.resume}' is not a checkpoint folder: use none, latest or a path under <run_dir>/checkpoints")


def validate_sync(s: SyncConfig) -> None:
    if s.method not in ("ddp", "diloco", "noloco"):
        raise ConfigError(f"sync.method='{s.method}': choose ddp, diloco or noloco")
    for key, value in (("compress", s.compress), ("lane_compress", s.lane_compress)):
        kind, _, comp = value.partition("-")
        if value != "none" and (kind not in ("ef21", "ef21sgdm", "ef14") or comp not in ("topk", "randk", "int8")):
            raise ConfigError(f"sync.{key}='{value}': use none or <ef21|ef21sgdm|ef14>-<topk|randk|int8>, "
                              f"e.g. ef21-topk")
    if s.compress != "none":
        if s.method == "noloco":
            raise ConfigError("sync.compress applies to ddp gradients and diloco pseudo-gradients: set "
                              "sync.compress=none with sync.method=noloco")
        if s.precision != "fp32":
            raise ConfigError("sync.compress and sync.precision both set the wire format: keep one (sync.precision=fp32)")
        if s.method == "diloco" and s.outer_momentum != 0:  # measured: bench/lowcomm.py, README "Loss against bytes"
            raise ConfigError("sync.compress with diloco: the error-feedback state is the outer step's memory, outer "
                              "momentum on top of it trains worse: set sync.outer_momentum=0")
    if not 0 < s.ratio <= 1 or not 0 < s.chunk <= 32768:
        raise ConfigError(f"sync.ratio={s.ratio} must be in (0, 1] and sync.chunk={s.chunk} in (0, 32768]")
    if s.precision not in ("fp32", "bf16", "int8", "int4"):
        raise ConfigError(f"sync.precision='{s.precision}': choose fp32, bf16, int8 or int4")
    if s.H < 1 or s.fragments < 1 or s.fragments > s.H:
        raise ConfigError(f"sync.H={s.H} and sync.fragments={s.fragments}: need H >= 1 and 1 <= fragments <= H")
    if s.method == "noloco":
        if not s.beta > s.alpha or not s.alpha < s.gamma < math.sqrt(2 + s.alpha ** 2):
            raise ConfigError(f"sync.alpha={s.alpha}, beta={s.beta}, gamma={s.gamma} break NoLoCo's convergence "
                              f"conditions: need beta > alpha and alpha < gamma < sqrt(2 + alpha^2)")


def validate_lanes(cfg: Config) -> None:
    p = cfg.parallel
    if p.lanes < 1:
        raise ConfigError(f"parallel.lanes={p.lanes} must be >= 1")
    degree = p.sp.split(":", 1)[1] if p.sp.startswith("static:") else None
    if p.sp != "adaptive" and not (degree and degree.isdigit() and int(degree) >= 1):
        raise ConfigError(f"parallel.sp='{p.sp}': choose adaptive or static:<d>, e.g. parallel.sp=static:2")
    if p.lanes == 1:
        return
    largest = int(degree) if degree else 1 << (p.lanes.bit_length() - 1)
    if degree and (largest & (largest - 1) or p.lanes % largest):
        raise ConfigError(f"parallel.sp={p.sp}: the SP degree must be a power of two that divides parallel.lanes={p.lanes}")
    if cfg.model.n_heads % largest:
        raise ConfigError(f"model.n_heads={cfg.model.n_heads} must divide by the largest SP group ({largest} lanes: "
                          f"Ulysses splits heads over the group): use fewer lanes or parallel.sp=static:<d>")
    if cfg.sync.routing:
        raise ConfigError("parallel.lanes > 1 with sync.routing is not supported (a routed micro-batch would have to "
                          "carry its SP plan across replicas): use one of them")


def validate_wan(cfg: Config) -> None:
    s, w = cfg.sync, cfg.wan
    if s.transport not in ("torch", "hivemind"):
        raise ConfigError(f"sync.transport='{s.transport}': choose torch or hivemind")
    if s.transport == "torch":
        if w.sites != 1 or w.site != 0 or w.initial_peers:
            raise ConfigError("wan.site/sites/initial_peers apply to sync.transport=hivemind: set it, or drop them")
        return
    if s.method == "ddp":
        raise ConfigError("sync.transport=hivemind carries the outer step of diloco or noloco (ddp would average "
                          "across sites every step): set sync.method=diloco or noloco")
    unsupported = [fix for bad, fix in ((s.compress != "none", "sync.compress=none"),
                                        (s.fragments != 1, "sync.fragments=1"),
                                        (s.final_average, "sync.final_average=false"),
                                        (s.routing, "sync.routing=false"),
                                        (s.precision not in ("fp32", "bf16"), "sync.precision=fp32 or bf16"),
                                        (cfg.parallel.lanes > 1, "parallel.lanes=1")) if bad]
    if unsupported:
        raise ConfigError(f"sync.transport=hivemind does not support this yet: set {', '.join(unsupported)}")
    if not 0 <= w.site < w.sites:
        raise ConfigError(f"wan.site={w.site} must be in 0..wan.sites-1 (wan.sites={w.sites}): number sites 0, 1, ...")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", w.run_id):
        raise ConfigError(f"wan.run_id='{w.run_id}' prefixes DHT keys: use only letters, digits, _ and -")
    if not 0 <= w.port < 65536 or (w.announce_host and not w.port):
        raise ConfigError(f"wan.port={w.port}: use 0 (any free port) or a port below 65536; wan.announce_host needs "
                          f"a fixed wan.port (the one forwarded to this machine)")
    if w.client_mode and not w.initial_peers:
        raise ConfigError("wan.client_mode=true accepts no connections, so it cannot start a DHT: give "
                          "wan.initial_peers of a reachable site")
    if min(w.startup_s, w.matchmaking_s, w.averaging_s) <= 0:
        raise ConfigError("wan.startup_s, wan.matchmaking_s and wan.averaging_s must be > 0")
    if w.startup_s >= cfg.parallel.timeout_s:
        raise ConfigError(f"wan.startup_s={w.startup_s:g} must be below parallel.timeout_s={cfg.parallel.timeout_s:g} "
                          f"(the site's other ranks wait in a torch.distributed call meanwhile): lower or raise one")
    if w.initial_peers:
        from hivemind.utils.multiaddr import Multiaddr  # here: only hivemind runs import hivemind
        for peer in w.initial_peers:
            try:
                ok = "p2p" in [p.name for p in Multiaddr(peer).protocols()]
            except Exception:  # the parser raises several kinds
                ok = False
            if not ok:
                raise ConfigError(f"wan.initial_peers entry '{peer}' is not a peer multiaddr like "
                                  f"/ip4/10.0.0.1/tcp/31337/p2p/12D3KooW...: copy the one site 0 prints at start-up")


def validate_recovery(cfg: Config) -> None:
    r = cfg.recovery
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
    if cfg.sync.method == "diloco" and cfg.sync.fragments > 1:
        raise ConfigError("recovery.coordinator with streaming DiLoCo (sync.fragments > 1) is not supported yet (a "
                          "replica that loses a stage rewinds to one outer step shared by the whole stage): set "
                          "sync.fragments=1")
    if r.rejoin not in ("skip", "replay"):
        raise ConfigError(f"recovery.rejoin='{r.rejoin}': choose skip or replay")
    if r.rebuild not in ("auto", "checkfree", "checkpoint"):
        raise ConfigError(f"recovery.rebuild='{r.rebuild}': choose auto, checkfree or checkpoint")
    if r.checkfree_weight not in ("grad_norm", "grad_norm_sq", "uniform"):
        raise ConfigError(f"recovery.checkfree_weight='{r.checkfree_weight}': choose grad_norm, grad_norm_sq or uniform")
    if r.swap and cfg.sync.routing:
        raise ConfigError("recovery.swap and sync.routing both reorder the pipeline: use one")
    if r.heartbeat_s <= 0 or r.edge_copy_every < 1 or r.phase_margin_s <= 0:
        raise ConfigError("recovery.heartbeat_s and recovery.phase_margin_s must be > 0 and recovery.edge_copy_every >= 1")


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
