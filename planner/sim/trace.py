"""Chrome trace (Perfetto) output with the track and slice names the simulator and the runtime share.

One track (thread) per resource: gpu, h2d, d2h, cpu-attn; one counter track per memory pool.
Slices are named by `slice_name(task, layer, micro_batch, batch)`, e.g. "ffn L3 mb1 B0". The names
live in planner/trace_names.py, which the runtime's engine, its trace writer (run_cli.write_trace,
through this class), the profiler's in-engine fit and the run report import too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..trace_names import TRACK_ORDER, TRACKS, slice_name, track_name

__all__ = ["ChromeTrace", "TRACKS", "TRACK_ORDER", "counter_name", "slice_name", "track_name"]


def counter_name(pool: str) -> str:
    return f"mem {pool} (GiB)"


class ChromeTrace:
    """Collects complete events ("X") and counters ("C") in microseconds; writes trace-event JSON."""

    def __init__(self, process: str = "specoffload", max_events: int = 400_000):
        self.process = process
        self.max_events = max_events
        self.events: list[dict[str, Any]] = []
        self.dropped = 0
        self.notes: list[str] = []
        self._tids = {key: i + 1 for i, key in enumerate(TRACK_ORDER)}

    def _tid(self, resource: str) -> int:
        if resource not in self._tids:
            self._tids[resource] = len(self._tids) + 1
        return self._tids[resource]

    def full(self) -> bool:
        return len(self.events) >= self.max_events

    def slice(self, resource: str, name: str, start_s: float, dur_s: float, args: dict | None = None) -> None:
        if self.full():
            self.dropped += 1
            return
        ev = {"ph": "X", "pid": 1, "tid": self._tid(resource), "name": name,
              "ts": round(start_s * 1e6, 3), "dur": round(dur_s * 1e6, 3)}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def counter(self, pool: str, t_s: float, nbytes: float) -> None:
        if self.full():
            self.dropped += 1
            return
        self.events.append({"ph": "C", "pid": 1, "name": counter_name(pool), "ts": round(t_s * 1e6, 3),
                            "args": {"GiB": round(nbytes / 2**30, 4)}})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_json(self) -> dict[str, Any]:
        meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": self.process}}]
        for key, tid in sorted(self._tids.items(), key=lambda kv: kv[1]):
            meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": track_name(key)}})
            meta.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_sort_index", "args": {"sort_index": tid}})
        notes = list(self.notes)
        if self.dropped:
            notes.append(f"{self.dropped} trace events dropped after the first {self.max_events}")
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms",
                "otherData": {"notes": notes}}

    def write(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), separators=(",", ":")))
        tmp.replace(path)
