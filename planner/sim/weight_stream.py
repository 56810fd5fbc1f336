"""The weight stream: one sweep over the streamed layers per pass, copies issued in order into the
weight buffers, each buffer held until the layer's last compute in that pass.

The disk stage (the disk tier, plan.disk_layers > 0): a second sweep, ahead of the first, over the
layers the plan reads from disk (schema.disk_layer_ids), as reads on the `disk` resource into
DISK_STAGING_BUFFERS staging buffers (host memory, pinned on a GPU machine; one layer each). On a GPU
machine a disk layer's host->GPU copies wait for its read, and its staging buffer is held until the
layer's last compute in the pass (the runtime frees it when it releases the layer); on a CPU-only
machine the staged layer is converted to the compute dtype on the device (`disk convert`), which
frees the buffer, and the layer's compute waits for that (`disk_convert_seconds`: the profile's measured
conversion rate, else a memory-bandwidth estimate). Each read also takes host compute while in flight
(`disk read cpu`, `disk_read_compute_seconds`: the profile's measured slowdown per byte read): a task on
the device (CPU-only) or the CPU-attention resource, served before other work, as the cost model's
`disk_cpu_terms` charges it. Reads are issued in sweep order, into the next pass before it is decided, as
the weight copies are.

Methods of `Simulation` (mixed in); the stream's state (streamed, attn_streamed, ffn_streamed,
issued, free_buffers, stream_pos, buffer_taken, ...) is set up by `Simulation.__init__`, the disk
stage's by `_init_disk_stage` (called from it).
"""
from __future__ import annotations

from ..trace_names import SPAN_WEIGHTS
from ..costmodel import DISK_STAGING_BUFFERS
from ..schema import disk_layer_ids
from ..strict import SchemaError
from ..trace_names import SPAN_DISK_CONVERT, SPAN_DISK_READ, SPAN_DISK_READ_CPU
from .engine import Task
from .state import BULK, TARGET, _Pass, _prio


class WeightStream:
    """Issue streamed-weight copies as buffers free up and make each layer's users wait for them."""

    # --- the disk stage ------------------------------------------------------------------------
    def _init_disk_stage(self, record=None) -> None:
        cm = self.cm
        resident = set() if self.cpu_only else {j for j in range(self.L)
                                                 if not (self.attn_streamed[j] and self.ffn_streamed[j])}
        try:
            self.disk_layers = disk_layer_ids(self.plan.disk_layers, self.L, resident)
        except ValueError as exc:
            raise SchemaError(f"plan: {exc}") from None
        self.on_disk = set(self.disk_layers)
        self.disk_res = None
        self.disk_reads: dict[tuple[int, int], Task] = {}  # (pass, layer) -> its read (or conversion)
        self.disk_waiting: dict[tuple[int, int], list[Task]] = {}  # users / copies held until the read is issued
        self.staging_taken: set[tuple[int, int]] = set()
        self.disk_pos = 0
        self.free_staging = 0
        if not self.disk_layers:
            return
        if not cm.disk_tier:
            raise SchemaError(f"the plan reads {len(self.disk_layers)} layers from disk but profile "
                              f"'{self.profile.name}' states no disk_read_bytes_per_s; simulate with "
                              "--set disk_read_bytes_per_s=BYTES_PER_S (or a profile measured with --disk)")
        self.disk_res = self.eng.resource("disk", record)
        self.free_staging = DISK_STAGING_BUFFERS
        self.disk_layer_bytes = cm.disk_layer_bytes
        self._disk_read = cm.disk_seconds(cm.disk_layer_bytes)
        self._disk_convert = cm.disk_convert_seconds()
        self._disk_read_cpu = cm.disk_read_compute_seconds()
        self.staging_pools = ("host",) if self.cpu_only else ("pinned", "host")
        extra = cm.disk_staging_bytes() - DISK_STAGING_BUFFERS * cm.disk_layer_bytes
        if extra > 0:  # CPU-only: the layer converted to the compute dtype, one at a time
            for pool in self.staging_pools:
                self._alloc(pool, extra, "disk tier: a staged layer in the compute dtype")

    def _disk_state(self) -> str:
        n, idx = divmod(self.disk_pos, len(self.disk_layers))
        return (f"disk stage at pass {n} layer {self.disk_layers[idx]} with {self.free_staging} of "
                f"{DISK_STAGING_BUFFERS} staging buffers free")

    def _disk_pump(self) -> None:
        """Issue disk reads in sweep order while staging buffers are free."""
        layers = self.disk_layers
        while layers and self.free_staging > 0 and not self.eng.stopped:
            n, idx = divmod(self.disk_pos, len(layers))
            if not self._sweep_allowed(n):
                return
            j = layers[idx]
            self.free_staging -= 1
            self.disk_pos += 1
            self.staging_taken.add((n, j))
            for pool in self.staging_pools:
                self._alloc(pool, self.disk_layer_bytes, f"disk staging: layer {j} for pass {n}")
            traced = self._traced(n)
            read = Task(SPAN_DISK_READ, "disk", self.disk_res, self._disk_read, priority=_prio(BULK, n, j, 0),
                        layer=j, pass_index=n, traced=traced)
            last = read
            if self.cpu_only:
                last = Task(SPAN_DISK_CONVERT, "gpu", self.gpu, self._disk_convert, priority=_prio(BULK, n, j, 0),
                            layer=j, pass_index=n, traced=traced,
                            on_done=lambda now, n=n, j=j: self._staging_release(n, j))
                self.eng.depend(read, last)
                self.eng.arm(last)
            self.disk_reads[(n, j)] = last
            for u in self.disk_waiting.pop((n, j), ()):
                self.eng.attach(last, u)
            self.eng.arm(read)
            if self._disk_read_cpu > 0:  # the host compute the read takes while in flight, served first
                self.eng.arm(Task(SPAN_DISK_READ_CPU, "gpu" if self.cpu_only else "cpu", self.cpu,
                                  self._disk_read_cpu, priority=_prio(TARGET, 0), layer=j, pass_index=n,
                                  traced=traced))

    def _staging_release(self, n: int, j: int) -> None:
        if (n, j) not in self.staging_taken:
            return
        self.staging_taken.discard((n, j))
        for pool in self.staging_pools:
            self._free(pool, self.disk_layer_bytes)
        self.free_staging += 1
        self._disk_pump()

    def _after_disk(self, n: int, j: int, tasks: list[Task]) -> None:
        """Make tasks (copies to the GPU, or the layer's compute on a CPU-only machine) wait for the
        disk stage of layer j in pass n (held until its read is issued)."""
        got = self.disk_reads.get((n, j))
        seen = set()
        for t in tasks:
            if id(t) in seen:
                continue
            seen.add(id(t))
            if got is not None:
                self.eng.depend(got, t)
            else:
                self.eng.hold(t)
                self.disk_waiting.setdefault((n, j), []).append(t)

    def _ffn_copy(self, tokens: float) -> tuple[float, float]:
        """(seconds, bytes) of one layer's streamed FFN copy for `tokens` routed tokens."""
        if tokens not in self._ffn_copy_cache:
            nbytes = self.cm.ffn_streamed_bytes(tokens)
            self._ffn_copy_cache[tokens] = (self.cm.h2d_seconds(nbytes), nbytes)
        return self._ffn_copy_cache[tokens]

    def _quantum(self, seconds: float, nbytes: float) -> float:
        return seconds * self._chunk / nbytes if nbytes > self._chunk else 0.0

    def _sweep_allowed(self, n: int) -> bool:
        if n < len(self.passes):
            return True
        return n == len(self.passes) and self.finished < self.N

    def _pump(self) -> None:
        if self.disk_layers:
            self._disk_pump()
        layers = self.streamed
        if not layers:
            return
        while self.free_buffers > 0 and not self.eng.stopped:
            n, idx = divmod(self.stream_pos, len(layers))
            if not self._sweep_allowed(n):
                return
            j = layers[idx]
            need = self._buffer_need(n, j)
            if need > self.free_buffers * (1 + 1e-12):
                return
            self._issue(n, j, need)
            self.free_buffers -= need
            self.stream_pos += 1

    def _buffer_need(self, n: int, j: int) -> float:
        if not self.by_bytes:
            return 1
        tokens = self.passes[n].tokens if n < len(self.passes) else self.default_tokens
        return ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))

    def _issue(self, n: int, j: int, need: float) -> None:
        eng = self.eng
        p = self.passes[n] if n < len(self.passes) else None
        tokens = p.tokens if p is not None else self.default_tokens
        traced = self._traced(n)
        attn = ffn = None
        if self.attn_streamed[j]:
            attn = Task(SPAN_WEIGHTS, "h2d", self.h2d, self._attn_copy, priority=_prio(BULK, n, j, 0),
                        quantum=self._quantum(self._attn_copy, self.t.attn_bytes_per_layer), layer=j, pass_index=n,
                        traced=traced)
        if self.ffn_streamed[j]:
            secs, nbytes = self._ffn_copy(tokens)
            ffn = Task(SPAN_WEIGHTS, "h2d", self.h2d, secs, priority=_prio(BULK, n, j, 1),
                       quantum=self._quantum(secs, nbytes),
                       layer=j, pass_index=n, traced=traced)
        if j in self.on_disk:  # the copies to the GPU start from the staging buffer, once the read is done
            self._after_disk(n, j, [t for t in (attn, ffn) if t is not None])
        self.issued[(n, j)] = (attn, ffn, tokens, need)
        if self.buffer_bytes:  # the bytes this layer's copy puts in its buffer, until the layer is done
            nbytes = ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                      + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))
            self.buffer_taken[(n, j)] = nbytes
            self._alloc("gpu", nbytes, f"weight buffer: layer {j} for pass {n}")
        for task in (attn, ffn):
            if task is not None:
                eng.arm(task)
        if p is not None and j in p.waiting_weights:
            attn_users, ffn_users = p.waiting_weights.pop(j)
            if attn is not None:
                for u in attn_users:
                    eng.attach(attn, u)
            if ffn is not None:
                for u in ffn_users:
                    eng.attach(ffn, u)

    def _release_buffer(self, n: int, j: int) -> None:
        got = self.issued.pop((n, j), None)
        taken = self.buffer_taken.pop((n, j), 0.0)
        if taken:
            self._free("gpu", taken)
        self.free_buffers += got[3] if got is not None else (0 if self.by_bytes else 1)
        self._pump()

    def _wire_weights(self, p: _Pass, j: int, attn_users: list[Task], ffn_users: list[Task]) -> None:
        """Make layer j's users wait for its streamed weights in pass p's sweep."""
        eng = self.eng
        attn_streamed, ffn_streamed = self.attn_streamed[j], self.ffn_streamed[j]
        if self.cpu_only and j in self.on_disk:  # the layer's compute waits for its read and conversion
            self._after_disk(p.index, j, list(attn_users) + list(ffn_users))
            return
        if not (attn_streamed or ffn_streamed):
            return
        got = self.issued.get((p.index, j))
        if got is None:  # not issued yet: hold the users until the stream issues the copy
            for u in attn_users if attn_streamed else ():
                eng.hold(u)
            for u in ffn_users if ffn_streamed else ():
                eng.hold(u)
            p.waiting_weights[j] = (attn_users, ffn_users)
            return
        attn, ffn, tokens, _ = got
        for u in attn_users:
            eng.depend(attn, u)
        for u in ffn_users:
            eng.depend(ffn, u)
        if ffn_streamed and p.tokens != tokens:
            need, _ = self._ffn_copy(p.tokens)
            have, _ = self._ffn_copy(tokens)
            if need > have * (1 + 1e-9):  # prefetched for fewer routed experts than this pass touches
                top = Task(SPAN_WEIGHTS, "h2d", self.h2d, need - have, priority=_prio(BULK, p.index, j, 2), layer=j,
                           pass_index=p.index, traced=self._traced(p.index))
                for u in ffn_users:
                    eng.depend(top, u)
                eng.arm(top)

    def _layer_release(self, p: _Pass, j: int) -> Task:
        """A join after layer j's last compute in pass p: frees the layer's buffer."""
        streamed = self.attn_streamed[j] or self.ffn_streamed[j]

        def done(now: float, p=p, j=j, streamed=streamed) -> None:
            p.layers_done = max(p.layers_done, j + 1)
            if streamed:
                self._release_buffer(p.index, j)
            if j in self.on_disk:
                if not self.cpu_only:
                    self._staging_release(p.index, j)
                self.disk_reads.pop((p.index, j), None)

        return Task("release", None, None, 0.0, on_done=done, layer=j, pass_index=p.index)
