"""Memory accounting over simulated time: allocations against the pools, KV per token, prefill staging.

Apart from time: nothing here builds tasks. Methods of `Simulation` (mixed in); the state they read
(pools, kv_token, kv_token_gpu, staging, gpu_kv, eng, problems) is set up by `Simulation.__init__`.
"""
from __future__ import annotations

import numpy as np

from .state import Problem, _Batch, _Pass


class MemoryAccounting:
    """Pool allocations and frees; KV taken per token as sequences are admitted and generate."""

    def _alloc(self, pool: str, nbytes: float, task: str) -> None:
        over = self.pools[pool].alloc(nbytes, self.eng.now, task)
        if over is not None and self.overflow is None:
            self.overflow = over
            gib = 2**30
            self.problems.append(Problem("overflow", (
                f"{pool} memory overflows at t={over.time:.3f} s in task '{task}': {over.need_bytes / gib:.2f} GiB "
                f"needed, capacity {over.capacity_bytes / gib:.2f} GiB (over by {over.excess_bytes / gib:.2f} GiB)")))
            self.eng.stopped = True

    def _free(self, pool: str, nbytes: float) -> None:
        self.pools[pool].free(nbytes, self.eng.now)

    def _kv_bytes(self, slots: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
        """Bytes per pool that `tokens` KV entries of each of `slots` take (GPU-KV slots come first)."""
        on_gpu = slots < self.gpu_kv
        n_gpu, n_host = float(tokens[on_gpu].sum()), float(tokens[~on_gpu].sum())
        out: dict[str, float] = {}
        for rate, n in ((self.kv_token, n_host), (self.kv_token_gpu, n_gpu)):
            for pool, v in rate.items():
                out[pool] = out.get(pool, 0.0) + v * n
        return out

    def _kv_take(self, batch: _Batch, slots: np.ndarray, tokens: np.ndarray, what: str) -> None:
        if not len(slots) or self.eng.stopped:
            return
        batch.kv[slots] += tokens
        for pool, nbytes in self._kv_bytes(slots, tokens).items():
            self._alloc(pool, nbytes, f"KV caches: {what} (batch {batch.index}, {len(slots)} sequences)")

    def _kv_free(self, batch: _Batch, slots: np.ndarray) -> None:
        if not len(slots):
            return
        for pool, nbytes in self._kv_bytes(slots, batch.kv[slots]).items():
            self._free(pool, nbytes)
        batch.kv[slots] = 0

    def _staging(self, p: _Pass, take: bool) -> None:
        for pool, per_prompt, name in self.staging:
            if take:
                self._alloc(pool, per_prompt * p.n_prompts, f"{name}, prefill chunk of {p.n_prompts} prompts")
            else:
                self._free(pool, per_prompt * p.n_prompts)
