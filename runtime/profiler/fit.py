"""Pure numerics of the profiler: robust summaries, curves from points, and the CPU-attention fit.

This module uses numpy only, so the fitting can be tested on synthetic measurements with known answers;
importing it through the package (specoffload.runtime.profiler.fit) still loads torch, since the
package's __init__ imports the probes.

The CPU-attention model is the cost model's (planner/costmodel.py ``cpu_attention_seconds``):

    time = overhead + batch * (context * kv_bytes_per_token_per_layer / kv_read_bytes_per_s
                               + attention_flops(query, context) / flops_per_s)

linear in (overhead, 1 / kv_read_bytes_per_s, 1 / flops_per_s), all three nonnegative. The columns
``kv_bytes = batch * context * kv_bytes_per_token_per_layer`` and ``flops = batch * 4 * query *
context * q_dim`` are proportional whenever ``query`` is fixed, so the measured grid must vary the
query count to tell bandwidth from arithmetic. Times span orders of magnitude (50 us to 100s of ms),
so the fit minimises *relative* error (each row weighted by 1 / measured time): the small points
decide the overhead, the large ones the two rates.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

# A rate the data cannot see (its term fitted to zero) is written as the bound at which its term
# would still be at most this fraction of every measured time: finite, conservative, and flagged.
NOT_LIMITING_FRACTION = 0.01


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings of one measurement: median and relative spread (IQR / median)."""

    median: float
    spread: float  # (q75 - q25) / median; 0 for a single sample
    samples: tuple[float, ...] = ()
    inner: int = 1  # calls averaged within each sample

    @classmethod
    def of(cls, samples: Sequence[float], inner: int = 1) -> "Stats":
        xs = np.asarray(list(samples), dtype=float)
        if xs.size == 0 or not np.all(np.isfinite(xs)):
            raise ValueError(f"need finite samples, got {list(samples)}")
        med = float(np.median(xs))
        if xs.size < 2 or med <= 0:
            return cls(med, 0.0, tuple(float(x) for x in xs), inner)
        q25, q75 = np.percentile(xs, [25, 75])
        return cls(med, float((q75 - q25) / med), tuple(float(x) for x in xs), inner)


def sig(x: float, digits: int = 4) -> float:
    """x rounded to `digits` significant digits (profiles are read by people too)."""
    if x == 0 or not math.isfinite(x):
        return float(x)
    return float(f"{x:.{digits - 1}e}")


def curve_points(points: Sequence[tuple[float, float]], digits: int = 4) -> tuple[tuple[float, float], ...]:
    """Points for a ``Curve``: sorted by x, duplicate x merged by median, non-positive or
    non-finite values dropped, y rounded to `digits` significant digits.

    Raises ValueError when nothing usable is left (the probe then counts as failed).
    """
    by_x: dict[float, list[float]] = {}
    for x, y in points:
        x, y = float(x), float(y)
        if x > 0 and y > 0 and math.isfinite(x) and math.isfinite(y):
            by_x.setdefault(x, []).append(y)
    if not by_x:
        raise ValueError(f"no usable (positive, finite) points among {list(points)}")
    return tuple((x, sig(float(np.median(ys)), digits)) for x, ys in sorted(by_x.items()))


def nnls(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    """min ||a x - b||_2 subject to x >= 0, for a few columns (exact, by enumerating supports).

    The optimum's support S has x_S equal to the unconstrained least-squares solution on S (the
    gradient vanishes on S by the KKT conditions), so among all supports whose least-squares
    solution is nonnegative, the one with the smallest residual is the optimum. 2^n small solves:
    meant for n <= ~10 (the attention fit has 3). Returns (x, residual norm).
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    m, n = a.shape
    if n > 12:
        raise ValueError("nnls by enumeration is for a few columns only")
    best_x, best_r = np.zeros(n), float(np.linalg.norm(b))
    for size in range(1, n + 1):
        for support in itertools.combinations(range(n), size):
            cols = list(support)
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(n)
            x[cols] = sol
            r = float(np.linalg.norm(a @ x - b))
            if r < best_r - 1e-15 * max(1.0, best_r):
                best_x, best_r = x, r
    return best_x, best_r


@dataclass(frozen=True)
class AttentionPoint:
    """One measured CPU attention call: shapes, cost-model quantities and the measured time."""

    batch: int
    query: int
    context: int
    kv_bytes: float  # batch * context * kv_bytes_per_token_per_layer (cost-model accounting)
    flops: float  # batch * attention_flops(query, context)
    seconds: float  # median
    spread: float = 0.0


@dataclass(frozen=True)
class AttentionFit:
    overhead_seconds: float
    kv_read_bytes_per_s: float
    flops_per_s: float
    rel_rms_residual: float  # sqrt(mean(((pred - t) / t)^2))
    rel_max_residual: float  # max |pred - t| / t
    bounded: tuple[str, ...] = ()  # rates the data could not see, written as a not-limiting bound
    residuals: tuple[float, ...] = field(default=(), repr=False)  # (pred - t) / t per point
    seq_seconds: float = 0.0  # fixed cost per sequence in the batch (gathers, masks per row)
    row_seconds: float = 0.0  # fixed cost per query row (sequence x new token)

    def predict(self, kv_bytes: float, flops: float, batch: float = 0.0, query: float = 0.0) -> float:
        return (self.overhead_seconds + batch * (self.seq_seconds + query * self.row_seconds)
                + kv_bytes / self.kv_read_bytes_per_s + flops / self.flops_per_s)


def fit_attention(points: Sequence[AttentionPoint]) -> AttentionFit:
    """Fit time = overhead + batch * (seq + query * row) + kv_bytes / bw + flops / rate (all terms >= 0)
    by relative least squares. The per-sequence and per-query-row fixed costs are what a batch of
    short contexts pays beyond its bytes and FLOPs (index gathers, masks, softmax rows).

    Needs at least three points and at least two distinct flops-per-byte ratios (query counts);
    raises ValueError otherwise. A rate whose term fits to zero is replaced by the bound at which
    its term stays below NOT_LIMITING_FRACTION of every measured time, and is listed in `bounded`.
    """
    if len(points) < 3:
        raise ValueError(f"the attention fit needs at least 3 points, got {len(points)}")
    t = np.array([p.seconds for p in points], dtype=float)
    kv = np.array([p.kv_bytes for p in points], dtype=float)
    fl = np.array([p.flops for p in points], dtype=float)
    if np.any(t <= 0) or np.any(kv <= 0) or np.any(fl <= 0):
        raise ValueError("attention points need positive times, bytes and flops")
    ratios = np.unique(np.round(fl / kv, 9))
    if ratios.size < 2:
        raise ValueError("all attention points have the same flops per KV byte (vary the query count): "
                         "bandwidth and arithmetic rate cannot be told apart")
    batch = np.array([p.batch for p in points], dtype=float)
    rows = batch * np.array([p.query for p in points], dtype=float)
    cols = np.stack([np.ones_like(t), kv, fl, batch, rows], axis=1)
    scale = cols.max(axis=0)  # column scaling for conditioning
    a = (cols / scale) / t[:, None]  # relative error rows
    b = np.ones_like(t)
    x, _ = nnls(a, b)
    coef = x / scale  # seconds, seconds per byte, seconds per flop, seconds per sequence, per query row
    bounded = []
    overhead = float(coef[0])
    if coef[1] > 0:
        bw = 1.0 / coef[1]
    else:
        bw = float(np.max(kv / (NOT_LIMITING_FRACTION * t)))
        bounded.append("kv_read_bytes_per_s")
    if coef[2] > 0:
        rate = 1.0 / coef[2]
    else:
        rate = float(np.max(fl / (NOT_LIMITING_FRACTION * t)))
        bounded.append("flops_per_s")
    seq, row = float(coef[3]), float(coef[4])
    pred = overhead + batch * seq + rows * row + kv / bw + fl / rate
    rel = (pred - t) / t
    return AttentionFit(overhead, bw, rate, float(np.sqrt(np.mean(rel ** 2))), float(np.max(np.abs(rel))),
                        tuple(bounded), tuple(float(r) for r in rel), seq, row)


def relative_spread(a: float, b: float) -> float:
    """|a - b| / mean(a, b): how far two measurements of one figure disagree."""
    m = (abs(a) + abs(b)) / 2.0
    return abs(a - b) / m if m > 0 else 0.0


@dataclass(frozen=True)
class ExcessFit:
    """time = known + sum_j coef_j * column_j, coef >= 0: fixed costs fitted on top of a known part."""

    coef: tuple[float, ...]
    rel_rms_residual: float
    rel_max_residual: float
    residuals: tuple[float, ...] = field(default=(), repr=False)  # (pred - t) / t per point


def fit_excess(seconds: Sequence[float], known: Sequence[float], columns: Sequence[Sequence[float]]) -> ExcessFit:
    """Fit measured times as a known part (from rates measured elsewhere) plus nonnegative multiples of
    the given columns (fixed costs per call, per row, per token ...), by relative least squares.

    seconds, known: one value per point; columns: one row per point. Needs more points than columns,
    positive times and nonnegative known parts (raises ValueError otherwise).
    """
    t = np.asarray(seconds, dtype=float)
    k = np.asarray(known, dtype=float)
    cols = np.asarray(columns, dtype=float)
    if cols.ndim != 2 or cols.shape[0] != t.size or k.size != t.size:
        raise ValueError(f"need one row of columns and one known value per point ({t.size} points)")
    if t.size <= cols.shape[1]:
        raise ValueError(f"{t.size} points cannot fit {cols.shape[1]} terms")
    if np.any(t <= 0) or not np.all(np.isfinite(t)) or np.any(k < 0):
        raise ValueError("times must be positive and finite, known parts nonnegative")
    scale = np.where(cols.max(axis=0) > 0, cols.max(axis=0), 1.0)
    x, _ = nnls((cols / scale) / t[:, None], (t - k) / t)
    coef = x / scale
    pred = k + cols @ coef
    rel = (pred - t) / t
    return ExcessFit(tuple(float(c) for c in coef), float(np.sqrt(np.mean(rel ** 2))), float(np.max(np.abs(rel))),
                     tuple(float(r) for r in rel))
