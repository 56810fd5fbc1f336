"""The cost model's closed-form figures for a plan, under the report's flattened names.

Used for `Report.predicted` by the simulator, and by the runtime for its measured report. All
numbers come from CostModel.evaluate / step_terms / prefill_terms / draft_round at the plan's
knobs and placement on the given profile; nothing is recomputed here.
"""
from __future__ import annotations

import math

from ..costmodel import CostModel, Knobs
from ..models import load_plan_models
from ..planner import knobs_from_plan, placement_from_plan
from ..schema import HardwareProfile, Plan, Prediction


def plan_cost_model(plan: Plan, profile: HardwareProfile) -> tuple[CostModel, Knobs, dict[str, float]]:
    """The cost model's view of a plan on a profile: (cost model, knobs, placement)."""
    target, draft = load_plan_models(plan)
    cm = CostModel(profile, target, draft, plan.workload, plan.host_mem_limit_bytes)
    return cm, knobs_from_plan(plan), placement_from_plan(plan, target)


def predicted_figures(cm: CostModel, knobs: Knobs, placement: dict[str, float],
                      prediction: Prediction | None = None) -> dict[str, float]:
    """Closed-form figures (see report.figures for the names)."""
    pred = prediction or cm.evaluate(knobs, placement)
    chunks = cm.standalone_chunks(knobs)  # prefill chunks on sweeps of their own
    fused_n = cm.fused_passes(knobs)  # verifications that also prefill a chunk
    prefill = {r: f.at(placement) for r, f in cm.prefill_terms(knobs).items()}

    def step_busy(terms) -> dict[str, float]:
        busy = {r: f.at(placement) for r, f in terms.busy.items()}
        if knobs.policy == "serial-spec":  # the draft round runs before the verification, on its own resources
            dr = cm.draft_round(knobs, knobs.decode_batch)
            busy = {r: v + dr.get(r, 0.0) for r, v in busy.items()}
        return busy

    busy = step_busy(cm.step_terms(knobs))
    fused = step_busy(cm.fused_terms(knobs)) if fused_n else {}
    if fused_n:  # the draft's prefill of each fused chunk runs on the GPU after the pass
        fused["gpu"] = fused.get("gpu", 0.0) + cm.draft_prefill_work(knobs)["gpu"]
    total = pred.total_seconds
    out = {
        "throughput_tokens_per_s": pred.throughput_tokens_per_s,
        "decode_tokens_per_s": pred.decode_tokens_per_s,
        "total_seconds": total,
        "prefill_seconds": pred.prefill_seconds,
        "decode_seconds": pred.decode_seconds,
        "slots": pred.slots,
        "slot_seconds": pred.slot_seconds,
        "prefill_passes": float(chunks),
        "fused_passes": float(fused_n),
        "acceptance.tokens_per_round": pred.expected_tokens_per_round,
        "bound_fraction": pred.bound_fraction,
    }
    for r in ("gpu", "cpu", "h2d", "d2h") + (("disk",) if "disk" in busy else ()):
        used = ((pred.slots - fused_n) * busy.get(r, 0.0) + fused_n * fused.get(r, 0.0)
                + chunks * prefill.get(r, 0.0))
        out[f"busy_fraction.{r}"] = used / total if total > 0 and math.isfinite(total) else math.nan
    for pool, v in pred.peak_mem_bytes.items():
        out[f"peak_mem_bytes.{pool}"] = v
    return out
