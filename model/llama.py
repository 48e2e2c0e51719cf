"""Llama-style decoder pieces: RMSNorm, RoPE, SwiGLU, grouped-query attention with document masking."""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from config import ModelConfig

ATTENTIONS = ("sdpa", "flex")  # model.attention: a dense document mask (SDPA) | a FlexAttention block mask
BIN_TOKENS = 256  # a packed row's attention bins (DocumentBins): at most this many tokens, or one longer document


def ffn_dim(cfg: ModelConfig) -> int:
    if cfg.ffn_dim:
        return cfg.ffn_dim
    hidden = int(8 * cfg.dim / 3)
    return cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_len, head_dim // 2)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, Dh); cos/sin: (B, 1, T, Dh/2), gathered at each token's position in its document."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")  # CPU runs it
# eagerly on purpose (tests check it against SDPA; compiling it there needs a C++ toolchain and minutes)


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process: on GPUs its fused kernel is the point (eager is a T x T fallback)."""
    return torch.compile(flex_attention, dynamic=False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (b, h, t, d) q and (b, kv_heads, t, d) k, v (GQA: each KV head serves
    h / kv_heads query heads). mask: a dense (b, 1, t, t) boolean tensor (SDPA; on GPUs a dense mask selects the
    math kernel with fp32 T x T scores), DocumentBins (one packed row: SDPA per bin of whole documents) or a
    FlexAttention BlockMask (block-sparse: blocks outside every document are skipped, and no T x T tensor is made)."""
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, BlockMask):
        flex = _compiled_flex() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, enable_gqa=gqa)
    if isinstance(mask, DocumentBins):
        if mask.order is not None:
            q, k, v = (z.index_select(2, mask.order) for z in (q, k, v))
        y = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], attn_mask=m,
                                                      enable_gqa=gqa) for a, b, m in mask.bins], dim=2)
        return y if mask.order is None else y.index_select(2, mask.inverse)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, attend=None):
        """attend: None (local attention), or a sequence-parallel attention taking this device's slice of the
        sequence as (t, b, heads, head_dim) q, k, v and the whole sequence's mask (KV heads repeated to all heads)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attend is None:
            y = attention(q, k, v, mask).transpose(1, 2)
        else:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = attend(*(z.permute(2, 0, 1, 3) for z in (q, k, v)), mask).permute(1, 0, 2, 3)
        return self.wo(y.reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, attend=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, attend)
        return x + self.ffn(self.ffn_norm(x))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool mask: causal and within the same document."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


@dataclass
class DocumentBins:
    """The document mask of one packed row (b = 1) as independent dense blocks: the tokens sorted by document
    (stably: each document keeps its order), cut between documents into bins of at most BIN_TOKENS tokens (a
    longer document is a bin of its own). No document spans two bins, so attention in each bin under its own
    document mask is attention under the whole mask, at sum_b n_b^2 scores instead of T^2 (each token scores at
    most max(BIN_TOKENS, its document's length) keys): a pack of many short sequences costs about what they
    cost one by one."""
    order: torch.Tensor | None  # (T,) token indices, document by document (None: they already are)
    inverse: torch.Tensor | None  # (T,) each token's place in `order`
    bins: list[tuple[int, int, torch.Tensor]]  # [a, b) in that order and its (1, 1, b - a, b - a) document mask


def document_bins(doc_ids: torch.Tensor, tokens: int = BIN_TOKENS) -> DocumentBins:
    """(1, T) document ids, each document's tokens in its own order (documents may interleave) -> DocumentBins."""
    ids = doc_ids[0]
    order = None if bool((ids[1:] >= ids[:-1]).all()) else torch.sort(ids, stable=True).indices
    grouped = ids if order is None else ids[order]
    bounds, a, b = [], 0, 0
    for n in torch.unique_consecutive(grouped, return_counts=True)[1].tolist():
        if b > a and b + n - a > tokens:
            bounds.append((a, b))
            a = b
        b += n
    bounds.append((a, b))
    return DocumentBins(order, None if order is None else torch.argsort(order),
                        [(a, b, document_mask(grouped[None, a:b])) for a, b in bounds])


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The same mask as document_mask as a FlexAttention BlockMask (built once per micro-batch, shared by layers)."""
    b, t = doc_ids.shape

    def causal_same_document(batch, head, q_idx, kv_idx):
        return (doc_ids[batch, q_idx] == doc_ids[batch, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(causal_same_document, b, None, t, t, device=doc_ids.device)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> each token's position inside its document (RoPE restarts per document)."""
    t = doc_ids.shape[1]
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx
