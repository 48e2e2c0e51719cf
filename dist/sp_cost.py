"""Predicted time and memory of one sequence on a sequence-parallel (SP) group of d lanes (Ulysses).

Analytic: time(s, d) = (quad * s^2 + lin * s) / d + comm(s, d), where comm is what one lane sends in the
Ulysses all-to-alls of the stage (q, k, v in, the output back; forward and backward),
bytes_per_token * (s / d) * (d - 1) / d, over the measured bandwidth, plus the all-to-alls' start-up
latency (none on a group of one lane);
a group of d lanes holds at most d * tokens_per_lane tokens. The coefficients are fitted from real
measurements by `bench/profile_sp.py` (`fit`) and stored as JSON (`save` / `load`).
Measured: `bench/profile_sp.py --lanes L` also times the stage on groups of every size d <= L while all L lanes
run at once (every group busy, as in training) and fits a s^2 + b s + c per d (`fit_measured`); those replace
the analytic time for those sizes. They capture what the analytic model cannot, e.g. more lanes than cores.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np


@dataclass(frozen=True)
class SPCost:
    quad: float  # seconds per token^2 (attention), for the whole stage, on one lane
    lin: float  # seconds per token (projections, MLP), on one lane
    bytes_per_token: float  # all-to-all bytes per token a lane holds, before the (d - 1) / d that stays local
    bandwidth: float  # bytes per second of the lane-to-lane link
    tokens_per_lane: int  # memory: tokens one lane can hold (activations) after the model states
    latency: float = 0.0  # seconds of all-to-all start-up per sequence on a group of > 1 lane (all layers)
    measured: dict | None = None  # "d" -> [a, b, c]: time = a s^2 + b s + c fitted on d-lane groups as they run

    def time(self, s: float | np.ndarray, d: int) -> float | np.ndarray:
        if self.measured and str(d) in self.measured:
            a, b, c = self.measured[str(d)]
            return a * s * s + b * s + c
        comm = self.bytes_per_token * s / d * (d - 1) / d / self.bandwidth + (self.latency if d > 1 else 0.0)
        return (self.quad * s * s + self.lin * s) / d + comm

    def analytic(self) -> "SPCost":
        """The model from compute and all-to-all fits alone (any number of lanes), without measured groups."""
        return replace(self, measured=None)

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


def fit_measured(runs: dict[int, list[tuple[int, float]]]) -> dict:
    """Per group size d, least squares of seconds on s^2, s and 1 (each coefficient >= 0) from [(tokens, seconds)]."""
    out = {}
    for d, points in runs.items():
        s = np.array([p[0] for p in points], dtype=float)
        t = np.array([p[1] for p in points], dtype=float)
        coef, *_ = np.linalg.lstsq(np.stack([s * s, s, np.ones_like(s)], axis=1), t, rcond=None)
        out[str(d)] = [max(float(c), 0.0) for c in coef]
    return out


def fit(compute: list[tuple[int, float]], alltoall: list[tuple[int, float]], bytes_per_token: float,
        tokens_per_lane: int, alltoalls_per_sequence: int = 0) -> SPCost:
    """Least-squares fits: compute = [(tokens, seconds on one lane)] on s^2 and s; alltoall = [(bytes per lane,
    seconds)] on a start-up time and bytes / bandwidth (the start-up counted alltoalls_per_sequence times)."""
    s = np.array([c[0] for c in compute], dtype=float)
    t = np.array([c[1] for c in compute], dtype=float)
    (quad, lin), *_ = np.linalg.lstsq(np.stack([s * s, s], axis=1), t, rcond=None)
    b = np.array([a[0] for a in alltoall], dtype=float)
    secs = np.array([a[1] for a in alltoall], dtype=float)
    (start, per_byte), *_ = np.linalg.lstsq(np.stack([np.ones_like(b), b], axis=1), secs, rcond=None)
    return SPCost(max(float(quad), 0.0), max(float(lin), 0.0), bytes_per_token, 1.0 / max(float(per_byte), 1e-15),
                  tokens_per_lane, max(float(start), 0.0) * alltoalls_per_sequence)
