"""Timing: a clock per device, cold copies of operands, medians over warm-up and repeated samples."""
from __future__ import annotations

import itertools
import json
import math
import time
from typing import Any, Callable, Iterable

import torch


from .config import MiB, ProfileConfig, WARMUP_MAX_S
from .fit import Stats, sig



class Clock:
    """Times `inner` back-to-back calls of a function: wall clock on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], inner: int) -> float:
        """Seconds per call, averaged over `inner` calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


COLD_BYTES = 64 * MiB  # weights rotated over per CPU probe: more than a last-level cache holds


def cold_copies(make: Callable[[int], Any], nbytes_each: float, device: torch.device) -> itertools.cycle:
    """Copies of some weights to cycle through, so that each call finds its weights out of the CPU's
    caches, as a layer does in the runtime (it runs every other layer's weights in between). On a
    GPU (or for weights larger than the caches) one copy."""
    n = 1 if device.type == "cuda" else max(1, min(256, math.ceil(COLD_BYTES / max(nbytes_each, 1.0))))
    return itertools.cycle([make(i) for i in range(n)])


def clone_layer(lw):
    """An independent copy of a LayerWeights (its own memory)."""
    from specoffload.runtime.layers import LayerWeights

    def clone(d):
        return {k: t.clone() for k, t in d.items()}

    return LayerWeights(clone(lw.attn), clone(lw.ffn), [clone(e) for e in lw.experts])


def measure(fn: Callable[[], Any], clock: Clock, cfg: ProfileConfig, max_inner: int = 10_000) -> Stats:
    """Warm up, calibrate the calls per sample, then `cfg.reps` samples: median and spread."""
    return measure_many([fn], clock, cfg, max_inner=max_inner)[0]


def measure_many(fns: list[Callable[[], Any]], clock: Clock, cfg: ProfileConfig, tick: Callable[[], None] | None = None,
                 max_inner: int = 10_000) -> list[Stats]:
    """Measure the points of one curve or grid together: warm up and calibrate each, then take the
    samples in rounds (one sample of every point per round), so a burst of load from elsewhere
    spreads over all points instead of skewing a few. tick: called once per point calibrated and
    once per round (len(fns) + cfg.reps calls)."""
    inner = []
    for fn in fns:
        t_end = time.perf_counter() + WARMUP_MAX_S
        for _ in range(max(1, cfg.warmup)):  # warm-up calls, but no more than WARMUP_MAX_S of them
            fn()
            if time.perf_counter() > t_end:
                break
        clock.sync()
        one = clock.time(fn, 1)
        inner.append(max(1, min(max_inner, math.ceil(cfg.min_sample_s / max(one, 1e-9)))))
        if tick:
            tick()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, cfg.reps)):
        for i, fn in enumerate(fns):
            samples[i].append(clock.time(fn, inner[i]))
        if tick:
            tick()
    return [Stats.of(xs, n) for xs, n in zip(samples, inner)]


def points_json(rows: Iterable[Iterable[float]]) -> str:
    """Measured points for provenance: one compact JSON list of rows, floats to 4 significant digits."""
    return json.dumps([[sig(v, 4) if isinstance(v, float) else v for v in row] for row in rows],
                      separators=(",", ":"))
