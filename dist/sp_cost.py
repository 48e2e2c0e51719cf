"""Predicted time and memory of one sequence on a sequence-parallel (SP) group of d lanes (Ulysses).

Time of a sequence of s tokens on a group of d lanes:
    time(s, d) = (quad * s^2 + lin * s) / d + comm(s, d)
    comm(s, d) = v * (d - 1) / d / B_d + latency (none on a group of one lane),  v = bytes_per_token * s / d
where v is what one lane holds of the Ulysses all-to-alls (q, k, v in, the output back; forward and backward)
and B_d the all-to-all bandwidth of a group of d lanes:
    B_d = bandwidths["d"]                                  where measured for that size (a fitted profile), else
    B_d = bandwidth                                        inside one node (d <= lanes_per_node, or lanes_per_node = 0)
    B_d = node_bandwidth * (d - 1) / (n * (d - n))         across nodes, n = lanes_per_node:
the n lanes of a node each send v * (d - n) / d off the node, all through the node's links (node_bandwidth
bytes/s together), so comm = n * v * (d - n) / d / node_bandwidth (the in-node part, ~10x faster, overlaps).
Time of a pass (one micro-batch): the slowest group's sum of its sequences' times, plus per_pass; of a step:
its passes' times plus per_step (the optimizer step, the lanes' gradient all-reduce, the embedding, head and loss
of a batch's fixed token count: what a whole training step costs beyond its passes). `fit_fixed` fits per_step
from training steps' measured seconds against the model's predictions.
Memory: a group of d lanes holds at most d * tokens_per_lane tokens; `lane_tokens` derives tokens_per_lane
from the memory of a lane, the model states under the sharding in use and the activation bytes per token.
Coefficients come from `bench/profile_sp.py` (`fit`, `fit_measured`; stored as JSON by `save` / `load`) or
from a named preset (`preset`). Measured: `bench/profile_sp.py --lanes L` also times the stage on groups of
every size d <= L while all L lanes run at once and fits a s^2 + b s + c per d; those replace the analytic
time for those sizes (they capture e.g. more lanes than cores).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True)
class SPCost:
    quad: float  # seconds per token^2 (attention), for the whole stage, on one lane
    lin: float  # seconds per token (projections, MLP), on one lane
    bytes_per_token: float  # all-to-all bytes per token a lane holds, before the (d - 1) / d that stays local
    bandwidth: float  # bytes per second of the all-to-all inside one node
    tokens_per_lane: int  # memory: tokens one lane can hold (activations) after the model states (`lane_tokens`)
    latency: float = 0.0  # seconds of all-to-all start-up per sequence on a group of > 1 lane (all layers)
    measured: dict | None = None  # "d" -> [a, b, c]: time = a s^2 + b s + c fitted on d-lane groups as they run
    per_pass: float = 0.0  # seconds every pass (micro-batch) costs on top of its slowest group (FlexSP's beta)
    lanes_per_node: int = 0  # lanes that share a node's fast links (0: every group inside one node)
    node_bandwidth: float = 0.0  # bytes per second of one node's links to the other nodes, all its lanes together
    bandwidths: dict | None = None  # "d" -> all-to-all bytes per second measured on groups of d lanes
    per_step: float = 0.0  # seconds every training step costs on top of its passes (`fit_fixed`)

    def link(self, d: int) -> float:
        """B_d: the all-to-all bandwidth one lane of a d-lane group sees (module docstring)."""
        if self.bandwidths and str(d) in self.bandwidths:
            return self.bandwidths[str(d)]
        n = self.lanes_per_node
        if not n or d <= n:
            return self.bandwidth
        if self.node_bandwidth <= 0:
            raise ValueError(f"a group of {d} lanes spans nodes of {n} lanes but node_bandwidth is not set: "
                             f"give it (bench/profile_sp.py --node-gbps) or a measured bandwidth for {d} lanes")
        return self.node_bandwidth * (d - 1) / (n * (d - n))

    def time(self, s: float | np.ndarray, d: int) -> float | np.ndarray:
        if self.measured and str(d) in self.measured:
            a, b, c = self.measured[str(d)]
            return a * s * s + b * s + c
        comm = self.bytes_per_token * s / d * (d - 1) / d / self.link(d) + self.latency if d > 1 else 0.0
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


def lane_tokens(memory_bytes: float, activation_bytes_per_token: float, params: float = 0.0,
                state_bytes_per_param: float = 16.0, state_shards: int = 1, quadratic: float = 0.0) -> int:
    """The tokens E one lane can hold: the largest E with a * E + q * E^2 <= free, where
    free = memory_bytes - state_bytes_per_param * params / state_shards, a = activation_bytes_per_token and
    q = quadratic (bytes per token^2: attention scores kept for the backward when attention is not fused, counted
    for one sequence of E tokens: conservative for several shorter ones); with q = 0, E = free / a.
    Model states: weights, gradients and optimizer moments (16 B per parameter for fp32 AdamW or bf16 mixed
    precision with fp32 master weights), split over state_shards lanes (ZeRO-3: all of them; our lanes of a stage
    each hold the stage's whole states: 1)."""
    free = memory_bytes - state_bytes_per_param * params / state_shards
    if free < activation_bytes_per_token + quadratic:
        raise ValueError(f"model states ({state_bytes_per_param * params / state_shards / 1e9:.2f} GB per lane) leave "
                         f"no room for one token's activations in {memory_bytes / 1e9:.2f} GB: shard the states over "
                         f"more lanes, use fewer layers per stage, or give each lane more memory")
    if quadratic <= 0:
        return int(free // activation_bytes_per_token)
    a, q = activation_bytes_per_token, quadratic
    return int((math.sqrt(a * a + 4 * q * free) - a) / (2 * q))


def preset(name: str) -> SPCost:
    """A named cost model for studying the planner at cluster scale (see PRESETS)."""
    if name not in PRESETS:
        raise ValueError(f"unknown SP cost preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]()


def _flexsp_a100_64() -> SPCost:
    """FlexSP's published figures (Wang et al., "FlexSP: Accelerating LLM Training via Flexible Sequence
    Parallelism", ASPLOS '25, arXiv 2412.01523; constants from its code): GPT 6.7B (hidden 4096 x 32 layers) on
    64 A100s, 8 per node. Whole-model forward + backward on one GPU 5.128e-6 ms/token^2 * s^2 + 0.1840 ms/token * s,
    629.4 ms per micro-batch (beta), 4.48 MB of activations per token, 30 GB per GPU left to activations after the
    ZeRO-3 model states (16 B per parameter over the 64 GPUs). Ulysses all-to-all bandwidth measured per group size:
    119.5 / 104.1 / 96.5 GB/s for 2 / 4 / 8 GPUs (one node), 10.3 / 5.9 / 4.9 GB/s for 16 / 32 / 64 (across nodes).
    All-to-all bytes per token: 4 (q, k, v, out) x 2 (forward + backward) x 32 layers x 4096 x 2 B."""
    params, gpus = 6.7e9, 64
    states = 16.0 * params / gpus
    gbps = {2: 119.5, 4: 104.1, 8: 96.5, 16: 10.3, 32: 5.9, 64: 4.9}
    return SPCost(quad=5.128e-9, lin=0.1840e-3, bytes_per_token=4 * 2 * 32 * 4096 * 2, bandwidth=gbps[8] * 1e9,
                  tokens_per_lane=lane_tokens(30e9 + states, 4.48e6, params, state_shards=gpus), per_pass=0.6294,
                  lanes_per_node=8, bandwidths={str(d): g * 1e9 for d, g in gbps.items()})


PRESETS = {"flexsp-a100-64": _flexsp_a100_64}


def fit_measured(runs: dict[int, list[tuple[int, float]]]) -> dict:
    """Per group size d, least squares of seconds on s^2, s and 1 (each coefficient >= 0) from [(tokens, seconds)]."""
    out = {}
    for d, points in runs.items():
        s = np.array([p[0] for p in points], dtype=float)
        t = np.array([p[1] for p in points], dtype=float)
        coef, _ = nnls(np.stack([s * s, s, np.ones_like(s)], axis=1), t)
        out[str(d)] = [float(c) for c in coef]
    return out


def fit_fixed(residuals: list[float]) -> float:
    """per_step from training steps' measured - predicted seconds (predicted without per_step): the least of them
    (other load on the machine only adds time; the profile's timings are best-of too). It takes in what a step
    costs beyond its passes as profiled: the optimizer step, the gradient all-reduce, the embedding, head and loss,
    and any per-pass overhead (per_pass stays as given), less what the profile overestimates (it can be < 0)."""
    return float(min(residuals))


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
