"""The offload engine: executes a Plan on real checkpoints, on CUDA with streams or on the CPU.

Scope: placement, weight streaming, the target's layer loop (CPU attention over the host KV
cache, FFN/MoE on the device, micro-batches), the draft and its KV cache in the plan's mode, the
three schedules (offload-only, draft-then-verify, two batches interleaved), verification, and
continuous refill from a request queue. Input/output files, resume and reports live in run_cli.py.

The loop, per decode slot (interleaved: batch A verifies while the draft drafts for batch B):

    for layer j:  prefetch streamed weights of layer j+1 on the copy stream (into a free buffer)
                  for each micro-batch: QKV on the device -> q, k, v to the host -> attention on the
                  CPU over the host KV cache -> output back -> O-proj + FFN/MoE on the device
                  (a slice of the draft's work for batch B is launched before the CPU attention,
                  so the GPU drafts while the CPU attends)
                  release layer j's buffer (an event on the compute stream)
    verify A (accept the matching prefix + the target's token), roll caches back, refill free slots.

On CUDA, events order copy, compute and buffer reuse; nothing synchronises the whole device inside
the loop. Without CUDA the same code runs on the CPU: streams and events become no-ops, weights
are used where they lie, and attention and FFN share the one processor.
"""
from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelArgs, load_args
from .host_attention import backend_note as attention_backend_note, clamp_threads, set_threads
from .kv_cache import KVCache
from .layers import (LayerWeights, ModelWeights, attention, attn_out, ffn, ffn_norm, moe_experts, qkv, rms_norm, route,
                     rope_cos_sin, rope_inv_freq, swiglu)
from .loader import load_model
from .verify import AcceptanceStats, accept_best, draw, processed_probs, sampling_accept


class EngineError(ValueError):
    """A request or plan the engine cannot run; the message names the field and the fix."""


# ----------------------------------------------------------------------------------------------
# Requests and sequences
# ----------------------------------------------------------------------------------------------

@dataclass
class Request:
    id: str
    prompt: list[int]  # token ids, BOS included if the tokenizer adds one
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Finished:
    request: Request
    tokens: list[int]  # generated ids, capped at max_tokens; the EOS included when it stopped on one
    finish_reason: str  # "eos" | "length"


@dataclass(eq=False)  # identity: the schedules test membership per pass (value equality would compare tokens)
class Seq:
    """A request in a slot. `last` is the newest committed token, not yet in the target's KV cache;
    `pending` are committed tokens the draft has not seen yet (1 or 2 of them)."""

    req: Request
    slot: int
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    drafted: Tensor | None = None  # [k] draft tokens awaiting verification
    draft_probs: Tensor | None = None  # [k, V] their processed draft distributions (sampling)

    @property
    def last(self) -> int:
        return self.out[-1]

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - len(self.out)


def padded(rows: list[list[int]]) -> Tensor:
    """Token rows of different lengths -> [B, max len] int64, right-padded with 0 (one tensor build)."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Timing: one span per task, the same track names as the simulator's trace
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PassRecord:
    """One forward: `model` (target | draft), `batch` rows of `query` new tokens each (padded: the longest
    row's count), `keys` the keys the attention reads per row (the mean over rows of cached + new: host
    attention reads each row only up to its own length), start/end on the timeline's clock; `prefill`
    for prompts."""

    model: str
    batch: int
    query: int
    keys: float
    start: float
    end: float
    prefill: bool = False


class Timeline:
    """Host-clock spans per resource track (gpu, h2d, d2h, cpu-attn); busy seconds per track."""

    def __init__(self, enabled: bool = True, max_spans: int = 200_000):
        self.t0 = time.perf_counter()
        self.busy: dict[str, float] = {}
        self.spans: list[tuple[str, str, float, float]] = []
        # One record per forward: what ran and when, for the profiler's in-engine fit.
        self.passes: list[PassRecord] = []
        self.enabled, self.max_spans = enabled, max_spans

    def add_pass(self, model: str, batch: int, query: int, keys: float, start: float, end: float,
                 prefill: bool = False) -> None:
        if self.enabled and len(self.passes) < self.max_spans:
            self.passes.append(PassRecord(model, batch, query, keys, start - self.t0, end - self.t0, prefill))

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


# ----------------------------------------------------------------------------------------------
# Devices, streams and weight streaming
# ----------------------------------------------------------------------------------------------

class Streams:
    """Purpose-named CUDA streams; on the CPU every method is a no-op."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.copy = torch.cuda.Stream(device) if self.cuda else None  # host -> device weights

    def event(self) -> "torch.cuda.Event | None":
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream())
        return ev


class LayerStreamer:
    """The target's per-layer weights: resident parts on the device, streamed parts in pinned host
    memory copied into one of `n_buffers` device buffers ahead of use.

    prefetch(j) issues layer j's copy on the copy stream after the buffer's previous user released
    it; get(j) makes the compute stream wait for that copy; release(j) records that compute is done
    with the buffer. MoE layers at small token counts copy only the experts the router picked.
    """

    def __init__(self, weights: ModelWeights, attn_resident: list[bool], ffn_resident: list[bool],
                 device: torch.device, n_buffers: int, streams: Streams, timeline: Timeline):
        self.w, self.device, self.streams, self.tl = weights, device, streams, timeline
        self.attn_res, self.ffn_res = attn_resident, ffn_resident
        self.cuda = streams.cuda
        self.n = len(weights.layers)
        streamed = [j for j in range(self.n) if not (attn_resident[j] and ffn_resident[j])]
        self.buffer_of = {j: i % max(1, n_buffers) for i, j in enumerate(streamed)}
        self.ready: dict[int, tuple[dict, object]] = {}
        self.free_event: dict[int, object] = {}
        self.buffers: list[dict] = []
        self.copied_bytes = 0
        if self.cuda and streamed:
            template = weights.layers[streamed[0]]
            for _ in range(max(1, n_buffers)):
                self.buffers.append({
                    "attn": {k: torch.empty_like(t, device=device) for k, t in template.attn.items()},
                    "ffn": {k: torch.empty_like(t, device=device) for k, t in template.ffn.items()},
                    "experts": [{k: torch.empty_like(t, device=device) for k, t in e.items()} for e in template.experts],
                })

    def streamed(self, j: int) -> bool:
        return j in self.buffer_of

    def pinned_bytes(self) -> int:
        """Bytes of streamed weights held in pinned host memory."""
        total = 0
        for j in self.buffer_of:
            lw = self.w.layers[j]
            parts = ([] if self.attn_res[j] else [lw.attn]) + ([] if self.ffn_res[j] else [lw.ffn, *lw.experts])
            total += sum(t.nbytes for d in parts for t in d.values())
        return total

    def prefetch(self, j: int, experts: list[int] | None = None) -> None:
        """Start copying layer j's streamed tensors (all experts, or only `experts`)."""
        if j >= self.n or not self.streamed(j) or j in self.ready:
            return
        lw = self.w.layers[j]
        if not self.cuda:  # weights are used where they lie
            self.ready[j] = ({"attn": lw.attn, "ffn": lw.ffn, "experts": lw.experts}, None)
            return
        b = self.buffer_of[j]
        buf = self.buffers[b]
        want = range(len(lw.experts)) if experts is None else experts
        start = time.perf_counter()
        with torch.cuda.stream(self.streams.copy):
            if b in self.free_event:
                self.streams.copy.wait_event(self.free_event.pop(b))
            out = {"attn": lw.attn, "ffn": lw.ffn, "experts": list(lw.experts)}
            if not self.attn_res[j]:
                for k, t in lw.attn.items():
                    buf["attn"][k].copy_(t, non_blocking=True)
                    self.copied_bytes += t.nbytes
                out["attn"] = buf["attn"]
            if not self.ffn_res[j]:
                for k, t in lw.ffn.items():
                    buf["ffn"][k].copy_(t, non_blocking=True)
                    self.copied_bytes += t.nbytes
                out["ffn"] = buf["ffn"]
                out["experts"] = [None] * len(lw.experts)
                for e in want:
                    for k, t in lw.experts[e].items():
                        buf["experts"][e][k].copy_(t, non_blocking=True)
                        self.copied_bytes += t.nbytes
                    out["experts"][e] = buf["experts"][e]
            done = torch.cuda.Event()
            done.record(self.streams.copy)
        self.tl.add("h2d", f"weights L{j}", start, time.perf_counter())
        self.ready[j] = (out, done)

    def get(self, j: int) -> LayerWeights:
        if not self.streamed(j):
            lw = self.w.layers[j]
            return lw
        if j not in self.ready:
            self.prefetch(j)
        out, done = self.ready[j]
        if done is not None:
            torch.cuda.current_stream().wait_event(done)
        return LayerWeights(out["attn"], out["ffn"], out["experts"])

    def add_experts(self, j: int, experts: list[int]) -> LayerWeights:
        """Copy further experts of a streamed MoE layer (routed-only mode) and wait for them."""
        out, _ = self.ready[j]
        missing = [e for e in experts if out["experts"][e] is None]
        if missing and self.cuda:
            buf = self.buffers[self.buffer_of[j]]
            with torch.cuda.stream(self.streams.copy):
                for e in missing:
                    for k, t in self.w.layers[j].experts[e].items():
                        buf["experts"][e][k].copy_(t, non_blocking=True)
                        self.copied_bytes += t.nbytes
                    out["experts"][e] = buf["experts"][e]
                done = torch.cuda.Event()
                done.record(self.streams.copy)
            torch.cuda.current_stream().wait_event(done)
        return LayerWeights(out["attn"], out["ffn"], out["experts"])

    def release(self, j: int) -> None:
        if not self.streamed(j):
            return
        self.ready.pop(j, None)
        ev = self.streams.event()
        if ev is not None:
            self.free_event[self.buffer_of[j]] = ev


# ----------------------------------------------------------------------------------------------
# The target: streamed weights, host KV cache (a GPU partition optional), CPU attention
# ----------------------------------------------------------------------------------------------

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


class Target:
    """The target model placed as the plan says; runs prefill and verification passes layer by layer."""

    def __init__(self, model_dir: str | Path, plan, device: torch.device, dtype: torch.dtype, n_slots: int,
                 max_len: int, timeline: Timeline):
        from specoffload.planner.schema import resident_layers

        cuda = device.type == "cuda"
        args = load_args(model_dir)
        n_layers = args.n_layers
        attn_res = resident_layers(plan.gpu_attn_layers, n_layers)  # spread evenly, as the simulator assumes
        ffn_res = resident_layers(plan.gpu_ffn_layers, n_layers)

        def placement(name: str) -> str | torch.device:
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
        self.streamer = LayerStreamer(self.w, [j in attn_res or not cuda for j in range(L)],
                                      [j in ffn_res or not cuda for j in range(L)], device, plan.weight_buffers,
                                      self.streams, timeline)
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
        if self.device.type == "cpu":  # one memory, one cache: attend in place, no gathers
            t0 = time.perf_counter()
            cache, local = self.kv.local(slots)
            o = cache.attend(j, local, q, k, v, n_new).to(q.dtype)
            self.tl.add("cpu-attn", f"attn L{j}", t0, time.perf_counter())
            return o
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
                self.tl.add("gpu", f"attn L{j}", t0, time.perf_counter())
                continue
            if prefill:
                # Prompt attention runs on the device over the prompt itself; the keys/values go to the host.
                t0 = time.perf_counter()
                pos = cache.positions(local, qs.shape[1]).to(q.device)
                kv_len = cache.lengths[torch.tensor(local)].to(q.device) + n_new[rows].to(q.device)
                base = cache.lengths[torch.tensor(local)]
                if bool((base > 0).any()):
                    raise AssertionError("prefill into a slot that is not empty")
                o[idx] = attention(qs, ks.transpose(1, 2), vs.transpose(1, 2), pos, kv_len)
                kh, vh = ks.to("cpu", non_blocking=True), vs.to("cpu", non_blocking=True)
                torch.cuda.current_stream().synchronize()  # the host copies must land before the cache write
                cache.write(j, local, kh, vh, n_new[rows])
                self.tl.add("d2h", f"kv L{j}", t0, time.perf_counter())
                continue
            # Decode / verify: q, k, v down to the host, attention on the CPU, output back up.
            t0 = time.perf_counter()
            qh, kh, vh = (x.to("cpu", non_blocking=True) for x in (qs, ks, vs))
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream())
            done.synchronize()  # wait for this micro-batch's copies only
            t1 = time.perf_counter()
            self.tl.add("d2h", f"qkv L{j}", t0, t1)
            oh = cache.attend(j, local, qh, kh, vh, n_new[rows])
            t2 = time.perf_counter()
            self.tl.add("cpu-attn", f"attn L{j}", t1, t2)
            o[idx] = oh.pin_memory().to(q.device, q.dtype, non_blocking=True)
            self.tl.add("h2d", f"attn-out L{j}", t2, time.perf_counter())
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
        self.streamer.prefetch(0, experts=[] if few_tokens else None)
        for j in range(a.n_layers):
            lw = self.streamer.get(j)
            self.streamer.prefetch(j + 1, experts=[] if few_tokens else None)
            for i in range(m):
                lo, hi = bounds[i], bounds[i + 1]
                if lo == hi:
                    continue
                xs = x if whole else x[lo:hi]
                t0 = time.perf_counter()
                q, k, v = qkv(a, lw.attn, xs, cos_sin if whole else (cos_sin[0][lo:hi], cos_sin[1][lo:hi]))
                self.tl.add("gpu", f"qkv L{j} mb{i}", t0, time.perf_counter())
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
                self.tl.add("gpu", f"ffn L{j} mb{i}", t0, time.perf_counter())
            self.streamer.release(j)
        # The next pass (verification of the other batch, or a prefill) starts at layer 0: fetch it now.
        self.streamer.prefetch(0, experts=[] if few_tokens else None)
        self.kv.advance(slots, n_new.tolist())
        if self.keep_hidden:
            self.last_hidden = rms_norm(x, self.w.norm, a.norm_eps)
        if logits_at == "last":
            x = x[torch.arange(B, device=dev), (n_new - 1).clamp(min=0).to(dev)]
        t0 = time.perf_counter()
        out = F.linear(rms_norm(x, self.w.norm, a.norm_eps), self.w.lm_head).float()
        t_end = time.perf_counter()
        self.tl.add("gpu", "lm_head", t0, t_end)
        if self.tl.enabled:
            self.tl.add_pass("target", B, T, float((lengths + n_new).float().mean()), t_pass, t_end, prefill)
        return out


# ----------------------------------------------------------------------------------------------
# The draft: resident on the device; KV on the device, on the host, or recomputed each round
# ----------------------------------------------------------------------------------------------

class Draft:
    def __init__(self, model_dir: str | Path, plan, device: torch.device, dtype: torch.dtype, n_slots: int,
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
                self.tl.add("cpu-attn", f"draft attn L{j}", t0, time.perf_counter())
            x = x + attn_out(lw.attn, o)
            x = x + ffn(a, lw.ffn, x, lw.experts)
        cache.advance(rows, n_new)
        x = x[torch.arange(B, device=dev), (n_new - 1).clamp(min=0).to(dev)]
        out = F.linear(rms_norm(x, self.w.norm, a.norm_eps), self.w.lm_head).float()
        if record and self.tl.enabled:  # "step" | "prefill"
            self.tl.add_pass("draft", B, T, float(cache.lengths[torch.tensor(rows)].max()), t_pass,
                             time.perf_counter(), record == "prefill")
        return out

    def prefill(self, seqs: list[Seq], prompts: list[list[int]]) -> None:
        if self.kv is None:
            return
        rows = [s.slot for s in seqs]
        self.kv.reset(rows)
        prompts = [list(p) for p in prompts]
        n_new = torch.tensor([len(p) for p in prompts])
        tokens = padded(prompts)
        t0 = time.perf_counter()
        self._forward(self.kv, rows, tokens, n_new, record="prefill")
        self.tl.add("gpu", "draft prefill", t0, time.perf_counter())

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
            temps = torch.tensor([group[i].req.temperature for i in sampled])
            top_ps = torch.tensor([group[i].req.top_p for i in sampled])
            drafted = torch.zeros(len(group), k, dtype=torch.long)
            probs: list[Tensor] = []
            for step in range(k):
                t0 = time.perf_counter()
                logits = self._forward(cache, rows, tokens, n_new, record="step")  # [B, V]
                nxt = logits.argmax(-1).cpu()
                if sampled:
                    p = processed_probs(logits[sampled], temps, top_ps)
                    nxt[sampled] = draw(p, [group[i].generator for i in sampled]).cpu()
                    probs.append(p.cpu())
                drafted[:, step] = nxt
                tokens = nxt[:, None]
                n_new = torch.ones(len(group), dtype=torch.long)
                self.tl.add("gpu", f"draft step {step}", t0, time.perf_counter())
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
# ----------------------------------------------------------------------------------------------

@dataclass
class EngineStats:
    generated_tokens: int = 0  # committed tokens, each sequence capped at its max_tokens
    prefill_tokens: int = 0
    sequences: int = 0  # finished sequences
    slots: int = 0  # verifications of one batch
    prefill_passes: int = 0  # prefill chunks (weight sweeps for prompts)
    slot_times: list[float] = field(default_factory=list)
    slot_windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end), perf_counter clock
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    acceptance: AcceptanceStats = field(default_factory=AcceptanceStats)


class Engine:
    """Runs requests through a plan. `run(requests, on_finish)` calls on_finish as each sequence ends."""

    def __init__(self, plan, target_dir: str | Path, draft_dir: str | Path | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_len: int | None = None, trace: bool = False, synthetic_acceptance: float | None = None,
                 threads: int | None = None):
        """synthetic_acceptance: TIMING MODE ONLY. Keep each draft token with this probability whatever
        it is (for random-weight models, which accept nothing); outputs are then not the target's.
        threads: CPU threads for host attention (torch's intra-op pool); None keeps the process's setting
        (the CLIs choose it with host_attention.set_threads: usable cores less one), lowered to the cores
        this process may use if it is above them."""
        self.threads = set_threads(threads) if threads is not None else clamp_threads()
        self.attention_path = attention_backend_note()  # builds the kernel now (once per machine), not mid-run
        self.plan = plan
        self.synthetic = synthetic_acceptance
        self._synthetic_rng = torch.Generator().manual_seed(0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # fp32 on the CPU (exactness); bf16 on the GPU, as the checkpoints are.
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.k = plan.draft_len
        self.num_batches = plan.num_batches
        self.batch = plan.decode_batch
        self.n_slots = plan.decode_batch * plan.num_batches
        self.timeline = Timeline(enabled=trace)
        args = load_args(target_dir)
        # KV cache per sequence: what the plan was made for (its longest prompt, its generation length and
        # the verification's k + 1), not the model's whole context: the cache is allocated up front.
        self.model_len = args.max_position_embeddings
        self.planned_len = plan.workload.max_context_tokens + self.k + 1
        self.max_len = min(max_len or self.planned_len, self.model_len)
        self.target = Target(target_dir, plan, self.device, self.dtype, self.n_slots, self.max_len, self.timeline)
        self.draft = None
        if self.k > 0:
            if draft_dir is None:
                raise EngineError(f"plan policy {plan.policy} drafts {self.k} tokens but no draft model was given")
            from .feature_draft import FeatureDraft, FeatureHeadError, is_feature_head

            if is_feature_head(draft_dir):  # an EAGLE-style head over the target's hidden states
                try:
                    self.draft = FeatureDraft(draft_dir, plan, self.target, self.device, self.dtype, self.n_slots,
                                              self.max_len, self.timeline)
                except FeatureHeadError as e:
                    raise EngineError(str(e)) from None
            else:
                self.draft = Draft(draft_dir, plan, self.device, self.dtype, self.n_slots, self.max_len,
                                   self.timeline)
            if self.draft.args.vocab_size != self.target.args.vocab_size:
                raise EngineError(f"draft vocabulary ({self.draft.args.vocab_size}) differs from the target's "
                                  f"({self.target.args.vocab_size}); the pair must share a tokenizer")
        self.eos = set(self.target.args.eos_token_id)
        self.stats = EngineStats()

    def host_tensor_bytes(self) -> float:
        """Bytes of the engine's own host tensors: weights held on the host (pinned or not) and KV caches.
        What the cost model's host (and, on a CUDA machine, pinned) memory pools hold; the process's RSS
        adds the interpreter, torch and libraries on top."""
        seen: dict[int, int] = {}

        def add(t: Tensor | None) -> None:
            if t is not None and t.device.type == "cpu" and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        models = [self.target.w] + ([self.draft.w] if self.draft is not None else [])
        for w in models:
            for t in w.flat().values():
                add(t)
        caches = [self.target.kv.host, self.target.kv.dev]
        if self.draft is not None:
            caches.append(self.draft.kv)
        for c in caches:
            if c is not None:
                for t in c.k + c.v:
                    add(t)
        return float(sum(seen.values()))

    # -- admission ----------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """A request this engine cannot run is an error naming it and the fix."""
        if not req.prompt:
            raise EngineError(f"request {req.id!r}: empty prompt")
        if req.max_tokens < 1:
            raise EngineError(f"request {req.id!r}: max_tokens must be >= 1, got {req.max_tokens}")
        need = len(req.prompt) + req.max_tokens + self.k + 1
        what = (f"request {req.id!r}: prompt of {len(req.prompt)} tokens + max_tokens {req.max_tokens} "
                f"(+{self.k + 1} for verification)")
        if need > self.model_len:
            raise EngineError(f"{what} exceeds the model's context of {self.model_len} tokens; shorten the prompt "
                              "or lower max_tokens")
        if need > self.max_len:
            w = self.plan.workload
            raise EngineError(f"{what} exceeds the {self.max_len} tokens of KV cache per sequence this engine holds "
                              f"(the plan's workload: prompts up to {w.max_prompt_len} tokens, {w.gen_len_tokens} "
                              "generated); re-plan with a workload that covers it (specoffload-plan --workload from "
                              "these prompts, or --prompt-len/--gen-len), or size the cache for it (specoffload-run "
                              "--force)")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise EngineError(f"request {req.id!r}: temperature must be >= 0 and top_p in (0, 1]")

    def _prefill(self, seqs: list[Seq]) -> list[Seq]:
        """Prompts into the caches, in chunks of the plan's prefill batch; returns those still running."""
        running = []
        bp = max(1, self.plan.prefill_batch)
        for c in range(0, len(seqs), bp):
            chunk = seqs[c:c + bp]
            t0 = time.perf_counter()
            slots = [s.slot for s in chunk]
            self.target.kv.reset(slots)
            n_new = torch.tensor([len(s.req.prompt) for s in chunk])
            tokens = padded([s.req.prompt for s in chunk])
            logits = self.target.forward(slots, tokens, n_new, prefill=True, logits_at="last")
            first = self._pick(chunk, logits)
            if self.draft is not None:
                self.draft.prefill(chunk, [s.req.prompt for s in chunk])
            self.stats.prefill_tokens += int(n_new.sum())
            self.stats.prefill_passes += 1
            self.stats.prefill_seconds += time.perf_counter() - t0
            for s, tok in zip(chunk, first):
                if self._commit(s, [tok]):
                    s.pending = [tok]
                    running.append(s)
        return running

    def _pick(self, seqs: list[Seq], logits: Tensor) -> list[int]:
        """The next token per row from logits [B, V]: argmax, or a draw at the request's temperature/top-p."""
        out = logits.argmax(-1).cpu().tolist()
        for i, s in enumerate(seqs):
            if s.req.temperature > 0:
                p = processed_probs(logits[i:i + 1], torch.tensor([s.req.temperature]), torch.tensor([s.req.top_p]))
                out[i] = int(draw(p, [s.generator])[0])
        return out

    def _commit(self, s: Seq, tokens: list[int]) -> bool:
        """Append committed tokens up to max_tokens and the first EOS; False once the sequence is done."""
        for t in tokens:
            if s.remaining <= 0:
                break
            s.out.append(t)
            self.stats.generated_tokens += 1
            if t in self.eos:
                return False
        return s.remaining > 0

    # -- one verification of a batch ----------------------------------------------------------
    def _verify(self, seqs: list[Seq], between: Callable[[int], None] | None = None) -> list[Seq]:
        """Target pass over [last, d1..dk] for each sequence; accept; roll caches back. Returns the unfinished."""
        k = self.k if self.draft is not None else 0
        t_start = time.perf_counter()
        slots = [s.slot for s in seqs]
        base = self.target.kv.lengths(slots)
        tokens = torch.tensor([s.last for s in seqs], dtype=torch.long)[:, None]  # one tensor op, not one per row
        if k:
            tokens = torch.cat((tokens, torch.stack([s.drafted for s in seqs])), dim=1)
        n_new = torch.full((len(seqs),), k + 1, dtype=torch.long)
        logits = self.target.forward(slots, tokens, n_new, between=between)  # [B, k+1, V]
        sampling = [s.req.temperature > 0 for s in seqs]
        drafted = tokens[:, 1:]
        best = logits.argmax(-1)  # [B, k+1]: the target's own tokens, scanned once
        n_acc, nxt = accept_best(drafted.to(logits.device), best)
        n_acc, nxt = n_acc.cpu(), nxt.cpu()
        if any(sampling):
            rows = [i for i, f in enumerate(sampling) if f]
            ss = [seqs[i] for i in rows]
            p = processed_probs(logits[rows], torch.tensor([s.req.temperature for s in ss]),
                                torch.tensor([s.req.top_p for s in ss])).cpu()
            if k:
                q = torch.stack([s.draft_probs for s in ss])
                a2, n2 = sampling_accept(drafted[rows], q, p, [s.generator for s in ss])
            else:
                a2 = torch.zeros(len(rows), dtype=torch.long)
                n2 = draw(p[:, 0], [s.generator for s in ss])
            n_acc[rows], nxt[rows] = a2, n2
        if self.synthetic is not None and k:
            # Timing mode: position i kept with the given probability, then the target's own token there.
            keep = torch.rand(len(seqs), k, generator=self._synthetic_rng) < self.synthetic
            n_acc = keep.long().cumprod(dim=1).sum(dim=1)
            nxt = best.cpu().gather(1, n_acc[:, None])[:, 0]
        self.stats.acceptance.record(n_acc, k)  # k = 0 too: one token per round
        n_list, nxt_list = n_acc.tolist(), nxt.tolist()
        news = [drafted[i, :a].tolist() + [nxt_list[i]] for i, a in enumerate(n_list)]
        keep = [b + 1 + a for b, a in zip(base.tolist(), n_list)]  # last + accepted drafts are now in the KV
        self.target.kv.rollback(slots, keep)
        if self.draft is not None:
            self.draft.commit(seqs, n_list, k, news)
        running = []
        for s, new in zip(seqs, news):
            s.drafted, s.draft_probs = None, None
            if self._commit(s, new):
                running.append(s)
        self.stats.slots += 1
        t_end = time.perf_counter()
        self.stats.slot_times.append(t_end - t_start)
        self.stats.slot_windows.append((t_start, t_end))
        return running

    # -- the schedules --------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd bookkeeping: ~8% per-op overhead on small models
    def run(self, requests: list[Request], on_finish: Callable[[Finished], None],
            progress: Callable[[int], None] | None = None,
            more: Callable[[], list[Request]] | None = None) -> EngineStats:
        """Generate every request; on_finish is called once per request, as soon as it is done.
        `more`, if given, is asked for further requests whenever slots are free and the queue is short
        (a stream of work: the run ends when it has none and every sequence is done)."""
        for r in requests:
            self.check(r)
        queue = deque(requests)
        groups: list[list[Seq]] = [[] for _ in range(self.num_batches)]
        free: list[list[int]] = [list(range(g * self.batch, (g + 1) * self.batch)) for g in range(self.num_batches)]

        def finish(s: Seq) -> None:
            reason = "eos" if s.out and s.out[-1] in self.eos else "length"
            self.target.kv.reset([s.slot])
            if self.draft is not None:
                self.draft.release([s.slot])
            free[s.slot // self.batch].append(s.slot)
            self.stats.sequences += 1
            on_finish(Finished(s.req, list(s.out), reason))
            if progress:
                progress(len(s.out))

        def refill(g: int) -> None:
            """Admit queued requests into batch g's free slots, a prefill chunk at a time."""
            if more is not None and len(queue) < len(free[g]):
                for r in more():
                    self.check(r)
                    queue.append(r)
            want = min(len(free[g]), len(queue))
            # Wait for a full chunk unless the batch is idle or the queue is short.
            if want == 0 or (want < min(self.plan.prefill_batch, len(queue)) and groups[g]):
                return
            new = []
            for _ in range(want):
                req = queue.popleft()
                seed = zlib.crc32(f"{req.seed}:{req.id}".encode())  # per request: independent of batching
                new.append(Seq(req, free[g].pop(0), generator=torch.Generator().manual_seed(seed)))
            alive = self._prefill(new)
            for s in new:
                if s not in alive:
                    finish(s)
            groups[g].extend(alive)

        def drafts(g: int) -> Iterator[None]:
            return self.draft.propose(groups[g], self.k) if self.draft is not None else iter(())

        def verify(g: int, between: Callable[[int], None] | None = None) -> None:
            running = self._verify(groups[g], between)
            done = [s for s in groups[g] if s not in running]
            groups[g] = running
            for s in done:
                finish(s)

        t_start = time.perf_counter()
        for g in range(self.num_batches):
            refill(g)
        if self.num_batches == 2:
            # Interleaved: the draft drafts for batch b while the target verifies batch a, then they swap.
            for _ in drafts(0):
                pass
            a = 0
            every = max(1, self.target.args.n_layers // max(1, self.k))
            while any(groups) or queue:
                b = 1 - a
                steps = drafts(b)

                def between(j: int, steps=steps) -> None:
                    if j % every == 0:
                        next(steps, None)

                if groups[a]:
                    verify(a, between)
                for _ in steps:  # what the layers did not absorb
                    pass
                refill(a)  # newcomers in a are drafted in the next slot, while b verifies
                a = b
        else:
            while any(groups) or queue:
                for _ in drafts(0):
                    pass
                if groups[0]:
                    verify(0)
                refill(0)
        self.stats.decode_seconds = time.perf_counter() - t_start - self.stats.prefill_seconds
        return self.stats
