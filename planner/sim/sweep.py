"""What-if sweeps: simulate a plan (or re-plan) over one or two profile fields; CSV and PNG out.

A sweep spec is `FIELD=START:STOP:N` (N evenly spaced values, ends included) or `FIELD=V1,V2,...`;
FIELD is any HardwareProfile field or alias (h2d_bytes_per_s, d2h_bytes_per_s, gpu_flops_per_s), and
`a+b=...` sets several fields to the same value (e.g. h2d_bytes_per_s+d2h_bytes_per_s for a PCIe
generation). Two specs make a grid. With `replan`, each point gets a fresh plan from the planner
(the plan's own policy, or all policies); without it the same plan is simulated on each machine.
"""
from __future__ import annotations

import csv
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..models import ModelSpec, load_plan_models
from ..planner import make_plan
from ..schema import POLICIES, HardwareProfile, Plan
from ..strict import SchemaError
from .simulator import SimOptions, simulate


@dataclass(frozen=True)
class SweepAxis:
    fields: tuple[str, ...]
    values: tuple[float, ...]

    @property
    def name(self) -> str:
        return "+".join(self.fields)


def parse_value(text: str) -> Any:
    """A --set / sweep value: a number when it parses as one, else the string (null -> None)."""
    text = text.strip()
    if text.lower() in ("null", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def parse_sweep(spec: str) -> SweepAxis:
    if "=" not in spec:
        raise SchemaError(f"--sweep {spec!r}: expected FIELD=START:STOP:N or FIELD=V1,V2,...")
    name, rng = spec.split("=", 1)
    fields = tuple(f.strip() for f in name.split("+") if f.strip())
    if not fields:
        raise SchemaError(f"--sweep {spec!r}: no field named")
    try:
        if ":" in rng:
            parts = rng.split(":")
            if len(parts) != 3:
                raise ValueError
            start, stop, n = float(parts[0]), float(parts[1]), int(parts[2])
            if n < 1:
                raise ValueError
            values = tuple(start + (stop - start) * i / (n - 1) for i in range(n)) if n > 1 else (start,)
        else:
            values = tuple(float(v) for v in rng.split(",") if v.strip())
            if not values:
                raise ValueError
    except ValueError:
        raise SchemaError(f"--sweep {spec!r}: expected FIELD=START:STOP:N (N >= 1 points) or FIELD=V1,V2,... "
                          f"with numbers") from None
    return SweepAxis(fields, values)


def apply_point(profile: HardwareProfile, axes: list[SweepAxis], point: tuple[float, ...]) -> HardwareProfile:
    overrides = {f: v for axis, v in zip(axes, point) for f in axis.fields}
    return profile.with_overrides(overrides, source="--sweep")


def run_sweep(plan: Plan, profile: HardwareProfile, axes: list[SweepAxis], replan: str | None = None,
              options: SimOptions = SimOptions(), log: Callable[[str], None] | None = None,
              draft: ModelSpec | None = None) -> list[dict[str, Any]]:
    """One row per (point, policy): simulated and predicted throughput, the plan's knobs, problems.

    `draft` (re-planning only) replaces the plan's draft: a plan where offload-only won carries none."""
    if not 1 <= len(axes) <= 2:
        raise SchemaError("--sweep: give one or two fields")
    for axis in axes:  # fail fast on an unknown field, before any simulation
        profile.with_overrides({f: axis.values[0] for f in axis.fields}, source="--sweep")
    target, plan_draft = load_plan_models(plan) if replan else (None, None)
    draft = draft or plan_draft
    if replan == "all":
        policies = POLICIES if draft is not None else ("offload-only",)
    else:
        policies = (plan.policy,)
    rows = []
    for point in itertools.product(*(a.values for a in axes)):
        prof = apply_point(profile, axes, point)
        for policy in policies:
            row: dict[str, Any] = {a.name: v for a, v in zip(axes, point)}
            row["policy"] = policy
            try:
                p = plan
                if replan:
                    p = make_plan(prof, target, draft if policy != "offload-only" else None, plan.workload,
                                  policy=policy, host_mem_limit_bytes=plan.host_mem_limit_bytes).plan
                res = simulate(p, prof, options)
            except SchemaError as exc:  # the planner found no plan, or the profile lacks a figure
                row.update(feasible=False, problem=str(exc))
                rows.append(row)
                if log:
                    log(_describe(row, axes))
                continue
            rep = res.report
            pred = rep.predicted
            row.update(
                feasible=res.ok, sim_tokens_per_s=rep.throughput_tokens_per_s,
                predicted_tokens_per_s=pred["throughput_tokens_per_s"],
                diff_pct=100 * (rep.throughput_tokens_per_s / pred["throughput_tokens_per_s"] - 1)
                if pred["throughput_tokens_per_s"] > 0 else math.nan,
                sim_decode_tokens_per_s=rep.decode_tokens_per_s,
                predicted_decode_tokens_per_s=pred["decode_tokens_per_s"],
                slot_seconds=rep.slot_seconds, decode_batch=p.decode_batch, num_batches=p.num_batches,
                draft_len=p.draft_len, micro_batches=p.micro_batches, draft_kv=p.draft_kv,
                gpu_attn_layers=p.gpu_attn_layers, gpu_ffn_layers=p.gpu_ffn_layers,
                binding=p.prediction.binding, problem="; ".join(pr.message for pr in res.problems))
            rows.append(row)
            if log:
                log(_describe(row, axes))
    return rows


def _describe(row: dict[str, Any], axes: list[SweepAxis]) -> str:
    where = ", ".join(f"{a.name}={row[a.name]:.4g}" for a in axes)
    if "sim_tokens_per_s" not in row:
        return f"  {where} {row['policy']}: no plan ({row['problem']})"
    flag = "" if row["feasible"] else f"  INFEASIBLE: {row['problem']}"
    return (f"  {where} {row['policy']}: simulated {row['sim_tokens_per_s']:.1f} tok/s, predicted "
            f"{row['predicted_tokens_per_s']:.1f} ({row['diff_pct']:+.1f}%), batch {row['decode_batch']}"
            f"x{row['num_batches']}, k={row['draft_len']}{flag}")


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    cols: list[str] = []
    for row in rows:
        for c in row:
            if c not in cols:
                cols.append(c)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({c: row.get(c, "") for c in cols})


def _unit(field: str) -> tuple[float, str]:
    if field.endswith("bytes_per_s"):
        return 1e-9, "GB/s"
    if field.endswith("bytes"):
        return 1 / 2**30, "GiB"
    if field.endswith("flops_per_s"):
        return 1e-12, "TFLOP/s"
    return 1.0, ""


def plot(rows: list[dict[str, Any]], axes: list[SweepAxis], path: str | Path, title: str = "") -> bool:
    """Write the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    if len(axes) == 1:
        ax0 = axes[0]
        scale, unit = _unit(ax0.fields[0])
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for i, policy in enumerate(policies):
            pts = [r for r in rows if r["policy"] == policy and "sim_tokens_per_s" in r]
            xs = [r[ax0.name] * scale for r in pts]
            color = f"C{i}"
            ax.plot(xs, [r["sim_tokens_per_s"] if r["feasible"] else math.nan for r in pts], "o-", color=color,
                    label=f"{policy} (simulated)")
            ax.plot(xs, [r["predicted_tokens_per_s"] for r in pts], "--", color=color, alpha=0.6,
                    label=f"{policy} (cost model)")
        ax.set_xlabel(f"{ax0.name}{' (' + unit + ')' if unit else ''}")
        ax.set_ylabel("throughput (generated tokens/s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    else:
        a0, a1 = axes
        s0, u0 = _unit(a0.fields[0])
        s1, u1 = _unit(a1.fields[0])
        best: dict[tuple[float, float], tuple[float, str]] = {}
        for r in rows:
            if r.get("feasible") and "sim_tokens_per_s" in r:
                key = (r[a0.name], r[a1.name])
                if r["sim_tokens_per_s"] > best.get(key, (-1.0, ""))[0]:
                    best[key] = (r["sim_tokens_per_s"], r["policy"])
        grid = [[best.get((x, y), (math.nan, ""))[0] for x in a0.values] for y in a1.values]
        fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(a0.values)), [f"{v * s0:.3g}" for v in a0.values])
        ax.set_yticks(range(len(a1.values)), [f"{v * s1:.3g}" for v in a1.values])
        ax.set_xlabel(f"{a0.name}{' (' + u0 + ')' if u0 else ''}")
        ax.set_ylabel(f"{a1.name}{' (' + u1 + ')' if u1 else ''}")
        short = {"offload-only": "off", "serial-spec": "ser", "interleaved": "int"}
        for yi, y in enumerate(a1.values):
            for xi, x in enumerate(a0.values):
                v, pol = best.get((x, y), (math.nan, ""))
                if math.isfinite(v):
                    ax.text(xi, yi, f"{v:.0f}\n{short.get(pol, pol)}", ha="center", va="center", fontsize=7,
                            color="white")
        fig.colorbar(im, ax=ax, label="simulated tokens/s (best policy)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def progress_log(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
