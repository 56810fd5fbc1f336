"""The target's KV cache, partitioned: some slots on the device, the rest in host memory."""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import ModelArgs
from ..kv_cache import KVCache


class TargetKV:
    """The target's KV cache: slots whose index is in `gpu_slots` live on the device, the rest on the host."""

    def __init__(self, args: ModelArgs, n_slots: int, max_len: int, gpu_slots: set[int], device: torch.device,
                 dtype: torch.dtype):
        self.gpu_slots = sorted(gpu_slots) if device.type == "cuda" else []
        self.host_slots = [s for s in range(n_slots) if s not in set(self.gpu_slots)]
        self.where = {s: ("dev", i) for i, s in enumerate(self.gpu_slots)}
        self.where.update({s: ("host", i) for i, s in enumerate(self.host_slots)})
        self.host = KVCache.for_model(args, max(1, len(self.host_slots)), max_len, dtype=dtype, device="cpu",
                                      pin=device.type == "cuda")
        self.dev = KVCache.for_model(args, len(self.gpu_slots), max_len, dtype=dtype, device=device) \
            if self.gpu_slots else None

    def _cache(self, kind: str) -> KVCache:
        return self.dev if kind == "dev" else self.host

    def _groups(self, slots: list[int]):
        """(partition, row positions, local slot indices) for each partition the slots touch."""
        if not self.gpu_slots:  # the common case: everything on the host, local index == slot
            yield "host", torch.arange(len(slots)), torch.tensor([self.where[s][1] for s in slots], dtype=torch.long)
            return
        for kind in ("dev", "host"):
            rows = [i for i, s in enumerate(slots) if self.where[s][0] == kind]
            if rows:
                yield kind, torch.tensor(rows), torch.tensor([self.where[slots[i]][1] for i in rows], dtype=torch.long)

    def split(self, slots: list[int]) -> tuple[list[int], list[int]]:
        """Row indices of `slots` whose cache is on the device, and on the host."""
        rows = {kind: r.tolist() for kind, r, _ in self._groups(slots)}
        return rows.get("dev", []), rows.get("host", [])

    def _each(self, slots: list[int]):
        for kind, _, local in self._groups(slots):
            yield self._cache(kind), local.tolist()

    def lengths(self, slots: list[int]) -> Tensor:
        out = torch.empty(len(slots), dtype=torch.long)
        for kind, rows, local in self._groups(slots):
            out[rows] = self._cache(kind).lengths[local]
        return out

    def local(self, slots: list[int]) -> tuple[KVCache, list[int]]:
        caches = list(self._each(slots))
        if len(caches) != 1:
            raise AssertionError("rows span both partitions")
        return caches[0]

    def advance(self, slots: list[int], n: list[int]) -> None:
        n_t = torch.as_tensor(n, dtype=torch.long)
        for kind, rows, local in self._groups(slots):
            self._cache(kind).advance(local, n_t[rows])

    def rollback(self, slots: list[int], lengths: list[int]) -> None:
        len_t = torch.as_tensor(lengths, dtype=torch.long)
        for kind, rows, local in self._groups(slots):
            self._cache(kind).rollback(local, len_t[rows])

    def reset(self, slots: list[int]) -> None:
        for cache, local in self._each(slots):
            cache.reset(local)
