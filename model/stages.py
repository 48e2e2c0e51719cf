"""A pipeline stage: a contiguous slice of the decoder's layers (first owns the embedding, last the norm and head)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from config import ModelConfig
from model.llama import Block, document_bins, document_block_mask, document_mask, document_positions, rope_tables

PRECISIONS = ("fp32", "bf16")  # train.precision: bf16 autocasts matmuls (set_fast_path)


def split_layers(n_layers: int, stages: int) -> list[range]:
    """Layer ranges per stage, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(n_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


@dataclass
class StageInputs:
    """What every layer needs besides the hidden state, derived once per micro-batch from document ids."""
    cos: torch.Tensor
    sin: torch.Tensor
    mask: object  # a dense (b, 1, t, t) boolean mask or DocumentBins (model.attention=sdpa), or a BlockMask (flex)
    attend: object = None  # sequence-parallel attention over the lanes sharing this sequence (None: local)


class Stage(nn.Module):
    """Layers `layer_ids` of the decoder; parameter names are global (layers.<i>...) so checkpoints re-shard."""

    def __init__(self, cfg: ModelConfig, layer_ids: range, first: bool, last: bool, max_seq_len: int):
        super().__init__()
        self.cfg, self.first, self.last = cfg, first, last
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim) if first else None
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in layer_ids})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if last else None
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False) if last else None
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.autocast_dtype: torch.dtype | None = None  # bf16: matmuls under autocast (set_fast_path)
        self.recompute = False  # activation checkpointing per layer

    @property
    def wire_dtype(self) -> torch.dtype:
        """The dtype of activations and their gradients between stages: the autocast dtype (half the bytes)."""
        return self.autocast_dtype or torch.float32

    def prepare(self, doc_ids: torch.Tensor) -> StageInputs:
        """Inputs for whole windows: RoPE at each token's place in its document, attention within documents."""
        mask = document_block_mask(doc_ids) if self.cfg.attention == "flex" else document_mask(doc_ids)
        return self._inputs(document_positions(doc_ids), mask)

    def prepare_packed(self, positions: torch.Tensor, doc_ids: torch.Tensor, attend=None) -> StageInputs:
        """Inputs for one row of packed sequences. positions: (1, t) each of this device's tokens' place in its
        sequence (RoPE); doc_ids: (1, T) the sequence of every token attention sees, in the order it sees them:
        T = t locally, or a sequence-parallel group's whole pack in its all-to-all's order (dist/lanes.py), where
        each sequence's tokens keep their order. Mask M[q, j] = (doc[q] == doc[j]) and (q >= j): causal inside
        each sequence, nothing across (sdpa: as DocumentBins, so many short sequences cost no T^2)."""
        mask = document_block_mask(doc_ids) if self.cfg.attention == "flex" else document_bins(doc_ids)
        return self._inputs(positions, mask, attend)

    def _inputs(self, positions: torch.Tensor, mask, attend=None) -> StageInputs:
        pos = positions.clamp(max=self.rope_cos.shape[0] - 1)  # SP padding past the last table row: never attended to
        return StageInputs(self.rope_cos[pos][:, None], self.rope_sin[pos][:, None], mask, attend)

    def forward(self, x: torch.Tensor, inputs: StageInputs) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states or logits (last stage) out."""
        return self.forward_parts(x, inputs, ("E" if self.first else "") + "L" + ("H" if self.last else ""))

    def forward_parts(self, x: torch.Tensor, inputs: StageInputs, parts: str) -> torch.Tensor:
        """Some of this stage's blocks in order: E(mbedding), L(ayers), H(ead: norm + output layer)."""
        with torch.autocast(x.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            h = self.embed(x) if "E" in parts else x
            if "L" in parts:
                for layer in self.layers.values():
                    args = (h, inputs.cos, inputs.sin, inputs.mask, inputs.attend)
                    h = checkpoint(layer, *args, use_reentrant=False) if self.recompute and torch.is_grad_enabled() \
                        else layer(*args)
            return self.head(self.norm(h)) if "H" in parts else h


def init_weights(module: nn.Module, seed: int, std: float) -> None:
    """Initialise every parameter from a generator keyed by its global name, so any stage split gets the same weights."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
            else:
                scale = std / (2 * module.cfg.n_layers) ** 0.5 if name.endswith(("wo.weight", "w2.weight")) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def build_stage(cfg: ModelConfig, stage: int, stages: int, max_seq_len: int, seed: int) -> Stage:
    layer_ids = split_layers(cfg.n_layers, stages)[stage]
    module = Stage(cfg, layer_ids, first=stage == 0, last=stage == stages - 1, max_seq_len=max_seq_len)
    init_weights(module, seed, cfg.init_std)
    return module


def set_fast_path(module: Stage, precision: str, recompute: bool, compile_layers: bool) -> Stage:
    """The GPU step's switches: bf16 autocast (weights, optimizer state and the loss stay fp32), activation
    checkpointing per layer, torch.compile per layer (parameter names unchanged, so checkpoints still load)."""
    module.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    module.recompute = recompute
    if compile_layers:
        for layer in module.layers.values():
            layer.compile()
    return module


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy; callers divide by the batch's token count."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
