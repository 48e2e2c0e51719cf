"""Predicted time and memory of one sequence on a sequence-parallel (SP) group of d lanes (Ulysses).

time(s, d) = (quad * s^2 + lin * s) / d + comm(s, d), where comm is what one lane sends in the
Ulysses all-to-alls of the stage (q, k, v in, the output back; forward and backward),
bytes_per_token * (s / d) * (d - 1) / d, over the measured bandwidth;
a group of d lanes holds at most d * tokens_per_lane tokens. The coefficients are fitted from real
measurements by `bench/profile_sp.py` (`fit`) and stored as JSON (`save` / `load`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class SPCost:
    quad: float  # seconds per token^2 (attention), for the whole stage, on one lane
    lin: float  # seconds per token (projections, MLP), on one lane
    bytes_per_token: float  # all-to-all bytes per token a lane holds, before the (d - 1) / d that stays local
    bandwidth: float  # bytes per second of the lane-to-lane link
    tokens_per_lane: int  # memory: tokens one lane can hold (activations) after the model states

    def time(self, s: float | np.ndarray, d: int) -> float | np.ndarray:
        comm = self.bytes_per_token * s / d * (d - 1) / d / self.bandwidth
        return (self.quad * s * s + self.lin * s) / d + comm

    def min_degree(self, s: int) -> int:
        """The smallest power-of-two group that can hold a sequence of s tokens."""
        return 1 << max(0, math.ceil(math.log2(math.ceil(s / self.tokens_per_lane))))

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump(asdict(self), fh, indent=1)

    @staticmethod
    def load(path: str) -> "SPCost":
        with open(path) as fh:
            return SPCost(**json.load(fh))


def fit(compute: list[tuple[int, float]], alltoall: list[tuple[int, float]], bytes_per_token: float,
        tokens_per_lane: int) -> SPCost:
    """Least-squares fit: compute = [(tokens, seconds on one lane)], alltoall = [(bytes per lane, seconds)]."""
    s = np.array([c[0] for c in compute], dtype=float)
    t = np.array([c[1] for c in compute], dtype=float)
    (quad, lin), *_ = np.linalg.lstsq(np.stack([s * s, s], axis=1), t, rcond=None)
    b = np.array([a[0] for a in alltoall], dtype=float)
    secs = np.array([a[1] for a in alltoall], dtype=float)
    bandwidth = float(b @ b / max(b @ secs, 1e-12))  # seconds = bytes / bandwidth, through the origin
    return SPCost(max(float(quad), 0.0), max(float(lin), 0.0), bytes_per_token, bandwidth, tokens_per_lane)
