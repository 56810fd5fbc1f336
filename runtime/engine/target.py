"""The target: streamed weights, a host KV cache (a device partition optional), CPU attention."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from specoffload.planner.trace_names import (SPAN_ATTN, SPAN_ATTN_OUT, SPAN_FFN, SPAN_KV, SPAN_LM_HEAD, SPAN_PREFILL,
                                              SPAN_QKV, TRACK_CPU_ATTN, TRACK_D2H, TRACK_GPU, TRACK_H2D)

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
        self.chunk_hidden: Tensor | None = None  # ... and of a fused pass's prompt chunk ([Bp, Tp, D])
        self._on_device: dict[tuple, Tensor] = {}  # small per-pass tensors copied to the device once

    # -- one layer's attention for some rows: device partition on the device, the rest on the CPU --
    def _attend(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor, prefill: bool,
                writes: list, spans: bool = True, after_issue: Callable[[], None] | None = None) -> Tensor:
        """q [B, T, H, Dh], k/v [B, T, Hkv, Dh] on the device -> o [B, T, H, Dh] on the device.

        writes: a prompt's host keys/values waiting for their device-to-host copies (`_finish_writes` at the
        layer's end). spans: record the attention's own spans (a fused pass's chunk records one span per
        micro-batch instead). after_issue (CUDA): called once the host rows' q, k, v copies are issued,
        before the host waits for them (the fused pass's chunk is launched there)."""
        if self.device.type == "cpu":
            return self._attend_cpu(j, slots, q, k, v, n_new, spans)
        return self._attend_cuda(j, slots, q, k, v, n_new, prefill, writes, spans, after_issue)

    def _attend_cpu(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor,
                    spans: bool = True) -> Tensor:
        """Without CUDA: one memory, one cache; attend in place, no gathers."""
        t0 = time.perf_counter()
        cache, local = self.kv.local(slots)
        o = cache.attend(j, local, q, k, v, n_new).to(q.dtype)
        if spans:
            self.tl.add(TRACK_CPU_ATTN, f"{SPAN_ATTN} L{j}", t0, time.perf_counter())
        return o

    def _to_device(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        """A small host tensor on the device, made once per pass (a row index, prompt positions): copied from
        pinned memory without blocking, as a plain copy would wait for the whole stream."""
        t = self._on_device.get(key)
        if t is None:
            t = make().pin_memory().to(self.device, non_blocking=True)
            self._on_device[key] = t
        return t

    def _attend_cuda(self, j: int, slots: list[int], q: Tensor, k: Tensor, v: Tensor, n_new: Tensor,
                     prefill: bool, writes: list, spans: bool = True,
                     after_issue: Callable[[], None] | None = None) -> Tensor:
        """On CUDA: rows whose cache is on the device attend there; host rows as _prefill_host / the host
        attention (_attend_host_issue, _attend_host_complete) say."""
        dev_rows, host_rows = self.kv.split(slots)
        single = not dev_rows or not host_rows  # one partition (the usual case): no gather, no scatter
        o = None if single else torch.empty_like(q)
        for rows, on_dev in ((dev_rows, True), (host_rows, False)):
            if not rows:
                continue
            cache, local = self.kv.local([slots[r] for r in rows])
            if single:
                idx, qs, ks, vs, nn = None, q, k, v, n_new
            else:
                idx = self._to_device(("rows", tuple(rows)), lambda: torch.tensor(rows))
                qs, ks, vs, nn = q[idx], k[idx], v[idx], n_new[rows]
            if on_dev:
                t0 = time.perf_counter()
                out = cache.attend(j, local, qs, ks, vs, nn).to(q.dtype)
                if spans:
                    self.tl.add(TRACK_GPU, f"{SPAN_ATTN} L{j}", t0, time.perf_counter())
            elif prefill:
                out = self._prefill_host(j, cache, local, qs, ks, vs, nn, writes)
            else:
                issued = self._attend_host_issue(qs, ks, vs)
                if after_issue is not None:
                    after_issue()
                out = self._attend_host_complete(j, cache, local, issued, nn, qs)
            if single:
                o = out.to(q.dtype)
            else:
                o[idx] = out
        return o

    def _prefill_host(self, j: int, cache: KVCache, local: list[int], qs: Tensor, ks: Tensor, vs: Tensor,
                      n_new: Tensor, writes: list) -> Tensor:
        """Prompt attention runs on the device over the prompt itself; the keys/values go down to the host
        without blocking and join `writes`: the host cache takes them once their copies are done, at the
        layer's end (`_finish_writes`), so the stream is never drained in the middle of a layer."""
        t0 = time.perf_counter()
        at = torch.tensor(local)
        if bool((cache.lengths[at] > 0).any()):
            raise AssertionError("prefill into a slot that is not empty")
        T = qs.shape[1]
        key = (id(cache), tuple(local), T)
        pos = self._to_device(("pos",) + key, lambda: cache.positions(local, T))
        kv_len = self._to_device(("kv_len",) + key, lambda: cache.lengths[at] + n_new)
        o = attention(qs, ks.transpose(1, 2), vs.transpose(1, 2), pos, kv_len)
        kh, vh = ks.to("cpu", non_blocking=True), vs.to("cpu", non_blocking=True)  # into pinned memory
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        writes.append((j, cache, local, kh, vh, n_new, done, t0))
        return o

    def _finish_writes(self, writes: list) -> None:
        """Write the prompts' keys/values into the host cache, each once its copies have landed."""
        for j, cache, local, kh, vh, n_new, done, t0 in writes:
            done.synchronize()  # these copies only
            cache.write(j, local, kh, vh, n_new)
            self.tl.add(TRACK_D2H, f"{SPAN_KV} L{j}", t0, time.perf_counter())
        writes.clear()

    @staticmethod
    def _attend_host_issue(qs: Tensor, ks: Tensor, vs: Tensor) -> tuple:
        """Decode / verify, first half: q, k, v down to the host (issued, not waited for)."""
        t0 = time.perf_counter()
        qh, kh, vh = (x.to("cpu", non_blocking=True) for x in (qs, ks, vs))
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        return qh, kh, vh, done, t0

    def _attend_host_complete(self, j: int, cache: KVCache, local: list[int], issued: tuple, n_new: Tensor,
                              like: Tensor) -> Tensor:
        """... second half: wait for this micro-batch's copies only, attention on the CPU, the output back up."""
        qh, kh, vh, done, t0 = issued
        done.synchronize()
        t1 = time.perf_counter()
        self.tl.add(TRACK_D2H, f"{SPAN_QKV} L{j}", t0, t1)
        oh = cache.attend(j, local, qh, kh, vh, n_new)
        t2 = time.perf_counter()
        self.tl.add(TRACK_CPU_ATTN, f"{SPAN_ATTN} L{j}", t1, t2)
        o = oh.pin_memory().to(like.device, like.dtype, non_blocking=True)
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

    # -- a fused pass's prompt chunk: its half of each layer --------------------------------------
    def _chunk_attention(self, j: int, lw: LayerWeights, part: "_Part", out: dict, writes: list) -> None:
        """The chunk's layer j up to each micro-batch's attention output (kept in `out`), its keys/values
        into its slots as a prefill's."""
        for i, lo, hi in part.micro():
            t0 = time.perf_counter()
            q, k, v = qkv(self.args, lw.attn, part.rows(lo, hi), part.rope(lo, hi))
            out[i] = self._attend(j, part.slots_of(lo, hi), q, k, v, part.n_new[lo:hi], True, writes, spans=False)
            self.tl.add(TRACK_GPU, f"{SPAN_PREFILL} L{j} mb{i}", t0, time.perf_counter())

    def _chunk_ffn(self, j: int, lw: LayerWeights, part: "_Part", out: dict) -> None:
        """... and the rest of it: output projection and FFN/MoE."""
        for i, lo, hi in part.micro():
            t0 = time.perf_counter()
            xs = part.rows(lo, hi)
            xs = xs + attn_out(lw.attn, out.pop(i).to(self.dtype))
            xs = xs + self._ffn(j, lw, xs)
            part.put(lo, hi, xs)
            self.tl.add(TRACK_GPU, f"{SPAN_PREFILL} L{j} mb{i}", t0, time.perf_counter())

    def _head(self, part: "_Part", logits_at: str, span: str) -> tuple[Tensor, Tensor | None]:
        """(logits of a part, fp32; its final-norm hidden states [B, T, D] when keep_hidden, else None)."""
        a, dev = self.args, self.device
        hidden = rms_norm(part.x, self.w.norm, a.norm_eps) if self.keep_hidden else None  # normed once
        last = torch.arange(part.B, device=dev), (part.n_new - 1).clamp(min=0).to(dev)
        t0 = time.perf_counter()
        if hidden is not None:
            h = hidden[last] if logits_at == "last" else hidden
        else:
            h = rms_norm(part.x[last] if logits_at == "last" else part.x, self.w.norm, a.norm_eps)
        out = F.linear(h, self.w.lm_head).float()
        self.tl.add(TRACK_GPU, span, t0, time.perf_counter())
        return out, hidden

    def forward(self, slots: list[int], tokens: Tensor, n_new: Tensor, prefill: bool = False,
                logits_at: str = "all", between: Callable[[int], None] | None = None,
                chunk: tuple[list[int], Tensor, Tensor] | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Run new tokens [B, T] (right-padded, n_new valid per row) through all layers, extending the KV.

        Returns logits [B, T, V] ("all") or [B, V] at each row's last valid token ("last"), fp32.
        `between(j)` is called in each layer before the CPU attention (the draft's slice of work).

        `chunk` (the fused pass): (slots, prompts [Bp, Tp] right-padded, n_new) of empty slots, prefilled in
        the same sweep: each layer, once its weights are on the device, runs the rows above and then the
        chunk's (on CUDA on the chunk stream, launched while the first micro-batch with host rows attends on
        the CPU; a MoE layer's FFN, whose dispatch waits on the device, after the micro-batches). Its
        keys/values go into its slots as a prefill's, in the micro-batches a prefill of it alone would use.
        Returns (the logits above, the chunk's logits at each prompt's last token [Bp, V]); with keep_hidden,
        `chunk_hidden` holds the chunk's final-norm hidden states as `last_hidden` holds the rows'.
        """
        a, dev = self.args, self.device
        t_pass = time.perf_counter()
        self._on_device = {}
        main = _Part(self, slots, tokens, n_new, prefill)
        part = _Part(self, *chunk, prefill=True) if chunk is not None else None
        if part is not None and set(part.slots) & set(slots):
            raise AssertionError("a fused pass's chunk shares slots with the rows it rides with")
        cuda = self.streams.cuda
        # CUDA: the chunk's device work runs on a stream of its own, beside the verification's layer (whose
        # kernels do not queue behind it); the compute stream waits for the chunk's layer before the next
        # layer, each layer's weight buffer is released after both, and both meet before the LM heads.
        side = self.streams.chunk if (cuda and part is not None) else None
        tokens_in = main.B * main.T + (part.B * part.T if part is not None else 0)
        few_tokens = tokens_in * a.top_k < a.n_experts if a.is_moe else False
        ahead = [] if few_tokens else None  # experts the copies issued ahead take (none: routed ones on use)
        self.streamer.fill(ahead)  # every free weight buffer takes the next streamed layer, in sweep order
        chunk_done: tuple = ()  # CUDA: the chunk's previous layer, which this layer's work waits for
        for j in range(a.n_layers):
            lw = self.streamer.get(j, ahead)
            self.streamer.fill(ahead)
            for ev in chunk_done:  # so the chunk never holds a weight buffer while the next layer runs
                torch.cuda.current_stream().wait_event(ev)
            writes: list = []  # prompt keys/values on their way to the host cache
            todo: list[Callable[[], None]] = []  # the chunk's stages of this layer still to run
            if part is not None:
                o_chunk: dict[int, Tensor] = {}
                todo = [lambda: self._chunk_attention(j, lw, part, o_chunk, writes),
                        lambda: self._chunk_ffn(j, lw, part, o_chunk)]

            early = [side is not None and bool(todo)]  # the chunk is still to be launched inside a host attention

            def launch_chunk() -> None:  # CUDA: while the first micro-batch with host rows attends on the CPU
                early[0] = False
                side.wait_stream(torch.cuda.current_stream())  # the layer's weights, the chunk's inputs
                with torch.cuda.stream(side):
                    for _ in range(1 if a.is_moe else 2):
                        if todo:
                            todo.pop(0)()

            for i, lo, hi in main.micro():
                xs = main.rows(lo, hi)
                t0 = time.perf_counter()
                q, k, v = qkv(a, lw.attn, xs, main.rope(lo, hi))
                self.tl.add(TRACK_GPU, f"{SPAN_QKV} L{j} mb{i}", t0, time.perf_counter())
                if between is not None and i == 0:
                    between(j)
                o = self._attend(j, main.slots_of(lo, hi), q, k, v, n_new[lo:hi], prefill, writes,
                                 after_issue=launch_chunk if early[0] else None)
                t0 = time.perf_counter()
                xs = xs + attn_out(lw.attn, o.to(self.dtype))
                xs = xs + self._ffn(j, lw, xs)
                main.put(lo, hi, xs)
                self.tl.add(TRACK_GPU, f"{SPAN_FFN} L{j} mb{i}", t0, time.perf_counter())
            after: tuple = ()
            if side is not None and part is not None:  # the rest of the chunk's layer, on its stream
                if early[0]:  # no micro-batch attended on the host: launched here
                    side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    while todo:
                        todo.pop(0)()
                    after = chunk_done = (side.record_event(),)
            while todo:  # the CPU: after the micro-batches
                todo.pop(0)()
            self._finish_writes(writes)
            self.streamer.release(j, after)
            lw = None  # nothing holds layer j's weights now (a disk layer's converted copy can be reused)
            # The freed buffer takes the next streamed layer: past the last layers, the next pass's first
            # ones (a verification of the other batch, or a prefill), copied while a serial draft round runs.
            self.streamer.fill(ahead)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)  # the chunk's last layer, before its LM head
        self._on_device = {}
        self.kv.advance(slots, n_new.tolist())
        if part is not None:
            self.kv.advance(part.slots, part.n_new.tolist())
        out, self.last_hidden = self._head(main, logits_at, SPAN_LM_HEAD)
        chunk_out = None
        self.chunk_hidden = None
        if part is not None:
            chunk_out, self.chunk_hidden = self._head(part, "last", SPAN_PREFILL)
        t_end = time.perf_counter()
        if self.tl.enabled:
            fused = part is not None  # both records span the whole pass; the chunk's own work: "prefill" spans
            self.tl.add_pass("target", main.B, main.T, main.keys(), t_pass, t_end, prefill, fused)
            if fused:
                self.tl.add_pass("target", part.B, part.T, part.keys(), t_pass, t_end, True, fused)
        return out if part is None else (out, chunk_out)


class _Part:
    """One set of rows in a sweep: slots, new tokens [B, T] (right-padded, n_new valid per row), the
    residual stream x, RoPE tables at each slot's next positions, and the micro-batch bounds."""

    def __init__(self, t: Target, slots: list[int], tokens: Tensor, n_new: Tensor, prefill: bool):
        a, dev = t.args, t.device
        self.slots, self.n_new, self.prefill = slots, n_new, prefill
        self.B, self.T = tokens.shape
        self.lengths = t.kv.lengths(slots)
        if int((self.lengths + n_new).max()) > a.max_position_embeddings:
            raise EngineError(f"a sequence would exceed the model's context of {a.max_position_embeddings} tokens")
        positions = self.lengths[:, None] + torch.arange(self.T)[None, :]
        self.cos_sin = rope_cos_sin(t.inv_freq, positions.to(dev), t.dtype)
        self.x = F.embedding(tokens.to(dev), t.w.embed)  # [B, T, D]
        m = max(1, min(t.micro_batches, self.B))
        self.bounds = [round(i * self.B / m) for i in range(m + 1)]
        self.whole = m == 1

    def micro(self):
        """(index, lo, hi) of each non-empty micro-batch."""
        for i in range(len(self.bounds) - 1):
            if self.bounds[i] < self.bounds[i + 1]:
                yield i, self.bounds[i], self.bounds[i + 1]

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.x if self.whole else self.x[lo:hi]

    def put(self, lo: int, hi: int, xs: Tensor) -> None:
        if self.whole:
            self.x = xs
        else:
            self.x[lo:hi] = xs

    def rope(self, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        return self.cos_sin if self.whole else (self.cos_sin[0][lo:hi], self.cos_sin[1][lo:hi])

    def slots_of(self, lo: int, hi: int) -> list[int]:
        return self.slots if self.whole else self.slots[lo:hi]

    def keys(self) -> float:
        """Keys the attention reads per row, the mean over rows (cached + new)."""
        return float((self.lengths + self.n_new).float().mean())


# ----------------------------------------------------------------------------------------------
