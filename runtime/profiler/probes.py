"""Measure this machine and build a HardwareProfile (source: measured) that the planner reads unchanged.

Every figure is measured the way the cost model consumes it (planner/costmodel.py). Which probe fills
which figure on each kind of device, how its samples are fitted and what stands when it fails are
declared once, in planner/cost_terms.py; `probes()` takes each probe's figures from there. In short:
copy-rate curves per transfer size (CUDA events; on a CPU-only machine one memcpy curve for all four),
the matmul rate over tokens at the reference FFN shape, device and host memory bandwidth (STREAM copy),
the runtime's own host attention over a grid fitted by `fit.fit_attention`, one layer's fixed cost,
the Engine's bookkeeping on tiny random checkpoints (`engine_overhead`) and, on CPU devices, the Engine
on random weights of a narrow model of the reference's kind (`engine_layers`), whose fit replaces the
micro-benchmark fixed costs (kept in provenance); memory from the allocator (CUDA) or /proc/meminfo.

Each timing: warm-up calls, then `reps` samples, each averaging enough calls to last at least
`min_sample_s` (synchronised on CUDA); the figure uses the median, and the spread (IQR / median)
goes into provenance with the shapes. A probe that raises is reported (a warning naming it and the
reason), its figures are written as null and listed in `missing`; figures the schema requires get a
fallback that provenance names.
"""
from __future__ import annotations

import datetime as _dt
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from specoffload.planner.cost_terms import BY_NAME as COST_TERMS
from specoffload.planner.cost_terms import BYTES, COUNT, CURVE, RATE, ZERO, probe_figures
from specoffload.planner.schema import OPTIONAL_FIGURES, HardwareProfile

from .attention import AttentionProbe, attention_call, attention_workload
from .config import (FORCE_FAIL_ENV, KV_DTYPES, WARMUP_MAX_S, GiB, KiB, MiB, ProbeFailure, ProfileConfig,
                     forced_failures)
from .device import DeviceProbes
from .fit import AttentionFit, Stats, sig
from .in_engine import EngineProbes, engine_fit_shapes, engine_probe_shapes, probe_plan
from .link import LinkProbes
from .machine import cpu_cores, cpu_name, default_name, host_memory, host_tag, meminfo, resolve_device
from .timing import COLD_BYTES, Clock, cold_copies, measure, measure_many

# The names this module has always offered (callers import them from here; the probes live beside it).
__all__ = ["ALL_PROBES", "COLD_BYTES", "Clock", "FORCE_FAIL_ENV", "GiB", "KV_DTYPES", "KiB", "MiB", "Probe",
           "ProbeFailure", "ProfileConfig", "ProfileResult", "Profiler", "WARMUP_MAX_S", "attention_call",
           "attention_workload", "cold_copies", "cpu_cores", "cpu_name", "default_name", "engine_fit_shapes",
           "engine_probe_shapes",
           "forced_failures", "host_memory", "host_tag", "measure", "measure_many", "meminfo", "probe_plan",
           "resolve_device", "run_profile"]

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


class Profiler(LinkProbes, DeviceProbes, AttentionProbe, EngineProbes):
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

    # --- assembly -----------------------------------------------------------------------------
    def probes(self) -> list[Probe]:
        c = self.cfg
        reps = max(1, c.reps)
        n_mm = len([n for n in c.matmul_tokens if self.cuda or n <= c.cpu_matmul_max_tokens]) + reps
        n_tr, n_at = len(c.transfer_sizes) + reps, len(self.attention_grid()) + reps
        kind = self.kind

        def probe(name: str, steps: int, run, fallback=None, extra: tuple[str, ...] = ()) -> Probe:
            # Its figures are the table's (planner/cost_terms.py): which probe fills which term on this device.
            return Probe(name, probe_figures(name, kind) + extra, steps, run, fallback)

        host = probe("host_memory", 1, self.probe_host_memory, self.fallback_host_memory, extra=("cpu_name",))
        attention = probe("cpu_attention", n_at, self.probe_cpu_attention, self.fallback_cpu_attention)
        overhead = probe("device_op_overhead", 1, self.probe_op_overhead, self.fallback_op_overhead)
        matmul = probe("matmul", n_mm, self.probe_matmul)
        engine = probe("engine_overhead", 4, self.probe_engine_overhead, self.fallback_engine_overhead)
        layers = probe("engine_layers", len(c.engine_batches) * len(c.engine_draft_lens), self.probe_engine_layers,
                       self.fallback_engine_layers)
        if not self.cuda:
            return [host, probe("memcpy", n_tr, self.probe_memcpy), probe("mem_bandwidth", 1, self.probe_bandwidth),
                    matmul, attention, overhead, engine, layers]
        transfers = [probe(f"{d}_{'pinned' if p else 'pageable'}", n_tr, (lambda d=d, p=p: self.probe_transfer(d, p)))
                     for d in ("h2d", "d2h") for p in (True, False)]
        return [host, *transfers, probe("mem_bandwidth", 1, self.probe_bandwidth),
                probe("host_bandwidth", 1, self.probe_host_bandwidth), matmul, attention, overhead, engine,
                probe("gpu_memory", 1, self.probe_gpu_memory, self.fallback_gpu_memory)]

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
                        for f in required:  # the table's zero fallback for what the probe's fallback left out
                            if f in COST_TERMS and COST_TERMS[f].fallback == ZERO:
                                self.fig.setdefault(f, 0.0)
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
            cpu_name=fig.get("cpu_name", cpu_name()), **{t.name: _figure(t, fig) for t in COST_TERMS.values()},
            provenance=prov, missing=missing)


def _figure(term, fig: dict[str, Any]) -> Any:
    """A term's value as the profile holds it (its kind in planner/cost_terms.py)."""
    v = fig.get(term.name)
    if term.kind == CURVE:
        return v
    if term.kind == RATE:
        return _opt(v)
    if term.kind == BYTES:
        return sig(float(v), 6)
    if term.kind == COUNT:
        return int(v if v is not None else cpu_cores())
    return float(v if v is not None else 0.0)


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
