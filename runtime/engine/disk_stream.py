"""The disk tier in the engine: layers the plan reads from the checkpoint every sweep.

The plan's ``disk_layers`` layers (which ones: ``schema.disk_layer_ids``) are not loaded into host
memory at all. Each pass (a verification or a prefill chunk) reads them from the checkpoint's
safetensors files in place (runtime/disk.py: offsets from the headers, reader threads, O_DIRECT or
fadvise so the page cache does not grow) into a ring of staging buffers, a layer or two ahead of
compute, in sweep order (layer 0 of the next pass follows the last layer of this one). The layer's
tensors are views into the staging buffer in their on-disk dtype; the weight streamer copies them to
the GPU (CUDA), or (CPU) ``DiskLayers.take`` converts the layer to the compute dtype in one flat copy per
run of the buffer into a pooled destination (the weights are views into it) and hands the buffer back.

A checkpoint file that changes or disappears during the run raises ``CheckpointChanged`` (a
``CheckpointError``) from the pass that needed the layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from specoffload.planner.trace_names import SPAN_DISK_CONVERT, SPAN_DISK_READ, TRACK_DISK, TRACK_GPU

from ..config import ModelArgs
from ..disk import DEFAULT_BLOCK, READ_THREADS, CheckpointIndex, DiskReader, Prefetcher
from ..layers import LayerWeights
from ..loader import hf_name_map

def plan_disk_layers(plan, n_layers: int, resident: set[int]) -> set[int]:
    """The layers a plan reads from disk (schema.disk_layer_ids); an EngineError if the plan cannot be."""
    from specoffload.planner.schema import disk_layer_ids

    from .requests import EngineError

    try:
        return set(disk_layer_ids(plan.disk_layers, n_layers, resident))
    except ValueError as exc:
        raise EngineError(str(exc)) from None


#: staging buffers (one layer each): one layer in use while the next is read; the cost model's
#: DISK_STAGING_BUFFERS says the same
STAGING_BUFFERS = 2


class _TimedReader:
    """The reader as the prefetcher sees it, each layer's read timed on the timeline's disk track."""

    def __init__(self, reader: DiskReader, timeline=None):
        self.reader, self.timeline = reader, timeline

    def layer_staging_bytes(self, layer: int) -> int:
        return self.reader.layer_staging_bytes(layer)

    def fill_layer(self, layer: int, staging: torch.Tensor, check: bool = True) -> None:
        start = time.perf_counter()
        self.reader.fill_layer(layer, staging, check)
        if self.timeline is not None:
            self.timeline.add(TRACK_DISK, f"{SPAN_DISK_READ} L{layer}", start, time.perf_counter())

    def layer_views(self, layer: int, staging: torch.Tensor) -> dict:
        return self.reader.layer_views(layer, staging)

    def layer_aliases(self, layer: int) -> bool:
        return self.reader.layer_aliases(layer)

    def check_layer(self, layer: int) -> None:
        self.reader.check_layer(layer)


class DiskLayers:
    """Reads the plan's disk layers into staging buffers ahead of use; see the module docstring."""

    def __init__(self, model_dir: str | Path, args: ModelArgs, layers: list[int], threads: int = READ_THREADS,
                 depth: int = STAGING_BUFFERS, pin: bool | None = None, timeline=None,
                 block_bytes: int = DEFAULT_BLOCK):
        self.layers = sorted(layers)
        self.index = CheckpointIndex.open(model_dir)
        # the settings the profiler's layer-read probe (profiler/disk.py, measure_layer_reads) reads with
        self.reader = DiskReader(self.index, threads=threads, block_bytes=block_bytes)
        self.prefetcher = Prefetcher(_TimedReader(self.reader, timeline), self.layers, depth=depth, pin=pin)
        self.depth = depth
        self.timeline = timeline
        names = hf_name_map(args)
        self._canon = {j: {hf: names[hf] for hf in self.index.layer_names(j)} for j in self.layers}
        self.layer_bytes = {j: self.index.layer_bytes(j) for j in self.layers}
        self.staging_bytes = self.prefetcher.staging_bytes
        self.n_experts = args.n_experts
        # bytes of disk layers used by passes (what a sweep reads, as the headers say), and passes counted
        self.used_bytes = 0
        self._layouts: dict[int, FlatLayout] = {}
        self.dests = DestPool()
        self.convert_seconds = 0.0  # time in take()'s conversion, and the on-disk bytes it converted
        self.converted_bytes = 0

    def __contains__(self, j: int) -> bool:
        return j in self._canon

    def ahead(self, j: int, n_layers: int) -> None:
        """Start reads of the next disk layers in sweep order from layer j (wrapping into the next pass)
        while staging buffers are free."""
        if not self.layers:
            return
        j %= n_layers
        order = [x for x in self.layers if x >= j] + [x for x in self.layers if x < j]
        for x in order:
            if self.prefetcher.started(x):
                continue
            if not self.prefetcher.free_buffers:
                return
            self.prefetcher.start(x)

    def ready(self, j: int) -> bool:
        return self.prefetcher.done(j)

    def wait(self, j: int) -> LayerWeights:
        """Layer j's tensors (views into its staging buffer, on-disk dtype) once read."""
        return self._split(j, self.prefetcher.wait(j))

    def take(self, j: int, dtype: torch.dtype) -> LayerWeights:
        """Layer j converted to ``dtype`` once read (the CPU path), its staging buffer handed back.

        Flat: one copy per run of the staging buffer (FlatLayout, computed once per layer) into one
        destination tensor (DestPool: reused once the previous layer's weights are dropped), the weights
        being views into it."""
        raw = self.prefetcher.wait(j)
        staging = self.prefetcher.buffer(j)
        layout = self._layouts.get(j)
        if layout is None:
            layout = self._layouts[j] = FlatLayout.of(raw, staging)
        t0 = time.perf_counter()
        out = layout.convert(raw, staging, self.dests.get(layout.numel, dtype))
        t1 = time.perf_counter()
        self.convert_seconds += t1 - t0
        if self.timeline is not None:
            self.timeline.add(TRACK_GPU, f"{SPAN_DISK_CONVERT} L{j}", t0, t1)
        self.converted_bytes += self.layer_bytes[j]
        self.release(j)
        return self._split(j, out)

    def _split(self, j: int, tensors: dict[str, torch.Tensor]) -> LayerWeights:
        """{HF name: tensor} of layer j as the engine's LayerWeights."""
        attn: dict = {}
        ffn: dict = {}
        experts: list[dict] = [{} for _ in range(self.n_experts)]
        for hf, t in tensors.items():
            canon = self._canon[j][hf]  # layers.J.attn.wq / layers.J.ffn.router / layers.J.experts.E.w_up
            parts = canon.split(".")
            if parts[2] == "attn":
                attn[parts[3]] = t
            elif parts[2] == "ffn":
                ffn[parts[3]] = t
            else:
                experts[int(parts[3])][parts[4]] = t
        return LayerWeights(attn, ffn, experts)

    def release(self, j: int) -> None:
        if self.prefetcher.started(j):
            self.prefetcher.release(j)

    def count_use(self, j: int) -> None:
        self.used_bytes += self.layer_bytes[j]

    @property
    def read_bytes(self) -> int:
        """Tensor bytes read from disk so far (prefetches of a pass that never ran included)."""
        return self.reader.payload_bytes

    @property
    def mode(self) -> str:
        return self.reader.mode

    def close(self) -> None:
        try:
            self.prefetcher.close()
        except Exception:  # noqa: BLE001 - a failed read was already reported by the pass that needed it
            pass
        self.reader.close()
        self.dests.clear()


@dataclass(frozen=True)
class FlatLayout:
    """Where a staged layer's tensors lie in its staging buffer, and where they go in one flat destination.

    A layer's tensors lie back to back in the checkpoint (one file extent), so in the staging buffer they
    form a few runs (one per extent) of one dtype each: converting the layer is one ``copy_`` per run into
    a destination tensor of the compute dtype, and the weights are views into that destination. Tensors the
    reader had to copy out of the buffer (an odd offset in the file) are ``loose``: copied one by one."""

    runs: tuple[tuple[int, int, torch.dtype, int], ...]  # (byte offset in staging, elements, on-disk dtype, dest offset)
    loose: tuple[tuple[str, int], ...]  # (HF name, dest offset)
    views: tuple[tuple[str, int, tuple[int, ...], tuple[int, ...]], ...]  # (HF name, dest offset, shape, stride)
    numel: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor], staging: torch.Tensor) -> "FlatLayout":
        """The layout of ``tensors`` (views into the uint8 ``staging`` buffer, as DiskReader.read_layer gives)."""
        base, size = staging.data_ptr(), staging.numel()
        inside, loose_names = [], []
        for name, t in tensors.items():
            off = t.data_ptr() - base
            if t.is_contiguous() and 0 <= off and off + t.nbytes <= size and off % t.element_size() == 0:
                inside.append((off, name, t))
            else:
                loose_names.append(name)
        inside.sort(key=lambda x: x[0])
        runs: list[list] = []  # [byte offset, elements, dtype, dest offset]
        dest_of: dict[str, int] = {}
        pos = 0
        for off, name, t in inside:
            last = runs[-1] if runs else None
            if last is not None and last[2] == t.dtype and last[0] + last[1] * t.element_size() == off:
                last[1] += t.numel()
            else:
                runs.append([off, t.numel(), t.dtype, pos])
            dest_of[name] = pos
            pos += t.numel()
        loose = []
        for name in loose_names:
            loose.append((name, pos))
            dest_of[name] = pos
            pos += tensors[name].numel()
        views = []
        for name, t in tensors.items():
            shape = tuple(t.shape)
            stride, acc = [], 1
            for d in reversed(shape):
                stride.append(acc)
                acc *= d
            views.append((name, dest_of[name], shape, tuple(reversed(stride))))
        return cls(tuple(tuple(r) for r in runs), tuple(loose), tuple(views), pos)

    def convert(self, tensors: dict[str, torch.Tensor], staging: torch.Tensor, dest: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """Copy (converting the dtype) the staged tensors into ``dest`` (>= numel elements, the compute dtype):
        one copy per run; {HF name: view into dest}."""
        for off, n, dtype, at in self.runs:
            dest[at:at + n].copy_(staging[off:off + n * dtype.itemsize].view(dtype))
        for name, at in self.loose:
            t = tensors[name]
            dest[at:at + t.numel()].copy_(t.reshape(-1))
        return {name: dest.as_strided(shape, stride, dest.storage_offset() + at)
                for name, at, shape, stride in self.views}


_COUNT_OK: dict[object, bool] = {}  # per counting function: whether it behaves as _storage_refs needs


def _counts_views(count) -> bool:
    """Whether ``count`` (torch's private storage use count) rises by one per live view and falls back when the
    view dies, checked once on a scratch tensor: a torch whose count means something else (or fails) gets
    fresh destinations every time rather than a reused one a live layer still reads."""
    ok = _COUNT_OK.get(count)
    if ok is None:
        try:
            t = torch.empty(4)
            c0 = int(count(t.untyped_storage()._cdata))
            v = t[1:3]
            c1 = int(count(t.untyped_storage()._cdata))
            del v
            c2 = int(count(t.untyped_storage()._cdata))
            ok = c1 == c0 + 1 and c2 == c0
        except Exception:  # noqa: BLE001 - any failure: do not rely on it
            ok = False
        _COUNT_OK[count] = ok
    return ok


def _storage_refs(t: torch.Tensor) -> int | None:
    """How many tensors share ``t``'s storage (None where torch does not say, or its count fails the check)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None or not _counts_views(count):
        return None
    return int(count(t.untyped_storage()._cdata))


class DestPool:
    """Destination tensors for converted layers, reused once no weight view of the layer they hold is alive.

    The engine drops a layer's weights when it releases the layer, before it asks for the next one, so one
    destination serves every conversion (the cost model's one converted layer); where a layer is still held
    (or torch cannot say) a fresh tensor is allocated instead, so a live layer is never overwritten. Reuse
    spares the allocator's fresh pages (a page fault and a zeroed page each) on every conversion.

    Liveness is torch's storage use count (private; every view, derived ones included, holds the storage),
    checked once to behave so (`_counts_views`); tracking only the views handed out (weakrefs) would miss a
    view of a view, and an explicit release would trust the caller."""

    def __init__(self, size: int = 1):
        self.size = size
        self._pool: list[tuple[torch.Tensor, int]] = []  # (tensor, its storage's reference count when free)
        self.allocated = 0

    def get(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        for d, free in self._pool:
            if d.dtype == dtype and d.numel() >= numel and _storage_refs(d) == free:
                return d
        d = torch.empty(numel, dtype=dtype)
        self.allocated += 1
        free = _storage_refs(d)
        if free is not None and len(self._pool) < self.size:
            self._pool.append((d, free))
        return d

    def clear(self) -> None:
        self._pool.clear()
