"""Tokenizers: bytes (default, nothing to train) or a byte-level BPE trained with `tokenizers`."""
from __future__ import annotations

import os

import numpy as np

EOS_TEXT = "<|eos|>"


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 ends a document."""
    name = "byte"
    vocab_size = 257
    eos = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (HuggingFace `tokenizers`), trained once on the training documents and cached."""
    name = "bpe"

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos = tok.token_to_id(EOS_TEXT)

    @classmethod
    def load_or_train(cls, path: str, texts: list[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        if os.path.exists(path):
            return cls(Tokenizer.from_file(path))
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)
        return cls(tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int32)

    def encode_many(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


TOKENIZERS = (ByteTokenizer.name, BPETokenizer.name)  # data.tokenizer
