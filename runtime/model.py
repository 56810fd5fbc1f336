"""Whole-model forward built from the per-layer pieces in ``layers`` (convenience and reference).

Scope: everything on one device, one call per step. The offloaded engine does the same per layer
(qkv -> KVCache.attend -> attn_out -> ffn) but streams weights and splits devices; this module is
what it is checked against, and what plain generation and the tests use.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelArgs
from .kv_cache import KVCache, _as_index
from .layers import ModelWeights, attn_out, ffn, qkv, rms_norm, rope_cos_sin, rope_inv_freq


class Transformer:
    """A decoder-only model: ``args`` + ``weights`` (all on one device) + the RoPE frequencies."""

    def __init__(self, args: ModelArgs, weights: ModelWeights, attn_impl: str = "sdpa"):
        self.args = args
        self.weights = weights
        self.device = weights.embed.device
        self.dtype = weights.embed.dtype
        self.inv_freq = rope_inv_freq(args, self.device)  # [Dh/2]
        self.attn_impl = attn_impl

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", **kw) -> "Transformer":
        """Load a Hugging Face folder (safetensors) with every tensor on ``device``; fp32 by default."""
        from .loader import load_model

        args, weights = load_model(model_dir, dtype=dtype, placement=lambda name: device)
        return cls(args, weights, **kw)

    def new_cache(self, n_slots: int, max_len: int | None = None, **kw) -> KVCache:
        max_len = max_len or self.args.max_position_embeddings
        kw.setdefault("device", self.device)
        return KVCache.for_model(self.args, n_slots, max_len, **kw)

    def forward(self, tokens: Tensor, cache: KVCache, slots=None, n_new: Tensor | None = None,
                logits: str = "all") -> Tensor:
        """Run new tokens through the model, extending the cache.

        tokens [B, T] (right-padded rows), slots: the cache slot of each row (default 0..B-1),
        n_new [B] valid tokens per row (default T). Returns logits [B, T, V] for ``logits="all"``
        or [B, V] at each row's last valid token for ``logits="last"``. Padded positions' logits
        are meaningless. Advances the cache lengths by n_new.
        """
        a, w = self.args, self.weights
        B, T = tokens.shape
        idx = torch.arange(B) if slots is None else _as_index(slots)
        n_new = torch.full((B,), T, dtype=torch.long) if n_new is None else torch.as_tensor(n_new, dtype=torch.long)
        cache.check_room(idx, n_new)
        positions = cache.positions(idx, T)  # [B, T]
        if a.max_position_embeddings and int((cache.lengths[idx] + n_new).max()) > a.max_position_embeddings:
            raise ValueError(f"sequence longer than max_position_embeddings={a.max_position_embeddings}")
        cos_sin = rope_cos_sin(self.inv_freq, positions.to(self.device), self.dtype)  # [B, T, Dh] x2

        x = F.embedding(tokens.to(self.device), w.embed)  # [B, T, D]
        for i, lw in enumerate(w.layers):
            q, k, v = qkv(a, lw.attn, x, cos_sin)
            o = cache.attend(i, idx, q, k, v, n_new, impl=self.attn_impl)  # [B, T, H, Dh]
            x = x + attn_out(lw.attn, o.to(self.device, self.dtype))
            x = x + ffn(a, lw.ffn, x, lw.experts)
        cache.advance(idx, n_new)

        if logits == "hidden":  # the final-norm hidden states (the LM head's input; a feature draft reads them)
            return rms_norm(x, w.norm, a.norm_eps)  # [B, T, D]
        if logits == "last":
            x = x[torch.arange(B), (n_new - 1).clamp(min=0).to(self.device)]  # [B, D]
        elif logits != "all":
            raise ValueError(f"logits must be 'all', 'last' or 'hidden', not {logits!r}")
        return F.linear(rms_norm(x, w.norm, a.norm_eps), w.lm_head)  # [B, T, V] or [B, V]

    __call__ = forward

    def logits_full(self, tokens: Tensor) -> Tensor:
        """Logits of whole sequences without a persistent cache (a fresh one per call).  # [B, T, V]"""
        cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        return self.forward(tokens, cache)

