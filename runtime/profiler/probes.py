"""Measure this machine and build a HardwareProfile (source: measured) that the planner reads unchanged.

Every figure is measured the way the cost model consumes it (planner/costmodel.py):

=============================  ======================================================================
figure                         probe
=============================  ======================================================================
h2d/d2h_{pinned,pageable}      CUDA: ``dst.copy_(src, non_blocking=True)`` between a pinned or pageable
  _bytes_per_s (curves, x =    host tensor and a device tensor, timed with CUDA events, per transfer
  transfer bytes)              size. CPU-only: the device *is* the CPU, so one host-to-host memcpy curve
                               is measured and written to all four (the cost model ignores them there).
gpu_matmul_flops_per_s         ``F.linear(x[tokens, hidden], W[ffn, hidden])`` at the reference model's
  (curve, x = tokens)          FFN shape; 2*tokens*hidden*ffn / time. bf16 on CUDA, fp32 on the CPU
                               (what the runtime computes in there).
gpu_mem_bandwidth_bytes_per_s  a large copy on the device, (read + write bytes) / time (STREAM "copy").
cpu_mem_bandwidth_bytes_per_s  the same on host memory (on a CPU-only machine: the same measurement).
cpu_attn_kv_read_bytes_per_s,  the runtime's own attention call (:func:`attention_call`) over a grid of
cpu_attn_flops_per_s,          (batch, query tokens, context) on the CPU, then a nonnegative relative
cpu_attn_overhead_seconds      least-squares fit of overhead + kv_bytes / bw + flops / rate with the cost
                               model's byte (bf16) and FLOP accounting (fit.fit_attention).
device_op_overhead_seconds     one decoder layer's device ops (qkv, output projection, FFN) at a tiny
                               size and one token: all fixed cost, no arithmetic to speak of.
engine_*_overhead_seconds      the Engine itself on tiny random MoE checkpoints at (layers, batch)
  (pass, seq, layer)           points: the slot time outside its timed pieces.
CPU devices, in the engine     ``engine_layers``: the Engine on random weights of the reference shapes
  (engine_layers)              over a (batch, draft length) grid; fitted on top of the rates above:
                               device_op_overhead / _token / expert, cpu_attn_overhead / seq / row,
                               device_logit_element, engine_pass / seq and engine_draft_round / seq /
                               step. They replace the micro-benchmark values (kept in provenance).
gpu_mem_bytes,                 CUDA: allocate chunks until the allocator refuses, then free; reserve =
gpu_mem_reserve_bytes          allocator fragmentation and workspace seen during the probes + the chunk
                               granularity. CPU-only: MemAvailable, and a stated margin.
host_mem_bytes, pinned, cores  /proc/meminfo MemAvailable minus a stated margin; CPUs this process may use.
=============================  ======================================================================

Each timing: warm-up calls, then `reps` samples, each averaging enough calls to last at least
`min_sample_s` (synchronised on CUDA); the figure uses the median, and the spread (IQR / median)
goes into provenance with the shapes. A probe that raises is reported (a warning naming it and the
reason), its figures are written as null and listed in `missing`; figures the schema requires get a
fallback that provenance names.
"""
from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import platform
import re
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from specoffload.planner.models import ModelSpec, load_model_spec
from specoffload.planner.schema import OPTIONAL_FIGURES, Curve, HardwareProfile

from .fit import AttentionFit, AttentionPoint, Stats, curve_points, fit_attention, fit_excess, nnls, sig

GiB, MiB, KiB = 2**30, 2**20, 2**10
FORCE_FAIL_ENV = "SPECOFFLOAD_PROFILE_FAIL"  # comma-separated probe names: a test hook
WARMUP_MAX_S = 0.25  # warm-up of one measurement stops after this long (one call at least)


class ProbeFailure(RuntimeError):
    """A probe could not produce its figures (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how hard. `quick()`, `full()` and `tiny()` (tests) are the presets."""

    mode: str
    reps: int  # samples per measurement
    warmup: int  # calls before timing
    min_sample_s: float  # each sample averages calls until it lasts this long
    transfer_sizes: tuple[int, ...]  # bytes
    bandwidth_bytes: int  # buffer size of the memory-bandwidth copy
    matmul_tokens: tuple[int, ...]
    attn_batches: tuple[int, ...]
    attn_queries: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    attn_max_kv_tokens: int  # grid points with batch * context above this are skipped
    attn_rotate_bytes: int = 256 * MiB  # KV pool the attention calls rotate over (defeats the CPU caches)
    cpu_matmul_max_tokens: int = 1024  # on the CPU the rate plateaus long before; bigger GEMMs take seconds
    model: ModelSpec | None = None  # reference shapes (matmul: FFN; attention: heads); None: mixtral-8x7b
    op_overhead_shape: tuple[int, int, int, int, int] = (64, 4, 2, 16, 128)  # dim, heads, kv heads, Dh, ffn
    force_fail: frozenset[str] = frozenset()  # test hook: these probes raise ProbeFailure
    # The in-engine run (CPU device): the runtime's Engine on random weights of the reference shapes.
    engine_batches: tuple[int, ...] = (1, 4, 16, 64)
    engine_draft_lens: tuple[int, ...] = (0, 1, 3)  # 0: one token per row; k: k + 1 (a draft of one layer proposes)
    engine_prompt_len: int = 16
    engine_gen_len: int = 24
    engine_reps: int = 2  # timed runs of each (batch, draft length), after one warm-up run
    engine_max_bytes: int = 512 * MiB  # fp32 weights of the reference layers run; fewer layers, then narrower, if over
    engine_overhead_reps: int = 0  # engine runs per point of the engine_overhead probe (0: max(3, reps))
    cpu_mem_margin_fraction: float = 0.05  # host memory kept free: this fraction of MemTotal ...
    cpu_mem_margin_min_bytes: int = GiB  # ... but at least this
    pinned_fraction: float = 0.9  # CUDA: share of usable host memory the planner may page-lock
    gpu_alloc_chunk_bytes: int = GiB  # CUDA memory probe: first chunk size, halved down to ...
    gpu_alloc_min_chunk_bytes: int = 64 * MiB  # ... this granularity

    @classmethod
    def quick(cls, **kw) -> "ProfileConfig":
        base = dict(mode="quick", reps=11, warmup=2, min_sample_s=0.005,
                    transfer_sizes=(64 * KiB, MiB, 16 * MiB, 128 * MiB), bandwidth_bytes=256 * MiB,
                    matmul_tokens=(1, 4, 16, 64, 256), attn_batches=(1, 4, 16, 64), attn_queries=(1, 5, 9),
                    attn_contexts=(16, 64, 512, 2048), attn_max_kv_tokens=16 * 2048, attn_rotate_bytes=256 * MiB,
                    # in-engine fit: 9 timed runs of a reference layer scaled to 128 MiB (seconds, not minutes)
                    engine_batches=(1, 4, 16), engine_draft_lens=(0, 1, 3), engine_reps=1, engine_gen_len=16,
                    engine_max_bytes=128 * MiB, engine_overhead_reps=3)
        base.update(kw)
        return cls(**base)

    @classmethod
    def full(cls, **kw) -> "ProfileConfig":
        base = dict(mode="full", reps=11, warmup=3, min_sample_s=0.005,
                    transfer_sizes=(4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB,
                                    256 * MiB, GiB),
                    bandwidth_bytes=GiB,
                    matmul_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                    attn_batches=(1, 2, 4, 8, 16, 32, 64), attn_queries=(1, 2, 5, 9),
                    attn_contexts=(16, 64, 256, 1024, 2048, 4096), attn_max_kv_tokens=64 * 1024,
                    attn_rotate_bytes=GiB, engine_batches=(1, 4, 16, 64, 128), engine_draft_lens=(0, 1, 3))
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> "ProfileConfig":
        """Tests: every probe runs, on sizes that take milliseconds (figures are not meaningful)."""
        spec = ModelSpec(name="profile-test", family="mistral", num_layers=2, hidden_size=64, num_heads=4,
                         num_kv_heads=2, head_dim=16, intermediate_size=128, num_experts=0, experts_per_token=0,
                         vocab_size=128, tie_word_embeddings=False, max_position_embeddings=512)
        base = dict(mode="test", reps=3, warmup=1, min_sample_s=0.0005,
                    transfer_sizes=(4 * KiB, 64 * KiB), bandwidth_bytes=MiB, matmul_tokens=(1, 8),
                    attn_batches=(1, 4), attn_queries=(1, 5), attn_contexts=(16, 64), attn_max_kv_tokens=256,
                    attn_rotate_bytes=MiB, engine_batches=(1, 2, 4), engine_draft_lens=(0, 1, 2), engine_reps=1,
                    engine_prompt_len=8, engine_gen_len=6, model=spec)
        base.update(kw)
        return cls(**base)

    @property
    def spec(self) -> ModelSpec:
        return self.model if self.model is not None else load_model_spec("mixtral-8x7b")


def forced_failures(cfg: ProfileConfig) -> frozenset[str]:
    env = {p.strip() for p in os.environ.get(FORCE_FAIL_ENV, "").split(",") if p.strip()}
    return frozenset(cfg.force_fail) | env


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

class Clock:
    """Times `inner` back-to-back calls of a function: wall clock on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, fn: Callable[[], Any], inner: int) -> float:
        """Seconds per call, averaged over `inner` calls."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


COLD_BYTES = 64 * MiB  # weights rotated over per CPU probe: more than a last-level cache holds


def cold_copies(make: Callable[[int], Any], nbytes_each: float, device: torch.device) -> itertools.cycle:
    """Copies of some weights to cycle through, so that each call finds its weights out of the CPU's
    caches, as a layer does in the runtime (it runs every other layer's weights in between). On a
    GPU (or for weights larger than the caches) one copy."""
    n = 1 if device.type == "cuda" else max(1, min(256, math.ceil(COLD_BYTES / max(nbytes_each, 1.0))))
    return itertools.cycle([make(i) for i in range(n)])


def _clone_layer(lw):
    """An independent copy of a LayerWeights (its own memory)."""
    from specoffload.runtime.layers import LayerWeights

    def clone(d):
        return {k: t.clone() for k, t in d.items()}

    return LayerWeights(clone(lw.attn), clone(lw.ffn), [clone(e) for e in lw.experts])


def measure(fn: Callable[[], Any], clock: Clock, cfg: ProfileConfig, max_inner: int = 10_000) -> Stats:
    """Warm up, calibrate the calls per sample, then `cfg.reps` samples: median and spread."""
    return measure_many([fn], clock, cfg, max_inner=max_inner)[0]


def measure_many(fns: list[Callable[[], Any]], clock: Clock, cfg: ProfileConfig, tick: Callable[[], None] | None = None,
                 max_inner: int = 10_000) -> list[Stats]:
    """Measure the points of one curve or grid together: warm up and calibrate each, then take the
    samples in rounds (one sample of every point per round), so a burst of load from elsewhere
    spreads over all points instead of skewing a few. tick: called once per point calibrated and
    once per round (len(fns) + cfg.reps calls)."""
    inner = []
    for fn in fns:
        t_end = time.perf_counter() + WARMUP_MAX_S
        for _ in range(max(1, cfg.warmup)):  # warm-up calls, but no more than WARMUP_MAX_S of them
            fn()
            if time.perf_counter() > t_end:
                break
        clock.sync()
        one = clock.time(fn, 1)
        inner.append(max(1, min(max_inner, math.ceil(cfg.min_sample_s / max(one, 1e-9)))))
        if tick:
            tick()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, cfg.reps)):
        for i, fn in enumerate(fns):
            samples[i].append(clock.time(fn, inner[i]))
        if tick:
            tick()
    return [Stats.of(xs, n) for xs, n in zip(samples, inner)]


# ----------------------------------------------------------------------------------------------
# The runtime's CPU attention: the one place the profiler calls it
# ----------------------------------------------------------------------------------------------

def attention_call(cache, layer, slots, q, k_new, v_new):
    """One layer's decode/verify attention exactly as the engine runs it on the host: write the new
    keys/values into the KV cache, then attend the queries over each slot's history
    (``KVCache.attend`` -> ``layers.attention``). Change this when the engine's call changes."""
    return cache.attend(layer, slots, q, k_new, v_new)


def attention_workload(spec: ModelSpec, batch: int, query: int, context: int) -> tuple[float, float]:
    """(kv_bytes, flops) of one call in the cost model's accounting (bf16 KV, 4*q*ctx*q_dim FLOPs)."""
    return (batch * context * spec.kv_bytes_per_token_per_layer, batch * spec.attention_flops(query, context))


# ----------------------------------------------------------------------------------------------
# Machine facts
# ----------------------------------------------------------------------------------------------

def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (empty where there is none)."""
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[name] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def host_memory() -> tuple[int, int, str]:
    """(available bytes, total bytes, how it was read)."""
    info = meminfo()
    if "MemAvailable" in info and "MemTotal" in info:
        return info["MemAvailable"], info["MemTotal"], "/proc/meminfo MemAvailable"
    page = os.sysconf("SC_PAGE_SIZE")
    return (os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page,
            "os.sysconf(SC_AVPHYS_PAGES) (free pages; no /proc/meminfo)")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _llc_text() -> str:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as fh:
            return fh.read().strip() + " as reported"
    except OSError:
        return "size unknown"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def host_tag() -> str:
    """A short file-name-safe form of the host name."""
    tag = re.sub(r"[^a-z0-9]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return tag[:20] or "host"


def default_name(device_kind: str) -> str:
    if device_kind == "cuda":
        gpu = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower().replace("nvidia", "")).strip("-")
        return f"{gpu[:24]}-{host_tag()}"
    return f"cpu-{cpu_cores()}c-{host_tag()}"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeFailure("--device cuda asked for, but CUDA is not available")
    if dev.type not in ("cuda", "cpu"):
        raise ProbeFailure(f"device {device!r}: only cpu and cuda are profiled")
    return dev


# ----------------------------------------------------------------------------------------------
# The profiler
# ----------------------------------------------------------------------------------------------

@dataclass
class Probe:
    name: str
    figures: tuple[str, ...]  # profile fields it sets
    steps: int  # progress-bar ticks
    run: Callable[[], dict[str, Any]]
    fallback: Callable[[str], dict[str, Any]] | None = None  # for figures the schema requires


@dataclass
class ProfileResult:
    profile: HardwareProfile
    warnings: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # probe -> reason
    attention_fit: AttentionFit | None = None
    seconds: float = 0.0


def _points_json(rows: Iterable[Iterable[float]]) -> str:
    return json.dumps([[sig(v, 4) if isinstance(v, float) else v for v in row] for row in rows],
                      separators=(",", ":"))


def engine_probe_shapes(spec: ModelSpec, vocab: int, budget_bytes: float) -> tuple[ModelSpec, int]:
    """The reference shapes the engine_layers probe runs, and the factor its widths were divided by.

    The spec itself when one fp32 layer and the embedding/head fit the budget; otherwise hidden size,
    heads (head_dim kept), KV heads and FFN width divided by the smallest power of two that fits (expert
    count and top-k kept), so a CPU-only machine runs the probe on the same kind of model, smaller.
    """
    import dataclasses

    scale = 1
    while True:
        heads = max(1, spec.num_heads // scale)
        kv = max(1, min(heads, spec.num_kv_heads // scale))
        while heads % kv:
            kv -= 1
        cand = spec if scale == 1 else dataclasses.replace(
            spec, hidden_size=max(spec.hidden_size // scale, 64), num_heads=heads, num_kv_heads=kv,
            intermediate_size=max(spec.intermediate_size // scale, 64))
        if 4.0 * (cand.layer_params + 2 * vocab * cand.hidden_size) <= budget_bytes or scale >= 256:
            return cand, scale
        scale *= 2


class Profiler:
    """Runs the probes for one device and assembles the profile."""

    def __init__(self, cfg: ProfileConfig, device: str | torch.device = "auto", name: str | None = None,
                 progress: bool = True, warn: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.kind = self.device.type
        self.cuda = self.kind == "cuda"
        self.clock = Clock(self.device)
        self.cpu_clock = Clock(torch.device("cpu"))
        self.spec = cfg.spec
        self.name = name or default_name(self.kind)
        self.progress = progress
        self._warn = warn or self._print_warning
        self.fail = forced_failures(cfg)
        self.prov: dict[str, str] = {}
        self.fig: dict[str, Any] = {}
        self.attention_fit: AttentionFit | None = None
        self._bar = None
        self._gpu_overhead_seen = 0  # CUDA: allocator fragmentation / workspace seen during probes
        self.avail_bytes = 0
        self.load_before: float | None = None
        self.load_after: float | None = None

    # --- plumbing -----------------------------------------------------------------------------
    def _print_warning(self, msg: str) -> None:
        line = f"specoffload-profile: warning: {msg}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr)

    def tick(self, what: str = "") -> None:
        if self._bar is not None:
            if what:
                self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)

    def measure(self, fn: Callable[[], Any], clock: Clock | None = None) -> Stats:
        return measure(fn, clock or self.clock, self.cfg)

    def _check_forced(self, probe: str) -> None:
        if probe in self.fail:
            raise ProbeFailure(f"forced to fail (test hook: {FORCE_FAIL_ENV} / force_fail)")

    def _fits(self, nbytes: float) -> bool:
        return self.avail_bytes <= 0 or nbytes <= self.avail_bytes / 4

    # --- probes -------------------------------------------------------------------------------
    def probe_host_memory(self) -> dict[str, Any]:
        self._check_forced("host_memory")
        avail, total, how = host_memory()
        if avail <= 0 or total <= 0:
            raise ProbeFailure(f"{how} reported {avail} bytes available of {total}")
        self.avail_bytes = avail
        margin = max(self.cfg.cpu_mem_margin_min_bytes, int(self.cfg.cpu_mem_margin_fraction * total))
        margin = min(margin, avail // 2)
        usable = avail - margin
        out = {"host_mem_bytes": float(usable), "cpu_cores": cpu_cores(), "cpu_name": cpu_name()}
        self.prov["host_mem_bytes"] = (
            f"{how} = {avail / GiB:.2f} GiB at profiling time (MemTotal {total / GiB:.2f} GiB) minus a stated "
            f"margin of max({self.cfg.cpu_mem_margin_min_bytes / GiB:g} GiB, "
            f"{self.cfg.cpu_mem_margin_fraction:.0%} of MemTotal) = {margin / GiB:.2f} GiB for the OS and other "
            "processes")
        self.prov["cpu_cores"] = "CPUs this process may run on (os.sched_getaffinity; logical CPUs)"
        if self.cuda:
            out["pinned_mem_bytes"] = float(self.cfg.pinned_fraction * usable)
            self.prov["pinned_mem_bytes"] = (f"stated: {self.cfg.pinned_fraction:.0%} of host_mem_bytes (page-locking "
                                             "is bounded by physical memory; the rest stays pageable for the OS)")
        else:
            out["pinned_mem_bytes"] = float(usable)
            out["gpu_mem_bytes"] = float(avail)
            out["gpu_mem_reserve_bytes"] = float(margin)
            self.prov["pinned_mem_bytes"] = "cpu-only: no page-locking; equal to host_mem_bytes"
            self.prov["gpu_mem_bytes"] = ("cpu-only: the device is the CPU; its memory is the host's MemAvailable "
                                          "(the cost model then plans against host_mem_bytes only)")
            self.prov["gpu_mem_reserve_bytes"] = "cpu-only: the stated host margin above (not measured)"
        self.tick("host memory")
        return out

    def fallback_host_memory(self, reason: str) -> dict[str, Any]:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        usable = 0.5 * total
        self.prov["host_mem_bytes"] = f"fallback after probe failure ({reason}): half of physical memory"
        out = {"host_mem_bytes": float(usable), "pinned_mem_bytes": float(0.5 * usable), "cpu_cores": cpu_cores(),
               "cpu_name": cpu_name()}
        if not self.cuda:
            out.update(gpu_mem_bytes=float(usable), gpu_mem_reserve_bytes=float(0.05 * usable))
        return out

    def _transfer_curve(self, probe: str, make: Callable[[int], Callable[[], Any]]) -> tuple[Curve, str]:
        self._check_forced(probe)
        sizes, skipped, total = [], [], 0
        for size in sorted(self.cfg.transfer_sizes):
            if self._fits(total + 2 * size):
                sizes.append(size)
                total += 2 * size
            else:
                skipped.append(size)
        if not sizes:
            raise ProbeFailure(f"no transfer size fits in available memory ({self.avail_bytes / GiB:.1f} GiB)")
        fns = [make(size) for size in sizes]
        stats = measure_many(fns, self.clock, self.cfg, tick=lambda: self.tick(probe))
        del fns
        rows = [(size, size / st.median, st.spread) for size, st in zip(sizes, stats)]
        note = f"; sizes skipped (over 1/4 of available memory): {skipped}" if skipped else ""
        return Curve(curve_points([(x, y) for x, y, _ in rows])), _points_json(rows) + note

    def probe_memcpy(self) -> dict[str, Any]:
        """CPU-only: host-to-host copy rate over size, written to all four transfer curves."""
        def make(size):
            src = torch.ones(size, dtype=torch.uint8)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)

        curve, data = self._transfer_curve("memcpy", make)
        self.prov["transfers"] = ("cpu-only: the device is the CPU, so host<->device transfers are host memcpy "
                                  "(torch copy_ between two uint8 host tensors, transfer bytes / time); one curve "
                                  "measured and written to h2d/d2h pinned/pageable alike (the cost model does not "
                                  "charge transfers on a CPU-only machine)")
        self.prov["data.memcpy"] = "[bytes, bytes_per_s, spread]: " + data
        return {f: curve for f in ("h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s",
                                   "d2h_pinned_bytes_per_s", "d2h_pageable_bytes_per_s")}

    def probe_transfer(self, direction: str, pinned: bool) -> dict[str, Any]:
        """CUDA: one direction and host memory kind, over transfer size."""
        figure = f"{direction}_{'pinned' if pinned else 'pageable'}_bytes_per_s"
        probe = figure.replace("_bytes_per_s", "")
        dev = self.device

        def make(size):
            host = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
            gpu = torch.empty(size, dtype=torch.uint8, device=dev)
            if direction == "h2d":
                return lambda: gpu.copy_(host, non_blocking=True)
            return lambda: host.copy_(gpu, non_blocking=True)

        curve, data = self._transfer_curve(probe, make)
        self.prov[f"data.{probe}"] = "[bytes, bytes_per_s, spread]: " + data
        return {figure: curve}

    def _copy_bandwidth(self, probe: str, device: torch.device, clock: Clock) -> tuple[float, Stats, int]:
        self._check_forced(probe)
        size = self.cfg.bandwidth_bytes
        if device.type == "cpu":
            while size > MiB and not self._fits(2 * size):
                size //= 2
        src = torch.ones(size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        st = measure(lambda: dst.copy_(src), clock, self.cfg)
        del src, dst
        return 2 * size / st.median, st, size

    def probe_bandwidth(self) -> dict[str, Any]:
        """Device memory bandwidth (and, CPU-only, host memory bandwidth: the same memory)."""
        rate, st, size = self._copy_bandwidth("mem_bandwidth", self.device, self.clock)
        self.tick("memory bandwidth")
        how = (f"STREAM-style copy of a {size / MiB:.0f} MiB buffer on the {self.kind}: (read + write bytes) / "
               f"time; median {st.median * 1e3:.3g} ms, spread {st.spread:.3f}")
        if self.cuda:
            self.prov["gpu_mem_bandwidth_bytes_per_s"] = how
            return {"gpu_mem_bandwidth_bytes_per_s": rate}
        self.prov["gpu_mem_bandwidth_bytes_per_s"] = how + ("; cpu-only: device and host memory are one, "
                                                            "cpu_mem_bandwidth_bytes_per_s is this same measurement. "
                                                            "Raw bytes: the CPU runtime holds fp32 weights, twice the "
                                                            "bf16 bytes the cost model counts")
        return {"gpu_mem_bandwidth_bytes_per_s": rate, "cpu_mem_bandwidth_bytes_per_s": rate}

    def probe_host_bandwidth(self) -> dict[str, Any]:
        rate, st, size = self._copy_bandwidth("host_bandwidth", torch.device("cpu"), self.cpu_clock)
        self.tick("host bandwidth")
        self.prov["cpu_mem_bandwidth_bytes_per_s"] = (
            f"STREAM-style copy of a {size / MiB:.0f} MiB host buffer: (read + write bytes) / time; "
            f"median {st.median * 1e3:.3g} ms, spread {st.spread:.3f}")
        return {"cpu_mem_bandwidth_bytes_per_s": rate}

    def probe_matmul(self) -> dict[str, Any]:
        self._check_forced("matmul")
        spec = self.spec
        d, f = spec.hidden_size, spec.intermediate_size
        dtype = torch.bfloat16 if self.cuda else torch.float32
        g = torch.Generator(device="cpu").manual_seed(0)
        w0 = (torch.randn(f, d, generator=g) * d ** -0.5).to(self.device, dtype)
        ws = cold_copies(lambda i: w0 if i == 0 else w0.clone(), w0.nbytes, self.device)
        if self.cuda:  # what the allocator caches beyond live tensors while GEMMs run: part of the reserve
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        tokens = [n for n in self.cfg.matmul_tokens if self.cuda or n <= self.cfg.cpu_matmul_max_tokens]
        xs = [torch.randn(n, d, generator=g).to(self.device, dtype) for n in tokens]
        stats = measure_many([(lambda x=x: F.linear(x, next(ws))) for x in xs], self.clock, self.cfg,
                             tick=lambda: self.tick("matmul"))
        rows = [(n, 2.0 * n * d * f / st.median, st.spread) for n, st in zip(tokens, stats)]
        pts = [(n, r) for n, r, _ in rows]
        if self.cuda:
            self._gpu_overhead_seen = max(self._gpu_overhead_seen, torch.cuda.max_memory_reserved(self.device)
                                          - torch.cuda.max_memory_allocated(self.device))
        del w0, ws
        self.prov["gpu_matmul_flops_per_s"] = (
            f"achieved rate of F.linear(x[tokens, {d}], W[{f}, {d}]) ({spec.name} FFN shape"
            f"{'' if self.cuda else ', weights rotated over copies so each call reads them from memory'}) in "
            f"{'bf16' if self.cuda else 'fp32 (what the runtime computes in on the CPU)'}: 2*tokens*{d}*{f} / "
            "median time; at few tokens this is memory-bound and includes the weight read")
        self.prov["data.matmul"] = "[tokens, flops_per_s, spread]: " + _points_json(rows)
        return {"gpu_matmul_flops_per_s": Curve(curve_points(pts))}

    def attention_grid(self) -> list[tuple[int, int, int]]:
        c = self.cfg
        return [(b, q, ctx) for b in c.attn_batches for q in c.attn_queries for ctx in c.attn_contexts
                if b * ctx <= c.attn_max_kv_tokens and q <= ctx]

    def probe_cpu_attention(self) -> dict[str, Any]:
        from specoffload.runtime.kv_cache import KVCache

        self._check_forced("cpu_attention")
        spec = self.spec
        H, Hkv, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
        g = torch.Generator().manual_seed(0)
        grid = self.attention_grid()
        if not grid:
            raise ProbeFailure("the attention grid is empty (check attn_* sizes)")
        # Cold caches, as in the engine (each call reads a different layer's KV, far more than the CPU caches
        # hold): every point's cache is carved out of one pool of at least attn_rotate_bytes, and successive
        # calls of a point rotate over as many layers as fit in it. All points are measured together.
        largest = max(b * Hkv * ctx * Dh for b, _, ctx in grid)  # fp32 elements of K (and of V) of one layer
        pool_bytes = self.cfg.attn_rotate_bytes
        while pool_bytes > MiB and not self._fits(pool_bytes):
            pool_bytes //= 2
        half = max(pool_bytes // 8, largest)
        if not self._fits(8 * half):
            raise ProbeFailure(f"the largest attention point needs {8 * half / GiB:.2f} GiB of KV; only "
                               f"{self.avail_bytes / GiB:.2f} GiB available")
        pool_k = torch.full((half,), 0.01, dtype=torch.float32)
        pool_v = torch.full((half,), 0.01, dtype=torch.float32)
        fns, layers_used = [], []
        for batch, q_len, ctx in grid:
            shape = (batch, Hkv, ctx, Dh)
            per_layer = batch * Hkv * ctx * Dh
            n_layers = max(1, half // per_layer)
            cache = KVCache(0, batch, ctx, Hkv, Dh, dtype=torch.float32, device="cpu")
            cache.k = [pool_k[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(n_layers)]
            cache.v = [pool_v[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(n_layers)]
            cache.lengths[:] = ctx - q_len  # the new tokens bring each sequence to `ctx` keys
            q = torch.randn(batch, q_len, H, Dh, generator=g)
            k_new = torch.randn(batch, q_len, Hkv, Dh, generator=g)
            v_new = torch.randn(batch, q_len, Hkv, Dh, generator=g)
            layer = itertools.cycle(range(n_layers))
            fns.append(lambda c=cache, it=layer, s=list(range(batch)), q=q, k=k_new, v=v_new:
                       attention_call(c, next(it), s, q, k, v))
            layers_used.append(n_layers)
        stats = measure_many(fns, self.cpu_clock, self.cfg, tick=lambda: self.tick("attention"))
        del fns, pool_k, pool_v
        points = []
        for (batch, q_len, ctx), st in zip(grid, stats):
            kv_bytes, flops = attention_workload(spec, batch, q_len, ctx)
            points.append(AttentionPoint(batch, q_len, ctx, kv_bytes, flops, st.median, st.spread))
        fit = fit_attention(points)
        self.attention_fit = fit
        self.prov["cpu_attention"] = (
            f"the runtime's attention (KVCache.attend -> layers.attention, fp32 host KV cache, {H} query / {Hkv} kv "
            f"heads x {Dh}, {spec.name}) timed over {len(points)} (batch, query, context) points, cold: successive "
            f"calls rotate over the layers of a {8 * half // MiB} MiB KV pool (1 to {max(layers_used)} layers per "
            f"point; CPU last-level cache {_llc_text()}); fitted "
            "time = overhead + batch*(seq_overhead + query*row_overhead) + "
            "batch*context*kv_bytes_per_token_per_layer / kv_read_bytes_per_s + "
            "batch*attention_flops(query, context) / flops_per_s by nonnegative least squares on relative "
            "error, KV bytes in the cost model's bf16 accounting (2 bytes/element; the runtime stores fp32) and "
            "4*query*context*q_dim FLOPs")
        self.prov["fit.cpu_attention"] = json.dumps({
            "overhead_seconds": sig(fit.overhead_seconds), "kv_read_bytes_per_s": sig(fit.kv_read_bytes_per_s),
            "flops_per_s": sig(fit.flops_per_s), "seq_seconds": sig(fit.seq_seconds), "row_seconds": sig(fit.row_seconds),
            "rel_rms_residual": sig(fit.rel_rms_residual, 3),
            "rel_max_residual": sig(fit.rel_max_residual, 3), "bounded": list(fit.bounded)}, separators=(",", ":"))
        self.prov["data.cpu_attention"] = "[batch, query, context, seconds, spread, fit_rel_residual]: " + _points_json(
            (p.batch, p.query, p.context, p.seconds, p.spread, r) for p, r in zip(points, fit.residuals))
        out = {"cpu_attn_kv_read_bytes_per_s": sig(fit.kv_read_bytes_per_s),
               "cpu_attn_flops_per_s": sig(fit.flops_per_s),
               "cpu_attn_overhead_seconds": sig(fit.overhead_seconds),
               "cpu_attn_seq_overhead_seconds": sig(fit.seq_seconds),
               "cpu_attn_row_overhead_seconds": sig(fit.row_seconds)}
        for b in fit.bounded:
            self._warn(f"cpu_attention: the fit could not see {b} (its term fitted to zero); written as the bound "
                       "at which it stays under 1% of every measured time")
        return out

    def fallback_cpu_attention(self, reason: str) -> dict[str, Any]:
        self.prov["cpu_attn_overhead_seconds"] = f"0: the cpu_attention probe failed ({reason})"
        return {"cpu_attn_overhead_seconds": 0.0}

    def probe_op_overhead(self) -> dict[str, Any]:
        from specoffload.runtime.config import ModelArgs
        from specoffload.runtime.layers import attn_out, ffn, init_random_weights, qkv, rope_cos_sin, rope_inv_freq

        self._check_forced("device_op_overhead")
        dim, heads, kv_heads, dh, ffn_dim = self.cfg.op_overhead_shape
        args = ModelArgs(family="mistral", vocab_size=32, dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=dh, ffn_dim=ffn_dim, norm_eps=1e-5, rope_theta=10000.0)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        one = init_random_weights(args, seed=0).layers[0].to(self.device, dtype)
        layer_bytes = sum(t.nbytes for d in (one.attn, one.ffn) for t in d.values())
        layers = cold_copies(lambda i: one if i == 0 else _clone_layer(one), layer_bytes, self.device)
        x = torch.randn(1, 1, dim).to(self.device, dtype)
        cos_sin = rope_cos_sin(rope_inv_freq(args, self.device), torch.zeros(1, 1, dtype=torch.long), dtype)

        def front():
            return qkv(args, next(layers).attn, x, cos_sin)

        q = front()[0]

        def back():
            lw = next(layers)
            h = x + attn_out(lw.attn, q)
            return h + ffn(args, lw.ffn, h)

        st_front = self.measure(front)
        st_back = self.measure(back)
        st_all = self.measure(lambda: (front(), back()))
        # MoE: a fixed cost per expert a forward invokes (gather, three projections, scatter-add): time the
        # runtime's own MoE FFN at a tiny size with 2 experts used (1 token) and with all 8 used.
        margs = ModelArgs(family="mixtral", vocab_size=32, dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                          head_dim=dh, ffn_dim=ffn_dim, norm_eps=1e-5, rope_theta=10000.0, n_experts=8, top_k=2)
        mw = init_random_weights(margs, seed=0).layers[0].to(self.device, dtype)
        moe_bytes = sum(t.nbytes for d in [mw.ffn, *mw.experts] for t in d.values())
        moes = cold_copies(lambda i: mw if i == 0 else _clone_layer(mw), moe_bytes, self.device)
        x_all = torch.randn(1, 64, dim).to(self.device, dtype)  # 64 tokens: every expert is routed some

        def moe(xx):
            m = next(moes)
            return ffn(margs, m.ffn, xx, m.experts)

        st_two = self.measure(lambda: moe(x))
        st_eight = self.measure(lambda: moe(x_all))
        per_expert = max(0.0, (st_eight.median - st_two.median) / 6)
        self.tick("op overhead")
        self.prov["device_expert_overhead_seconds"] = (
            f"the runtime's MoE FFN at a tiny size (dim {dim}, expert FFN {ffn_dim}, 8 experts top-2): 1 token "
            f"(2 experts) {st_two.median * 1e6:.1f} us, 64 tokens (8 experts) {st_eight.median * 1e6:.1f} us; "
            f"per extra expert (difference / 6)")
        self.prov["device_op_overhead_seconds"] = (
            f"one decoder layer's device ops (norm, q/k/v projections, RoPE | output projection, norm, SwiGLU FFN) "
            f"on the {self.kind} at a tiny size (dim {dim}, {heads}/{kv_heads} heads x {dh}, FFN {ffn_dim}, 1 token, "
            f"{'bf16' if self.cuda else 'fp32'}), where the time is all fixed cost: per layer per forward "
            f"{st_all.median * 1e6:.1f} us (spread {st_all.spread:.3f}); of which qkv half "
            f"{st_front.median * 1e6:.1f} us, output+FFN half {st_back.median * 1e6:.1f} us")
        return {"device_op_overhead_seconds": sig(st_all.median), "device_expert_overhead_seconds": sig(per_expert)}

    def fallback_op_overhead(self, reason: str) -> dict[str, Any]:
        self.prov["device_op_overhead_seconds"] = f"0: the device_op_overhead probe failed ({reason})"
        return {"device_op_overhead_seconds": 0.0, "device_expert_overhead_seconds": 0.0}

    def probe_engine_overhead(self) -> dict[str, Any]:
        """The engine's own bookkeeping per verification pass and per sequence (Python work between
        the timed pieces: building inputs, verifying, rolling caches back, committing tokens): run the
        runtime's Engine on a tiny random MoE checkpoint at a few batch sizes and fit
        (slot time - time inside the timed pieces) = pass + batch * per_sequence."""
        import tempfile
        from pathlib import Path

        from specoffload.planner.schema import Workload

        from specoffload.runtime.engine import Engine, Request
        from specoffload.runtime.random_checkpoint import write_random_checkpoint

        self._check_forced("engine_overhead")
        dim, heads, kv_heads, dh, ffn_dim = self.cfg.op_overhead_shape
        points, rows = [(1, 4), (1, 64), (6, 4), (6, 64)], []  # (layers, batch): a wide lever on each
        for n_layers, b in points:
            config = {"architectures": ["MixtralForCausalLM"], "hidden_size": dim, "intermediate_size": ffn_dim,
                      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": dh,
                      "num_hidden_layers": n_layers, "num_local_experts": 8, "num_experts_per_tok": 2,
                      "vocab_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                      "rope_theta": 10000.0, "eos_token_id": None, "hidden_act": "silu"}
            with tempfile.TemporaryDirectory() as tmp:
                write_random_checkpoint(Path(tmp), config, 0, torch.device("cpu"))
                plan = probe_plan(Workload(prompt_len_tokens=4, gen_len_tokens=17, num_prompts=b), b, n_layers)
                samples = []
                for _ in range(self.cfg.engine_overhead_reps or max(3, self.cfg.reps)):
                    eng = Engine(plan, tmp, device=self.device, trace=True)
                    eng.run([Request(str(i), [1, 2, 3, 4], 17) for i in range(b)], lambda f: None)
                    t0 = eng.timeline.t0
                    for start, end in eng.stats.slot_windows[2:]:  # skip the first slots (warm-up)
                        inside = sum(e - s_ for _, _, s_, e in eng.timeline.spans
                                     if s_ >= start - t0 and e <= end - t0)
                        samples.append((end - start) - inside)
                self.tick("engine overhead")
                rows.append((n_layers, b, sorted(samples)[len(samples) // 2]))
        ls, bs, ts = (np.array([r[i] for r in rows], dtype=float) for i in range(3))
        coef, _ = nnls(np.stack([np.ones_like(bs), bs, ls], axis=1), ts)
        self.prov["engine_overhead"] = (
            f"the engine's bookkeeping outside its timed pieces, per verification pass, on random MoE models "
            f"(dim {dim}) at (layers, batch) {', '.join(f'({l:.0f}, {b:.0f})' for l, b in zip(ls, bs))}: median "
            f"{', '.join(f'{t * 1e3:.3f} ms' for t in ts)}; fitted pass {coef[0] * 1e6:.1f} us + "
            f"{coef[1] * 1e6:.2f} us per sequence + {coef[2] * 1e6:.1f} us per layer")
        return {"engine_pass_overhead_seconds": sig(float(coef[0])), "engine_seq_overhead_seconds": sig(float(coef[1])),
                "engine_layer_overhead_seconds": sig(float(coef[2]))}

    def fallback_engine_overhead(self, reason: str) -> dict[str, Any]:
        self.prov["engine_overhead"] = f"0: the engine_overhead probe failed ({reason})"
        return {"engine_pass_overhead_seconds": 0.0, "engine_seq_overhead_seconds": 0.0,
                "engine_layer_overhead_seconds": 0.0}

    def probe_engine_layers(self) -> dict[str, Any]:
        """The per-layer fixed costs as the engine pays them (CPU device only).

        Micro-benchmarks call one op in a loop, hot in the CPU's caches; the engine runs a layer's ops
        once each between other layers' ops, and pays each dispatch cold. So: run the runtime's Engine
        on random weights of the reference shapes (a one-layer dense draft of the same dimensions
        proposes for the k > 0 runs, synthetic acceptance), take each decode pass's timed pieces, and
        fit on top of what the rates measured above predict for them:
          attention per layer   = KV bytes / bandwidth + FLOPs / rate
                                  + cpu_attn_overhead + batch * (seq_overhead + query * row_overhead)
          (qkv + ffn) per layer = matmuls + device_op_overhead + tokens * device_op_token
                                  (+ experts touched * device_expert_overhead)
        the layer rows coming from the target's passes (MoE) and the draft's steps (dense, less their
        attention and logits). These replace the micro-benchmark values of those figures (kept in
        provenance).
        """
        import dataclasses
        import tempfile
        from pathlib import Path

        from specoffload.planner.costmodel import CostModel
        from specoffload.planner.schema import Workload

        from specoffload.runtime.engine import Engine, Request
        from specoffload.runtime.random_checkpoint import hf_config_for, write_random_checkpoint

        self._check_forced("engine_layers")
        if self.cuda:
            raise ProbeFailure("CPU devices only (on CUDA the engine's host spans time kernel launches, not kernels)")
        lacking = [f for f in ("gpu_matmul_flops_per_s", "gpu_mem_bandwidth_bytes_per_s", "cpu_attn_kv_read_bytes_per_s",
                               "cpu_attn_flops_per_s") if self.fig.get(f) is None]
        if lacking:
            raise ProbeFailure(f"skipped: it fits on top of {', '.join(lacking)}, whose probe failed")
        c, spec = self.cfg, self.spec
        n_runs = len(c.engine_batches) * len(c.engine_draft_lens) * c.engine_reps
        if n_runs <= 6 or not any(c.engine_draft_lens) or c.engine_reps < 1:
            raise ProbeFailure(f"{n_runs} timed runs cannot fit the 6 bookkeeping terms; give engine_batches x "
                               "engine_draft_lens x engine_reps at least 7 runs, some with draft length > 0")
        vocab = min(spec.vocab_size, 8192)
        full_spec, spec, scale = spec, *engine_probe_shapes(spec, vocab, c.engine_max_bytes)
        per_layer = 4.0 * spec.layer_params
        outer = 4.0 * 2 * vocab * spec.hidden_size
        n_layers = min(spec.num_layers, int((c.engine_max_bytes - outer) // per_layer))
        if n_layers < 1:
            raise ProbeFailure(f"one {spec.name} layer takes {per_layer / GiB:.1f} GiB in fp32, over the in-engine "
                               f"budget of {c.engine_max_bytes / GiB:.1f} GiB; the micro-benchmark figures stand")
        scaled = "" if scale == 1 else (
            f"; one full {full_spec.name} layer ({4.0 * full_spec.layer_params / GiB:.1f} GiB in fp32) is over the "
            f"in-engine budget of {c.engine_max_bytes / MiB:.0f} MiB, so its widths were divided by {scale} (hidden "
            f"{spec.hidden_size}, {spec.num_heads} query / {spec.num_kv_heads} KV heads of {spec.head_dim}, FFN "
            f"{spec.intermediate_size}, {spec.num_experts} experts): the fixed costs fitted are per op, and the rates "
            "above predict the arithmetic at these shapes")
        # Known parts: the rates measured above, with every fixed cost zeroed.
        base = self.assemble()
        zero = dataclasses.replace(base, device_op_overhead_seconds=0.0, device_expert_overhead_seconds=0.0,
                                   device_op_token_seconds=0.0, cpu_attn_overhead_seconds=0.0,
                                   cpu_attn_seq_overhead_seconds=0.0, cpu_attn_row_overhead_seconds=0.0,
                                   device_logit_element_seconds=0.0)
        ref = dataclasses.replace(spec, num_layers=n_layers, vocab_size=vocab)  # spec: scaled to fit, if needed
        draft_spec = dataclasses.replace(ref, family="mistral", num_layers=1, num_experts=0, experts_per_token=0)
        wl = Workload(prompt_len_tokens=c.engine_prompt_len, gen_len_tokens=c.engine_gen_len, num_prompts=1)
        cm = CostModel(zero, ref, draft_spec, wl)
        g = torch.Generator().manual_seed(0)
        target_passes, draft_passes, runs = [], [], []

        def collect(b: int, k: int, eng: Engine) -> None:
            spans = eng.timeline.spans
            tp = [r for r in eng.timeline.passes if r.model == "target" and not r.prefill]
            dp = [r for r in eng.timeline.passes if r.model == "draft" and not r.prefill]
            # The whole decode less the forwards: the runtime's bookkeeping, in totals per run.
            runs.append((b, k, eng.stats.decode_seconds - sum(r.end - r.start for r in tp + dp),
                         len(tp), sum(r.batch for r in tp), sum(r.batch * r.query for r in tp),
                         len(dp), sum(r.batch for r in dp)))
            for rec in eng.timeline.passes:  # prefills too: long queries, many tokens
                inside = [sp for sp in spans if sp[2] >= rec.start and sp[3] <= rec.end]
                if rec.model == "target":
                    layer = sum(e - s_ for tr, nm, s_, e in inside if nm.startswith(("qkv L", "ffn L")))
                    attn = sum(e - s_ for tr, nm, s_, e in inside if nm.startswith("attn L"))
                    target_passes.append((rec.batch, rec.query, rec.keys, layer / n_layers, attn / n_layers))
                else:
                    draft_passes.append((rec.batch, rec.query, rec.keys, rec.end - rec.start))

        with tempfile.TemporaryDirectory() as tmp:
            t_dir, d_dir = Path(tmp) / "target", Path(tmp) / "draft"
            write_random_checkpoint(t_dir, hf_config_for(spec, n_layers, vocab), 0, torch.device("cpu"))
            write_random_checkpoint(d_dir, hf_config_for(spec, 1, vocab, dense=True), 1, torch.device("cpu"))
            for b in c.engine_batches:
                for k in c.engine_draft_lens:
                    plan = probe_plan(dataclasses.replace(wl, num_prompts=b), b, n_layers, k)
                    prompts = torch.randint(3, vocab, (b, c.engine_prompt_len), generator=g).tolist()
                    for rep in range(1 + c.engine_reps):  # the first run warms up
                        eng = Engine(plan, t_dir, d_dir if k else None, device=self.device, trace=True,
                                     synthetic_acceptance=0.7 if k else None)
                        eng.run([Request(str(i), p, c.engine_gen_len) for i, p in enumerate(prompts)],
                                lambda f: None)
                        if rep:
                            collect(b, k, eng)
                    self.tick("engine layers")
        # Group medians per (batch, query): single passes are noisy.
        def grouped(rows: list[tuple]) -> list[tuple]:
            groups: dict[tuple[int, int], list[tuple]] = {}
            for row in rows:
                groups.setdefault((row[0], row[1]), []).append(row)
            return [(b, q, *(float(np.median([r[i] for r in rs])) for i in range(2, len(rs[0]))), len(rs))
                    for (b, q), rs in sorted(groups.items())]

        pts, dpts = grouped(target_passes), grouped(draft_passes)
        if len({b * q for b, q, *_ in pts}) < 4:
            raise ProbeFailure(f"only {len(pts)} distinct pass shapes were timed; need 4 token counts")
        moe = ref.num_experts > 0
        # Attention first (target passes), then the layers: the target's qkv + ffn pieces, and the draft's
        # steps less their attention (as just fitted) and logits: dense layers, no experts.
        att = fit_excess([p[4] for p in pts], [cm.cpu_attention_seconds(ref, b, q, keys) for b, q, keys, *_ in pts],
                         [[1.0, b, b * q] for b, q, *_ in pts])
        att_figs = {"cpu_attn_overhead_seconds": att.coef[0], "cpu_attn_seq_overhead_seconds": att.coef[1],
                    "cpu_attn_row_overhead_seconds": att.coef[2]}
        with_att = CostModel(dataclasses.replace(zero, **att_figs), ref, draft_spec, wl)
        Ld = draft_spec.num_layers
        seconds = [p[3] for p in pts] + [
            max(1e-9, (secs - with_att.lm_head_seconds(draft_spec, b)) / Ld
                - with_att.cpu_attention_seconds(draft_spec, b, q, keys)) for b, q, keys, secs, _ in dpts]
        known = ([cm.qkv_seconds(ref, b * q) + cm.ffn_seconds(ref, b * q) for b, q, *_ in pts]
                 + [cm.qkv_seconds(draft_spec, b * q) + cm.ffn_seconds(draft_spec, b * q) for b, q, *_ in dpts])
        cols = ([[1.0, b * q, ref.expected_experts(b * q) if moe else 0.0] for b, q, *_ in pts]
                + [[1.0, b * q, 0.0] for b, q, *_ in dpts])
        lay = fit_excess(seconds, known, cols)
        op, tok = lay.coef[0], lay.coef[1]
        expert = lay.coef[2] if moe else float(self.fig.get("device_expert_overhead_seconds", 0.0))
        out = {"device_op_overhead_seconds": sig(op), "device_op_token_seconds": sig(tok),
               "device_expert_overhead_seconds": sig(expert), **{f: sig(v) for f, v in att_figs.items()}}
        # The bookkeeping per run: verification passes (fixed, per sequence; the per-layer part is the
        # engine_overhead probe's), logits scanned (target rows x vocabulary, draft steps x vocabulary), and
        # for speculative runs per round, per sequence drafted for and per draft step.
        layer_oh = float(self.fig.get("engine_layer_overhead_seconds", 0.0))
        host_cols = [[n_p, sb, (sbq + sbd) * vocab, n_p if k else 0, sb if k else 0, n_d]
                     for b, k, _, n_p, sb, sbq, n_d, sbd in runs]
        host = fit_excess([r[2] for r in runs], [r[3] * n_layers * layer_oh for r in runs], host_cols)
        out.update({"engine_pass_overhead_seconds": sig(host.coef[0]), "engine_seq_overhead_seconds": sig(host.coef[1]),
                    "device_logit_element_seconds": sig(host.coef[2]),
                    "engine_draft_round_overhead_seconds": sig(host.coef[3]),
                    "engine_draft_seq_overhead_seconds": sig(host.coef[4]),
                    "engine_draft_step_overhead_seconds": sig(host.coef[5])})
        n_t = len(pts)
        t_res, d_res = np.abs(lay.residuals[:n_t]), np.abs(lay.residuals[n_t:])
        before = {f: self.fig.get(f) for f in out}
        self.prov["engine_layers"] = (
            f"the runtime's Engine on random weights of {spec.name}'s shapes ({n_layers} of {spec.num_layers} layers, "
            f"vocabulary {vocab}, fp32{scaled}), batches {list(c.engine_batches)} x draft lengths "
            f"{list(c.engine_draft_lens)} (synthetic acceptance 0.7; a one-layer dense draft of the same dimensions), "
            f"prompts {c.engine_prompt_len} -> {c.engine_gen_len} tokens, {c.engine_reps} timed run(s) each after "
            "a warm-up; per forward (decode and prefill) the timed pieces per layer, group medians per (batch, "
            "query); fitted on top of the matmul and attention rates above by nonnegative relative least "
            "squares: first the target's attention = bytes and FLOPs at "
            "the rates + overhead + batch * (seq + query * row) "
            f"(residual rms {att.rel_rms_residual:.3f}, max {att.rel_max_residual:.3f}); then per layer, the "
            "target's (qkv + ffn) and the draft's step less its attention and logits, = matmuls + op_overhead + "
            "tokens * op_token" + (" + experts touched * expert_overhead (target)" if moe else "") +
            f" (residual rms {lay.rel_rms_residual:.3f}; median |residual| target "
            f"{float(np.median(t_res)):.3f}, draft {(float(np.median(d_res)) if len(d_res) else float('nan')):.3f}). "
            "Per run, the decode's time outside the forwards = verification passes x (pass + per-layer as the "
            "engine_overhead probe) + sequences verified x seq + logit elements x logit_element + (speculative) "
            "rounds x draft_round + sequences drafted for x draft_seq + draft steps x draft_step "
            f"(residual rms {host.rel_rms_residual:.3f}, max {host.rel_max_residual:.3f}). "
            "Values replaced: "
            + ", ".join(f"{f} {v:.4g}" for f, v in before.items() if v is not None))
        self.prov["data.engine_layers"] = (
            "target passes [batch, query, keys, layer_seconds, attention_seconds, passes, layer_fit_rel_residual, "
            "attention_fit_rel_residual]: " + _points_json(
                (b, q, keys, ls, at, n, r1, r2) for (b, q, keys, ls, at, n), r1, r2
                in zip(pts, lay.residuals[:n_t], att.residuals))
            + "; draft steps [batch, query, keys, step_seconds, steps, layer_fit_rel_residual]: " + _points_json(
                (b, q, keys, st, n, r) for (b, q, keys, st, n), r in zip(dpts, lay.residuals[n_t:]))
            + "; runs [batch, draft_len, seconds_outside_forwards, passes, fit_rel_residual]: " + _points_json(
                (b, k, sec, n_p, r) for (b, k, sec, n_p, *_), r in zip(runs, host.residuals)))
        return out

    def fallback_engine_layers(self, reason: str) -> dict[str, Any]:
        self.prov["device_op_token_seconds"] = (f"0: the engine_layers probe did not run ({reason}); the per-layer "
                                                "fixed costs are the micro-benchmarks'")
        return {"device_op_token_seconds": 0.0, "device_logit_element_seconds": 0.0,
                "engine_draft_round_overhead_seconds": 0.0, "engine_draft_seq_overhead_seconds": 0.0,
                "engine_draft_step_overhead_seconds": 0.0}

    def probe_gpu_memory(self) -> dict[str, Any]:
        """CUDA: what the caching allocator really hands out, in chunks until it refuses; then freed."""
        self._check_forced("gpu_memory")
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info(dev)
        held = torch.cuda.memory_reserved(dev)
        chunks, chunk, got = [], self.cfg.gpu_alloc_chunk_bytes, 0
        try:
            while chunk >= self.cfg.gpu_alloc_min_chunk_bytes:
                try:
                    chunks.append(torch.empty(chunk, dtype=torch.uint8, device=dev))
                    got += chunk
                except torch.cuda.OutOfMemoryError:
                    chunk //= 2
        finally:
            chunks.clear()
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
        self.tick("gpu memory")
        gpu_mem = got + held
        if gpu_mem <= 0:
            raise ProbeFailure("the allocator gave no memory at all")
        # Reserve: fragmentation/caching overhead seen while the probes ran, plus the granularity we
        # could not resolve, plus whatever free memory the driver had that the allocator could not use.
        unusable = max(0, free0 - got)
        reserve = self._gpu_overhead_seen + self.cfg.gpu_alloc_min_chunk_bytes + unusable
        reserve = min(reserve, gpu_mem // 2)
        self.prov["gpu_mem_bytes"] = (
            f"allocated in chunks ({self.cfg.gpu_alloc_chunk_bytes // MiB} MiB halving to "
            f"{self.cfg.gpu_alloc_min_chunk_bytes // MiB} MiB) until the allocator refused: {got / GiB:.2f} GiB, plus "
            f"{held / GiB:.2f} GiB already held; device total {total / GiB:.2f} GiB (the difference is the CUDA "
            "context and the driver's)")
        self.prov["gpu_mem_reserve_bytes"] = (
            f"measured: allocator fragmentation/workspace peak during the probes {self._gpu_overhead_seen / MiB:.0f} "
            f"MiB + chunk granularity {self.cfg.gpu_alloc_min_chunk_bytes // MiB} MiB + free memory the allocator "
            f"could not use {unusable / MiB:.0f} MiB")
        return {"gpu_mem_bytes": float(gpu_mem), "gpu_mem_reserve_bytes": float(reserve)}

    def fallback_gpu_memory(self, reason: str) -> dict[str, Any]:
        free, total = torch.cuda.mem_get_info(self.device)
        self.prov["gpu_mem_bytes"] = f"fallback after probe failure ({reason}): cudaMemGetInfo free memory"
        self.prov["gpu_mem_reserve_bytes"] = "fallback: 5% of device memory (not measured)"
        return {"gpu_mem_bytes": float(free), "gpu_mem_reserve_bytes": float(0.05 * total)}

    # --- assembly -----------------------------------------------------------------------------
    def probes(self) -> list[Probe]:
        c = self.cfg
        reps = max(1, c.reps)
        n_mm = len([n for n in c.matmul_tokens if self.cuda or n <= c.cpu_matmul_max_tokens]) + reps
        n_tr, n_at = len(c.transfer_sizes) + reps, len(self.attention_grid()) + reps
        host = Probe("host_memory", ("host_mem_bytes", "pinned_mem_bytes", "cpu_cores", "cpu_name")
                     + (() if self.cuda else ("gpu_mem_bytes", "gpu_mem_reserve_bytes")), 1,
                     self.probe_host_memory, self.fallback_host_memory)
        attention = Probe("cpu_attention", ("cpu_attn_kv_read_bytes_per_s", "cpu_attn_flops_per_s",
                                            "cpu_attn_overhead_seconds", "cpu_attn_seq_overhead_seconds",
                                            "cpu_attn_row_overhead_seconds"), n_at,
                          self.probe_cpu_attention, self.fallback_cpu_attention)
        overhead = Probe("device_op_overhead", ("device_op_overhead_seconds", "device_expert_overhead_seconds"), 1,
                         self.probe_op_overhead,
                         self.fallback_op_overhead)
        matmul = Probe("matmul", ("gpu_matmul_flops_per_s",), n_mm, self.probe_matmul)
        engine = Probe("engine_overhead", ("engine_pass_overhead_seconds", "engine_seq_overhead_seconds",
                                           "engine_layer_overhead_seconds"), 4,
                       self.probe_engine_overhead, self.fallback_engine_overhead)
        layers = Probe("engine_layers", ("device_op_token_seconds", "device_logit_element_seconds",
                                         "engine_draft_round_overhead_seconds", "engine_draft_seq_overhead_seconds",
                                         "engine_draft_step_overhead_seconds"),
                       len(c.engine_batches) * len(c.engine_draft_lens), self.probe_engine_layers,
                       self.fallback_engine_layers)
        if not self.cuda:
            return [host,
                    Probe("memcpy", ("h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s", "d2h_pinned_bytes_per_s",
                                     "d2h_pageable_bytes_per_s"), n_tr, self.probe_memcpy),
                    Probe("mem_bandwidth", ("gpu_mem_bandwidth_bytes_per_s", "cpu_mem_bandwidth_bytes_per_s"), 1,
                          self.probe_bandwidth),
                    matmul, attention, overhead, engine, layers]
        transfers = [Probe(f"{d}_{'pinned' if p else 'pageable'}", (f"{d}_{'pinned' if p else 'pageable'}_bytes_per_s",),
                           n_tr, (lambda d=d, p=p: self.probe_transfer(d, p)))
                     for d in ("h2d", "d2h") for p in (True, False)]
        return [host, *transfers,
                Probe("mem_bandwidth", ("gpu_mem_bandwidth_bytes_per_s",), 1, self.probe_bandwidth),
                Probe("host_bandwidth", ("cpu_mem_bandwidth_bytes_per_s",), 1, self.probe_host_bandwidth),
                matmul, attention, overhead, engine,
                Probe("gpu_memory", ("gpu_mem_bytes", "gpu_mem_reserve_bytes"), 1, self.probe_gpu_memory,
                      self.fallback_gpu_memory)]

    def run(self) -> ProfileResult:
        t0 = time.perf_counter()
        self.load_before = _loadavg()
        if self.load_before is not None and self.load_before > 0.5 * cpu_cores():
            self._warn(f"the machine is busy (load average {self.load_before:.1f} on {cpu_cores()} CPUs): timings will be "
                       "noisy; profile again when it is quiet")
        probes = self.probes()
        known = {p.name for p in probes}
        unknown = sorted(self.fail - known - set(ALL_PROBES))
        if unknown:
            raise ProbeFailure(f"unknown probe(s) to force-fail: {', '.join(unknown)}; probes: {', '.join(ALL_PROBES)}")
        result = ProfileResult(profile=None)  # type: ignore[arg-type]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(p.steps for p in probes), desc=f"profiling ({self.cfg.mode})", unit="pt",
                       file=sys.stderr, leave=True, dynamic_ncols=True)
        self._bar = bar
        try:
            for p in probes:
                ticks_before = bar.n if bar is not None else 0
                try:
                    if bar is not None:
                        bar.set_postfix_str(p.name)
                    self.fig.update(p.run())
                except Exception as exc:  # noqa: BLE001 - any probe error becomes a reported missing figure
                    reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ProbeFailure) else str(exc)
                    reason = reason.splitlines()[0][:300] if reason else type(exc).__name__
                    result.failed[p.name] = reason
                    optional = [f for f in p.figures if f in OPTIONAL_FIGURES]
                    required = [f for f in p.figures if f not in OPTIONAL_FIGURES]
                    for f in optional:
                        self.fig[f] = None
                    msg = f"probe '{p.name}' failed: {reason}"
                    if optional:
                        msg += f"; {', '.join(optional)} written as null and listed in 'missing'"
                    if required and p.fallback is not None:
                        try:
                            self.fig.update(p.fallback(reason))
                        except Exception as exc2:  # noqa: BLE001
                            raise ProbeFailure(f"probe '{p.name}' failed ({reason}) and so did its fallback "
                                               f"({type(exc2).__name__}: {exc2}); {', '.join(required)} are "
                                               "required, no profile written") from exc2
                        msg += f"; {', '.join(required)} from a fallback (see provenance)"
                    self.prov[f"failed.{p.name}"] = reason
                    result.warnings.append(msg)
                    self._warn(msg)
                if bar is not None:  # keep the bar's total honest (skipped sizes, failures)
                    bar.update(max(0, p.steps - (bar.n - ticks_before)))
        finally:
            if bar is not None:
                bar.close()
            self._bar = None
        self.load_after = _loadavg()
        result.profile = self.assemble()
        result.attention_fit = self.attention_fit
        result.seconds = time.perf_counter() - t0
        return result

    def provenance_header(self) -> dict[str, str]:
        cfg = self.cfg
        head = {
            "written_by": f"specoffload-profile{' --quick' if cfg.mode == 'quick' else ''} "
                          "(specoffload.runtime.profiler)",
            "mode": cfg.mode,
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "host": socket.gethostname(),
            "torch": str(torch.__version__),
            "cuda": str(torch.version.cuda) if torch.version.cuda else "none (CPU build of torch)",
            "device": self.device_name(),
            "cpu": cpu_name(),
            "threads": f"torch intra-op threads {torch.get_num_threads()}",
            "timing": (f"{cfg.warmup} warm-up call(s), then {cfg.reps} samples each averaging calls over >= "
                       f"{cfg.min_sample_s * 1e3:g} ms{' (CUDA events, synchronised)' if self.cuda else ''}; figure = "
                       "median; spread = IQR / median, per point in the data.* entries"),
            "reference_shapes": self.spec.describe(),
            "load": (f"1-minute load average {_fmt_load(self.load_before)} before, {_fmt_load(self.load_after)} after, "
                     f"on {cpu_cores()} CPUs (other processes make timings noisy)"),
        }
        return head

    def device_name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        return f"CPU as the compute device ({cpu_name()}), fp32, {torch.get_num_threads()} threads"

    def assemble(self) -> HardwareProfile:
        fig = dict(self.fig)
        missing = tuple(f for f in OPTIONAL_FIGURES if fig.get(f) is None)
        for f in missing:
            fig[f] = None
        prov = self.provenance_header()
        prov.update(self.prov)
        prov = {str(k): str(v) for k, v in prov.items()}
        return HardwareProfile(
            name=self.name, source="measured", device_kind=self.kind, device_name=self.device_name(),
            cpu_name=fig.get("cpu_name", cpu_name()), cpu_cores=int(fig.get("cpu_cores", cpu_cores())),
            host_mem_bytes=sig(float(fig["host_mem_bytes"]), 6), pinned_mem_bytes=sig(float(fig["pinned_mem_bytes"]), 6),
            gpu_mem_bytes=sig(float(fig["gpu_mem_bytes"]), 6),
            gpu_mem_reserve_bytes=sig(float(fig["gpu_mem_reserve_bytes"]), 6),
            gpu_matmul_flops_per_s=fig["gpu_matmul_flops_per_s"],
            gpu_mem_bandwidth_bytes_per_s=_opt(fig["gpu_mem_bandwidth_bytes_per_s"]),
            h2d_pinned_bytes_per_s=fig["h2d_pinned_bytes_per_s"], h2d_pageable_bytes_per_s=fig["h2d_pageable_bytes_per_s"],
            d2h_pinned_bytes_per_s=fig["d2h_pinned_bytes_per_s"], d2h_pageable_bytes_per_s=fig["d2h_pageable_bytes_per_s"],
            cpu_attn_kv_read_bytes_per_s=_opt(fig["cpu_attn_kv_read_bytes_per_s"]),
            cpu_attn_flops_per_s=_opt(fig["cpu_attn_flops_per_s"]),
            cpu_attn_overhead_seconds=float(fig.get("cpu_attn_overhead_seconds", 0.0)),
            cpu_attn_seq_overhead_seconds=float(fig.get("cpu_attn_seq_overhead_seconds", 0.0)),
            cpu_attn_row_overhead_seconds=float(fig.get("cpu_attn_row_overhead_seconds", 0.0)),
            cpu_mem_bandwidth_bytes_per_s=_opt(fig["cpu_mem_bandwidth_bytes_per_s"]),
            device_op_overhead_seconds=float(fig.get("device_op_overhead_seconds", 0.0)),
            device_expert_overhead_seconds=float(fig.get("device_expert_overhead_seconds", 0.0)),
            device_op_token_seconds=float(fig.get("device_op_token_seconds", 0.0)),
            engine_pass_overhead_seconds=float(fig.get("engine_pass_overhead_seconds", 0.0)),
            engine_seq_overhead_seconds=float(fig.get("engine_seq_overhead_seconds", 0.0)),
            engine_layer_overhead_seconds=float(fig.get("engine_layer_overhead_seconds", 0.0)),
            **{f: float(fig.get(f, 0.0)) for f in ("device_logit_element_seconds", "engine_draft_round_overhead_seconds",
                                                   "engine_draft_seq_overhead_seconds",
                                                   "engine_draft_step_overhead_seconds")},
            provenance=prov, missing=missing)


def probe_plan(workload, batch: int, n_layers: int, draft_len: int = 0):
    """A hand-built Plan for the engine probes: one batch, everything resident, no weight streaming;
    serial-spec with a draft of `draft_len` tokens, or offload-only."""
    from specoffload.planner.schema import Plan, Prediction

    pred = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "-", 0, 0)
    return Plan(policy="serial-spec" if draft_len else "offload-only", model="probe", model_fingerprint="",
                draft="probe-draft" if draft_len else "", draft_fingerprint="", profile="-", profile_fingerprint="",
                workload=workload, decode_batch=batch, num_batches=1, prefill_batch=batch, draft_sub_batch=1,
                draft_len=draft_len, micro_batches=1, gpu_attn_layers=n_layers, gpu_ffn_layers=n_layers,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv="gpu", weight_buffers=0, prediction=pred)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _fmt_load(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.2f}"


def _opt(v: Any) -> float | None:
    return None if v is None else sig(float(v))


# Every probe name either device kind may run (for --help and the force-fail hook).
ALL_PROBES = ("host_memory", "memcpy", "h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable", "mem_bandwidth",
              "host_bandwidth", "matmul", "cpu_attention", "device_op_overhead", "engine_layers", "engine_overhead",
              "gpu_memory")


def run_profile(cfg: ProfileConfig, device: str | torch.device = "auto", name: str | None = None,
                progress: bool = True, threads: int | None = None,
                warn: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure this machine with `cfg` and return the profile (not yet written) and what went wrong."""
    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings(), torch.inference_mode():  # as the engine runs (Engine.run)
        warnings.simplefilter("ignore", UserWarning)  # e.g. pin_memory notices; failures are reported by probe
        return Profiler(cfg, device, name=name, progress=progress, warn=warn).run()
