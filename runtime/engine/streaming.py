"""Weight streaming: purpose-named CUDA streams and the target's per-layer weights copied ahead of use.

Layers the plan reads from disk (disk_stream.DiskLayers) are streamed the same way, from their
staging buffer instead of pinned host memory; on the CPU they are converted from it each pass."""
from __future__ import annotations

import time

import torch

from specoffload.planner.trace_names import SPAN_WEIGHTS, TRACK_H2D

from ..layers import LayerWeights, ModelWeights
from .disk_stream import convert
from .timeline import Timeline


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
                 device: torch.device, n_buffers: int, streams: Streams, timeline: Timeline,
                 disk=None, dtype: torch.dtype | None = None):
        """disk: a disk_stream.DiskLayers for the layers read from disk every pass (their entries in
        `weights` are placeholders on the meta device); dtype: the compute dtype (CPU conversion)."""
        self.disk = disk
        self.dtype = dtype
        self.disk_src: dict[int, LayerWeights] = {}  # disk layer -> its staged tensors, until released
        self.disk_done: dict[int, object] = {}  # disk layer -> event after which its staging may be reused
        self.w, self.device, self.streams, self.tl = weights, device, streams, timeline
        self.attn_res, self.ffn_res = attn_resident, ffn_resident
        self.cuda = streams.cuda
        self.n = len(weights.layers)
        streamed = [j for j in range(self.n) if not (attn_resident[j] and ffn_resident[j])]
        self.buffer_of = {j: i % max(1, n_buffers) for i, j in enumerate(streamed)}
        self.ready: dict[int, tuple[dict, object]] = {}
        self.pending: dict[int, list[int] | None] = {}  # disk layers asked for whose read was not done yet
        self.free_event: dict[int, object] = {}
        self.buffers: list[dict] = []
        self.copied_bytes = 0
        if self.cuda and streamed:
            template = weights.layers[streamed[0]]
            if template.attn["wq"].device.type == "meta":  # a disk layer: only shapes, made real below
                template = LayerWeights(*(({k: torch.empty(t.shape, dtype=t.dtype) for k, t in d.items()})
                                          for d in (template.attn, template.ffn)),
                                        [{k: torch.empty(t.shape, dtype=t.dtype) for k, t in e.items()}
                                         for e in template.experts])
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
            if self.disk is not None and j in self.disk:
                continue  # read from disk into the staging buffers, not held
            lw = self.w.layers[j]
            parts = ([] if self.attn_res[j] else [lw.attn]) + ([] if self.ffn_res[j] else [lw.ffn, *lw.experts])
            total += sum(t.nbytes for d in parts for t in d.values())
        return total

    def prefetch(self, j: int, experts: list[int] | None = None) -> None:
        """Start copying layer j's streamed tensors (all experts, or only `experts`)."""
        if self.disk is not None:
            self.disk.ahead(j, self.n)  # disk reads run ahead in sweep order, whatever layer j is
        if j >= self.n or not self.streamed(j) or j in self.ready:
            return
        if j in self.pending or (self.disk is not None and j in self.disk):
            if not (self.cuda and self.disk.ready(j)):
                self.pending[j] = experts  # read still running (or CPU): taken in get(j), not waited for here
                return
            self.pending.pop(j, None)
        self._make_ready(j, experts)

    def _make_ready(self, j: int, experts: list[int] | None) -> None:
        lw = self.w.layers[j]
        if self.disk is not None and j in self.disk:
            src = self.disk.wait(j)
            if not self.cuda:  # converted to the compute dtype; the staging buffer is free again
                lw = convert(src, self.dtype or torch.float32)
                self.disk.release(j)
                self.ready[j] = ({"attn": lw.attn, "ffn": lw.ffn, "experts": lw.experts}, None)
                return
            self.disk_src[j] = src
            lw = src
        if not self.cuda:  # weights are used where they lie
            self.ready[j] = ({"attn": lw.attn, "ffn": lw.ffn, "experts": lw.experts}, None)
            return
        self._copy_in(j, lw, experts)
        if j in self.disk_src:
            self.disk_done[j] = self.ready[j][1]

    def _copy_in(self, j: int, lw: LayerWeights, experts: list[int] | None) -> None:
        """On CUDA: copy layer j's streamed parts into its buffer on the copy stream, after the buffer's release."""
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
        self.tl.add(TRACK_H2D, f"{SPAN_WEIGHTS} L{j}", start, time.perf_counter())
        self.ready[j] = (out, done)

    def get(self, j: int) -> LayerWeights:
        if not self.streamed(j):
            lw = self.w.layers[j]
            return lw
        if self.disk is not None and j in self.disk:
            self.disk.count_use(j)
        if j not in self.ready:
            experts = self.pending.pop(j, None)
            if self.disk is not None:
                self.disk.ahead(j, self.n)
            self._make_ready(j, experts)
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
            src = self.disk_src.get(j, self.w.layers[j])
            with torch.cuda.stream(self.streams.copy):
                for e in missing:
                    for k, t in src.experts[e].items():
                        buf["experts"][e][k].copy_(t, non_blocking=True)
                        self.copied_bytes += t.nbytes
                    out["experts"][e] = buf["experts"][e]
                done = torch.cuda.Event()
                done.record(self.streams.copy)
            if j in self.disk_src:
                self.disk_done[j] = done
            torch.cuda.current_stream().wait_event(done)
        return LayerWeights(out["attn"], out["ffn"], out["experts"])

    def release(self, j: int) -> None:
        if not self.streamed(j):
            return
        self.ready.pop(j, None)
        ev = self.streams.event()
        if ev is not None:
            self.free_event[self.buffer_of[j]] = ev
        if j in self.disk_src:  # the staging buffer is reusable once its copies to the GPU are done
            self.disk_src.pop(j)
            done = self.disk_done.pop(j, None)
            if done is not None:
                done.synchronize()
            self.disk.release(j)
