"""Exhaustive grid search over the planner's knobs and a placement grid: the yardstick for the planner.

Every candidate of the planner's grid (no bounds, no pruning) at every prefill batch, evaluated by the
same cost model in closed form on a placement grid (whole resident layers of attention and FFN,
GPU-KV fractions in steps), vectorised with numpy. Used by tools/bench_planner.py and the tests.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .costmodel import Knobs, Linear
from .planner import POLICIES, Planner

KV_LEVELS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class GridBest:
    knobs: Knobs
    placement: dict[str, float]
    total_seconds: float
    throughput: float
    evaluated: int  # (candidate, prefill batch, placement) points


def _eval(f: Linear, grid: dict[str, np.ndarray]) -> np.ndarray:
    out = f.const + f.attn * grid["attn_gpu"] + f.ffn * grid["ffn_gpu"] + f.kv * grid["kv_gpu"]
    if f.disk and "disk" in grid:
        out = out + f.disk * grid["disk"]
    return out


def grid_search(planner: Planner, policies: tuple[str, ...] = POLICIES, disk: bool | None = None) -> GridBest | None:
    """`disk`: also search the disk tier's share in whole layers (default: when the planner has a host
    memory limit and the profile a disk rate; the axis multiplies the grid by layers + 1)."""
    if disk is None:
        disk = bool(planner.cm.host_mem_limit_bytes) and planner.cm.disk_tier
    disk = disk and planner.cm.disk_tier
    cm = planner.cm
    L = planner.target.num_layers
    best: GridBest | None = None
    evaluated = 0
    tokens = planner.workload.num_prompts * planner.workload.gen_len_tokens
    for policy in policies:
        if policy != "offload-only" and planner.draft is None:
            continue
        for knobs in planner.knob_space(policy):
            box = planner._placement_box(knobs)
            # Skip only what no placement can fit (a necessary memory condition, not an objective bound).
            if not planner._memory_possible(knobs, box):
                continue
            if not disk:
                box = {**box, "disk": (0.0, 0.0)}
            axes = {v: np.array(sorted({min(max(x, lo), hi) for x in
                                        ([i / L for i in range(L + 1)] if v != "kv_gpu" else KV_LEVELS)}))
                    for v, (lo, hi) in box.items()}
            a, f, k, dk = np.meshgrid(axes["attn_gpu"], axes["ffn_gpu"], axes["kv_gpu"], axes["disk"], indexing="ij")
            grid = {"attn_gpu": a.ravel(), "ffn_gpu": f.ravel(), "kv_gpu": k.ravel(), "disk": dk.ravel()}
            # a layer on disk is resident in neither part (GPU machine); its staging is paid when any is
            placeable = np.ones_like(grid["disk"], dtype=bool)
            if not cm.cpu_only:
                placeable = (grid["disk"] + grid["attn_gpu"] <= 1 + 1e-9) & (grid["disk"] + grid["ffn_gpu"] <= 1 + 1e-9)
            staging = np.where(grid["disk"] > 0, cm.disk_staging_bytes(), 0.0)
            terms = cm.step_terms(knobs)
            slot = np.max(np.stack([_eval(f, grid) for f in terms.bounds().values()]), axis=0)
            slot = slot + terms.serial_total
            for bp in planner.prefill_grid(knobs):
                kb = replace(knobs, prefill_batch=bp)
                slots, _ = cm.decode_steps(kb)  # rows waiting for a whole refill chunk: depends on bp
                mem_ok = placeable.copy()
                for tier, form in cm.memory_terms(kb).items():
                    cap = planner.caps[tier]
                    if math.isfinite(cap):
                        extra = staging if tier == "host" or (tier == "pinned" and not cm.cpu_only) else 0.0
                        mem_ok &= _eval(form, grid) + extra <= cap * (1 + 1e-9) + 1.0
                evaluated += slot.size
                if not mem_ok.any():
                    continue
                pre = {r: _eval(x, grid) for r, x in cm.prefill_terms(kb).items()}
                if cm.cpu_only:
                    pre = {"device": pre["gpu"] + pre["cpu"], "h2d": pre["h2d"], "d2h": pre["d2h"],
                           **({"disk": pre["disk"]} if "disk" in pre else {})}
                chunk = np.max(np.stack(list(pre.values())), axis=0)
                total = slots * slot + cm.prefill_chunks(kb) * chunk
                if kb.fuse_prefill:  # chunks that ride in verifications: fused passes instead of sweeps of their own
                    fused_terms = cm.fused_terms(kb)
                    fused = np.max(np.stack([_eval(f, grid) for f in fused_terms.bounds().values()]), axis=0)
                    n_f = cm.fused_passes(kb)
                    total = ((slots - n_f) * slot + n_f * (fused + fused_terms.serial_total)
                             + cm.standalone_chunks(kb) * chunk)
                total = np.where(mem_ok, total, np.inf)
                i = int(np.argmin(total))
                if best is None or total[i] < best.total_seconds:
                    placement = {v: float(grid[v][i]) for v in grid}
                    best = GridBest(kb, placement, float(total[i]), tokens / float(total[i]), 0)
    if best is not None:
        best = replace(best, evaluated=evaluated)
    return best
