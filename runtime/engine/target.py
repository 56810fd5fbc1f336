"""The target: streamed weights, a host KV cache (a device partition optional), CPU attention."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from specoffload.planner.trace_names import (SPAN_ATTN, SPAN_ATTN_OUT, SPAN_FFN, SPAN_KV, SPAN_LM_HEAD, SPAN_QKV,
                                              TRACK_CPU_ATTN, TRACK_D2H, TRACK_GPU, TRACK_H2D)

from specoffload.planner.schema import Plan

from ..config import load_args
from ..layers import (LayerWeights, attention, attn_out, ffn_norm, moe_experts, qkv, rms_norm, route, rope_cos_sin,
                      rope_inv_freq, swiglu)
from ..kv_cache import KVCache
from ..loader import load_model
from .requests import EngineError
from .disk_stream import DiskLayers, plan_disk_layers
from .streaming import LayerStreamer, Streams
from .target_kv import TargetKV
from .timeline import Timeline


class Target:
    """The target model placed as the plan says; runs prefill and verification passes layer by layer."""

    def __init__(self, model_dir: str | Path, plan: Plan, device: torch.device, dtype: torch.dtype, n_slots: int,
                 max_len: int, timeline: Timeline):
        """Reads the plan's placement: gpu_attn_layers, gpu_ffn_layers (resident layers, spread evenly),
        weight_buffers, micro_batches, and gpu_kv_sequences per batch of decode_batch x num_batches."""
        from specoffload.planner.schema import resident_layers

        cuda = device.type == "cuda"
        args = load_args(model_dir)
        n_layers = args.n_layers
        attn_res = resident_layers(plan.gpu_attn_layers, n_layers)  # spread evenly, as the simulator assumes
        ffn_res = resident_layers(plan.gpu_ffn_layers, n_layers)
        on_disk = plan_disk_layers(plan, n_layers, attn_res | ffn_res if cuda else set())

        def placement(name: str) -> str | torch.device:
            if name.startswith("layers.") and int(name.split(".")[1]) in on_disk:
                return "disk"  # not loaded: read from the checkpoint every pass
            if not cuda:
                return "cpu"
            if not name.startswith("layers."):
                return device
            j, part = int(name.split(".")[1]), name.split(".")[2]
            return device if j in (attn_res if part == "attn" else ffn_res) else "pinned"

        self.args, self.w = load_model(model_dir, dtype=dtype, placement=placement, args=args)
        self.device, self.dtype, self.tl = device, dtype, timeline
        self.streams = Streams(device)
        L = self.args.n_layers
        self.disk = DiskLayers(model_dir, self.args, sorted(on_disk), timeline=timeline) if on_disk else None
        self.streamer = LayerStreamer(self.w, [(j in attn_res or not cuda) and j not in on_disk for j in range(L)],
                                      [(j in ffn_res or not cuda) and j not in on_disk for j in range(L)], device,
                                      plan.weight_buffers, self.streams, timeline, self.disk, dtype)
        self.inv_freq = rope_inv_freq(self.args, device)
        self.micro_batches = plan.micro_batches
        per_batch = plan.gpu_kv_sequences
        gpu_slots = {bi * plan.decode_batch + s for bi in range(plan.num_batches) for s in range(per_batch)}
        self.kv = TargetKV(self.args, n_slots, max_len, gpu_slots, device, dtype)
        self.routed_only_below = self.args.n_experts // max(1, self.args.top_k)  # tokens under which few experts are hit
        # A feature draft reads the final-norm hidden states of each pass ([B, T, D], kept in last_hidden).
        self.keep_hidden = False
        self.last_hidden: Tensor | None = None

    # -- one layer's attention for some rows: device partition on the device, the rest on the CPU --
    def _attend(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor,
                prefill: bool) -> Tensor:
        """q [B, T, H, Dh], k/v [B, T, Hkv, Dh] on the device -> o [B, T, H, Dh] on the device."""
        if self.device.type == "cpu":
            return self._attend_cpu(j, slots, q, k, v, n_new)
        return self._attend_cuda(j, slots, q, k, v, n_new, prefill)

    def _attend_cpu(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor) -> Tensor:
        """Without CUDA: one memory, one cache; attend in place, no gathers."""
        t0 = time.perf_counter()
        cache, local = self.kv.local(slots)
        o = cache.attend(j, local, q, k, v, n_new).to(q.dtype)
        self.tl.add(TRACK_CPU_ATTN, f"{SPAN_ATTN} L{j}", t0, time.perf_counter())
        return o

    def _attend_cuda(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor,
                     prefill: bool) -> Tensor:
        """On CUDA: rows whose cache is on the device attend there; host rows as _prefill_host/_attend_host say."""
        dev_rows, host_rows = self.kv.split(slots)
        o = torch.empty_like(q)
        for rows, on_dev in ((dev_rows, True), (host_rows, False)):
            if not rows:
                continue
            idx = torch.tensor(rows, device=q.device)
            cache, local = self.kv.local([slots[r] for r in rows])
            qs, ks, vs = q[idx], k[idx], v[idx]
            if on_dev:
                t0 = time.perf_counter()
                o[idx] = cache.attend(j, local, qs, ks, vs, n_new[rows]).to(q.dtype)
                self.tl.add(TRACK_GPU, f"{SPAN_ATTN} L{j}", t0, time.perf_counter())
            elif prefill:
                o[idx] = self._prefill_host(j, cache, local, qs, ks, vs, n_new[rows])
            else:
                o[idx] = self._attend_host(j, cache, local, qs, ks, vs, n_new[rows])
        return o

    def _prefill_host(self, j: int, cache: KVCache, local: list[int], qs: Tensor, ks: Tensor, vs: Tensor,
                      n_new: Tensor) -> Tensor:
        """Prompt attention runs on the device over the prompt itself; the keys/values go to the host cache."""
        t0 = time.perf_counter()
        pos = cache.positions(local, qs.shape[1]).to(qs.device)
        kv_len = cache.lengths[torch.tensor(local)].to(qs.device) + n_new.to(qs.device)
        base = cache.lengths[torch.tensor(local)]
        if bool((base > 0).any()):
            raise AssertionError("prefill into a slot that is not empty")
        o = attention(qs, ks.transpose(1, 2), vs.transpose(1, 2), pos, kv_len)
        kh, vh = ks.to("cpu", non_blocking=True), vs.to("cpu", non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the host copies must land before the cache write
        cache.write(j, local, kh, vh, n_new)
        self.tl.add(TRACK_D2H, f"{SPAN_KV} L{j}", t0, time.perf_counter())
        return o

    def _attend_host(self, j: int, cache: KVCache, local: list[int], qs: Tensor, ks: Tensor, vs: Tensor,
                     n_new: Tensor) -> Tensor:
        """Decode / verify: q, k, v down to the host, attention on the CPU, the output back up."""
        t0 = time.perf_counter()
        qh, kh, vh = (x.to("cpu", non_blocking=True) for x in (qs, ks, vs))
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        done.synchronize()  # wait for this micro-batch's copies only
        t1 = time.perf_counter()
        self.tl.add(TRACK_D2H, f"{SPAN_QKV} L{j}", t0, t1)
        oh = cache.attend(j, local, qh, kh, vh, n_new)
        t2 = time.perf_counter()
        self.tl.add(TRACK_CPU_ATTN, f"{SPAN_ATTN} L{j}", t1, t2)
        o = oh.pin_memory().to(qs.device, qs.dtype, non_blocking=True)
        self.tl.add(TRACK_H2D, f"{SPAN_ATTN_OUT} L{j}", t2, time.perf_counter())
        return o

    def _ffn(self, j: int, lw: LayerWeights, x: Tensor) -> Tensor:
        a = self.args
        h = ffn_norm(a, lw.ffn, x)
        if not a.is_moe:
            return swiglu(lw.ffn, h)
        B, T, D = h.shape
        flat = h.reshape(B * T, D)
        r = route(a, lw.ffn, flat)
        if any(e is None for e in lw.experts):
            lw = self.streamer.add_experts(j, r.experts_used())
        return moe_experts(lw.experts, flat, r).view(B, T, D)

    def forward(self, slots: list[int], tokens: Tensor, n_new: Tensor, prefill: bool = False,
                logits_at: str = "all", between: Callable[[int], None] | None = None) -> Tensor:
        """Run new tokens [B, T] (right-padded, n_new valid per row) through all layers, extending the KV.

        Returns logits [B, T, V] ("all") or [B, V] at each row's last valid token ("last"), fp32.
        `between(j)` is called in each layer before the CPU attention (the draft's slice of work).
        """
        a, dev = self.args, self.device
        B, T = tokens.shape
        t_pass = time.perf_counter()
        lengths = self.kv.lengths(slots)
        if int((lengths + n_new).max()) > a.max_position_embeddings:
            raise EngineError(f"a sequence would exceed the model's context of {a.max_position_embeddings} tokens")
        positions = lengths[:, None] + torch.arange(T)[None, :]
        cos_sin = rope_cos_sin(self.inv_freq, positions.to(dev), self.dtype)
        x = F.embedding(tokens.to(dev), self.w.embed)  # [B, T, D]
        m = max(1, min(self.micro_batches, B))
        bounds = [round(i * B / m) for i in range(m + 1)]
        whole = m == 1
        few_tokens = B * T * a.top_k < a.n_experts if a.is_moe else False
        ahead = [] if few_tokens else None  # experts the copies issued ahead take (none: routed ones on use)
        self.streamer.fill(ahead)  # every free weight buffer takes the next streamed layer, in sweep order
        for j in range(a.n_layers):
            lw = self.streamer.get(j, ahead)
            self.streamer.fill(ahead)
            for i in range(m):
                lo, hi = bounds[i], bounds[i + 1]
                if lo == hi:
                    continue
                xs = x if whole else x[lo:hi]
                t0 = time.perf_counter()
                q, k, v = qkv(a, lw.attn, xs, cos_sin if whole else (cos_sin[0][lo:hi], cos_sin[1][lo:hi]))
                self.tl.add(TRACK_GPU, f"{SPAN_QKV} L{j} mb{i}", t0, time.perf_counter())
                if between is not None and i == 0:
                    between(j)
                o = self._attend(j, slots if whole else slots[lo:hi], q, k, v, n_new[lo:hi], prefill)
                t0 = time.perf_counter()
                xs = xs + attn_out(lw.attn, o.to(self.dtype))
                xs = xs + self._ffn(j, lw, xs)
                if whole:
                    x = xs
                else:
                    x[lo:hi] = xs
                self.tl.add(TRACK_GPU, f"{SPAN_FFN} L{j} mb{i}", t0, time.perf_counter())
            self.streamer.release(j)
            lw = None  # nothing holds layer j's weights now (a disk layer's converted copy can be reused)
            # The freed buffer takes the next streamed layer: past the last layers, the next pass's first
            # ones (a verification of the other batch, or a prefill), copied while a serial draft round runs.
            self.streamer.fill(ahead)
        self.kv.advance(slots, n_new.tolist())
        if self.keep_hidden:  # normed once: the LM head reads the same states (no second norm of every position)
            self.last_hidden = rms_norm(x, self.w.norm, a.norm_eps)
        last = torch.arange(B, device=dev), (n_new - 1).clamp(min=0).to(dev)
        t0 = time.perf_counter()
        if self.keep_hidden:
            h = self.last_hidden[last] if logits_at == "last" else self.last_hidden
        else:
            h = rms_norm(x[last] if logits_at == "last" else x, self.w.norm, a.norm_eps)
        out = F.linear(h, self.w.lm_head).float()
        t_end = time.perf_counter()
        self.tl.add(TRACK_GPU, SPAN_LM_HEAD, t0, t_end)
        if self.tl.enabled:
            self.tl.add_pass("target", B, T, float((lengths + n_new).float().mean()), t_pass, t_end, prefill)
        return out


# ----------------------------------------------------------------------------------------------
