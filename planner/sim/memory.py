"""What the simulator allocates in each memory pool, derived from the cost model's memory terms.

The cost model gives one peak per tier (`CostModel.memory_terms`), at full occupancy: every slot's KV
at full length, every weight buffer filled, a prefill chunk's staging. This module splits the same
bytes into named parts, so that an overflow names the part that does not fit, and says which of them
live for the whole run and which the simulation takes and releases over time:

- "static" (allocated at setup, for the whole run): resident weights, the draft's weights, pinned
  streamed weights, and what the cost model adds on top of the named parts on the GPU (activation
  and logit working sets, the draft's recompute buffers) as one "workspace", the residual;
- "buffers": the weight buffers, taken by each streamed layer's copy (the bytes actually copied) when
  the copy is issued and released after the layer's last compute;
- "staging": the pinned / host staging of a prefill chunk's hidden states (the residual of those
  pools), taken while a prefill chunk runs (chunks run one at a time), scaled by the chunk's size;
- KV caches (kv_per_sequence / kv_per_gpu_sequence, bytes per sequence at full length): taken per
  token as sequences are admitted (their prompt) and generate (the tokens each verification keeps),
  freed when a sequence finishes and its slot is refilled.

At full occupancy these add up to the cost model's peak exactly (tests check this); over a run the
simulated use stays at or below it.

Pools: `gpu`, `pinned` (page-locked host memory, a part of host memory) and `host`. Pinned bytes are
allocated in both `pinned` and `host`. On a CPU-only profile everything lives in `host`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..costmodel import CPU_ONLY_PLACEMENT, CostModel, Knobs
from ..schema import Plan

POOLS = ("gpu", "pinned", "host")


@dataclass(frozen=True)
class StaticAlloc:
    pool: str
    name: str
    nbytes: float
    kind: str = "static"  # static (whole run) | buffers (per streamed copy) | staging (per prefill chunk)


@dataclass(frozen=True)
class MemoryLayout:
    static: tuple[StaticAlloc, ...]
    kv_per_sequence: dict[str, float]  # pool -> bytes one sequence holds when its slot keeps KV on the host
    kv_per_gpu_sequence: dict[str, float]  # same for a slot whose target KV lives on the GPU
    capacity: dict[str, float]  # pool -> bytes (inf: no limit)
    predicted_peak: dict[str, float]  # the cost model's peak per pool at this plan's placement
    residual_error: dict[str, float]  # negative residuals clamped to 0 (should all be 0)


def _add(d: dict[str, float], pool: str, nbytes: float) -> None:
    d[pool] = d.get(pool, 0.0) + nbytes


def memory_layout(cm: CostModel, knobs: Knobs, placement: dict[str, float], plan: Plan) -> MemoryLayout:
    t, d = cm.t, cm.d
    L = t.num_layers
    terms = cm.memory_terms(knobs)
    peak = {pool: terms[pool].at(placement) for pool in POOLS}
    caps = cm.capacities()
    kv_seq = cm.ctx_max * t.kv_bytes_per_token
    spec = knobs.speculative and d is not None
    dkv_seq = cm.ctx_max * d.kv_bytes_per_token if spec else 0.0
    nb, b = knobs.num_batches, knobs.decode_batch
    # The disk tier: layers read from disk every sweep are held in no memory (their staging buffers are
    # taken and released by the simulation's disk stage, see weight_stream.py).
    n_disk = plan.disk_layers
    disk_bytes = n_disk * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)

    static: list[tuple] = []
    kv_host: dict[str, float] = {}
    kv_gpu: dict[str, float] = {}
    if cm.cpu_only:
        # One memory: weights, KV and working sets all in host memory; attention in place.
        static.append(("host", "target weights" + (f" ({n_disk} layers on disk)" if n_disk else ""),
                       t.outer_bytes + L * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer) - disk_bytes))
        if spec:
            static.append(("host", "draft weights", d.total_bytes))
        _add(kv_host, "host", kv_seq)
        _add(kv_gpu, "host", kv_seq)
        if spec and knobs.draft_kv in ("gpu", "host"):
            _add(kv_host, "host", dkv_seq)
            _add(kv_gpu, "host", dkv_seq)
        gpu_kv_slots = 0
        placement = {**CPU_ONLY_PLACEMENT, "disk": placement.get("disk", 0.0)}
    else:
        A, F = plan.gpu_attn_layers, plan.gpu_ffn_layers
        static.append(("gpu", "target embeddings, final norm and LM head", t.outer_bytes))
        static.append(("gpu", f"resident attention weights ({A} layers)", A * t.attn_bytes_per_layer))
        static.append(("gpu", f"resident FFN weights ({F} layers)", F * t.ffn_bytes_per_layer))
        static.append(("gpu", f"weight buffers ({knobs.weight_buffers} x one layer)",
                       knobs.weight_buffers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer), "buffers"))
        streamed = (L - A) * t.attn_bytes_per_layer + (L - F) * t.ffn_bytes_per_layer - disk_bytes
        static.append(("pinned", f"streamed weights ({L - A} attention, {L - F} FFN layers"
                       + (f", of which {n_disk} layers on disk" if n_disk else "") + ")", streamed))
        static.append(("host", "streamed weights (pinned)", streamed))
        if spec:
            static.append(("gpu", "draft weights", d.total_bytes))
        _add(kv_host, "host", kv_seq)
        _add(kv_gpu, "gpu", kv_seq)
        if spec and knobs.draft_kv in ("gpu", "host"):
            pool = "gpu" if knobs.draft_kv == "gpu" else "host"
            _add(kv_host, pool, dkv_seq)
            _add(kv_gpu, pool, dkv_seq)
        gpu_kv_slots = plan.gpu_kv_sequences
    # KV at full occupancy: every slot of every batch holds a sequence.
    full: dict[str, float] = {}
    for pool, v in kv_host.items():
        _add(full, pool, v * nb * (b - gpu_kv_slots))
    for pool, v in kv_gpu.items():
        _add(full, pool, v * nb * gpu_kv_slots)
    named: dict[str, float] = {}
    for pool, _, v, *_ in static:
        _add(named, pool, v)
    errors = {}
    for pool in POOLS:
        residual = peak[pool] - named.get(pool, 0.0) - full.get(pool, 0.0)
        if residual < -max(1.0, 1e-9 * peak[pool]):
            errors[pool] = residual
        if residual > 0:
            label = {"gpu": "workspace (activations, logits, prefill, draft buffers)",
                     "pinned": "pinned staging (prefill hidden states)",
                     "host": "host staging (prefill hidden states)"}[pool]
            static.append((pool, label, residual, "static" if pool == "gpu" else "staging"))
    return MemoryLayout(
        static=tuple(StaticAlloc(*a) for a in static if a[2] > 0),
        kv_per_sequence=kv_host, kv_per_gpu_sequence=kv_gpu,
        capacity={p: caps[p] for p in POOLS},
        predicted_peak=peak, residual_error=errors)


def finite_capacity(capacity: float) -> float:
    """Capacity as reports write it: 0 for an unlimited pool (as Prediction.capacity_bytes does)."""
    return capacity if math.isfinite(capacity) else 0.0


def working_sets(cm: CostModel, knobs: Knobs, chunk: int | None = None) -> tuple[float, float]:
    """(decode, prefill) device working sets in bytes (`CostModel.working_sets`), the prefill one for a chunk of
    `chunk` prompts (default the plan's prefill batch)."""
    return cm.working_sets(knobs if chunk is None else replace(knobs, prefill_batch=max(1, chunk)))


def fused_extra_bytes(cm: CostModel, knobs: Knobs, placement: dict[str, float], chunk: int) -> float:
    """Device bytes a fused pass (a verification with a prefill chunk of `chunk` prompts riding in its
    sweep) needs beyond what the plan's memory holds: both working sets at once, less the larger one the
    cost model always counts and whatever it adds for a fused plan (its peak with `fuse_prefill` over the
    same plan without). 0 where the plan counted the chunk beside the verification."""
    decode, prefill = working_sets(cm, knobs, chunk)
    _, prefill_full = working_sets(cm, knobs)
    pool = "host" if cm.cpu_only else "gpu"
    counted = 0.0
    if knobs.fuse_prefill:
        with_fused = cm.memory_terms(knobs)[pool].at(placement)
        without = cm.memory_terms(replace(knobs, fuse_prefill=False))[pool].at(placement)
        counted = max(0.0, with_fused - without)
    return max(0.0, decode + prefill - max(decode, prefill_full) - counted)
