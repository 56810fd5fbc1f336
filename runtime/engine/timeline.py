"""Timing: one span per task on the same track names as the simulator's trace, one record per forward."""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class PassRecord:
    """One forward: `model` (target | draft), `batch` rows of `query` new tokens each (padded: the longest
    row's count; a feature draft's packed forward records the mean count its linear parts compute), `keys`
    the keys the attention reads per row (the mean over rows of cached + new: host attention reads each row
    only up to its own length), start/end on the timeline's clock; `prefill` for prompts."""

    model: str
    batch: int
    query: float
    keys: float
    start: float
    end: float
    prefill: bool = False
    fused: bool = False


class Timeline:
    """Host-clock spans per resource track (gpu, h2d, d2h, cpu-attn); busy seconds per track."""

    def __init__(self, enabled: bool = True, max_spans: int = 200_000):
        self.t0 = time.perf_counter()
        self.busy: dict[str, float] = {}
        self.spans: list[tuple[str, str, float, float]] = []
        # One record per forward: what ran and when, for the profiler's in-engine fit.
        self.passes: list[PassRecord] = []
        self.enabled, self.max_spans = enabled, max_spans

    def add_pass(self, model: str, batch: int, query: float, keys: float, start: float, end: float,
                 prefill: bool = False, fused: bool = False) -> None:
        if self.enabled and len(self.passes) < self.max_spans:
            self.passes.append(PassRecord(model, batch, query, keys, start - self.t0, end - self.t0, prefill, fused))

    def add(self, track: str, name: str, start: float, end: float) -> None:
        self.busy[track] = self.busy.get(track, 0.0) + (end - start)
        if self.enabled and len(self.spans) < self.max_spans:
            self.spans.append((track, name, start - self.t0, end - self.t0))

    def span(self, track: str, name: str):
        tl = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                tl.add(track, name, self.start, time.perf_counter())

        return _Span()
