"""What the task-graph builders share: problems found, task priority classes, a batch's sequences and
one pass's bookkeeping."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .engine import Task


@dataclass(frozen=True)
class Problem:
    """Why a simulation did not finish as planned."""

    kind: str  # overflow | deadlock | unfinished
    message: str


TARGET, DRAFT, BULK = 0, 1, 2  # priority classes: lower runs first


def _prio(cls: int, n: int, j: int = 0, i: int = 0) -> int:
    return (((cls << 32) | n) << 16) | (min(j, 255) << 8) | min(i, 255)


class _Batch:
    """The sequences of one batch as arrays over its decode_batch slots."""

    def __init__(self, index: int, size: int):
        self.index = index
        self.seq = np.full(size, -1, dtype=np.int64)
        self.gen = np.zeros(size, dtype=np.int64)
        self.active = np.zeros(size, dtype=bool)
        self.kv = np.zeros(size, dtype=np.int64)  # tokens each slot holds in the KV caches
        self.pending: list[Task] = []  # what the next verification (serial: the next draft) waits for

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(~self.active)


class _Pass:
    __slots__ = ("index", "kind", "batch", "slots", "tokens", "waiting_weights", "layers_done", "gate",
                 "n_prompts", "done", "chunk")

    def __init__(self, index: int, kind: str):
        self.index, self.kind = index, kind
        self.batch = -1
        self.slots = None
        self.tokens = 0.0
        self.waiting_weights: dict[int, tuple[list[Task], list[Task]]] = {}
        self.layers_done = 0
        self.gate: Task | None = None
        self.n_prompts = 0
        self.done = False
        self.chunk: _Chunk | None = None  # a verification's fused prefill chunk (planner/sim/fused_pass.py)


class _Chunk:
    """A refill's chunk of prompts whose prefill waits for the next verification's sweep (a fused plan)."""

    __slots__ = ("batch", "slots", "n_prompts", "extra_bytes")

    def __init__(self, batch: int, slots: np.ndarray):
        self.batch, self.slots, self.n_prompts = batch, slots, len(slots)
        self.extra_bytes = 0.0  # device working set taken beyond the plan's while the fused pass runs
