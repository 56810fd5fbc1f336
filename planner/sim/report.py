"""The report both the simulator and the runtime write: `Report(kind="simulated" | "measured")`.

Same fields on both sides so a prediction, a simulation and a measurement diff line by line
(`figures()` flattens the comparable numbers under stable names such as `busy_fraction.h2d`).
`predicted` holds the cost model's closed-form figures for the same plan on the same profile, under
the same flattened names, so every report carries its own prediction.

Definitions (the runtime must measure the same things):
- generated_tokens: each sequence counted up to its requested generation length (no overshoot).
- total_seconds: from the start of the first prefill to the end of the last verification.
- prefill_seconds / decode_seconds: the timeline split by pass: each weight sweep (a prefill
  chunk or a verification of one batch) owns the time from the end of the previous pass to its own
  end; prefill passes sum to prefill_seconds, verifications (with the drafting between them) to
  decode_seconds. They add up to total_seconds.
- prefill_passes: prefill chunks on weight sweeps of their own; fused_passes: verifications that also
  prefilled a chunk in their sweep (a plan with fuse_prefill), whose time is the verification's (decode).
- slots: verifications of one batch; slot_seconds = decode_seconds / slots (tail slots included),
  slot_seconds_median the median verification.
- busy_fraction: busy seconds of each resource (gpu, cpu = CPU attention, h2d, d2h; disk where a plan reads
  layers from disk) / total_seconds.
- peak_mem_bytes / capacity_bytes: per pool (gpu, pinned, host); capacity 0 means unlimited.
- peak_mem_seconds: when each pool first reached its peak; mem_over_time: per pool, the highest use
  in each of MEM_BINS equal spans of [0, total_seconds] (simulated reports: memory taken and released
  over the run; empty where not recorded).
- acceptance: per verification of one sequence: tokens = accepted draft tokens + 1 (uncapped),
  useful tokens (capped at what the sequence still needed), observed per-position acceptance
  P(position i accepted | 1..i-1 accepted).
- bound_fraction: throughput / the physical bound (CostModel.physical_bound).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..strict import YamlContract

REPORT_SCHEMA = 1
KINDS = ("simulated", "measured")


@dataclass(frozen=True)
class AcceptanceStats:
    draft_len: int
    rounds: int  # verifications of one sequence
    tokens_per_round: float  # mean accepted + 1, uncapped (the cost model's E[tokens])
    useful_tokens_per_round: float  # mean tokens kept (capped at the generation length)
    per_position: tuple[float, ...]  # observed conditional acceptance of draft positions 1..k


@dataclass(frozen=True)
class Report(YamlContract):
    kind: str  # simulated | measured
    policy: str
    model: str
    draft: str
    profile: str
    profile_fingerprint: str
    plan_fingerprint: str
    seed: int
    sequences: int
    generated_tokens: int
    total_seconds: float
    prefill_seconds: float
    decode_seconds: float
    throughput_tokens_per_s: float
    decode_tokens_per_s: float
    slots: int
    slot_seconds: float
    slot_seconds_median: float
    prefill_passes: int
    busy_fraction: dict[str, float]
    peak_mem_bytes: dict[str, float]
    capacity_bytes: dict[str, float]
    acceptance: AcceptanceStats
    physical_bound_tokens_per_s: float
    bound_fraction: float
    predicted: dict[str, float] = field(default_factory=dict)  # same names as figures()
    notes: tuple[str, ...] = ()
    peak_mem_seconds: dict[str, float] = field(default_factory=dict)
    mem_over_time: dict[str, tuple[float, ...]] = field(default_factory=dict)
    fused_passes: int = 0  # verifications whose sweep also prefilled a chunk (a fused plan); 0: none
    schema_version: int = REPORT_SCHEMA
    SCHEMA = REPORT_SCHEMA  # what this code reads (a class constant, not a field)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; found {self.kind!r}")



MEM_BINS = 20


def binned_peaks(history: list[tuple[float, float]], total: float, bins: int = MEM_BINS) -> tuple[float, ...]:
    """The highest value of a step function (time, value after the change) in each of `bins` equal spans
    of [0, total]: a use taken and released inside one span still shows."""
    if not history:
        return ()
    if total <= 0:
        return (max(v for _, v in history),)
    out = [0.0] * bins
    value = 0.0
    points = sorted(history, key=lambda x: x[0])
    i = 0
    for b in range(bins):
        lo, hi = total * b / bins, total * (b + 1) / bins
        while i < len(points) and points[i][0] <= lo:
            value = points[i][1]
            i += 1
        peak = value
        while i < len(points) and (points[i][0] < hi or b == bins - 1):  # the last span takes the rest
            value = points[i][1]
            peak = max(peak, value)
            i += 1
        out[b] = peak
    return tuple(out)


# The comparable figures, in display order: (flattened name, label, unit scale, unit).
GiB = 2**30
FIGURES = (
    ("throughput_tokens_per_s", "throughput end to end", 1.0, "tok/s"),
    ("decode_tokens_per_s", "throughput decode only", 1.0, "tok/s"),
    ("total_seconds", "time total", 1.0, "s"),
    ("prefill_seconds", "time prefill", 1.0, "s"),
    ("decode_seconds", "time decode", 1.0, "s"),
    ("slots", "verifications (slots)", 1.0, ""),
    ("slot_seconds", "slot time (mean)", 1.0, "s"),
    ("prefill_passes", "prefill chunks", 1.0, ""),
    ("fused_passes", "fused passes", 1.0, ""),
    ("acceptance.tokens_per_round", "tokens per round", 1.0, ""),
    ("busy_fraction.gpu", "busy gpu", 1.0, ""),
    ("busy_fraction.cpu", "busy cpu attention", 1.0, ""),
    ("busy_fraction.h2d", "busy h2d", 1.0, ""),
    ("busy_fraction.d2h", "busy d2h", 1.0, ""),
    ("busy_fraction.disk", "busy disk (disk tier)", 1.0, ""),
    ("peak_mem_bytes.gpu", "peak memory gpu", 1 / GiB, "GiB"),
    ("peak_mem_bytes.pinned", "peak memory pinned", 1 / GiB, "GiB"),
    ("peak_mem_bytes.host", "peak memory host", 1 / GiB, "GiB"),
    ("bound_fraction", "fraction of physical bound", 1.0, ""),
)


def figures(report: Report) -> dict[str, float]:
    """The comparable numbers under flattened names (what `predicted` also holds)."""
    out: dict[str, float] = {
        "throughput_tokens_per_s": report.throughput_tokens_per_s,
        "decode_tokens_per_s": report.decode_tokens_per_s,
        "total_seconds": report.total_seconds,
        "prefill_seconds": report.prefill_seconds,
        "decode_seconds": report.decode_seconds,
        "slots": float(report.slots),
        "slot_seconds": report.slot_seconds,
        "prefill_passes": float(report.prefill_passes),
        "fused_passes": float(report.fused_passes),
        "acceptance.tokens_per_round": report.acceptance.tokens_per_round,
        "bound_fraction": report.bound_fraction,
    }
    for r, v in report.busy_fraction.items():
        out[f"busy_fraction.{r}"] = v
    for p, v in report.peak_mem_bytes.items():
        out[f"peak_mem_bytes.{p}"] = v
    return out


def diff_percent(value: float, reference: float) -> float:
    if reference == 0 or not math.isfinite(reference):
        return math.nan
    return 100.0 * (value - reference) / reference


def comparison_rows(report: Report, other: dict[str, float] | None = None) -> list[tuple[str, str, float, float, float]]:
    """(name, label, value, reference, diff %) for each figure; reference: `other` or report.predicted."""
    ref = report.predicted if other is None else other
    mine = figures(report)
    rows = []
    for name, label, scale, unit in FIGURES:
        if name not in mine:
            continue
        v = mine[name] * scale
        r = ref.get(name, math.nan) * scale
        rows.append((name, f"{label}{' (' + unit + ')' if unit else ''}", v, r, diff_percent(v, r)))
    return rows


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def format_report(report: Report) -> str:
    """The human-readable summary the CLI prints."""
    title = {"simulated": "simulated", "measured": "measured"}[report.kind]
    head = (f"{report.policy} plan: {report.model}{' + ' + report.draft if report.draft else ''} on {report.profile}"
            f"{f' (seed {report.seed})' if report.kind == 'simulated' else ''}")
    lines = [head, f"{'':34}{title:>12}{'predicted':>12}{'diff':>9}"]
    for name, label, v, r, d in comparison_rows(report):
        diff = f"{d:+.1f}%" if math.isfinite(d) else "-"
        lines.append(f"  {label:32}{_fmt(v):>12}{_fmt(r):>12}{diff:>9}")
    caps = report.capacity_bytes
    lines.append("  memory peak / capacity: " + ", ".join(
        f"{p} {report.peak_mem_bytes.get(p, 0) / GiB:.1f}/{caps[p] / GiB:.1f} GiB" if caps.get(p) else
        f"{p} {report.peak_mem_bytes.get(p, 0) / GiB:.1f} GiB (no limit)" for p in report.peak_mem_bytes))
    acc = report.acceptance
    if acc.draft_len:
        pos = ", ".join(f"{a:.3f}" for a in acc.per_position)
        lines.append(f"  acceptance: {acc.rounds} rounds, {acc.tokens_per_round:.3f} tokens/round "
                     f"({acc.useful_tokens_per_round:.3f} kept), per position [{pos}]")
    if report.fused_passes:
        lines.append(f"  fused prefill: {report.fused_passes} verifications also prefilled a chunk in their sweep "
                     f"({report.prefill_passes} chunk{'s' if report.prefill_passes != 1 else ''} on a sweep of "
                     f"{'their' if report.prefill_passes != 1 else 'its'} own)")
    lines.append(f"  {report.sequences} sequences, {report.generated_tokens} tokens; physical bound "
                 f"{report.physical_bound_tokens_per_s:.1f} tok/s")
    for note in report.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
