"""The planner: outer enumeration of integer knobs (branch and bound), inner PuLP placement LP.

For every candidate (policy, decode batch, draft length, micro-batches, draft KV mode, draft
sub-batch, prefill batch) the placement problem is a small mixed-integer LP: whole layers of
attention / FFN weights resident on the GPU, sequences whose KV stays on the GPU, and two epigraph
variables (slot time, prefill chunk time) minimising the job's end-to-end time. Candidates are
visited in order of an optimistic bound (each resource at its own best placement, memory relaxed
to a fractional knapsack), and the search stops when no remaining bound beats the best plan: the
result is the exact optimum over the candidate grid, without solving most of the LPs.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace

from .costmodel import CPU_ONLY_PLACEMENT, CostModel, Knobs, Linear, fits, streamed
from .lp import Constraint, LpError, Variable, minimize
from .models import ModelSpec, check_draft_for_target
from .schedule import refill_rows
from .schema import POLICIES, HardwareProfile, Plan, Prediction, Workload, resident_layers
from .strict import SchemaError

GiB = 2**30
PLAN_POLICIES = POLICIES + ("specoffload",)
MICRO_BATCHES = (1, 2, 4, 8, 16)
DEFAULT_MAX_DRAFT_LEN = 8  # longest draft length k considered unless told otherwise (the CLI reads it)
DRAFT_SUB_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# The search stops once no remaining candidate can beat the best plan by more than this fraction:
# the plan is within 0.2% of the best over the candidate grid (near-ties are not worth an LP each).
OPTIMALITY_GAP = 2e-3
PREFILL_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def size_words(nbytes: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB (small models and tight limits stay readable)."""
    return f"{nbytes / GiB:.1f} GiB" if abs(nbytes) >= GiB else f"{nbytes / 2**20:.1f} MiB"


class PlanInfeasible(SchemaError):
    """No plan fits: the message names the resource, the need and the capacity."""


def batch_grid(per_stream: int) -> list[int]:
    """Decode batch candidates: 1..16, then ~19% steps to 65536, plus even splits of the stream.

    The grid does not depend on the machine, so a machine with more of anything never loses a
    candidate (this is what makes the planner monotone in bandwidth and memory).
    """
    grid = set(range(1, 17))
    x = 16.0
    while x < 65536:
        x *= 2 ** 0.25
        grid.add(int(round(x)))
    grid.update(math.ceil(per_stream / w) for w in range(1, 17))
    return sorted(b for b in grid if b <= per_stream)


@dataclass(frozen=True)
class Candidate:
    knobs: Knobs
    placement: dict[str, float]
    prediction: Prediction
    binding_memory: tuple[str, ...] = ()  # LP memory constraints at their capacity (mem_host, mem_gpu, ...)

    @property
    def throughput(self) -> float:
        return self.prediction.throughput_tokens_per_s


@dataclass
class PlanResult:
    plan: Plan
    best_by_policy: dict[str, Candidate]
    alternatives: list[Candidate]  # the runners-up, best first
    notes: list[str]
    lp_solves: int = 0
    candidates: int = 0
    seconds: float = 0.0
    num_layers: int = 0


def knapsack_min(f: Linear, g: Linear, cap: float) -> float:
    """min f(x) s.t. g(x) <= cap over the unit box, by fractional knapsack (exact for this LP)."""
    gc = dict(g.coef)
    budget = cap - g.const - sum(min(c, 0.0) for c in gc.values())
    if budget < 0:
        return math.inf
    value = f.const
    items = []
    for v, c in f.coef:
        if c >= 0:
            continue
        w = gc.get(v, 0.0)
        if w <= 0:
            value += c
        else:
            items.append((c / w, c, w))
    for _, c, w in sorted(items):  # most time saved per byte first
        take = min(1.0, budget / w)
        value += c * take
        budget -= w * take
        if budget <= 0:
            break
    return value


def layer_knapsack_min(f: Linear, g: Linear, cap: float, layers: int) -> float:
    """Like knapsack_min, but attention and FFN residency come in whole layers (as in the LP).

    Tries every FFN layer count; attention layers fill what is left, then GPU-KV fractionally.
    """
    if f.attn >= 0 and f.ffn >= 0:
        return knapsack_min(f, g, cap)
    budget = cap - g.const - min(g.kv, 0.0)
    if budget < 0:
        return math.inf
    best = math.inf
    wa, wf = max(g.attn, 0.0) / layers, max(g.ffn, 0.0) / layers
    for nf in range(layers + 1) if f.ffn < 0 else (0,):
        left = budget - nf * wf
        if left < 0:
            break
        na = layers if (f.attn < 0 and wa == 0) else (min(layers, int(left // wa)) if f.attn < 0 else 0)
        left -= na * wa
        value = f.const + f.ffn * nf / layers + f.attn * na / layers
        if f.kv < 0:
            value += f.kv * (1.0 if g.kv <= 0 else min(1.0, left / g.kv))
        best = min(best, value)
    return best


class Planner:
    def __init__(self, profile: HardwareProfile, target: ModelSpec, draft: ModelSpec | None, workload: Workload,
                 max_draft_len: int = DEFAULT_MAX_DRAFT_LEN, fixed: dict[str, int | str] | None = None,
                 host_mem_limit_bytes: float = 0.0):
        """`fixed` pins knobs: decode_batch, draft_len, micro_batches, prefill_batch (e.g. to reproduce
        a setting from a paper); the rest is still searched. `host_mem_limit_bytes` (> 0) caps the host
        memory (pinned included) a plan may use; where the weights do not fit, the disk tier reads some
        layers from the checkpoint every sweep (when the profile states disk_read_bytes_per_s)."""
        self.fixed = dict(fixed or {})
        fixable = ("decode_batch", "draft_len", "micro_batches", "prefill_batch", "draft_kv", "draft_sub_batch",
                   "fuse_prefill")
        unknown = set(self.fixed) - set(fixable)
        if unknown:
            raise SchemaError(f"cannot fix {sorted(unknown)}; fixable: {', '.join(fixable)}")
        check_draft_for_target(target, draft)
        # A feature draft keeps its one-layer KV (GPU or host); it has no context to re-read.
        self._feature_draft = draft is not None and draft.feature_draft
        if self._feature_draft and self.fixed.get("draft_kv") == "recompute":
            raise SchemaError(f"draft KV 'recompute' does not apply to the feature draft {draft.name}: it keeps "
                              "its one-layer KV cache (gpu or host)")
        if host_mem_limit_bytes < 0 or not math.isfinite(host_mem_limit_bytes):
            raise SchemaError(f"host memory limit must be > 0 GiB (or none), got {host_mem_limit_bytes / GiB:g} GiB")
        self.cm = CostModel(profile, target, draft, workload, host_mem_limit_bytes)
        self.profile, self.target, self.draft, self.workload = profile, target, draft, workload
        self.max_draft_len = max_draft_len
        self.caps = self.cm.capacities()
        self.lp_solves = 0
        self._prefill_lb: dict[tuple, float] = {}
        self._prefill_cache: dict[tuple, float] = {}
        self._prefill_min: dict[tuple, float] = {}

    # --- the candidate grid --------------------------------------------------------------------
    def knob_space(self, policy: str):
        """Decode knobs without the prefill batch (prefill_batch=1 stands in)."""
        nb = 2 if policy == "interleaved" else 1
        per_stream = max(1, math.ceil(self.workload.num_prompts / nb))
        ks = [0] if policy == "offload-only" else range(1, self.max_draft_len + 1)
        if "draft_len" in self.fixed and policy != "offload-only":
            ks = [self.fixed["draft_len"]]
        batches = batch_grid(per_stream)
        if "decode_batch" in self.fixed:
            batches = [self.fixed["decode_batch"]]
        micro = [self.fixed["micro_batches"]] if "micro_batches" in self.fixed else MICRO_BATCHES
        modes = [("gpu", 1)] if policy == "offload-only" else (
            [("gpu", 1), ("host", 1)] + [("recompute", s) for s in DRAFT_SUB_BATCHES if not self._feature_draft])
        if policy != "offload-only" and "draft_kv" in self.fixed:
            mode = self.fixed["draft_kv"]
            subs = [self.fixed.get("draft_sub_batch", 1)] if mode == "recompute" else [1]
            modes = [(mode, s) for s in subs]
        buffers = 0 if self.cm.cpu_only else 2
        fuse = self.fuse_choices(nb)
        for b in batches:
            for k in ks:
                for m in micro:
                    if m > b:
                        continue
                    for mode, s in modes:
                        if mode == "recompute" and s > b:
                            continue
                        for f in fuse:
                            yield Knobs(policy, b, 1, k, m, mode, s, buffers, f)

    def fuse_choices(self, num_batches: int) -> tuple[bool, ...]:
        """Whether plans prefill on sweeps of their own (False) or fused into verifications (True): both
        for one batch unless fixed; the interleaved policy (two batches) never fuses."""
        if num_batches != 1:
            return (False,)
        if "fuse_prefill" in self.fixed:
            return (bool(self.fixed["fuse_prefill"]),)
        return (False, True)

    def _placement_box(self, knobs: Knobs) -> dict[str, tuple[float, float]]:
        disk = (0.0, 1.0) if self.cm.disk_tier else (0.0, 0.0)
        if self.cm.cpu_only:
            return {**{v: (x, x) for v, x in CPU_ONLY_PLACEMENT.items()}, "disk": disk}
        if knobs.weight_buffers == 0:
            return {"attn_gpu": (1.0, 1.0), "ffn_gpu": (1.0, 1.0), "kv_gpu": (0.0, 1.0), "disk": (0.0, 0.0)}
        return {"attn_gpu": (0.0, 1.0), "ffn_gpu": (0.0, 1.0), "kv_gpu": (0.0, 1.0), "disk": disk}

    def _disk_floor(self, mem: dict[str, Linear], box) -> float:
        """The smallest disk fraction any placement in the box needs for its weights to fit (0: none;
        above 1: even the disk tier cannot help). Host alone, and GPU + host together: a weight byte not
        on the GPU is in host memory unless it is on disk."""
        lo, hi = box.get("disk", (0.0, 0.0))
        need = lo
        for f, cap in ((mem["host"], self.caps["host"]), (mem["gpu"] + mem["host"], self.caps["gpu"] + self.caps["host"])):
            f = self._fixed(f, {**box, "disk": (0.0, 1.0)})
            if not math.isfinite(cap):
                continue
            over = f.without_disk().minimum() - cap * (1 + 1e-9)
            if over > 0:
                need = max(need, math.inf if f.disk >= 0 else over / -f.disk)
        return need if need <= hi + 1e-12 or need == lo else math.inf

    def _fixed(self, f: Linear, box: dict[str, tuple[float, float]]) -> Linear:
        """Substitute variables whose box is a point (so bounds see only free variables)."""
        if not any(lo == hi for lo, hi in box.values()):
            return f
        const, coef = f.const, {}
        for v, c in f.coef:
            lo, hi = box.get(v, (0.0, 0.0))
            if lo == hi:
                const += c * lo
            else:
                coef[v] = c
        return Linear.of(const, **coef)

    def _resource_lb(self, busy: dict[str, Linear], shared: bool, gpu_mem: Linear, box, disk_floor: float = 0.0) -> float:
        cap, L = self.caps["gpu"], self.target.num_layers
        g = self._fixed(gpu_mem, box)
        vals = {r: layer_knapsack_min(self._fixed(f, box), g, cap, L) for r, f in busy.items()}
        if "disk" in busy and disk_floor > 0:
            vals["disk"] = busy["disk"].at({"attn_gpu": 0, "ffn_gpu": 0, "kv_gpu": 0, "disk": disk_floor})
        if shared:
            return max(vals["gpu"] + vals["cpu"], vals["h2d"], vals["d2h"], vals.get("disk", 0.0))
        return max(vals.values())

    def _memory_possible(self, knobs: Knobs, box, mem: dict[str, Linear] | None = None) -> bool:
        """Necessary conditions: each tier alone, and GPU with each host tier (a weight or KV byte not
        on the GPU is on the host, so those sums barely depend on the placement)."""
        mem = {t: self._fixed(f, box) for t, f in (mem or self.cm.memory_terms(knobs)).items()}
        caps = self.caps
        checks = [(f, caps[t]) for t, f in mem.items()]
        checks += [(mem["gpu"] + mem[t], caps["gpu"] + caps[t]) for t in ("pinned", "host")]
        if any(f.disk for f in mem.values()):  # the disk tier: its staging is paid whenever disk > 0
            staging = self.cm.disk_staging_bytes()
            fits_without = all(f.without_disk().minimum() <= cap * (1 + 1e-9) for f, cap in checks)
            lows = [f.minimum() for f, _ in checks]
            if not self.cm.cpu_only:
                # A disk layer is streamed in both parts (disk <= 1 - attn_gpu, 1 - ffn_gpu), so host and pinned
                # hold at least what they hold with every layer streamed from disk and KV on the GPU where it may.
                corner = {"attn_gpu": box["attn_gpu"][0], "ffn_gpu": box["ffn_gpu"][0], "kv_gpu": box["kv_gpu"][1],
                          "disk": box["disk"][1]}
                for i, tier in enumerate(mem):
                    if tier in ("pinned", "host"):
                        lows[i] = max(lows[i], mem[tier].at(corner))
            fits_with = all(low + (staging if i else 0.0) <= cap * (1 + 1e-9)
                            for i, (low, (_, cap)) in enumerate(zip(lows, checks)))  # checks[0] is the GPU alone
            return fits_without or fits_with
        return all(f.minimum() <= cap * (1 + 1e-9) for f, cap in checks)

    def _bound_setup(self, knobs: Knobs) -> tuple[dict, dict[str, Linear], float] | None:
        """(placement box, memory terms, least disk fraction) for bounding these knobs; None where no
        placement fits (memory, or more disk than the box allows)."""
        box = self._placement_box(knobs)
        mem = self.cm.memory_terms(knobs)
        if not self._memory_possible(knobs, box, mem):
            return None
        floor = self._disk_floor(mem, box)
        return (box, mem, floor) if math.isfinite(floor) else None

    def lower_bound(self, knobs: Knobs) -> float:
        """Optimistic job seconds for these decode knobs over every placement and prefill batch."""
        setup = self._bound_setup(knobs)
        if setup is None:
            return math.inf
        box, mem, floor = setup
        slot = self._step_lb(self.cm.step_terms(knobs), mem["gpu"], box, floor)
        return self.steps_lb(knobs) * slot + self.prefill_lb(knobs)

    def _step_lb(self, terms, gpu_mem: Linear, box, floor: float) -> float:
        """Optimistic seconds of one step (a verification, or a fused pass) over the placements in `box`."""
        bounds = terms.bounds()
        resources = {r: f for r, f in bounds.items() if not r.startswith("chain")}
        return max([self._resource_lb(resources, False, gpu_mem, box, floor)]
                   + [self._fixed(f, box).minimum() for r, f in bounds.items() if r.startswith("chain")]
                   ) + terms.serial_total

    def fused_job_lb(self, knobs: Knobs) -> float:
        """Optimistic job seconds of fused knobs at their own prefill batch: its plain verifications, its fused
        passes and its stand-alone chunks, each at its best placement (tighter than `lower_bound`, which
        holds for every prefill batch)."""
        cm = self.cm
        setup = self._bound_setup(knobs)
        if setup is None:
            return math.inf
        box, mem, floor = setup
        slots, _ = cm.decode_steps(knobs)
        n_f = cm.fused_passes(knobs)
        plain = self._step_lb(cm.step_terms(knobs), mem["gpu"], box, floor)
        fused = self._step_lb(cm.fused_terms(knobs), mem["gpu"], box, floor)
        return (slots - n_f) * plain + n_f * fused + cm.standalone_chunks(knobs) * self.prefill_seconds_lb(knobs)

    def steps_lb(self, knobs: Knobs) -> float:
        """Verifications of these decode knobs at least, whatever the prefill batch (fused plans: each
        sequence's extra step, on the whole batch, without the ramp and the wait for whole chunks)."""
        if knobs.fuse_prefill:
            return self.cm.rounds(knobs.draft_len).shifted(1).makespan(self.workload.num_prompts, knobs.decode_batch)
        return self.cm.decode_steps(knobs)[0]

    def prefill_seconds_lb(self, knobs: Knobs) -> float:
        key = (knobs.policy, knobs.draft_len > 0, knobs.draft_kv, knobs.weight_buffers, knobs.decode_batch,
               knobs.micro_batches, knobs.draft_sub_batch, knobs.prefill_batch, knobs.draft_len, knobs.fuse_prefill)
        if key in self._prefill_cache:
            return self._prefill_cache[key]
        setup = self._bound_setup(knobs)
        value = math.inf
        if setup is not None:
            box, mem, floor = setup
            # A fused plan prefills one chunk on a sweep of its own at least; the others ride in verifications,
            # which take at least a plain verification's time (steps_lb counts those).
            chunks = 1 if knobs.fuse_prefill else self.cm.prefill_chunks(knobs)
            value = chunks * self._resource_lb(self.cm.prefill_terms(knobs), self.cm.cpu_only, mem["gpu"], box, floor)
        self._prefill_cache[key] = value
        return value

    def prefill_lb(self, knobs: Knobs) -> float:
        """Optimistic prefill seconds over every prefill batch, valid for any decode batch.

        Prefill work does not depend on the decode knobs; only memory does, and the smallest
        decode footprint (batch 1, one micro-batch, sub-batch 1) relaxes it.
        """
        key = (knobs.policy, knobs.draft_len > 0, knobs.draft_kv, knobs.weight_buffers, knobs.fuse_prefill)
        if key not in self._prefill_lb:
            smallest = replace(knobs, decode_batch=1, micro_batches=1, draft_sub_batch=1)
            self._prefill_lb[key] = min(self.prefill_seconds_lb(replace(smallest, prefill_batch=bp))
                                        for bp in self.prefill_grid())
        return self._prefill_lb[key]

    def prefill_grid(self, knobs: Knobs | None = None) -> list[int]:
        """Prefill batches to try; for `knobs`' decode batch where given. Speculative plans free rows a
        few at a time, so their refills take whole chunks of at most `schedule.refill_rows` of the batch
        (the schedule's rule): a larger prefill batch would only ever run as its initial fill."""
        if "prefill_batch" in self.fixed:
            return [self.fixed["prefill_batch"]]
        n = self.workload.num_prompts
        grid = sorted({bp for bp in PREFILL_BATCHES if bp < n} | {min(n, PREFILL_BATCHES[-1])})
        if knobs is not None and knobs.draft_len > 0:
            cap = refill_rows(knobs.decode_batch)
            grid = [bp for bp in grid if bp <= cap]  # never empty: the grid starts at 1
        return grid

    # --- the placement LP ----------------------------------------------------------------------
    def solve_placement(self, knobs: Knobs) -> Candidate:
        """Mixed-integer LP over whole resident layers and GPU-KV sequences; minimises job seconds."""
        cm, t = self.cm, self.target
        L, b = t.num_layers, knobs.decode_batch
        box = self._placement_box(knobs)
        # Integer variables: resident layers (attention, FFN) and GPU-KV sequences; fractions = n / size.
        size = {"attn_gpu": L, "ffn_gpu": L, "kv_gpu": b, "disk": L}
        names = {"attn_gpu": "n_attn_layers", "ffn_gpu": "n_ffn_layers", "kv_gpu": "n_kv_sequences",
                 "disk": "n_disk_layers"}
        variables = [Variable(names[v], lo * size[v], hi * size[v], integer=True) for v, (lo, hi) in box.items()]
        variables += [Variable("slot_seconds"), Variable("chunk_seconds")]
        disk_free = box["disk"][1] > 0

        def lhs(f: Linear, epigraph: str | None = None) -> tuple[dict[str, float], float]:
            coef = {names[v]: c / size[v] for v, c in f.coef}
            if epigraph:
                coef[epigraph] = coef.get(epigraph, 0.0) - 1.0
            return coef, f.const

        cons = []

        def at_most(name: str, f: Linear, epigraph: str | None, cap: float = 0.0):
            coef, const = lhs(f, epigraph)
            cons.append(Constraint(name, coef, "<=", cap - const))

        terms = cm.step_terms(knobs)
        pre = cm.prefill_terms(knobs)
        if terms.shared_device:
            pre["device"] = pre.pop("gpu") + pre.pop("cpu")
        for r, f in terms.bounds().items():  # the step is max(bounds) + serial_total
            at_most(f"slot_{'layer_' if r.startswith('chain') else ''}{r.replace(':', '_')}", f, "slot_seconds")
        for r, f in pre.items():
            at_most(f"prefill_{r}", f, "chunk_seconds")
        fused_n = cm.fused_passes(knobs)
        fused = cm.fused_terms(knobs) if fused_n else None
        if fused is not None:  # a verification that also prefills a chunk: max(its bounds) + its serial part
            variables.append(Variable("fused_seconds"))
            for r, f in fused.bounds().items():
                at_most(f"fused_{'layer_' if r.startswith('chain') else ''}{r.replace(':', '_')}", f, "fused_seconds")
        staging = cm.disk_staging_bytes() if disk_free else 0.0
        for tier, f in cm.memory_terms(knobs).items():
            if math.isfinite(self.caps[tier]):
                at_most(f"mem_{tier}", f, None, self.caps[tier])
                if staging and (tier == "host" or (tier == "pinned" and not cm.cpu_only)):
                    cons[-1].coef["use_disk"] = staging  # the staging buffers, paid when any layer is on disk
        if disk_free:
            # A 0/1 switch for the staging; a disk layer streams both parts (resident in neither).
            variables.append(Variable("use_disk", 0, 1, integer=True))
            cons.append(Constraint("disk_switch", {"n_disk_layers": 1.0, "use_disk": -float(L)}, "<=", 0.0))
            if not cm.cpu_only:
                for v in ("n_attn_layers", "n_ffn_layers"):
                    cons.append(Constraint(f"disk_streamed_{v}", {"n_disk_layers": 1.0, v: 1.0}, "<=", float(L)))
        slots, _ = cm.decode_steps(knobs)
        chunks = cm.standalone_chunks(knobs)
        objective = {"slot_seconds": slots - fused_n, "chunk_seconds": chunks}
        const = (slots - fused_n) * terms.serial_total
        if fused is not None:
            objective["fused_seconds"] = fused_n
            const += fused_n * fused.serial_total

        def solve() -> tuple[dict[str, float], object]:
            self.lp_solves += 1
            sol = minimize("placement", variables, objective, cons, objective_const=const)
            placement = {v: sol.values[names[v]] / size[v] for v in box}
            return {v: min(max(round(x * size[v]) / size[v], box[v][0]), box[v][1]) for v, x in placement.items()}, sol

        placement, sol = solve()
        if disk_free and not cm.cpu_only and placement["disk"] > 0:
            # Disk layers are those resident in neither part (schema.disk_layer_ids); the spread resident sets of
            # attention and FFN need not nest, so their union may leave fewer than L - max(n_attn, n_ffn). Then
            # solve again with the bound that always holds (the union is at most n_attn + n_ffn layers).
            n = {v: round(placement[v] * L) for v in ("attn_gpu", "ffn_gpu", "disk")}
            free = L - len(resident_layers(n["attn_gpu"], L) | resident_layers(n["ffn_gpu"], L))
            if n["disk"] > free:
                cons.append(Constraint("disk_streamed_both", {"n_disk_layers": 1.0, "n_attn_layers": 1.0,
                                                              "n_ffn_layers": 1.0}, "<=", float(L)))
                placement, sol = solve()
        return Candidate(knobs, placement, cm.evaluate(knobs, placement), tuple(sol.binding("mem_")))

    # --- the search ----------------------------------------------------------------------------
    def group_bound(self, policy: str, b: int, k: int) -> float:
        """Optimistic job seconds for every candidate sharing (policy, b, k), whatever m and draft KV mode.

        Relaxations: weights get the whole GPU budget (KV, buffers' contents and working sets ignored),
        GPU work at the peak rate, the cheapest draft mode, no dependency chain.
        """
        cm, t = self.cm, self.target
        buffers = 0 if cm.cpu_only else 2
        base = Knobs(policy, b, 1, k, 1, "gpu", 1, buffers)
        L, tokens = t.num_layers, b * (k + 1)
        rate, bw = cm._rate.peak, cm._gpu_bw
        gpu = L * (tokens * t.linear_flops_per_token_per_layer / rate + cm.layer_fixed_seconds(tokens))
        gpu = max(gpu, L * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer) / bw)
        budget = self.caps["gpu"] - t.outer_bytes - buffers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        if k and self.draft is not None:
            budget -= self.draft.total_bytes
        if budget < 0:
            return math.inf
        kv_all = base.num_batches * b * cm.ctx_max * t.kv_bytes_per_token
        weights = L * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        on_host = 0.0 if cm.disk_tier else weights  # the disk tier can hold every streamed weight
        if not cm.cpu_only and kv_all + on_host > budget + self.caps["host"]:
            return math.inf  # every weight and KV byte lives on the GPU or the host: no room for this batch
        disk = 0.0  # the disk's share of a sweep at least: what neither the GPU nor the host can hold
        if cm.disk_tier and not cm.cpu_only:
            over = kv_all + weights - budget - self.caps["host"]
            if over > 0:
                disk = cm.disk_seconds(over)
        cpu_seq = cm.cpu_attention_seconds(t, 1, k + 1, cm.ctx_avg) - cm.hw.cpu_attn_overhead_seconds
        kv_max = 1.0 if cm.cpu_only else min(1.0, budget / kv_all)
        cpu = L * b * cpu_seq * (1.0 - kv_max)
        h2d = 0.0
        if not cm.cpu_only:
            stream = L * (streamed(cm.h2d_seconds(t.attn_bytes_per_layer), "attn_gpu")
                          + streamed(cm.h2d_seconds(cm.ffn_streamed_bytes(tokens)), "ffn_gpu"))
            mem = Linear.of(0.0, attn_gpu=L * t.attn_bytes_per_layer, ffn_gpu=L * t.ffn_bytes_per_layer)
            h2d = knapsack_min(stream, mem, budget)
        serial = 0.0
        modes = [("gpu", 1)] if not k else [("gpu", 1), ("host", 1)] + [
            ("recompute", s) for s in DRAFT_SUB_BATCHES if s <= b and not self._feature_draft]
        drafts = [cm.draft_round(replace(base, draft_kv=mode, draft_sub_batch=s), b) for mode, s in modes]
        if policy == "interleaved":
            gpu += min(d["gpu"] for d in drafts)
        elif policy == "serial-spec":
            serial = min((sum(d.values()) if cm.cpu_only else max(d.values())) for d in drafts)
        # The weight stream and the disk stage run on through a serial draft round (StepTerms.bounds): at
        # least their busy time, not busy + serial.
        slot = (max(gpu + cpu, h2d) + serial) if cm.cpu_only else max(max(gpu, cpu) + serial, h2d, disk)
        best = math.inf
        for fuse in self.fuse_choices(base.num_batches):  # a group holds both; the bound is the lower
            key = (policy, k > 0, fuse)
            if key not in self._prefill_min:
                self._prefill_min[key] = min(self.prefill_lb(replace(base, draft_kv=mode, draft_sub_batch=s,
                                                                     fuse_prefill=fuse)) for mode, s in modes)
            best = min(best, self.steps_lb(replace(base, fuse_prefill=fuse)) * slot + self._prefill_min[key])
        return best

    def best_for_policy(self, policy: str, keep: int = 5) -> tuple[Candidate | None, list[Candidate], int]:
        """Branch and bound over the knob grid; returns the best, the runners-up, and candidates seen.

        The heap holds groups (policy, b, k) under a group bound, then single candidates under their
        own bound; popping a bound no better than the best plan so far ends the search.
        """
        groups: dict[tuple[int, int], list[Knobs]] = {}
        count = 0
        for knobs in self.knob_space(policy):
            groups.setdefault((knobs.decode_batch, knobs.draft_len), []).append(knobs)
            count += 1
        heap: list[tuple[float, int, object]] = []
        seq = 0
        for (b, k), members in groups.items():
            lb = self.group_bound(policy, b, k)
            if math.isfinite(lb):
                seq += 1
                heap.append((lb, seq, members))
        heapq.heapify(heap)
        solved: list[Candidate] = []
        best_total = math.inf
        while heap:
            lb, _, item = heapq.heappop(heap)
            if lb >= best_total * (1 - OPTIMALITY_GAP):
                break
            if isinstance(item, list):  # a group: bound each member and push it
                for knobs in item:
                    clb = self.lower_bound(knobs)
                    if clb < best_total * (1 - OPTIMALITY_GAP):
                        seq += 1
                        heapq.heappush(heap, (clb, seq, knobs))
                continue
            knobs = item
            decode_lb = lb - self.prefill_lb(knobs)
            for bp in sorted(self.prefill_grid(knobs), key=lambda x: self.prefill_seconds_lb(replace(knobs, prefill_batch=x))):
                k2 = replace(knobs, prefill_batch=bp)
                if decode_lb + self.prefill_seconds_lb(k2) >= best_total * (1 - OPTIMALITY_GAP):
                    continue
                # Tighter: the decode bound with this prefill batch's working set in GPU memory.
                if self.lower_bound(k2) - self.prefill_lb(k2) + self.prefill_seconds_lb(k2) >= \
                        best_total * (1 - OPTIMALITY_GAP):
                    continue
                if not self._memory_possible(k2, self._placement_box(k2)):
                    continue
                if k2.fuse_prefill and self.fused_job_lb(k2) >= best_total * (1 - OPTIMALITY_GAP):
                    continue
                try:
                    cand = self.solve_placement(k2)
                except LpError:
                    continue
                if not fits(cand.prediction.peak_mem_bytes, self.caps):
                    continue
                solved.append(cand)
                best_total = min(best_total, cand.prediction.total_seconds)
        ranked = sorted(solved, key=lambda c: c.prediction.total_seconds)
        # Runners-up: the best few with distinct decode knobs (not the same plan at another prefill batch).
        def shape(c: Candidate) -> tuple:
            return c.knobs.decode_batch, c.knobs.draft_len, c.knobs.draft_kv

        seen, rest = {shape(ranked[0])} if ranked else set(), []
        for c in ranked[1:]:
            if shape(c) not in seen:
                seen.add(shape(c))
                rest.append(c)
        return (ranked[0] if ranked else None), rest[:keep], count

    def plan(self, policy: str = "specoffload") -> PlanResult:
        if policy not in PLAN_POLICIES:
            raise SchemaError(f"unknown policy {policy!r}; choose one of {', '.join(PLAN_POLICIES)}")
        start = time.perf_counter()
        policies = POLICIES if policy == "specoffload" else (policy,)
        if self.draft is None:
            if policy in ("serial-spec", "interleaved"):
                raise SchemaError(f"policy {policy} needs a draft model (--draft)")
            policies = ("offload-only",)
        best: dict[str, Candidate] = {}
        others: list[Candidate] = []
        count = 0
        for p in policies:
            cand, rest, n = self.best_for_policy(p)
            count += n
            if cand is not None:
                best[p] = cand
                others.extend(rest)
        if not best:
            raise PlanInfeasible(self.explain_infeasible(policies))
        winner = max(best.values(), key=lambda c: c.throughput)
        notes = self.notes(policy, winner, best)
        alternatives = sorted([c for c in best.values() if c is not winner] + others,
                              key=lambda c: -c.throughput)[:8]
        plan = self.to_plan(winner, notes)
        return PlanResult(plan, best, alternatives, notes, self.lp_solves, count, time.perf_counter() - start,
                          self.target.num_layers)

    def notes(self, policy: str, winner: Candidate, best: dict[str, Candidate]) -> list[str]:
        notes = []
        spec = [c for p, c in best.items() if p != "offload-only"]
        if policy == "specoffload" and winner.knobs.policy == "offload-only" and spec:
            rival = max(spec, key=lambda c: c.throughput)
            pr = rival.prediction
            notes.append(
                f"declined to speculate: offload-only predicts {winner.throughput:.1f} tok/s, the best speculative "
                f"plan ({rival.knobs.policy}, k={rival.knobs.draft_len}, batch {rival.knobs.decode_batch}) "
                f"{rival.throughput:.1f} tok/s: at acceptance {self.workload.acceptance} a verification yields "
                f"{pr.expected_tokens_per_round:.2f} tokens, too few to pay for the draft's "
                f"{pr.busy_seconds_per_slot.get('draft_serial', 0) or pr.busy_seconds_per_slot['gpu']:.3f} s per slot "
                f"and the smaller batch")
        if self.draft is None:
            notes.append("no draft model given: offload-only")
        elif policy == "specoffload" and not spec:
            why = self.explain_infeasible(("serial-spec",)).removeprefix("no plan fits: ").split(". Use")[0]
            notes.append(f"no speculative plan fits, so offload-only: {why}")
        if self._feature_draft and spec:
            notes.append(self._feature_draft_note(winner if winner.knobs.speculative else
                                                  max(spec, key=lambda c: c.throughput)))
        if winner.placement.get("disk", 0.0) > 0:
            notes.append(self.disk_note(winner))
        for p, c in sorted(best.items(), key=lambda kv: -kv[1].throughput):
            notes.append(f"best {p}: {c.throughput:.2f} tok/s (batch {c.knobs.decode_batch}, k={c.knobs.draft_len}, "
                         f"binding {c.prediction.binding})")
        return notes

    def disk_note(self, c: Candidate) -> str:
        """What the disk tier does in plan c: layers on disk, bytes and seconds per sweep, what binds."""
        cm, t = self.cm, self.target
        L = t.num_layers
        n = round(c.placement["disk"] * L)
        nbytes = cm.disk_bytes_per_sweep(c.placement)
        pr = c.prediction
        mem = [m.removeprefix("mem_") for m in c.binding_memory]
        binds = ("the disk binds the decode slot" if pr.binding == "disk"
                 else f"the slot is bound by {pr.binding}, the disk read hides under it")
        return (f"disk tier: {n} of {L} layers are read from the checkpoint every sweep ({nbytes / GiB:.2f} GiB at "
                f"{cm.disk_rate / 1e9:.2f} GB/s = {cm.disk_seconds(nbytes):.3g} s per sweep, pipelined with the "
                f"host->GPU copies; {cm.disk_staging_bytes() / GiB:.2f} GiB of staging buffers), because "
                f"{' and '.join(mem) or 'host'} memory is short"
                + (f" (--host-mem-limit {cm.host_mem_limit_bytes / GiB:g} GiB)" if cm.host_mem_limit_bytes else "")
                + f"; {binds}")

    def _feature_draft_note(self, c: Candidate) -> str:
        """What the feature draft costs and buys in plan c: its bytes, its KV, its round against the slot."""
        d, k, t = self.draft, c.knobs, self.target
        dr = self.cm.draft_round(k, k.decode_batch)
        du, b = self.cm, k.decode_batch
        kept = du.feature_kept_mean(k.draft_len)
        pr = c.prediction
        return (f"feature draft {d.name}: {d.total_bytes / 2**30:.2f} GiB of its own weights (embedding and LM head "
                f"are the target's), KV {d.kv_bytes_per_token / 2**10:.0f} KiB per token in 1 layer (the target "
                f"keeps {t.kv_bytes_per_token / 2**10:.0f} KiB), on the {'GPU' if k.draft_kv == 'gpu' else 'host'}; "
                f"its round of k={k.draft_len} for {k.decode_batch} sequences: {dr['gpu']:.3f} s GPU"
                + (f" + {dr['cpu']:.3f} s CPU attention" if dr["cpu"] else "")
                + f" (first step {du.feature_first_step_seconds(k.draft_len, b):.4g} s over {kept:.2f} kept "
                f"positions per row, packed; its attention padded to {du.feature_catch_up(k.draft_len, b):.2f}; "
                f"then {k.draft_len - 1} one-token steps of {du.draft_step_seconds(b):.4g} s; attention apart)"
                + f" against a {pr.slot_seconds:.3f} s slot, for {pr.expected_tokens_per_round:.2f} tokens per "
                f"sequence per verification instead of 1")

    def to_plan(self, cand: Candidate, notes: list[str]) -> Plan:
        k, t = cand.knobs, self.target
        return Plan(
            policy=k.policy,
            model=t.source or t.name, model_fingerprint=t.fingerprint,
            draft=(self.draft.source or self.draft.name) if (self.draft and k.speculative) else "",
            draft_fingerprint=self.draft.fingerprint if (self.draft and k.speculative) else "",
            profile=self.profile.name, profile_fingerprint=profile_fingerprint(self.profile),
            workload=self.workload,
            decode_batch=k.decode_batch, num_batches=k.num_batches, prefill_batch=k.prefill_batch,
            draft_sub_batch=k.draft_sub_batch if k.draft_kv == "recompute" else k.decode_batch,
            draft_len=k.draft_len, micro_batches=k.micro_batches,
            gpu_attn_layers=round(cand.placement["attn_gpu"] * t.num_layers),
            gpu_ffn_layers=round(cand.placement["ffn_gpu"] * t.num_layers),
            gpu_kv_sequences=round(cand.placement["kv_gpu"] * k.decode_batch),
            target_attention="gpu" if self.cm.cpu_only else "cpu",
            draft_kv=k.draft_kv, weight_buffers=k.weight_buffers,
            prediction=cand.prediction, notes=tuple(notes),
            disk_layers=round(cand.placement.get("disk", 0.0) * t.num_layers),
            host_mem_limit_bytes=self.cm.host_mem_limit_bytes, fuse_prefill=k.fuse_prefill)

    def explain_infeasible(self, policies: tuple[str, ...] = ("offload-only",)) -> str:
        """Which tier cannot hold even the smallest plan of each policy tried, by how much, and what to change."""
        t = self.target
        msgs = []
        for policy in policies:
            spec = policy != "offload-only"
            knobs = Knobs(policy, 1, 1, 1 if spec else 0, 1,
                          ("host" if self._feature_draft else "recompute") if spec else "gpu", 1,
                          0 if self.cm.cpu_only else 2)
            box = self._placement_box(knobs)
            terms = self.cm.memory_terms(knobs)
            need = {tier: self._fixed(f.without_disk(), box).minimum() for tier, f in terms.items()}
            if box["disk"][1] > 0:  # every layer streamed from disk (and KV on the GPU where it may be): the
                # least host memory; the staging buffers are then needed
                corner = {"attn_gpu": box["attn_gpu"][0], "ffn_gpu": box["ffn_gpu"][0], "kv_gpu": box["kv_gpu"][1],
                          "disk": 1.0}
                for tier in ("host",) if self.cm.cpu_only else ("pinned", "host"):
                    need[tier] = terms[tier].at(corner) + self.cm.disk_staging_bytes()
            over = [tier for tier in need if need[tier] > self.caps[tier] * (1 + 1e-9)]
            if spec and self.draft is not None and "gpu" in over:
                msgs.append(f"{policy}: the draft {self.draft.name}'s weights alone take "
                            f"{self.draft.total_bytes / GiB:.1f} GiB of GPU memory and the smallest plan needs "
                            f"{need['gpu'] / GiB:.1f} GiB; profile '{self.profile.name}' has "
                            f"{self.caps['gpu'] / GiB:.1f} GiB (use a smaller draft, or --policy offload-only)")
            elif over:
                tier = over[0]
                disk = (", every streamed layer read from disk, its staging buffers included"
                        if box["disk"][1] > 0 and tier != "gpu" else "")
                msgs.append(f"{policy}: {tier} memory: {t.name} needs at least {size_words(need[tier])} even at "
                            f"batch 1 (best placement{disk}), {self._host_cap_words(tier)} "
                            f"{size_words(self.caps[tier])}")
            else:
                both = t.num_layers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
                msgs.append(f"{policy}: GPU + host memory together: {t.name}'s {both / GiB:.1f} GiB of layer weights "
                            f"(and the rest of the smallest plan) do not fit between {self.caps['gpu'] / GiB:.1f} GiB "
                            f"of GPU and {self.caps['pinned'] / GiB:.1f} GiB of pinned host memory"
                            + (" even with layers read from disk" if box["disk"][1] > 0 else ""))
        hint = ""
        if not self.cm.disk_tier:
            hint = (f"; profile '{self.profile.name}' states no disk read rate, so no layer may be read from disk "
                    "(measure it with specoffload-profile --disk DIR, on the drive holding the checkpoint)")
        return ("no plan fits: " + "; ".join(msgs) + hint
                + ". Use a machine with more memory, a smaller model, or shorter prompts (--prompt-len/--gen-len)"
                + (", or a higher --host-mem-limit" if self.cm.host_mem_limit_bytes else ""))

    def _host_cap_words(self, tier: str) -> str:
        if tier != "gpu" and self.cm.host_mem_limit_bytes and self.caps[tier] >= self.cm.host_mem_limit_bytes:
            return "--host-mem-limit allows"
        return f"profile '{self.profile.name}' has"


def knobs_from_plan(plan: Plan) -> Knobs:
    """The cost model's view of a plan's integer choices."""
    return Knobs(plan.policy, plan.decode_batch, plan.prefill_batch, plan.draft_len, plan.micro_batches,
                 plan.draft_kv, plan.draft_sub_batch, plan.weight_buffers, plan.fuse_prefill)


def placement_from_plan(plan: Plan, target: ModelSpec) -> dict[str, float]:
    L = target.num_layers
    return {"attn_gpu": plan.gpu_attn_layers / L, "ffn_gpu": plan.gpu_ffn_layers / L,
            "kv_gpu": plan.gpu_kv_sequences / plan.decode_batch, "disk": plan.disk_layers / L}


def profile_fingerprint(profile: HardwareProfile) -> str:
    from .schema import fingerprint

    return fingerprint(profile)


def make_plan(profile: HardwareProfile, target: ModelSpec, draft: ModelSpec | None, workload: Workload,
              policy: str = "specoffload", max_draft_len: int = DEFAULT_MAX_DRAFT_LEN,
              fixed: dict[str, int | str] | None = None, host_mem_limit_bytes: float = 0.0) -> PlanResult:
    return Planner(profile, target, draft, workload, max_draft_len, fixed, host_mem_limit_bytes).plan(policy)
