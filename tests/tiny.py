"""Tiny shared fixtures: a small model config and a random packed batch with several documents per row."""
import torch

from config import ModelConfig
from data.loader import make_batch


def tiny_model_config(n_layers: int = 6) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, multiple_of=16)


def tiny_batch(cfg: ModelConfig, seed: int, rows: int = 4, seq_len: int = 32, eos: int = 63):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(0, eos, (rows, seq_len + 1), generator=g)
    windows[torch.rand(windows.shape, generator=g) < 0.08] = eos  # document boundaries
    return make_batch(windows.numpy(), torch.arange(rows).numpy(), eos)
