"""A preallocated key/value cache for a ragged batch, meant to live in host memory.

Scope: storage and bookkeeping of past keys/values, plus the attention call over them. Each slot
holds one sequence and has its own length, so a batch can mix sequences at different positions (a
prompt being prefilled next to one decoding).

Layout per layer is head-major, ``[slots, Hkv, max_len, Dh]``, not token-major
``[slots, max_len, Hkv, Dh]``: attention reads K as a [L, Dh] matrix per (slot, kv head), and with
the head-major layout that matrix is one contiguous run of memory (token-major makes it strided,
which makes torch copy or fall off its fast path; measured 2-2.5x slower at Mixtral shapes).

Attention over a host cache (``impl="auto"`` on the CPU, or ``"host"``) is
runtime/host_attention.py: it addresses the slots through an index and reads each one only up to
its own length, so nothing is gathered, copied or padded to the longest row, and it accumulates in
fp32 whatever the cache dtype. A cache on a GPU (``"auto"`` there) uses torch sdpa over a view up
to the longest row. ``"sdpa"`` and ``"grouped"`` (runtime/layers.py) stay selectable anywhere.

A step appends up to T new tokens per slot, at that slot's own positions ``len .. len + n_new - 1``;
rows with fewer than T new tokens are right-padded and their padding is never written. Lengths
advance once per step (after every layer has written), which is why writing and advancing are
separate calls. Speculative verification writes k+1 tokens and then :meth:`KVCache.rollback`
truncates a slot to the accepted prefix; :meth:`KVCache.reset` frees a slot for a new prompt.
Stale entries past a slot's length are never read (attention masks by length) and get overwritten.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .config import ModelArgs
from .host_attention import host_attention
from .layers import attention


def _as_index(slots: Tensor | list[int] | range) -> Tensor:
    return torch.as_tensor(list(slots) if isinstance(slots, range) else slots, dtype=torch.long)


class KVCache:
    """Per-layer key and value buffers ``[S, Hkv, max_len, Dh]`` and per-slot lengths ``[S]``."""

    def __init__(self, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", pin: bool = False,
                 sliding_window: int | None = None):
        shape = (n_slots, n_kv_heads, max_len, head_dim)
        # Pinned host memory makes host<->GPU copies asynchronous; only meaningful where CUDA exists.
        pin = pin and torch.cuda.is_available() and torch.device(device).type == "cpu"
        self.k = [torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin) for _ in range(n_layers)]
        self.lengths = torch.zeros(n_slots, dtype=torch.long)  # [S], kept on the CPU for bookkeeping
        self.max_len = max_len
        self.sliding_window = sliding_window

    @classmethod
    def for_model(cls, args: ModelArgs, n_slots: int, max_len: int, **kw) -> "KVCache":
        return cls(args.n_layers, n_slots, max_len, args.n_kv_heads, args.head_dim,
                   sliding_window=args.sliding_window, **kw)

    @property
    def n_slots(self) -> int:
        return self.lengths.shape[0]

    # -- bookkeeping ------------------------------------------------------------------------------

    def positions(self, slots, T: int) -> Tensor:
        """Absolute positions of T new tokens per slot: len[slot] + t.  # [B, T]"""
        return self.lengths[_as_index(slots)][:, None] + torch.arange(T)[None, :]

    def check_room(self, slots, n_new: Tensor) -> None:
        idx = _as_index(slots)
        end = self.lengths[idx] + n_new
        if bool((end > self.max_len).any()):
            bad = int(idx[(end > self.max_len).nonzero()[0, 0]])
            raise ValueError(f"slot {bad}: {int(self.lengths[bad])} cached + new tokens exceed max_len={self.max_len}")

    def advance(self, slots, n_new: Tensor | list[int] | int) -> None:
        """Commit a step: each slot's length grows by its number of new tokens."""
        idx = _as_index(slots)
        self.lengths[idx] += torch.as_tensor(n_new, dtype=torch.long).expand(idx.shape)

    def rollback(self, slots, lengths: Tensor | list[int] | int) -> None:
        """Truncate slots to the given lengths (e.g. the accepted prefix after verification)."""
        idx = _as_index(slots)
        new = torch.as_tensor(lengths, dtype=torch.long).expand(idx.shape)
        if bool((new > self.lengths[idx]).any()) or bool((new < 0).any()):
            raise ValueError(f"rollback to {new.tolist()} beyond current lengths {self.lengths[idx].tolist()}")
        self.lengths[idx] = new

    def reset(self, slots) -> None:
        """Free slots for reuse by new sequences (their old entries are masked, then overwritten)."""
        self.lengths[_as_index(slots)] = 0

    # -- data -------------------------------------------------------------------------------------

    def write(self, layer: int, slots, k_new: Tensor, v_new: Tensor, n_new: Tensor | None = None) -> None:
        """Store the new keys/values of one layer at each slot's next positions (not yet advanced).

        k_new, v_new [B, T, Hkv, Dh]; n_new [B] valid tokens per row (default T); rows are right-padded.
        """
        idx = _as_index(slots)
        B, T = k_new.shape[:2]
        n_new = torch.full((B,), T, dtype=torch.long) if n_new is None else n_new.to(torch.long)
        pos = self.positions(idx, T)  # [B, T]
        valid = torch.arange(T)[None, :] < n_new[:, None]  # [B, T]
        rows = idx[:, None].expand(B, T)[valid]  # [n_valid]
        cols = pos[valid]
        dev = self.k[layer].device
        # Advanced indices split by a slice: cache[rows, :, cols] is [n_valid, Hkv, Dh], as is k_new[valid].
        self.k[layer][rows.to(dev), :, cols.to(dev)] = k_new[valid.to(k_new.device)].to(self.k[layer])
        self.v[layer][rows.to(dev), :, cols.to(dev)] = v_new[valid.to(v_new.device)].to(self.v[layer])

    def view(self, layer: int, slots, upto: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the first ``upto`` positions of the given slots.  # [B, Hkv, upto, Dh] each

        A contiguous run of slots is a view (no copy); otherwise the rows are gathered.
        """
        idx = _as_index(slots)
        s0 = int(idx[0]) if len(idx) else 0
        if torch.equal(idx, torch.arange(s0, s0 + len(idx))):
            return self.k[layer][s0:s0 + len(idx), :, :upto], self.v[layer][s0:s0 + len(idx), :, :upto]
        dev = self.k[layer].device
        return self.k[layer][idx.to(dev), :, :upto], self.v[layer][idx.to(dev), :, :upto]

    def attend(self, layer: int, slots, q: Tensor, k_new: Tensor, v_new: Tensor,
               n_new: Tensor | None = None, impl: str = "auto") -> Tensor:
        """Write this layer's new keys/values, then attend the new queries over the slot histories.

        q [B, T, H, Dh]; k_new, v_new [B, T, Hkv, Dh]; n_new [B] (default T) -> o [B, T, H, Dh].
        Runs where the cache lives (the host, in the offloaded engine); q/k/v are moved there.
        Call :meth:`advance` once all layers of the step are done. ``impl``: "auto" (host attention
        for a host cache, sdpa for a device cache), "host", "sdpa" or "grouped". The output is in the
        cache's dtype.
        """
        idx = _as_index(slots)
        B, T = q.shape[:2]
        n_new = torch.full((B,), T, dtype=torch.long) if n_new is None else n_new.to(torch.long)
        self.check_room(idx, n_new)
        self.write(layer, idx, k_new, v_new, n_new)
        kv_len = self.lengths[idx] + n_new  # [B]
        q_pos = self.positions(idx, T)  # [B, T]
        dev = self.k[layer].device
        if impl == "auto":
            impl = "host" if dev.type == "cpu" else "sdpa"
        if impl == "host":
            if dev.type != "cpu":
                raise ValueError("impl='host' needs a cache in host memory")
            return host_attention(q.to(self.k[layer].dtype), self.k[layer], self.v[layer], q_pos, kv_len,
                                  self.sliding_window, rows=idx, out_dtype=self.k[layer].dtype)
        k, v = self.view(layer, idx, int(kv_len.max()))
        return attention(q.to(dev, self.k[layer].dtype), k, v, q_pos.to(dev), kv_len.to(dev),
                         self.sliding_window, impl=impl)
