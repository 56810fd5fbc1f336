"""The contracts between stages: HardwareProfile, Workload, Plan (ModelSpec lives in models.py).

Frozen dataclasses with `schema_version`, units in field names, invariants checked in
`__post_init__`, strict YAML loading via `strict.py`. Nothing here imports torch.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cost_terms import OPTIONAL as COST_TERM_OPTIONAL
from .cost_terms import TERMS as COST_TERMS
from .strict import SchemaError, YamlContract, to_plain

PROFILE_SCHEMA = 1
WORKLOAD_SCHEMA = 1
PLAN_SCHEMA = 1


def fingerprint(obj: Any) -> str:
    """Short stable hash of a contract's content (what a plan was made for)."""
    blob = json.dumps(to_plain(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@dataclass(frozen=True)
class Curve:
    """A measured figure as a piecewise-linear function of a size (log-x interpolation).

    YAML: a single number (constant) or a list of [x, y] pairs with x increasing.
    Outside the measured range the curve is held at its end values.
    """

    points: tuple[tuple[float, float], ...]

    yaml_expected = "a number or a list of [x, y] pairs"

    def __post_init__(self):
        if not self.points:
            raise ValueError("a curve needs at least one point")
        xs = [p[0] for p in self.points]
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError("x values must increase")
        if any(x <= 0 or y <= 0 or not math.isfinite(y) for x, y in self.points):
            raise ValueError("x and y must be positive and finite")

    @classmethod
    def constant(cls, y: float) -> "Curve":
        return cls(((1.0, float(y)),))

    @classmethod
    def from_yaml_value(cls, value: Any) -> "Curve":
        if isinstance(value, bool):
            raise TypeError("not a number")
        if isinstance(value, (int, float)):
            return cls.constant(float(value))
        if isinstance(value, str):
            return cls.constant(float(value))
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        pts = []
        for item in value:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TypeError("each point must be an [x, y] pair")
            pts.append((float(item[0]), float(item[1])))
        return cls(tuple(pts))

    def to_yaml_value(self) -> Any:
        if len(self.points) == 1:
            return self.points[0][1]
        return [[x, y] for x, y in self.points]

    def __call__(self, x: float) -> float:
        pts = self.points
        if len(pts) == 1 or x <= pts[0][0]:
            return pts[0][1]
        if x >= pts[-1][0]:
            return pts[-1][1]
        i = bisect.bisect_right([p[0] for p in pts], x)
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
        return y0 + t * (y1 - y0)

    @property
    def peak(self) -> float:
        return max(y for _, y in self.points)

    def scaled(self, factor: float) -> "Curve":
        return Curve(tuple((x, y * factor) for x, y in self.points))


# Figures the profiler may fail to measure: listed in `missing` and null in the file (planner/cost_terms.py
# declares each figure once: unit, probe, fit, fallback).
OPTIONAL_FIGURES = COST_TERM_OPTIONAL


@dataclass(frozen=True)
class HardwareProfile(YamlContract):
    """One machine's figures, measured or from spec sheets.

    `device_kind: cpu` is a CPU-only machine: the `gpu_*` figures then describe the CPU acting as
    the compute device, and device compute and CPU attention share one resource.
    """

    name: str
    source: str  # "measured" or "spec-sheet"
    device_kind: str  # "cuda" or "cpu"
    device_name: str
    cpu_name: str
    cpu_cores: int
    host_mem_bytes: float  # usable host memory for weights + KV
    pinned_mem_bytes: float  # how much of it may be page-locked
    gpu_mem_bytes: float  # what the allocator really gives
    gpu_mem_reserve_bytes: float  # safety margin kept free (fragmentation, workspaces)
    gpu_matmul_flops_per_s: Curve | None  # achieved bf16 rate over token count (x = tokens)
    gpu_mem_bandwidth_bytes_per_s: float | None
    h2d_pinned_bytes_per_s: Curve | None  # x = transfer size in bytes
    h2d_pageable_bytes_per_s: Curve | None
    d2h_pinned_bytes_per_s: Curve | None
    d2h_pageable_bytes_per_s: Curve | None
    cpu_attn_kv_read_bytes_per_s: float | None  # decode attention: rate of reading the KV cache
    cpu_attn_flops_per_s: float | None  # decode attention: arithmetic rate (q·K, p·V)
    cpu_attn_overhead_seconds: float  # fixed cost per attention call (one layer, one batch)
    cpu_mem_bandwidth_bytes_per_s: float | None
    device_op_overhead_seconds: float = 0.0  # fixed cost per layer per forward on the device
    device_expert_overhead_seconds: float = 0.0  # MoE: fixed cost per expert a layer's forward invokes
    device_op_token_seconds: float = 0.0  # per token per layer per forward beyond the matmuls (norms, RoPE, routing)
    cpu_attn_seq_overhead_seconds: float = 0.0  # CPU attention: fixed cost per sequence in the call
    cpu_attn_row_overhead_seconds: float = 0.0  # CPU attention: fixed cost per query row (sequence x new token)
    engine_pass_overhead_seconds: float = 0.0  # the runtime's host bookkeeping per verification pass
    engine_seq_overhead_seconds: float = 0.0  # ... and per sequence in the pass
    engine_layer_overhead_seconds: float = 0.0  # ... and per layer (the loop between a layer's timed pieces)
    device_logit_element_seconds: float = 0.0  # per logit element produced (fp32 cast, argmax / acceptance scan)
    engine_draft_round_overhead_seconds: float = 0.0  # the runtime's bookkeeping per draft round (speculative)
    engine_draft_seq_overhead_seconds: float = 0.0  # ... and per sequence in the round
    engine_draft_step_overhead_seconds: float = 0.0  # ... and per draft step (one token for the batch)
    # sequential read rate of the disk holding the checkpoint (the disk tier); 0.0 = not measured / unknown
    disk_read_bytes_per_s: float = 0.0
    # the disk tier's CPU costs (0.0 = not measured): the rate at which the engine converts a staged layer to
    # the compute dtype on a CPU-only machine (on-disk bytes per second; 0: estimated from memory bandwidth),
    # and the host compute time a read in flight takes from the compute beside it, per byte read (0: none charged)
    disk_convert_bytes_per_s: float = 0.0
    disk_read_compute_seconds_per_byte: float = 0.0
    provenance: dict[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    schema_version: int = PROFILE_SCHEMA
    SCHEMA = PROFILE_SCHEMA  # what this code reads (a class constant, not a field)

    def __post_init__(self):
        if self.source not in ("measured", "spec-sheet"):
            raise ValueError(f"source must be 'measured' or 'spec-sheet', not {self.source!r}")
        if self.device_kind not in ("cuda", "cpu"):
            raise ValueError(f"device_kind must be 'cuda' or 'cpu', not {self.device_kind!r}")
        for term in COST_TERMS:  # the bounds each figure's row in planner/cost_terms.py implies
            value = getattr(self, term.name)
            if term.bound == "count" and value < 1:
                raise ValueError(f"{term.name} must be >= 1, found {value}")
            if term.bound == "positive" and not term.optional and not value > 0:
                raise ValueError(f"{term.name} must be positive, found {value}")
            if term.bound == "nonneg" and value < 0:
                raise ValueError(f"{term.name} must be >= 0, found {value}")
        if not math.isfinite(self.disk_read_bytes_per_s):
            raise ValueError(f"disk_read_bytes_per_s must be finite (0 = unknown), found {self.disk_read_bytes_per_s}")
        for name in ("disk_convert_bytes_per_s", "disk_read_compute_seconds_per_byte"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (0 = not measured), found {value!r}; "
                                 "measure it with specoffload-profile --disk DIR --disk-only -o PROFILE")
        if self.gpu_mem_reserve_bytes >= self.gpu_mem_bytes:
            raise ValueError("gpu_mem_reserve_bytes must be below gpu_mem_bytes")
        for name in OPTIONAL_FIGURES:
            value = getattr(self, name)
            if value is None and name not in self.missing:
                raise ValueError(f"{name} is null but not listed in 'missing'")
            if isinstance(value, float) and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, found {value}")
        unknown = [m for m in self.missing if m not in OPTIONAL_FIGURES]
        if unknown:
            raise ValueError(f"'missing' names unknown figures {unknown}; known: {OPTIONAL_FIGURES}")

    @property
    def cpu_only(self) -> bool:
        return self.device_kind == "cpu"

    def require(self, name: str, why: str = "") -> Any:
        """A figure the caller needs; a missing one is an error naming it and the remedy."""
        value = getattr(self, name)
        if value is None:
            raise SchemaError(
                f"profile '{self.name}': figure '{name}' is missing (its probe failed when profiled)"
                f"{' and is needed ' + why if why else ''}; re-run specoffload-profile, or set it "
                f"by hand (or with --set {name}=VALUE)")
        return value


    def with_overrides(self, overrides: dict[str, Any], source: str = "--set") -> "HardwareProfile":
        """A what-if copy: `{field: value}`; curves given a number become constant curves.

        Aliases: `h2d_bytes_per_s` / `d2h_bytes_per_s` set the pinned curves,
        `gpu_flops_per_s` sets the matmul curve.
        """
        aliases = {"h2d_bytes_per_s": "h2d_pinned_bytes_per_s", "d2h_bytes_per_s": "d2h_pinned_bytes_per_s",
                   "gpu_flops_per_s": "gpu_matmul_flops_per_s"}
        data = to_plain(self)
        for key, value in overrides.items():
            key = aliases.get(key, key)
            if key not in data or key == "schema_version":
                raise SchemaError(f"{source}: unknown profile field '{key}'; fields: "
                                  f"{', '.join(sorted(set(data) - {'schema_version'}))}")
            data[key] = value
            missing = list(data.get("missing", []))
            if value is not None and key in missing:
                missing.remove(key)
            elif value is None and key in OPTIONAL_FIGURES and key not in missing:
                missing.append(key)
            data["missing"] = missing
        return HardwareProfile.from_dict(data, source)


@dataclass(frozen=True)
class Workload(YamlContract):
    """What is to be generated: lengths, count, sampling, and the draft's acceptance behaviour.

    `acceptance` is a scalar p (i.i.d. per draft position) or a per-position vector a_i =
    P(draft token i accepted | tokens 1..i-1 accepted); positions beyond the vector reuse its last value.
    """

    prompt_len_tokens: int
    gen_len_tokens: int
    num_prompts: int
    acceptance: float | tuple[float, ...] = 0.7
    acceptance_source: str = "assumed"
    max_prompt_len_tokens: int = 0  # 0: same as prompt_len_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    schema_version: int = WORKLOAD_SCHEMA
    SCHEMA = WORKLOAD_SCHEMA  # what this code reads (a class constant, not a field)

    def __post_init__(self):
        for name in ("prompt_len_tokens", "gen_len_tokens", "num_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        accs = self.acceptance if isinstance(self.acceptance, tuple) else (self.acceptance,)
        if not accs or any(not (0.0 <= a <= 1.0) for a in accs):
            raise ValueError(f"acceptance must be in [0, 1], found {self.acceptance}")
        if self.max_prompt_len_tokens and self.max_prompt_len_tokens < self.prompt_len_tokens:
            raise ValueError("max_prompt_len_tokens must be >= prompt_len_tokens")
        if self.temperature < 0 or not (0 < self.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")

    @property
    def max_prompt_len(self) -> int:
        return self.max_prompt_len_tokens or self.prompt_len_tokens

    @property
    def max_context_tokens(self) -> int:
        return self.max_prompt_len + self.gen_len_tokens

    def acceptance_at(self, position: int) -> float:
        """Conditional acceptance of draft position `position` (1-based)."""
        if isinstance(self.acceptance, tuple):
            return self.acceptance[min(position, len(self.acceptance)) - 1]
        return float(self.acceptance)

    def acceptance_vector(self, k: int) -> tuple[float, ...]:
        return tuple(self.acceptance_at(i) for i in range(1, k + 1))



def resident_layers(n: int, layers: int) -> set[int]:
    """Which layers keep their weights on the GPU when a plan says `n` of `layers`: spread evenly.

    Spreading (rather than layers 0..n-1) keeps the copy engine busy: it can fetch the next streamed
    layer while a resident one computes. The simulator and the runtime both use this function.
    """
    if n >= layers:
        return set(range(layers))
    return {min(layers - 1, int((i + 0.5) * layers / n)) for i in range(max(0, n))}


def disk_layer_ids(n: int, layers: int, resident: set[int] = frozenset()) -> list[int]:
    """Which layers a plan reads from disk when it says `n`: spread evenly over the layers that are
    resident in no part (`resident`: layers keeping attention or FFN on the GPU; empty on a CPU-only
    machine). Spreading lets the disk read a layer while in-memory layers compute and copy. The
    planner, the simulator and the runtime all use this function. Raises ValueError if n is too many."""
    cand = [j for j in range(layers) if j not in resident]
    if n > len(cand):
        raise ValueError(f"the plan reads {n} layers from disk but only {len(cand)} of {layers} layers are fully "
                         "streamed; re-plan")
    if n <= 0:
        return []
    return sorted({cand[min(len(cand) - 1, int((i + 0.5) * len(cand) / n))] for i in range(n)})


POLICIES = ("offload-only", "serial-spec", "interleaved")
DRAFT_KV_MODES = ("gpu", "host", "recompute")
RESOURCES = ("gpu", "cpu", "h2d", "d2h")  # plus "disk" where a plan reads layers from disk
MEMORY_TIERS = ("gpu", "pinned", "host")


@dataclass(frozen=True)
class Prediction:
    """The cost model's figures for a plan (the same names the reports use)."""

    throughput_tokens_per_s: float  # end to end, each sequence counted up to its gen length
    decode_tokens_per_s: float
    total_seconds: float
    prefill_seconds: float
    decode_seconds: float
    slot_seconds: float  # one decode slot (one verification of one batch)
    slots: float  # expected number of decode slots, tail included
    tail_slots: float  # of which: the drain at the end (slowest sequences)
    expected_tokens_per_round: float  # per sequence per verification
    busy_seconds_per_slot: dict[str, float]  # resource -> busy time in one slot
    peak_mem_bytes: dict[str, float]  # tier -> peak
    capacity_bytes: dict[str, float]  # tier -> capacity
    binding: str  # the resource or dependency chain that sets the slot time
    physical_bound_tokens_per_s: float
    bound_fraction: float
    disk_bytes_per_sweep: float = 0.0  # bytes the disk tier reads from the checkpoint per weight sweep
    # Fused plans (Plan.fuse_prefill): verifications that also prefill a chunk (of `slots`), and the time of one
    fused_passes: float = 0.0
    fused_seconds: float = 0.0


@dataclass(frozen=True)
class Plan(YamlContract):
    """Everything the runtime needs and nothing it must guess, plus what the model predicts."""

    policy: str
    model: str
    model_fingerprint: str
    draft: str  # "" when the policy uses no draft
    draft_fingerprint: str
    profile: str
    profile_fingerprint: str
    workload: Workload
    decode_batch: int  # sequences per batch (each of num_batches)
    num_batches: int  # 2 for the interleaved policy
    prefill_batch: int
    draft_sub_batch: int
    draft_len: int  # k; 0 without speculation
    micro_batches: int
    gpu_attn_layers: int  # this many layers keep attention weights resident on the GPU (resident_layers())
    gpu_ffn_layers: int  # this many layers keep FFN / expert weights resident on the GPU (resident_layers())
    gpu_kv_sequences: int  # per batch, this many sequences keep their target KV (and attention) on the GPU
    target_attention: str  # "cpu" (over the host KV cache) or "gpu"
    draft_kv: str  # "gpu", "host", or "recompute" (the context re-read each round)
    weight_buffers: int  # device buffers for streamed layers; 0 when every weight is resident
    prediction: Prediction
    notes: tuple[str, ...] = ()
    # compute dtype the plan was made for (bf16 / fp16 / fp32): weights and KV are sized in it, and the run
    # uses it unless told otherwise; "" = the runtime's default (bf16 on a GPU, fp32 on the CPU)
    dtype: str = ""
    # The disk tier: this many layers (both parts streamed; disk_layer_ids() says which) are not held in
    # host memory but read from the checkpoint on disk every sweep. 0: none (plans before the tier).
    disk_layers: int = 0
    host_mem_limit_bytes: float = 0.0  # the cap on host memory the plan was made under (0: the profile's)
    # The fused prefill (planner/schedule.py `defer_prefill`): a refill's chunk of prompts rides in the next
    # verification's weight sweep instead of a sweep of its own. One batch only. False: plans before it.
    fuse_prefill: bool = False
    schema_version: int = PLAN_SCHEMA
    SCHEMA = PLAN_SCHEMA  # what this code reads (a class constant, not a field)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; found {self.policy!r}")
        if self.draft_kv not in DRAFT_KV_MODES:
            raise ValueError(f"draft_kv must be one of {', '.join(DRAFT_KV_MODES)}; found {self.draft_kv!r}")
        if self.target_attention not in ("cpu", "gpu"):
            raise ValueError(f"target_attention must be 'cpu' or 'gpu'; found {self.target_attention!r}")
        for name in ("decode_batch", "prefill_batch", "draft_sub_batch", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        if self.weight_buffers < 0:
            raise ValueError(f"weight_buffers must be >= 0 (0: nothing streamed), found {self.weight_buffers}")
        if self.num_batches != (2 if self.policy == "interleaved" else 1):
            raise ValueError(f"policy {self.policy} runs {'2 batches' if self.policy == 'interleaved' else '1 batch'}"
                             f", found num_batches={self.num_batches}")
        if (self.policy == "offload-only") != (self.draft_len == 0):
            raise ValueError("draft_len must be 0 exactly when the policy is offload-only")
        if self.draft_len and not self.draft:
            raise ValueError("a speculative policy needs a draft model")
        if self.micro_batches > self.decode_batch:
            raise ValueError("micro_batches cannot exceed decode_batch")
        if self.fuse_prefill and self.num_batches != 1:
            raise ValueError("fuse_prefill needs one batch (policy offload-only or serial-spec); the interleaved "
                             "policy prefills on sweeps of its own")
        if min(self.gpu_attn_layers, self.gpu_ffn_layers, self.gpu_kv_sequences) < 0:
            raise ValueError("resident layer and GPU-KV counts must be >= 0")
        if self.gpu_kv_sequences > self.decode_batch:
            raise ValueError("gpu_kv_sequences cannot exceed decode_batch")
        if self.dtype not in ("", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32 (or empty: the runtime's default); found {self.dtype!r}")
        if isinstance(self.disk_layers, bool) or self.disk_layers < 0:
            raise ValueError(f"disk_layers must be an integer >= 0 (layers read from disk every sweep; 0: none), "
                             f"found {self.disk_layers!r}")
        if self.disk_layers and self.target_attention == "cpu" and self.weight_buffers < 1:
            raise ValueError("disk_layers > 0 needs weight_buffers >= 1: layers read from disk are streamed to the GPU")
        if not (math.isfinite(self.host_mem_limit_bytes) and self.host_mem_limit_bytes >= 0):
            raise ValueError(f"host_mem_limit_bytes must be >= 0 and finite (0: no limit), found "
                             f"{self.host_mem_limit_bytes}")

    @property
    def sequences_in_flight(self) -> int:
        return self.decode_batch * self.num_batches


    def replace(self, **changes: Any) -> "Plan":
        return dataclasses.replace(self, **changes)


def profiles_dir() -> Path:
    """The shipped profiles/ folder (spec-sheet presets and measured profiles)."""
    import importlib.util

    spec = importlib.util.find_spec("specoffload.profiles")
    if spec is None or not spec.submodule_search_locations:
        raise SchemaError("the specoffload.profiles package is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def load_profile(ref: str | Path) -> HardwareProfile:
    """A profile YAML path, or the name of one shipped under profiles/ (e.g. `rtx4090-pcie4`)."""
    path = Path(ref)
    if path.exists():
        return HardwareProfile.load(path)
    shipped = profiles_dir() / f"{ref}.yaml"
    if shipped.exists():
        return HardwareProfile.load(shipped)
    names = sorted(p.stem for p in profiles_dir().glob("*.yaml"))
    raise SchemaError(f"profile {str(ref)!r}: no such file, and not a shipped profile ({', '.join(names)})")
