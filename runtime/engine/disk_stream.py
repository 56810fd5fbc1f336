"""The disk tier in the engine: layers the plan reads from the checkpoint every sweep.

The plan's ``disk_layers`` layers (which ones: ``schema.disk_layer_ids``) are not loaded into host
memory at all. Each pass (a verification or a prefill chunk) reads them from the checkpoint's
safetensors files in place (runtime/disk.py: offsets from the headers, reader threads, O_DIRECT or
fadvise so the page cache does not grow) into a ring of staging buffers, a layer or two ahead of
compute, in sweep order (layer 0 of the next pass follows the last layer of this one). The layer's
tensors are views into the staging buffer in their on-disk dtype; the weight streamer copies them to
the GPU (CUDA) or converts them to the compute dtype (CPU) and hands the buffer back.

A checkpoint file that changes or disappears during the run raises ``CheckpointChanged`` (a
``CheckpointError``) from the pass that needed the layer.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from specoffload.planner.trace_names import SPAN_DISK_READ, TRACK_DISK

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

    def read_layer(self, layer: int, staging: torch.Tensor) -> dict:
        start = time.perf_counter()
        out = self.reader.read_layer(layer, staging)
        if self.timeline is not None:
            self.timeline.add(TRACK_DISK, f"{SPAN_DISK_READ} L{layer}", start, time.perf_counter())
        return out


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
        names = hf_name_map(args)
        self._canon = {j: {hf: names[hf] for hf in self.index.layer_names(j)} for j in self.layers}
        self.layer_bytes = {j: self.index.layer_bytes(j) for j in self.layers}
        self.staging_bytes = self.prefetcher.staging_bytes
        self.n_experts = args.n_experts
        # bytes of disk layers used by passes (what a sweep reads, as the headers say), and passes counted
        self.used_bytes = 0

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
        raw = self.prefetcher.wait(j)
        attn: dict = {}
        ffn: dict = {}
        experts: list[dict] = [{} for _ in range(self.n_experts)]
        for hf, t in raw.items():
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


def convert(lw: LayerWeights, dtype: torch.dtype) -> LayerWeights:
    """A copy of a staged layer in the compute dtype (the staging buffer can then be reused)."""
    def conv(d: dict) -> dict:
        return {k: t.to(dtype=dtype, copy=True) for k, t in d.items()}

    return LayerWeights(conv(lw.attn), conv(lw.ffn), [conv(e) for e in lw.experts])
