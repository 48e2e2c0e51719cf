"""Tokenise and pack a corpus into fixed-length windows: train/validation token streams, cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from config import DataConfig
from data.corpus import DataError, is_validation, list_files, read_documents
from data.tokenizer import BPETokenizer, ByteTokenizer


@dataclass
class Corpus:
    train: np.ndarray  # (n_train, seq_len + 1) token windows
    val: np.ndarray  # (n_val, seq_len + 1)
    vocab_size: int
    eos: int
    unigram_entropy: float  # nats per token of the training stream: what a model that ignores context scores
    n_docs: tuple[int, int]  # (train, val) documents
    doc_lengths: np.ndarray  # training documents' lengths in tokens (long-tailed)


def _fingerprint(cfg: DataConfig, root: str, files: list[str]) -> str:
    h = hashlib.sha256(json.dumps([cfg.source, root, cfg.tokenizer, cfg.bpe_vocab_size, cfg.val_percent]).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _stream(token_lists: list[np.ndarray], eos: int) -> np.ndarray:
    """Documents joined into one stream, each followed by the end-of-document token."""
    parts = []
    for t in token_lists:
        parts += [t, np.array([eos], dtype=np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _save_atomic(path: str, **arrays) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def load_corpus(cfg: DataConfig) -> Corpus:
    root, files = list_files(cfg.source, cfg.path)
    os.makedirs(cfg.cache_dir, exist_ok=True)
    key = _fingerprint(cfg, root, files)
    cache = os.path.join(cfg.cache_dir, f"tokens-{key}.npz")
    tok_path = os.path.join(cfg.cache_dir, f"bpe-{key}.json")
    if not os.path.exists(cache):
        docs = read_documents(root, files)
        train_docs = [d for d in docs if not is_validation(d.name, cfg.val_percent)]
        val_docs = [d for d in docs if is_validation(d.name, cfg.val_percent)]
        if cfg.tokenizer == "bpe":
            tok = BPETokenizer.load_or_train(tok_path, [d.text for d in train_docs], cfg.bpe_vocab_size)
            train_tok, val_tok = tok.encode_many([d.text for d in train_docs]), tok.encode_many([d.text for d in val_docs])
        else:
            tok = ByteTokenizer()
            train_tok, val_tok = [tok.encode(d.text) for d in train_docs], [tok.encode(d.text) for d in val_docs]
        _save_atomic(cache, train=_stream(train_tok, tok.eos), val=_stream(val_tok, tok.eos),
                     lengths=np.array([len(t) for t in train_tok], dtype=np.int64),
                     meta=np.array([tok.vocab_size, tok.eos, len(train_docs), len(val_docs)], dtype=np.int64))
    with np.load(cache) as z:
        train, val, lengths, meta = z["train"], z["val"], z["lengths"], z["meta"]
    vocab_size, eos, n_train, n_val = (int(x) for x in meta)
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    corpus = Corpus(_windows(train, cfg.seq_len), _windows(val, cfg.seq_len), vocab_size, eos,
                    float(-(p * np.log(p)).sum()), (n_train, n_val), lengths)
    if len(corpus.train) == 0 or len(corpus.val) == 0:
        raise DataError(f"corpus too small for data.seq_len={cfg.seq_len}: {len(corpus.train)} train / "
                         f"{len(corpus.val)} validation windows; add documents or lower data.seq_len / raise data.val_percent")
    return corpus
