"""The draft: resident on the device; its KV cache on the device, on the host, or recomputed each round."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from specoffload.planner.trace_names import (SPAN_DRAFT_ATTN, SPAN_DRAFT_PREFILL, SPAN_DRAFT_STEP, TRACK_CPU_ATTN,
                                              TRACK_GPU)

from specoffload.planner.schema import Plan

from ..kv_cache import KVCache
from ..layers import attn_out, ffn, qkv, rms_norm, rope_cos_sin, rope_inv_freq
from ..loader import load_model
from ..verify import draw, processed_probs, sampling_tensors
from .requests import Seq, padded
from .timeline import Timeline


class Draft:
    """The draft model, resident on the device; reads the plan's draft_kv (where its KV cache lives, or
    recompute) and draft_sub_batch (rows per recompute group)."""

    def __init__(self, model_dir: str | Path, plan: Plan, device: torch.device, dtype: torch.dtype, n_slots: int,
                 max_len: int, timeline: Timeline):
        self.args, self.w = load_model(model_dir, dtype=dtype, placement=lambda n: device)
        self.device, self.dtype, self.tl = device, dtype, timeline
        self.mode = plan.draft_kv
        self.sub_batch = max(1, plan.draft_sub_batch)
        self.inv_freq = rope_inv_freq(self.args, device)
        self.max_len = max_len
        kv_device = "cpu" if self.mode == "host" else device
        self.kv = None if self.mode == "recompute" else KVCache.for_model(
            self.args, n_slots, max_len, dtype=dtype, device=kv_device)

    def _forward(self, cache: KVCache, rows: list[int], tokens: Tensor, n_new: Tensor, record: str = "") -> Tensor:
        """The draft over new tokens [B, T] of cache rows -> logits at each row's last valid token [B, V]."""
        a, dev = self.args, self.device
        B, T = tokens.shape
        t_pass = time.perf_counter()
        positions = cache.positions(rows, T)
        cos_sin = rope_cos_sin(self.inv_freq, positions.to(dev), self.dtype)
        x = F.embedding(tokens.to(dev), self.w.embed)
        for j, lw in enumerate(self.w.layers):
            q, k, v = qkv(a, lw.attn, x, cos_sin)
            t0 = time.perf_counter()
            o = cache.attend(j, rows, q, k, v, n_new).to(dev, self.dtype)
            if cache.k[0].device.type == "cpu" and dev.type == "cuda":
                self.tl.add(TRACK_CPU_ATTN, f"{SPAN_DRAFT_ATTN} L{j}", t0, time.perf_counter())
            x = x + attn_out(lw.attn, o)
            x = x + ffn(a, lw.ffn, x, lw.experts)
        cache.advance(rows, n_new)
        x = x[torch.arange(B, device=dev), (n_new - 1).clamp(min=0).to(dev)]
        out = F.linear(rms_norm(x, self.w.norm, a.norm_eps), self.w.lm_head).float()
        if record and self.tl.enabled:  # "step" | "prefill"
            self.tl.add_pass("draft", B, T, float(cache.lengths[torch.tensor(rows)].max()), t_pass,
                             time.perf_counter(), record == "prefill")
        return out

    def prefill(self, seqs: list[Seq], prompts: list[list[int]], hidden: Tensor | None = None) -> None:
        """The prompts into the draft's KV cache (a pass of its own). `hidden` (the target's states of the
        prompts, which a feature draft reads) is not used: this draft reads only the tokens."""
        if self.kv is None:
            return
        rows = [s.slot for s in seqs]
        self.kv.reset(rows)
        prompts = [list(p) for p in prompts]
        n_new = torch.tensor([len(p) for p in prompts])
        tokens = padded(prompts)
        t0 = time.perf_counter()
        self._forward(self.kv, rows, tokens, n_new, record="prefill")
        self.tl.add(TRACK_GPU, SPAN_DRAFT_PREFILL, t0, time.perf_counter())

    def release(self, slots: list[int]) -> None:
        if self.kv is not None:
            self.kv.reset(slots)

    def propose(self, seqs: list[Seq], k: int) -> Iterator[None]:
        """Draft k tokens for each sequence into seq.drafted (and seq.draft_probs for sampled requests).

        A generator: yields after each draft step so the caller can interleave the steps with the
        target's layers. Greedy rows take the argmax; sampled rows draw from the processed distribution.
        """
        if not seqs or k == 0:
            return
        groups = [seqs[i:i + self.sub_batch] for i in range(0, len(seqs), self.sub_batch)] \
            if self.mode == "recompute" else [seqs]
        for group in groups:
            if self.mode == "recompute":
                # No persistent KV: re-read each context (prompt + everything committed) into a scratch cache.
                first = [s.req.prompt + s.out for s in group]
                cache = KVCache.for_model(self.args, len(group), max(len(c) for c in first) + k, dtype=self.dtype,
                                          device=self.device)
                rows = list(range(len(group)))
            else:
                cache, rows = self.kv, [s.slot for s in group]
                first = [s.pending for s in group]
            n_new = torch.tensor([len(f) for f in first])
            tokens = padded(first)
            sampled = [i for i, s in enumerate(group) if s.req.temperature > 0]
            params = sampling_tensors([group[i].req for i in sampled])
            drafted = torch.zeros(len(group), k, dtype=torch.long)
            probs: list[Tensor] = []
            for step in range(k):
                t0 = time.perf_counter()
                logits = self._forward(cache, rows, tokens, n_new, record="step")  # [B, V]
                nxt = logits.argmax(-1).cpu()
                if sampled:
                    p = processed_probs(logits[sampled], *params)
                    nxt[sampled] = draw(p, [group[i].generator for i in sampled]).cpu()
                    probs.append(p.cpu())
                drafted[:, step] = nxt
                tokens = nxt[:, None]
                n_new = torch.ones(len(group), dtype=torch.long)
                self.tl.add(TRACK_GPU, f"{SPAN_DRAFT_STEP} {step}", t0, time.perf_counter())
                yield
            for i, s in enumerate(group):
                s.drafted = drafted[i]
            for r, i in enumerate(sampled):
                group[i].draft_probs = torch.stack([p[r] for p in probs])  # [k, V]
            if self.mode != "recompute":
                # The draft has now seen pending + d1..d_{k-1}; verification rolls it back to what was kept.
                for s in group:
                    s.pending = []

    def commit(self, seqs: list[Seq], n_accepted: list[int], k: int, new_tokens: list[list[int]]) -> None:
        """After verification: keep the draft KV of each accepted prefix; queue what the draft has not seen."""
        if self.kv is None:
            return
        seen_drafts = k - 1
        slots = [s.slot for s in seqs]
        lengths = self.kv.lengths[torch.tensor(slots, dtype=torch.long)]  # after drafting: old + pending + k - 1
        keep = [int(n) - seen_drafts + min(a, seen_drafts) for n, a in zip(lengths.tolist(), n_accepted)]
        self.kv.rollback(slots, keep)
        for s, a, new in zip(seqs, n_accepted, new_tokens):
            # Committed tokens the draft has not processed: d_k if it was accepted, then the target's token.
            s.pending = new[min(a, seen_drafts):]


# ----------------------------------------------------------------------------------------------
# The engine: schedules, verification, refill
