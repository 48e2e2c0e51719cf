"""Tokenise and pack a corpus into fixed-length windows: train/validation token streams, cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import BinaryIO, Callable

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


def _save_atomic(path: str, write: Callable[[BinaryIO], object]) -> None:
    """`write` fills a file that then replaces `path` at once (a reader never sees half of it)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        write(fh)
    os.replace(tmp, path)


def _windows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def load_corpus(cfg: DataConfig) -> Corpus:
    root, files = list_files(cfg.source, cfg.path)
    os.makedirs(cfg.cache_dir, exist_ok=True)
    key = _fingerprint(cfg, root, files)
    cache = os.path.join(cfg.cache_dir, f"tokens-{key}")  # .train/.val/.lengths.npy, then .json (written last)
    tok_path = os.path.join(cfg.cache_dir, f"bpe-{key}.json")
    if not os.path.exists(f"{cache}.json"):
        docs = read_documents(root, files)
        train_docs = [d for d in docs if not is_validation(d.name, cfg.val_percent)]
        val_docs = [d for d in docs if is_validation(d.name, cfg.val_percent)]
        if cfg.tokenizer == "bpe":
            tok = BPETokenizer.load_or_train(tok_path, [d.text for d in train_docs], cfg.bpe_vocab_size)
            train_tok, val_tok = tok.encode_many([d.text for d in train_docs]), tok.encode_many([d.text for d in val_docs])
        else:
            tok = ByteTokenizer()
            train_tok, val_tok = [tok.encode(d.text) for d in train_docs], [tok.encode(d.text) for d in val_docs]
        train = _stream(train_tok, tok.eos)
        counts = np.bincount(train, minlength=tok.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        for part, array in (("train", train), ("val", _stream(val_tok, tok.eos)),
                            ("lengths", np.array([len(t) for t in train_tok], dtype=np.int64))):
            _save_atomic(f"{cache}.{part}.npy", lambda fh: np.save(fh, array))
        meta = {"vocab_size": tok.vocab_size, "eos": tok.eos, "documents": [len(train_docs), len(val_docs)],
                "unigram_entropy": float(-(p * np.log(p)).sum())}
        _save_atomic(f"{cache}.json", lambda fh: fh.write(json.dumps(meta).encode()))
    with open(f"{cache}.json") as fh:
        meta = json.load(fh)
    # memory-mapped: the workers of a machine share one copy in the page cache and start without reading it all
    train, val, lengths = (np.load(f"{cache}.{part}.npy", mmap_mode="r") for part in ("train", "val", "lengths"))
    corpus = Corpus(_windows(train, cfg.seq_len), _windows(val, cfg.seq_len), meta["vocab_size"], meta["eos"],
                    meta["unigram_entropy"], tuple(meta["documents"]), lengths)
    if len(corpus.train) == 0 or len(corpus.val) == 0:
        raise DataError(f"corpus too small for data.seq_len={cfg.seq_len}: {len(corpus.train)} train / "
                         f"{len(corpus.val)} validation windows; add documents or lower data.seq_len / raise data.val_percent")
    return corpus
