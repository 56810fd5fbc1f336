"""Weight streaming: purpose-named CUDA streams and the target's per-layer weights copied ahead of use.

Layers the plan reads from disk (disk_stream.DiskLayers) are streamed the same way, from their
staging buffer instead of pinned host memory; on the CPU they are converted from it each pass."""
from __future__ import annotations

import time

import torch

from specoffload.planner.trace_names import SPAN_WEIGHTS, TRACK_H2D

from ..layers import LayerWeights, ModelWeights
from .timeline import Timeline


class Streams:
    """Purpose-named CUDA streams; on the CPU every method is a no-op."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.copy = torch.cuda.Stream(device) if self.cuda else None  # host -> device weights
        # A fused pass's prompt chunk (target.py): beside the verification, which never waits for it.
        self.chunk = torch.cuda.Stream(device) if self.cuda else None

    def event(self) -> "torch.cuda.Event | None":
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream())
        return ev


class LayerStreamer:
    """The target's per-layer weights: resident parts on the device, streamed parts in pinned host
    memory copied into one of `n_buffers` device buffers ahead of use.

    The stream runs ahead in sweep order, wrapping into the next pass, as far as the buffers allow (as
    the simulator's weight stream does, planner/sim/weight_stream.py): `fill()` issues the next streamed
    layers' copies on the copy stream into every free buffer, each copy waiting on the copy stream for
    the buffer's previous user to release it; get(j) makes the compute stream wait for layer j's copy;
    release(j) records that compute is done with its buffer (an event), which frees the buffer for the
    next copy. So when a verification releases its last layers, the next pass's first n_buffers streamed
    layers are copied while the host does its bookkeeping and a serial draft round runs. MoE layers at
    small token counts copy only the experts the router picked (`experts=[]`: none ahead, the rest on use).
    Without CUDA the same bookkeeping runs (no copies: weights are used where they lie).
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
        self.order = [j for j in range(self.n) if not (attn_resident[j] and ffn_resident[j])]  # the sweep
        self._streamed = set(self.order)
        self.n_buffers = max(1, n_buffers) if self.order else 0
        self.cursor = 0  # position in `order` of the next copy to issue (wraps into the next pass)
        self.max_ahead = 0  # the most layers issued and not yet released at once (the prefetch depth reached)
        self.free = list(range(self.n_buffers))  # buffers whose last user released them (copies may go in)
        self.buffer_of: dict[int, int] = {}  # issued layer -> its buffer, until released
        self.next_compute = 0  # the layer the compute reaches next (where disk reads continue from)
        self.ready: dict[int, tuple[dict, object]] = {}
        self.pending: dict[int, list[int] | None] = {}  # issued disk layers whose copy waits for the read
        self.free_event: dict[int, object] = {}
        self.buffers: list[dict] = []
        self.copied_bytes = 0
        if self.cuda and self.order:
            streamed = self.order
            template = weights.layers[streamed[0]]
            if template.attn["wq"].device.type == "meta":  # a disk layer: only shapes, made real below
                template = LayerWeights(*(({k: torch.empty(t.shape, dtype=t.dtype) for k, t in d.items()})
                                          for d in (template.attn, template.ffn)),
                                        [{k: torch.empty(t.shape, dtype=t.dtype) for k, t in e.items()}
                                         for e in template.experts])
            for _ in range(self.n_buffers):
                self.buffers.append({
                    "attn": {k: torch.empty_like(t, device=device) for k, t in template.attn.items()},
                    "ffn": {k: torch.empty_like(t, device=device) for k, t in template.ffn.items()},
                    "experts": [{k: torch.empty_like(t, device=device) for k, t in e.items()} for e in template.experts],
                })

    def issued(self) -> list[int]:
        """The layers whose copies are issued and not yet released, in sweep order from the oldest."""
        return sorted(self.buffer_of, key=lambda j: (self.order.index(j) - self.cursor) % len(self.order))

    def streamed(self, j: int) -> bool:
        return j in self._streamed

    def pinned_bytes(self) -> int:
        """Bytes of streamed weights held in pinned host memory."""
        total = 0
        for j in self.order:
            if self.disk is not None and j in self.disk:
                continue  # read from disk into the staging buffers, not held
            lw = self.w.layers[j]
            parts = ([] if self.attn_res[j] else [lw.attn]) + ([] if self.ffn_res[j] else [lw.ffn, *lw.experts])
            total += sum(t.nbytes for d in parts for t in d.values())
        return total

    def fill(self, experts: list[int] | None = None) -> None:
        """Issue the next streamed layers' copies, in sweep order, into every free buffer (all experts, or
        only `experts`); disk reads continue ahead of the compute. A disk layer whose read is still running
        stops the fill (the copy stream is in order); the next fill, or get(), takes it."""
        if self.disk is not None:
            self.disk.ahead(self.next_compute, self.n)  # disk reads run ahead in sweep order
        while self.free and self.order:
            j = self.order[self.cursor]
            if j in self.buffer_of:  # fewer streamed layers than buffers: this pass still holds it
                return
            if self.disk is not None and j in self.disk and not (self.cuda and self.disk.ready(j)):
                return
            self._issue(j, experts)

    def _issue(self, j: int, experts: list[int] | None) -> None:
        """Take a free buffer for layer j (the layer at the cursor) and start its copy."""
        self.buffer_of[j] = self.free.pop(0)
        self.cursor = (self.cursor + 1) % len(self.order)
        self.max_ahead = max(self.max_ahead, len(self.buffer_of))
        if self.disk is not None and j in self.disk and not self.cuda:
            self.pending[j] = experts  # converted on use (get), one layer at a time
            return
        self._make_ready(j, experts)

    def _make_ready(self, j: int, experts: list[int] | None) -> None:
        lw = self.w.layers[j]
        if self.disk is not None and j in self.disk:
            if not self.cuda:  # converted to the compute dtype; the staging buffer is free again
                lw = self.disk.take(j, self.dtype or torch.float32)
                self.ready[j] = ({"attn": lw.attn, "ffn": lw.ffn, "experts": lw.experts}, None)
                return
            src = self.disk.wait(j)
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
            for ev in self.free_event.pop(b, ()):
                self.streams.copy.wait_event(ev)
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

    def get(self, j: int, experts: list[int] | None = None) -> LayerWeights:
        """Layer j's weights for the compute stream (its copy waited for); `experts` as in fill, for a copy
        that was not issued ahead."""
        self.next_compute = (j + 1) % self.n
        if not self.streamed(j):
            lw = self.w.layers[j]
            return lw
        if self.disk is not None and j in self.disk:
            self.disk.count_use(j)
        if j not in self.buffer_of:
            if self.order[self.cursor] != j:  # out of sweep order (a pass cut short): start the sweep at j
                self._drop_ahead()
                self.cursor = self.order.index(j)
            if self.disk is not None:
                self.disk.ahead(j, self.n)
            if not self.free:  # a buffer is free once every earlier layer is released
                raise RuntimeError(f"layer {j} needed with all {self.n_buffers} weight buffers held by "
                                   f"layers {self.issued()}")
            self._issue(j, experts)  # j is at the cursor now
        if j not in self.ready:  # a disk layer issued while its read was running: copy (or convert) it now
            self._make_ready(j, self.pending.pop(j, None))
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

    def _drop_ahead(self) -> None:
        """Forget copies issued ahead of use (their buffers are free again once the copies are done)."""
        for j in list(self.buffer_of):
            self.release(j)

    def _free_buffer(self, j: int, after: tuple = ()) -> None:
        b = self.buffer_of.pop(j)
        self.ready.pop(j, None)
        self.pending.pop(j, None)
        ev = self.streams.event()
        if ev is not None:
            self.free_event[b] = (ev, *after)
        self.free.append(b)

    def release(self, j: int, after: tuple = ()) -> None:
        """Layer j's compute is issued; its buffer takes a next copy once the compute stream, and the events
        in `after` (other streams' work on the layer: a fused pass's chunk), are past it."""
        if not self.streamed(j) or j not in self.buffer_of:
            return
        self._free_buffer(j, after)
        if j in self.disk_src:  # the staging buffer is reusable once its copies to the GPU are done
            self.disk_src.pop(j)
            done = self.disk_done.pop(j, None)
            if done is not None:
                done.synchronize()
            self.disk.release(j)
