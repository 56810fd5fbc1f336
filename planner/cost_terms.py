"""The hardware profile's figures (cost terms), declared once: name, unit, what kind of value, which
probe fills it on each kind of device, how it is fitted, what stands when its probe fails, and how
the profile summary shows it. Pure Python, no torch.

Read by: planner/schema.py (HardwareProfile validation: which figures may be null, which must be
positive or nonnegative), the profiler (runtime/profiler/probes.py: each probe's figures, the
failure handling and the assembly into a HardwareProfile) and the profile summary
(runtime/profile_cli.py `summary`). The cost model reads the figures by name from the profile.

A new term: a HardwareProfile field, a row here, and the code that measures it (its probe returns
it) and uses it (the cost model). A test checks that every profile figure has a row and every row a
figure.
"""
from __future__ import annotations

from dataclasses import dataclass

# Kinds of value: how the profile holds it, how the profiler writes it, how the summary shows it.
CURVE = "curve"  # a Curve over a size (tokens or bytes)
RATE = "rate"  # a rate; null when its probe failed
BYTES = "bytes"  # an amount of memory
COUNT = "count"  # a whole number
COST = "cost"  # a fixed cost or rate that defaults to 0 (not charged / not measured)

# What stands when the term's probe fails (or does not run on this kind of device).
NULL = "null"  # written as null and listed in `missing`; the planner refuses what needs it
ZERO = "zero"  # 0: the cost is not charged
ESTIMATE = "estimate"  # the probe's fallback estimates it (named in provenance)

CUDA, CPU = "cuda", "cpu"


@dataclass(frozen=True)
class CostTerm:
    name: str  # the HardwareProfile field
    unit: str  # B, B/s, flop/s, s, cores
    kind: str  # CURVE | RATE | BYTES | COUNT | COST
    description: str
    probes: dict[str, str]  # device kind -> the probe that measures it there (ALL_PROBES names); absent: not measured
    fit: str  # how the probe's samples become the figure
    fallback: str  # NULL | ZERO | ESTIMATE
    summary: str = ""  # the summary line it is shown on ("" : not shown on its own)
    summary_as: str = ""  # its words on that line
    scale: float = 1.0  # shown as value * scale ...
    shown_unit: str = ""  # ... in this unit

    @property
    def optional(self) -> bool:
        """May be null in a profile (its probe failed)."""
        return self.fallback == NULL

    @property
    def bound(self) -> str:
        """'positive' (must be > 0), 'nonneg' (>= 0) or 'count' (>= 1)."""
        if self.kind == COUNT:
            return "count"
        return "nonneg" if self.kind == COST or self.name == "gpu_mem_reserve_bytes" else "positive"


def _both(probe: str) -> dict[str, str]:
    return {CUDA: probe, CPU: probe}


_US = dict(scale=1e6, shown_unit=" us")
TERMS: tuple[CostTerm, ...] = (
    CostTerm("cpu_cores", "cores", COUNT, "CPUs this process may use", _both("host_memory"),
             "sched_getaffinity", ESTIMATE),
    CostTerm("host_mem_bytes", "B", BYTES, "usable host memory for weights and KV", _both("host_memory"),
             "/proc/meminfo MemAvailable minus a stated margin", ESTIMATE),
    CostTerm("pinned_mem_bytes", "B", BYTES, "how much host memory may be page-locked", _both("host_memory"),
             "a share of the usable host memory", ESTIMATE),
    CostTerm("gpu_mem_bytes", "B", BYTES, "device memory the allocator really gives",
             {CUDA: "gpu_memory", CPU: "host_memory"},
             "CUDA: allocate chunks until the allocator refuses; CPU: the host memory", ESTIMATE),
    CostTerm("gpu_mem_reserve_bytes", "B", BYTES, "device memory kept free (fragmentation, workspaces)",
             {CUDA: "gpu_memory", CPU: "host_memory"},
             "allocator fragmentation and workspace seen during the probes + the chunk granularity", ESTIMATE),
    CostTerm("gpu_matmul_flops_per_s", "flop/s", CURVE, "achieved matmul rate over the token count",
             _both("matmul"), "2 * tokens * hidden * ffn / median time of F.linear at the reference FFN shape",
             NULL, "matmul flops/s by tokens"),
    CostTerm("gpu_mem_bandwidth_bytes_per_s", "B/s", RATE, "device memory bandwidth", _both("mem_bandwidth"),
             "(read + write bytes) / time of a large device copy", NULL, "device memory bandwidth",
             shown_unit=" B/s"),
    CostTerm("h2d_pinned_bytes_per_s", "B/s", CURVE, "host-to-device copies from pinned memory, over the size",
             {CUDA: "h2d_pinned", CPU: "memcpy"}, "bytes / median copy time per transfer size (CUDA events)", NULL,
             "h2d pinned by bytes"),
    CostTerm("h2d_pageable_bytes_per_s", "B/s", CURVE, "host-to-device copies from pageable memory",
             {CUDA: "h2d_pageable", CPU: "memcpy"}, "as h2d_pinned", NULL),
    CostTerm("d2h_pinned_bytes_per_s", "B/s", CURVE, "device-to-host copies into pinned memory",
             {CUDA: "d2h_pinned", CPU: "memcpy"}, "as h2d_pinned", NULL, "d2h pinned by bytes"),
    CostTerm("d2h_pageable_bytes_per_s", "B/s", CURVE, "device-to-host copies into pageable memory",
             {CUDA: "d2h_pageable", CPU: "memcpy"}, "as h2d_pinned", NULL),
    CostTerm("cpu_attn_kv_read_bytes_per_s", "B/s", RATE, "host attention: rate of reading the KV cache",
             _both("cpu_attention"), "fit.fit_attention: nonnegative relative least squares over the attention grid",
             NULL, "cpu attention", "KV read", shown_unit=" B/s"),
    CostTerm("cpu_attn_flops_per_s", "flop/s", RATE, "host attention: arithmetic rate (q.K, p.V)",
             _both("cpu_attention"), "fit.fit_attention", NULL, "cpu attention", "", shown_unit=" flop/s"),
    CostTerm("cpu_attn_overhead_seconds", "s", COST, "host attention: fixed cost per call (one layer, one batch)",
             _both("cpu_attention"), "fit.fit_attention; on CPU devices refitted in the engine (engine_layers)", ZERO,
             "cpu attention", "overhead", 1e6, " us"),
    CostTerm("cpu_mem_bandwidth_bytes_per_s", "B/s", RATE, "host memory bandwidth",
             {CUDA: "host_bandwidth", CPU: "mem_bandwidth"}, "(read + write bytes) / time of a large host copy", NULL,
             "host memory bandwidth", shown_unit=" B/s"),
    CostTerm("device_op_overhead_seconds", "s", COST, "fixed cost per layer per forward on the device",
             _both("device_op_overhead"), "one decoder layer at a tiny size and one token; on CPU devices refitted "
             "in the engine (engine_layers)", ZERO, "device layer cost", "", **_US),
    CostTerm("device_expert_overhead_seconds", "s", COST, "MoE: fixed cost per expert a layer's forward invokes",
             _both("device_op_overhead"), "the layer's time with more experts invoked, per expert", ZERO,
             "device layer cost", "per expert invoked", **_US),
    CostTerm("device_op_token_seconds", "s", COST, "per token per layer per forward beyond the matmuls",
             {CPU: "engine_layers"}, "fit.fit_excess over the engine's timed pieces", ZERO, "device layer cost",
             "per token", **_US),
    CostTerm("cpu_attn_seq_overhead_seconds", "s", COST, "host attention: fixed cost per sequence in the call",
             _both("cpu_attention"), "fit.fit_attention; on CPU devices refitted in the engine", ZERO,
             "cpu attention per seq/row", "per sequence", **_US),
    CostTerm("cpu_attn_row_overhead_seconds", "s", COST, "host attention: fixed cost per query row",
             _both("cpu_attention"), "fit.fit_attention; on CPU devices refitted in the engine", ZERO,
             "cpu attention per seq/row", "per row", **_US),
    CostTerm("engine_pass_overhead_seconds", "s", COST, "the runtime's host bookkeeping per verification pass",
             _both("engine_overhead"), "least squares over the Engine on tiny random checkpoints; on CPU devices "
             "refitted in the engine", ZERO, "engine bookkeeping", "per pass", **_US),
    CostTerm("engine_seq_overhead_seconds", "s", COST, "... and per sequence in the pass", _both("engine_overhead"),
             "as engine_pass_overhead_seconds", ZERO, "engine bookkeeping", "per sequence", **_US),
    CostTerm("engine_layer_overhead_seconds", "s", COST, "... and per layer (the loop between a layer's pieces)",
             _both("engine_overhead"), "as engine_pass_overhead_seconds", ZERO, "engine bookkeeping", "per layer",
             **_US),
    CostTerm("device_logit_element_seconds", "s", COST, "per logit element produced (fp32 cast, argmax, scan)",
             {CPU: "engine_layers"}, "fit.fit_excess over the engine's timed pieces", ZERO, "logits scanned",
             "per element", 1e9, " ns"),
    CostTerm("engine_draft_round_overhead_seconds", "s", COST, "the runtime's bookkeeping per draft round",
             {CPU: "engine_layers"}, "fit.fit_excess over each run's decode time outside the forwards", ZERO,
             "draft bookkeeping", "per round", **_US),
    CostTerm("engine_draft_seq_overhead_seconds", "s", COST, "... and per sequence in the round",
             {CPU: "engine_layers"}, "as engine_draft_round_overhead_seconds", ZERO, "draft bookkeeping",
             "per sequence", **_US),
    CostTerm("engine_draft_step_overhead_seconds", "s", COST, "... and per draft step (one token for the batch)",
             {CPU: "engine_layers"}, "as engine_draft_round_overhead_seconds", ZERO, "draft bookkeeping", "per step",
             **_US),
    CostTerm("disk_read_bytes_per_s", "B/s", COST, "sequential read rate of the disk holding the checkpoint "
             "(0 = not measured)", {}, "specoffload-profile --disk DIR: bytes / time over block sizes x reader "
             "threads, the best", ZERO, "disk sequential read", "", 1e-9, " GB/s"),
    CostTerm("disk_convert_bytes_per_s", "B/s", COST, "the disk tier on a CPU-only machine: on-disk bytes per "
             "second the engine converts a staged layer to the compute dtype (0 = estimated from memory bandwidth)",
             {}, "specoffload-profile --disk DIR: the engine's own conversion (DiskLayers.take) of layers read from "
             "the target checkpoint, layer bytes / median seconds", ZERO, "disk sequential read", "converted",
             1e-9, " GB/s"),
    CostTerm("disk_read_compute_seconds_per_byte", "s", COST, "host compute time a disk-tier read in flight takes "
             "from the compute beside it, per byte read (0 = not charged)", {}, "specoffload-profile --disk DIR: a "
             "layer's compute timed alone and with the engine's reader reading a layer beside it, the median "
             "difference / layer bytes", ZERO, "disk sequential read", "of compute per byte read", 1e9, " ns"),
)

BY_NAME = {t.name: t for t in TERMS}
OPTIONAL = tuple(t.name for t in TERMS if t.optional)


def probe_figures(probe: str, device_kind: str) -> tuple[str, ...]:
    """The figures a probe measures on this kind of device (the table's order)."""
    return tuple(t.name for t in TERMS if t.probes.get(device_kind) == probe)


def summary_lines() -> list[tuple[str, tuple[CostTerm, ...]]]:
    """(line label, the terms on it) in the table's order of first appearance."""
    lines: dict[str, list[CostTerm]] = {}
    for t in TERMS:
        if t.summary:
            lines.setdefault(t.summary, []).append(t)
    return [(label, tuple(ts)) for label, ts in lines.items()]
