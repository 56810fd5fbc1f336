"""Hand-built plans: a Plan at given knobs and placement, without the planner's search.

For what-ifs ("this exact plan on that machine") and for tests that need many plans quickly. The
prediction is the cost model's closed form at that point (CostModel.evaluate), the Plan is made by
the planner's own `to_plan`, so it is exactly what the planner would write for that candidate.
"""
from __future__ import annotations

from ..costmodel import Knobs
from ..models import ModelSpec
from ..planner import Candidate, Planner
from ..schema import HardwareProfile, Plan, Workload


def plan_at(profile: HardwareProfile, target: ModelSpec, draft: ModelSpec | None, workload: Workload,
            knobs: Knobs, placement: dict[str, float], notes: tuple[str, ...] = ("hand-built",),
            host_mem_limit_bytes: float = 0.0) -> Plan:
    """The Plan for `knobs` at `placement` (fractions; rounded to whole layers / sequences; `disk`, the
    disk tier's share of the layers, optional)."""
    planner = Planner(profile, target, draft, workload, host_mem_limit_bytes=host_mem_limit_bytes)
    L, b = target.num_layers, knobs.decode_batch
    snapped = {"attn_gpu": round(placement["attn_gpu"] * L) / L, "ffn_gpu": round(placement["ffn_gpu"] * L) / L,
               "kv_gpu": round(placement["kv_gpu"] * b) / b, "disk": round(placement.get("disk", 0.0) * L) / L}
    cand = Candidate(knobs, snapped, planner.cm.evaluate(knobs, snapped))
    return planner.to_plan(cand, list(notes))
