"""The job simulation: a Plan's prefill chunks, verifications and draft rounds as tasks on resources.

Model (what the runtime is expected to do; durations all come from the CostModel):

- Resources: `gpu` (compute), `h2d` and `d2h` copy engines, `cpu` (the CPU attention pool). The CPU
  attention pool is ONE resource whose task durations are the cost model's whole-machine figure
  (`cpu_attention_seconds` already divides by the machine's KV-read bandwidth and FLOP rate): the
  profile measures the pool, not one core, and decode attention is memory-bound, so splitting it
  into `cpu_cores` workers would need a per-core figure nobody measures. Each attention call (one
  layer, one micro-batch) uses the whole pool. On a CPU-only profile `gpu` and `cpu` work is served
  by one shared resource (the device), as in the cost model.
- Weight stream: one sweep over the streamed layers per pass (a verification or a prefill chunk),
  copies issued in order into `weight_buffers` buffers; a buffer is held from the start of its copy
  until the last compute of that layer. Layers below gpu_attn_layers / gpu_ffn_layers keep that part
  resident and copy nothing. The stream prefetches into the next sweep before its pass is decided
  (the weights are the same; routed-expert bytes assume a full decode batch until then, and a prefill
  bound later tops up the difference). Weight copies are preemptible every `weight_chunk_bytes`: a
  latency-critical activation transfer waits at most one chunk (default 4 MiB; with whole-tensor
  copies on one engine, e.g. 117 MB per Mixtral expert matrix, the per-layer chain waits that long).
- A verification of batch X (pass n): per layer j and micro-batch i: qkv (+ attention of the
  GPU-KV sequences) on the gpu -> d2h of q/k/v -> CPU attention -> h2d of the attention output ->
  o-proj/router/FFN on the gpu; qkv waits for the previous layer's FFN of the same micro-batch and the
  layer's attention weights, FFN for the FFN weights. Then the LM head; then acceptance is drawn per
  sequence and tokens are capped at each sequence's generation length. Durations use the live
  sequences of each micro-batch and their current contexts (option context="average" uses the
  cost model's average context instead, for closed-form comparisons).
- Draft: `CostModel.draft_round` for the live sequences of the batch. GPU-only rounds (draft KV on
  the GPU, or recomputed) are one GPU task preemptible at each draft layer step; host-KV rounds are a
  chain of pieces gpu -> d2h -> cpu -> h2d. Interleaved: the draft for batch X runs after X's
  verification, concurrently with the other batch's, at lower priority than target work on every
  resource (CUDA stream priorities). Serial-spec: the draft runs before each verification.
- Schedule and refill, as the runtime's engine loop does them (runtime/engine.py `run`): prompts are
  prefilled in chunks of plan.prefill_batch, each chunk its own weight sweep (`CostModel.prefill_terms`
  for the chunk's size, spread over layers and over up to `prefill_groups` groups of its micro-chunks:
  h2d hidden in -> gpu -> d2h out); the prefill's logits give each sequence its first token. The
  initial fill gives batch 0 min(decode_batch, prompts), then batch 1 the next ones. After a
  verification of batch X its finished sequences free their slots and X is refilled right away
  (before the next verification) when the free slots can take min(prefill_batch, prompts left) or X is
  idle: all min(free, left) waiting prompts, in chunks of prefill_batch. Then X's draft round (its
  survivors and newcomers, after their prefill) is issued; interleaved: it runs while the other batch
  verifies; serial-spec: right before X's next verification.
- Memory (see memory.py): weights and working sets at setup; weight buffers taken by each streamed
  copy and released after the layer's last compute; a prefill chunk's staging while it runs; KV taken
  per token as sequences are admitted and generate, freed when they finish. An overflow stops the run
  at the simulated time it happens, naming the part. (The runtime reserves each slot's KV at full
  length up front; the cost model's peak, which the planner enforces, counts it so; the simulator
  shows the bytes in use.)
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..schema import HardwareProfile, Plan, load_profile, resident_layers
from ..strict import SchemaError
from .engine import Engine, MemoryPool, Overflow, Task
from .memory import POOLS, finite_capacity, memory_layout
from .predict import plan_cost_model, predicted_figures
from .report import AcceptanceStats, Report, binned_peaks
from .trace import ChromeTrace, slice_name

TARGET, DRAFT, BULK = 0, 1, 2  # priority classes: lower runs first


def _prio(cls: int, n: int, j: int = 0, i: int = 0) -> int:
    return (((cls << 32) | n) << 16) | (min(j, 255) << 8) | min(i, 255)


@dataclass(frozen=True)
class SimOptions:
    seed: int = 0
    context: str = "live"  # "live" or "average" (the cost model's average context, for comparisons)
    # Weight copies and bulk KV writes can be cut every this many bytes for a latency-critical transfer
    # (a runtime copying in chunks with activation copies first, or two copy engines sharing the link).
    # Cuts cost events only when transfers actually contend, so a small value is cheap.
    weight_chunk_bytes: float = 4 * 2**20
    # "layers": weight_buffers buffers of one layer each (what the plan says); "bytes": the same memory
    # (weight_buffers x one layer) as a byte pool, so small (attention-only) copies can run further ahead.
    buffer_policy: str = "layers"
    # "spread": resident layers spread evenly (the Plan's contract, schema.resident_layers); "prefix": layers
    # 0..n-1 instead (a what-if: the copy engine idles while they compute).
    residency: str = "spread"
    draft_pieces: int = 128  # at most this many pieces for a host-KV draft round
    prefill_groups: int = 8  # at most this many pipelined groups per layer in a prefill chunk
    trace: bool = False
    trace_slots: int = 12  # trace the tasks of the first N passes only (memory counters: whole run)
    progress: bool = False  # carriage-return progress on stderr when the run takes over ~1 s
    time_limit_factor: float = 50.0  # "never finishes": simulated time past this x the prediction

    def __post_init__(self):
        if self.context not in ("live", "average"):
            raise ValueError(f"context must be 'live' or 'average', not {self.context!r}")
        if self.residency not in ("prefix", "spread"):
            raise ValueError(f"residency must be 'prefix' or 'spread', not {self.residency!r}")
        if self.buffer_policy not in ("layers", "bytes"):
            raise ValueError(f"buffer_policy must be 'layers' or 'bytes', not {self.buffer_policy!r}")


@dataclass(frozen=True)
class Problem:
    kind: str  # overflow | deadlock | unfinished
    message: str


@dataclass
class SimResult:
    report: Report
    problems: tuple[Problem, ...]
    slot_log: list[tuple[int, int, float, float, int]]  # (pass, batch, start, end, live sequences)
    prefill_log: list[tuple[int, int, float, float, int]]  # (pass, batch, start, end, prompts)
    trace: ChromeTrace | None
    events: int
    wall_seconds: float
    overflow: Overflow | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def steady_slot_seconds(self, skip: float = 0.25) -> float:
        """Mean verification time in steady state: verifications of a full batch, not the first of
        their batch nor next to a prefill pass, with the first and last `skip` of those dropped."""
        full = max((live for *_, live in self.slot_log), default=0)
        near = {p for p, *_ in self.prefill_log} | {p + 1 for p, *_ in self.prefill_log}
        seen, spans = set(), []
        for p, batch, start, end, live in self.slot_log:
            if batch not in seen:
                seen.add(batch)
                continue
            if live == full and p not in near:
                spans.append(end - start)
        if not spans:
            return math.nan
        lo = int(len(spans) * skip)
        mid = spans[lo:max(lo + 1, len(spans) - lo)]
        return sum(mid) / len(mid)


class _Batch:
    """The sequences of one batch as arrays over its decode_batch slots."""

    def __init__(self, index: int, size: int):
        self.index = index
        self.seq = np.full(size, -1, dtype=np.int64)
        self.gen = np.zeros(size, dtype=np.int64)
        self.active = np.zeros(size, dtype=bool)
        self.kv = np.zeros(size, dtype=np.int64)  # tokens each slot holds in the KV caches
        self.pending: list[Task] = []  # what the next verification (serial: the next draft) waits for

    def free_slots(self) -> np.ndarray:
        return np.flatnonzero(~self.active)


class _Pass:
    __slots__ = ("index", "kind", "batch", "slots", "tokens", "waiting_weights", "layers_done", "gate",
                 "n_prompts", "done")

    def __init__(self, index: int, kind: str):
        self.index, self.kind = index, kind
        self.batch = -1
        self.slots = None
        self.tokens = 0.0
        self.waiting_weights: dict[int, tuple[list[Task], list[Task]]] = {}
        self.layers_done = 0
        self.gate: Task | None = None
        self.n_prompts = 0
        self.done = False


class Simulation:
    def __init__(self, plan: Plan, profile: HardwareProfile, options: SimOptions = SimOptions()):
        self.plan, self.profile, self.opt = plan, profile, options
        self.cm, self.knobs, self.placement = plan_cost_model(plan, profile)
        cm = self.cm
        self.t, self.d = cm.t, cm.d
        self.L = self.t.num_layers
        self.k = plan.draft_len
        self.m = plan.micro_batches
        self.b = plan.decode_batch
        self.nb = plan.num_batches
        self.G = plan.workload.gen_len_tokens
        self.P = plan.workload.prompt_len_tokens
        self.N = plan.workload.num_prompts
        self.acc = np.array(plan.workload.acceptance_vector(self.k), dtype=float)
        self.rng = np.random.default_rng(options.seed)
        self.cpu_only = cm.cpu_only
        self.gpu_kv = 0 if self.cpu_only else min(plan.gpu_kv_sequences, self.b)
        A = self.L if self.cpu_only else min(plan.gpu_attn_layers, self.L)
        F = self.L if self.cpu_only else min(plan.gpu_ffn_layers, self.L)
        self.attn_streamed = [j not in self._resident(A) for j in range(self.L)]
        self.ffn_streamed = [j not in self._resident(F) for j in range(self.L)]

        self.trace = ChromeTrace("specoffload simulated") if options.trace else None
        rec = self._record if self.trace is not None else None
        eng = self.eng = Engine()
        self.gpu = eng.resource("gpu", rec)
        self.cpu = self.gpu if self.cpu_only else eng.resource("cpu", rec)
        self.h2d = eng.resource("h2d", rec)
        self.d2h = eng.resource("d2h", rec)
        self.layout = memory_layout(cm, self.knobs, self.placement, plan)
        mrec = self.trace.counter if self.trace is not None else None
        self.pools = {p: MemoryPool(p, self.layout.capacity[p], mrec) for p in POOLS}
        self.overflow: Overflow | None = None
        self.problems: list[Problem] = []
        # Memory taken and released over time (memory.py): KV per token per pool for a host-KV slot and
        # for a GPU-KV slot (the first gpu_kv slots of each batch), staging per prefill prompt.
        ctx = max(1.0, float(cm.ctx_max))
        self.kv_token = {pool: v / ctx for pool, v in self.layout.kv_per_sequence.items()}
        self.kv_token_gpu = {pool: v / ctx for pool, v in self.layout.kv_per_gpu_sequence.items()}
        self.staging = [(a.pool, a.nbytes / max(1, plan.prefill_batch), a.name) for a in self.layout.static
                        if a.kind == "staging"]
        self.buffer_bytes = {a.pool: a.nbytes for a in self.layout.static if a.kind == "buffers"}
        self.prefill_queue: list[_Pass] = []  # admitted chunks; the first holds the staging
        self.buffer_taken: dict[tuple[int, int], float] = {}

        # Weight stream state.
        self.streamed = [j for j in range(self.L) if self.attn_streamed[j] or self.ffn_streamed[j]]
        layer_bytes = self.t.attn_bytes_per_layer + self.t.ffn_bytes_per_layer
        self.by_bytes = options.buffer_policy == "bytes"
        self.buffer_capacity = plan.weight_buffers * (layer_bytes if self.by_bytes else 1)
        self.free_buffers = self.buffer_capacity
        self.stream_pos = 0
        self.issued: dict[tuple[int, int], tuple[Task | None, Task | None, float, float]] = {}
        self._attn_copy = cm.h2d_seconds(self.t.attn_bytes_per_layer)
        self._ffn_copy_cache: dict[float, tuple[float, float]] = {}
        self._chunk = options.weight_chunk_bytes
        self.default_tokens = float(self.b * (self.k + 1))

        self.passes: list[_Pass] = []
        self.batches = [_Batch(x, self.b) for x in range(self.nb)]
        self.queue_next = 0  # next prompt to admit
        self.finished = 0
        self.generated = 0
        self.last_end = 0.0
        self.phase = {"prefill": 0.0, "decode": 0.0}
        self.slot_log: list[tuple[int, int, float, float, int]] = []
        self.prefill_log: list[tuple[int, int, float, float, int]] = []
        self.rounds = 0
        self.tokens_sum = 0.0
        self.kept_sum = 0.0
        self.pos_tried = np.zeros(max(self.k, 1))
        self.pos_acc = np.zeros(max(self.k, 1))
        self.makespan = 0.0
        self._wall0 = 0.0
        self._progress_shown = False

    # --- helpers -------------------------------------------------------------------------------
    def _resident(self, n: int) -> set[int]:
        if n >= self.L or self.opt.residency == "prefix":
            return set(range(min(n, self.L)))
        return resident_layers(n, self.L)

    def _record(self, task: Task, start: float, end: float) -> None:
        self.trace.slice(task.label, slice_name(task.kind, task.layer, task.micro_batch, task.batch),
                         start, end - start, {"pass": task.pass_index})

    def _traced(self, n: int) -> bool:
        return self.trace is not None and n < self.opt.trace_slots

    def _alloc(self, pool: str, nbytes: float, task: str) -> None:
        over = self.pools[pool].alloc(nbytes, self.eng.now, task)
        if over is not None and self.overflow is None:
            self.overflow = over
            gib = 2**30
            self.problems.append(Problem("overflow", (
                f"{pool} memory overflows at t={over.time:.3f} s in task '{task}': {over.need_bytes / gib:.2f} GiB "
                f"needed, capacity {over.capacity_bytes / gib:.2f} GiB (over by {over.excess_bytes / gib:.2f} GiB)")))
            self.eng.stopped = True

    def _free(self, pool: str, nbytes: float) -> None:
        self.pools[pool].free(nbytes, self.eng.now)

    def _kv_bytes(self, slots: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
        """Bytes per pool that `tokens` KV entries of each of `slots` take (GPU-KV slots come first)."""
        on_gpu = slots < self.gpu_kv
        n_gpu, n_host = float(tokens[on_gpu].sum()), float(tokens[~on_gpu].sum())
        out: dict[str, float] = {}
        for rate, n in ((self.kv_token, n_host), (self.kv_token_gpu, n_gpu)):
            for pool, v in rate.items():
                out[pool] = out.get(pool, 0.0) + v * n
        return out

    def _kv_take(self, batch: _Batch, slots: np.ndarray, tokens: np.ndarray, what: str) -> None:
        if not len(slots) or self.eng.stopped:
            return
        batch.kv[slots] += tokens
        for pool, nbytes in self._kv_bytes(slots, tokens).items():
            self._alloc(pool, nbytes, f"KV caches: {what} (batch {batch.index}, {len(slots)} sequences)")

    def _kv_free(self, batch: _Batch, slots: np.ndarray) -> None:
        if not len(slots):
            return
        for pool, nbytes in self._kv_bytes(slots, batch.kv[slots]).items():
            self._free(pool, nbytes)
        batch.kv[slots] = 0

    def _staging(self, p: _Pass, take: bool) -> None:
        for pool, per_prompt, name in self.staging:
            if take:
                self._alloc(pool, per_prompt * p.n_prompts, f"{name}, prefill chunk of {p.n_prompts} prompts")
            else:
                self._free(pool, per_prompt * p.n_prompts)

    def _ctx(self, batch: _Batch, idx: np.ndarray, host: bool = False) -> float:
        """Keys per row of one attention call over the sequences idx. On the device the runtime pads the
        call to its longest row (the longest prompt among them, the furthest generation); host attention
        reads each row to its own length (the mean prompt plus the rows' mean generation)."""
        if host:
            if self.opt.context == "average" or not len(idx):
                return self.cm.host_attention_context()
            return float(self.plan.workload.prompt_len_tokens + batch.gen[idx].mean())
        if self.opt.context == "average" or not len(idx):
            return self.cm.attention_context(max(1, len(idx)), self.knobs.decode_batch * self.knobs.num_batches)
        return float(self.cm.padded_prompt(len(idx)) + batch.gen[idx].max())

    def _ffn_copy(self, tokens: float) -> tuple[float, float]:
        """(seconds, bytes) of one layer's streamed FFN copy for `tokens` routed tokens."""
        if tokens not in self._ffn_copy_cache:
            nbytes = self.cm.ffn_streamed_bytes(tokens)
            self._ffn_copy_cache[tokens] = (self.cm.h2d_seconds(nbytes), nbytes)
        return self._ffn_copy_cache[tokens]

    def _quantum(self, seconds: float, nbytes: float) -> float:
        return seconds * self._chunk / nbytes if nbytes > self._chunk else 0.0

    # --- the weight stream ---------------------------------------------------------------------
    def _sweep_allowed(self, n: int) -> bool:
        if n < len(self.passes):
            return True
        return n == len(self.passes) and self.finished < self.N

    def _pump(self) -> None:
        layers = self.streamed
        if not layers:
            return
        while self.free_buffers > 0 and not self.eng.stopped:
            n, idx = divmod(self.stream_pos, len(layers))
            if not self._sweep_allowed(n):
                return
            j = layers[idx]
            need = self._buffer_need(n, j)
            if need > self.free_buffers * (1 + 1e-12):
                return
            self._issue(n, j, need)
            self.free_buffers -= need
            self.stream_pos += 1

    def _buffer_need(self, n: int, j: int) -> float:
        if not self.by_bytes:
            return 1
        tokens = self.passes[n].tokens if n < len(self.passes) else self.default_tokens
        return ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))

    def _issue(self, n: int, j: int, need: float) -> None:
        eng = self.eng
        p = self.passes[n] if n < len(self.passes) else None
        tokens = p.tokens if p is not None else self.default_tokens
        traced = self._traced(n)
        attn = ffn = None
        if self.attn_streamed[j]:
            attn = Task("w-attn", "h2d", self.h2d, self._attn_copy, _prio(BULK, n, j, 0),
                        self._quantum(self._attn_copy, self.t.attn_bytes_per_layer), layer=j, pass_index=n,
                        traced=traced)
        if self.ffn_streamed[j]:
            secs, nbytes = self._ffn_copy(tokens)
            ffn = Task("w-ffn", "h2d", self.h2d, secs, _prio(BULK, n, j, 1), self._quantum(secs, nbytes),
                       layer=j, pass_index=n, traced=traced)
        self.issued[(n, j)] = (attn, ffn, tokens, need)
        if self.buffer_bytes:  # the bytes this layer's copy puts in its buffer, until the layer is done
            nbytes = ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                      + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))
            self.buffer_taken[(n, j)] = nbytes
            self._alloc("gpu", nbytes, f"weight buffer: layer {j} for pass {n}")
        for task in (attn, ffn):
            if task is not None:
                eng.arm(task)
        if p is not None and j in p.waiting_weights:
            attn_users, ffn_users = p.waiting_weights.pop(j)
            if attn is not None:
                for u in attn_users:
                    eng.attach(attn, u)
            if ffn is not None:
                for u in ffn_users:
                    eng.attach(ffn, u)

    def _release_buffer(self, n: int, j: int) -> None:
        got = self.issued.pop((n, j), None)
        taken = self.buffer_taken.pop((n, j), 0.0)
        if taken:
            self._free("gpu", taken)
        self.free_buffers += got[3] if got is not None else (0 if self.by_bytes else 1)
        self._pump()

    def _wire_weights(self, p: _Pass, j: int, attn_users: list[Task], ffn_users: list[Task]) -> None:
        """Make layer j's users wait for its streamed weights in pass p's sweep."""
        eng = self.eng
        attn_streamed, ffn_streamed = self.attn_streamed[j], self.ffn_streamed[j]
        if not (attn_streamed or ffn_streamed):
            return
        got = self.issued.get((p.index, j))
        if got is None:  # not issued yet: hold the users until the stream issues the copy
            for u in attn_users if attn_streamed else ():
                eng.hold(u)
            for u in ffn_users if ffn_streamed else ():
                eng.hold(u)
            p.waiting_weights[j] = (attn_users, ffn_users)
            return
        attn, ffn, tokens, _ = got
        for u in attn_users:
            eng.depend(attn, u)
        for u in ffn_users:
            eng.depend(ffn, u)
        if ffn_streamed and p.tokens != tokens:
            need, _ = self._ffn_copy(p.tokens)
            have, _ = self._ffn_copy(tokens)
            if need > have * (1 + 1e-9):  # prefetched for fewer routed experts than this pass touches
                top = Task("w-ffn top-up", "h2d", self.h2d, need - have, _prio(BULK, p.index, j, 2), layer=j,
                           pass_index=p.index, traced=self._traced(p.index))
                for u in ffn_users:
                    eng.depend(top, u)
                eng.arm(top)

    def _layer_release(self, p: _Pass, j: int) -> Task:
        """A join after layer j's last compute in pass p: frees the layer's buffer."""
        streamed = self.attn_streamed[j] or self.ffn_streamed[j]

        def done(now: float, p=p, j=j, streamed=streamed) -> None:
            p.layers_done = max(p.layers_done, j + 1)
            if streamed:
                self._release_buffer(p.index, j)

        return Task("release", None, None, 0.0, on_done=done, layer=j, pass_index=p.index)

    def _new_pass(self, kind: str) -> _Pass:
        p = _Pass(len(self.passes), kind)
        self.passes.append(p)
        return p

    # --- drafting ------------------------------------------------------------------------------
    def _draft_round(self, batch: int, n_seqs: int, deps: list[Task], n_ref: int) -> Task | None:
        """A draft round proposing k tokens for n_seqs sequences; returns its final join."""
        if not self.k or n_seqs <= 0:
            return None
        eng = self.eng
        dr = self.cm.draft_round(self.knobs, n_seqs)
        traced = self._traced(n_ref)
        end = Task("draft done", None, None, 0.0, batch=batch, pass_index=n_ref)
        Ld = self.d.num_layers
        if dr["cpu"] <= 0 and dr["d2h"] <= 0 and dr["h2d"] <= 0:
            # Preemptible at each draft layer of each forward (per sub-batch when the context is recomputed):
            # the granularity at which the runtime launches draft work; stream priorities are finer still.
            subs = math.ceil(n_seqs / min(self.plan.draft_sub_batch, n_seqs)) if self.plan.draft_kv == "recompute" else 1
            steps = self.k * Ld * subs
            g = Task("draft", "gpu", self.gpu, dr["gpu"], _prio(DRAFT, n_ref), dr["gpu"] / steps, batch=batch,
                     pass_index=n_ref, traced=traced)
            for dep in deps:
                eng.depend(dep, g)
            eng.depend(g, end)
            eng.arm(g)
        else:
            pieces = max(1, min(self.opt.draft_pieces, self.k * Ld))
            prev = None
            for i in range(pieces):
                chain = []
                for kind, label, res in (("draft", "gpu", self.gpu), ("draft d2h", "d2h", self.d2h),
                                         ("draft attention", "cpu", self.cpu), ("draft h2d", "h2d", self.h2d)):
                    dur = dr[label] / pieces
                    if dur <= 0:
                        continue
                    task = Task(kind, label, res, dur, _prio(DRAFT, n_ref, 0, i), batch=batch, pass_index=n_ref,
                                traced=traced)
                    if prev is None:
                        for dep in deps:
                            eng.depend(dep, task)
                    else:
                        eng.depend(prev, task)
                    chain.append(task)
                    prev = task
                for task in chain:
                    eng.arm(task)
            eng.depend(prev, end)
        eng.arm(end)
        return end

    # --- prefill -------------------------------------------------------------------------------
    def _prefill_pass(self, batch: _Batch, slots: np.ndarray) -> _Pass:
        """Admit the next len(slots) prompts into `slots` and prefill them as one chunk (one sweep).

        The prefill's logits give each sequence its first token; one asking for a single token is done
        when the chunk is."""
        p = self._new_pass("prefill")
        n = len(slots)
        p.batch, p.slots, p.n_prompts = batch.index, slots, n
        p.tokens = float(n * self.P)
        batch.seq[slots] = np.arange(self.queue_next, self.queue_next + n)
        batch.gen[slots] = 1
        batch.active[slots] = self.G > 1
        self.queue_next += n
        self._kv_take(batch, slots, np.full(n, self.P, dtype=np.int64), f"prompts of {n} admitted sequences")
        self.prefill_queue.append(p)
        if len(self.prefill_queue) == 1:  # chunks run one at a time: the first admitted holds the staging
            self._staging(p, True)
        self._build_prefill(p)
        batch.pending.append(p.gate)
        return p

    def _build_prefill(self, p: _Pass) -> None:
        eng, cm, L = self.eng, self.cm, self.L
        knobs = replace(self.knobs, prefill_batch=p.n_prompts)
        terms = cm.prefill_terms(knobs)
        gpu = terms["gpu"].at(self.placement)
        d2h = terms["d2h"].at(self.placement)
        resident = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": self.placement["kv_gpu"]}
        hidden_in = terms["h2d"].at(resident)  # the non-weight part: hidden states back from host
        micro, _ = cm.prefill_split(knobs)
        groups = max(1, min(micro, self.opt.prefill_groups))
        g_dur, o_dur, i_dur = gpu / (L * groups), d2h / (L * groups), hidden_in / (L * groups)
        o_q = cm.d2h_seconds(self._chunk) if o_dur > cm.d2h_seconds(self._chunk) else 0.0
        i_q = cm.h2d_seconds(self._chunk) if i_dur > cm.h2d_seconds(self._chunk) else 0.0
        n, traced = p.index, self._traced(p.index)
        end = Task("prefill done", None, None, 0.0, pass_index=n, on_done=lambda now, p=p: self._prefill_done(p, now))
        p.gate = end
        prev_gpu: list[Task | None] = [None] * groups
        prev_out: list[Task | None] = [None] * groups
        for j in range(L):
            release = self._layer_release(p, j)
            gpus, layer_tasks = [], []
            for g in range(groups):
                first = None
                if micro > 1 and i_dur > 0:
                    first = Task("prefill h2d hidden", "h2d", self.h2d, i_dur, _prio(TARGET, n, j, g), i_q, layer=j,
                                 micro_batch=g, pass_index=n, traced=traced)
                    eng.depend(prev_out[g], first)
                    layer_tasks.append(first)
                comp = Task("prefill", "gpu", self.gpu, g_dur, _prio(TARGET, n, j, g), layer=j, micro_batch=g,
                            pass_index=n, traced=traced)
                eng.depend(first if first is not None else prev_gpu[g], comp)
                out = Task("prefill d2h kv", "d2h", self.d2h, o_dur, _prio(BULK, n, j, g), o_q, layer=j,
                           micro_batch=g, pass_index=n, traced=traced)
                eng.depend(comp, out)
                eng.depend(comp, release)
                eng.depend(out, end)
                layer_tasks += [comp, out]
                gpus.append(comp)
                prev_gpu[g], prev_out[g] = comp, (out if micro > 1 else None)
            self._wire_weights(p, j, gpus, gpus)
            for task in layer_tasks:
                eng.arm(task)
            eng.arm(release)
        for g in range(groups):
            eng.depend(prev_gpu[g], end)
        eng.arm(end)
        self._pump()

    def _prefill_done(self, p: _Pass, now: float) -> None:
        p.done = True
        self.generated += p.n_prompts  # the first token of each sequence
        if p in self.prefill_queue:
            head = self.prefill_queue[0] is p
            self.prefill_queue.remove(p)
            if head:
                self._staging(p, False)
                if self.prefill_queue:
                    self._staging(self.prefill_queue[0], True)
        if self.G <= 1:
            self.finished += p.n_prompts
            self.batches[p.batch].seq[p.slots] = -1
            self._kv_free(self.batches[p.batch], p.slots)
        else:
            self._kv_take(self.batches[p.batch], p.slots, np.ones(p.n_prompts, dtype=np.int64),
                          "first tokens after prefill")
        start = self.last_end
        self._segment("prefill", now)
        self.prefill_log.append((p.index, p.batch, start, now, p.n_prompts))
        if self.finished >= self.N:
            self.makespan = now
            self.eng.stopped = True

    def _segment(self, phase: str, now: float) -> float:
        seg = max(0.0, now - self.last_end)
        self.last_end = max(self.last_end, now)
        self.phase[phase] += seg
        return seg

    def _refill(self, batch: _Batch) -> None:
        """Admit waiting prompts into the batch's free slots, in prefill chunks (the runtime's rule:
        only when a whole chunk's worth can go in, or the batch is idle)."""
        bp = self.plan.prefill_batch
        left = self.N - self.queue_next
        free = batch.free_slots()
        want = min(len(free), left)
        if want == 0 or (want < min(bp, left) and batch.active.any()):
            return
        for start in range(0, want, bp):
            self._prefill_pass(batch, free[start:min(want, start + bp)])

    # --- verification --------------------------------------------------------------------------
    def _draft_for(self, batch: _Batch) -> None:
        """Issue the batch's draft round (after its pending prefills); the next verification waits for it."""
        live = int(batch.active.sum())
        if self.k and live:
            dj = self._draft_round(batch.index, live, batch.pending, len(self.passes))
            if dj is not None:
                batch.pending = [dj]

    def _next_verification(self, after: _Batch) -> None:
        """After a verification of `after`: refill it, issue its draft, and start the next verification
        (the other batch under the interleaved policy, unless that one has nothing to verify)."""
        self._refill(after)
        self._draft_for(after)
        nxt = after
        if self.nb == 2:
            other = self.batches[1 - after.index]
            if not other.active.any() and self.queue_next < self.N:  # an idle batch is refilled on its turn
                self._refill(other)
                self._draft_for(other)
            if other.active.any():
                nxt = other
        live = np.flatnonzero(nxt.active)
        if len(live):
            self._verify_pass(nxt, live)

    def _verify_pass(self, batch: _Batch, live: np.ndarray) -> None:
        eng, cm, t = self.eng, self.cm, self.t
        p = self._new_pass("verify")
        p.batch, p.slots = batch.index, live
        k1 = self.k + 1
        p.tokens = float(len(live) * k1)
        n, traced, X = p.index, self._traced(p.index), batch.index
        gate = Task("gate", None, None, 0.0, batch=X, pass_index=n)
        for dep in batch.pending:
            eng.depend(dep, gate)
        batch.pending = []
        p.gate = gate
        # Per micro-batch durations (contexts do not change within a verification).
        mbs = []
        m = self.m
        for i in range(m):
            idx = live[live % m == i]
            if not len(idx):
                continue
            on_gpu = idx[idx < self.gpu_kv]
            on_cpu = idx[idx >= self.gpu_kv]
            tok = len(idx) * k1
            q = cm.qkv_seconds(t, tok)
            if len(on_gpu):
                q += len(on_gpu) * cm.gpu_attention_seconds(t, 1, k1, self._ctx(batch, on_gpu))
            f = cm.ffn_seconds(t, tok)
            if len(on_cpu):
                down, up = cm.attention_io_bytes(t, len(on_cpu) * k1)
                io = (cm.d2h_seconds(down), cm.cpu_attention_seconds(t, len(on_cpu), k1, self._ctx(batch, on_cpu, host=True)),
                      cm.h2d_seconds(up))
            else:
                io = None
            mbs.append((i, q, io, f))
        gpu, cpu, d2h, h2d = self.gpu, self.cpu, self.d2h, self.h2d
        prev = {i: gate for i, *_ in mbs}
        base_n = _prio(TARGET, n)
        for j in range(self.L):
            release = self._layer_release(p, j)
            attn_users, ffn_users, layer_tasks = [], [], []
            base = base_n | (min(j, 255) << 8)
            for i, q, io, f in mbs:
                # Fresh tasks (the gate included, armed last): dependencies are wired directly.
                prio = base | i
                Q = Task("qkv", "gpu", gpu, q, prio, 0.0, j, i, X, n, None, traced)
                prev[i].successors.append(Q)
                Q.waiting += 1
                layer_tasks.append(Q)
                last = Q
                if io is not None:
                    D = Task("d2h qkv", "d2h", d2h, io[0], prio, 0.0, j, i, X, n, None, traced)
                    C = Task("attention", "cpu", cpu, io[1], prio, 0.0, j, i, X, n, None, traced)
                    U = Task("h2d attn-out", "h2d", h2d, io[2], prio, 0.0, j, i, X, n, None, traced)
                    Q.successors.append(D)
                    D.successors.append(C)
                    C.successors.append(U)
                    D.waiting += 1
                    C.waiting += 1
                    U.waiting += 1
                    layer_tasks += (D, C, U)
                    last = U
                F = Task("ffn", "gpu", gpu, f, prio, 0.0, j, i, X, n, None, traced)
                last.successors.append(F)
                F.waiting += 1
                F.successors.append(release)
                release.waiting += 1
                layer_tasks.append(F)
                attn_users.append(Q)
                ffn_users.append(F)
                prev[i] = F
            self._wire_weights(p, j, attn_users, ffn_users)
            for task in layer_tasks:
                eng.arm(task)
            eng.arm(release)
        # The LM head, then the runtime's bookkeeping for the pass (verify, roll back, commit: host time).
        lm = Task("lm-head", "gpu", gpu, cm.lm_head_seconds(t, p.tokens) + cm.host_pass_seconds(len(p.slots)),
                  _prio(TARGET, n, self.L, 0), batch=X,
                  pass_index=n, traced=traced)
        for task in prev.values():
            eng.depend(task, lm)
        end = Task("verified", None, None, 0.0, batch=X, pass_index=n,
                   on_done=lambda now, p=p: self._verify_done(p, now))
        eng.depend(lm, end)
        eng.arm(lm)
        eng.arm(end)
        eng.arm(gate)
        self._pump()

    def _verify_done(self, p: _Pass, now: float) -> None:
        p.done = True
        batch = self.batches[p.batch]
        idx = p.slots
        n = len(idx)
        k = self.k
        if k:
            accepted = (self.rng.random((n, k)) < self.acc).cumprod(axis=1).sum(axis=1)
            counts = np.bincount(accepted, minlength=k + 1)
            at_least = counts[::-1].cumsum()[::-1]  # at_least[i] = #(accepted >= i)
            self.pos_tried += at_least[:k]
            self.pos_acc += at_least[1:k + 1]
        else:
            accepted = np.zeros(n, dtype=np.int64)
        tokens = accepted + 1
        kept = np.minimum(tokens, self.G - batch.gen[idx])
        batch.gen[idx] += kept
        self.rounds += n
        self.tokens_sum += float(tokens.sum())
        self.kept_sum += float(kept.sum())
        self.generated += int(kept.sum())
        self._kv_take(batch, idx, kept, "tokens kept by a verification")
        done = idx[batch.gen[idx] >= self.G]
        if len(done):
            batch.active[done] = False
            batch.seq[done] = -1
            self.finished += len(done)
            self._kv_free(batch, done)  # the slot's KV is freed at finish, ready for a refill
        start = self.last_end
        self._segment("decode", now)
        self.slot_log.append((p.index, p.batch, start, now, n))
        if self.finished >= self.N:
            self.makespan = now
            self.eng.stopped = True
            return
        self._next_verification(batch)
        self._pump()

    # --- the run -------------------------------------------------------------------------------
    def _setup(self) -> None:
        for a in self.layout.static:
            if a.kind != "static":
                continue
            self._alloc(a.pool, a.nbytes, f"setup: {a.name}")
            if self.eng.stopped:
                return
        need = self.P + self.G + self.k + 1
        if need > self.t.max_position_embeddings:
            self.problems.append(Problem("unfinished", (
                f"no sequence can finish: prompt {self.P} + generation {self.G} + {self.k + 1} verification tokens "
                f"= {need} exceeds {self.t.name}'s context of {self.t.max_position_embeddings} tokens")))
            self.eng.stopped = True
            return
        # Initial fill as the runtime does it: batch 0 first, then batch 1, each in prefill chunks.
        for batch in self.batches:
            self._refill(batch)
            self._draft_for(batch)
        if self.batches[0].active.any():
            self._verify_pass(self.batches[0], np.flatnonzero(self.batches[0].active))

    def _check(self, now: float, events: int) -> None:
        if now > self.time_limit:
            self.problems.append(Problem("unfinished", (
                f"sequences never finish: {self.N - self.finished} of {self.N} still unfinished at t={now:.1f} s, "
                f"past {self.opt.time_limit_factor:g}x the predicted {self.time_limit / self.opt.time_limit_factor:.1f} s")))
            self.eng.stopped = True
        if self.opt.progress:
            wall = time.perf_counter() - self._wall0
            if wall > 1.0:
                self._progress_shown = True
                sys.stderr.write(f"\r  simulating: {self.finished}/{self.N} sequences done, t={now:.1f} s simulated, "
                                 f"{events} events")
                sys.stderr.flush()

    def _deadlock_message(self) -> str:
        open_passes = [p for p in self.passes if not p.done]
        parts = [f"no event pending at t={self.eng.now:.3f} s while {self.N - self.finished} of {self.N} "
                 f"sequences are unfinished"]
        for p in open_passes[:3]:
            what = f"verification of batch {p.batch}" if p.kind == "verify" else f"prefill of {p.n_prompts} prompts"
            gate = "started" if p.gate is not None and p.gate.done else "waiting to start"
            parts.append(f"pass {p.index} ({what}) {gate}, {p.layers_done}/{self.L} layers done"
                         + (f", waiting for weights of layers {sorted(p.waiting_weights)[:4]}" if p.waiting_weights else ""))
        n, idx = divmod(self.stream_pos, max(1, len(self.streamed)))
        parts.append(f"weight stream at pass {n} layer {self.streamed[idx] if self.streamed else '-'} with "
                     f"{self.free_buffers:g} of {self.buffer_capacity:g} buffer {'bytes' if self.by_bytes else 'slots'} free")
        return "deadlock: " + "; ".join(parts)

    def run(self) -> SimResult:
        self._wall0 = time.perf_counter()
        try:
            pred_total = self.cm.evaluate(self.knobs, self.placement).total_seconds
        except (ValueError, ZeroDivisionError):
            pred_total = math.inf
        self.time_limit = self.opt.time_limit_factor * pred_total if math.isfinite(pred_total) else math.inf
        for pool, err in self.layout.residual_error.items():
            self.problems.append(Problem("model", f"memory decomposition of pool {pool} is off by {err:.0f} bytes"))
        self._setup()
        if not self.eng.stopped:
            self.eng.run(self._check)
        if self._progress_shown:
            sys.stderr.write("\n")
        if not self.eng.stopped and self.finished < self.N:
            self.problems.append(Problem("deadlock", self._deadlock_message()))
        if self.makespan <= 0:
            self.makespan = self.eng.now
        return self._result(time.perf_counter() - self._wall0)

    # --- the report ----------------------------------------------------------------------------
    def _result(self, wall: float) -> SimResult:
        plan, cm = self.plan, self.cm
        T = self.makespan
        busy: dict[str, float] = {"gpu": 0.0, "cpu": 0.0, "h2d": 0.0, "d2h": 0.0}
        for res in self.eng.resources:
            for label, v in res.busy_until(T).items():
                busy[label] = busy.get(label, 0.0) + v
        slots = len(self.slot_log)
        spans = sorted(end - start for _, _, start, end, _ in self.slot_log)
        decode = self.phase["decode"]
        per_pos = tuple(float(a / t) if t else 0.0 for a, t in zip(self.pos_acc, self.pos_tried)) if self.k else ()
        bound = cm.physical_bound(self.knobs)
        tput = self.generated / T if T > 0 else 0.0
        notes = [f"simulated {self.eng.events} events in {wall:.2f} s"]
        if self.opt.context == "average":
            notes.append("context: the cost model's average context for every verification (not the live contexts)")
        if self.trace is not None:
            shown = min(self.opt.trace_slots, len(self.passes))
            msg = (f"trace: tasks of the first {shown} of {len(self.passes)} passes; memory counters for the whole run")
            self.trace.note(msg)
            notes.append(msg)
        notes += [p.message for p in self.problems]
        report = Report(
            kind="simulated", policy=plan.policy, model=plan.model, draft=plan.draft, profile=self.profile.name,
            profile_fingerprint=_fingerprint(self.profile), plan_fingerprint=_fingerprint(plan),
            seed=self.opt.seed, sequences=self.finished, generated_tokens=self.generated,
            total_seconds=T, prefill_seconds=self.phase["prefill"], decode_seconds=decode,
            throughput_tokens_per_s=tput,
            decode_tokens_per_s=self.generated / decode if decode > 0 else 0.0,
            slots=slots, slot_seconds=decode / slots if slots else 0.0,
            slot_seconds_median=spans[len(spans) // 2] if spans else 0.0,
            prefill_passes=len(self.prefill_log),
            busy_fraction={r: (v / T if T > 0 else 0.0) for r, v in busy.items()},
            peak_mem_bytes={p: self.pools[p].peak for p in POOLS},
            peak_mem_seconds={p: self.pools[p].peak_time for p in POOLS},
            mem_over_time={p: binned_peaks(self.pools[p].history, T) for p in POOLS},
            capacity_bytes={p: finite_capacity(self.layout.capacity[p]) for p in POOLS},
            acceptance=AcceptanceStats(
                draft_len=self.k, rounds=self.rounds,
                tokens_per_round=self.tokens_sum / self.rounds if self.rounds else 0.0,
                useful_tokens_per_round=self.kept_sum / self.rounds if self.rounds else 0.0,
                per_position=per_pos),
            physical_bound_tokens_per_s=bound if math.isfinite(bound) else 0.0,
            bound_fraction=tput / bound if math.isfinite(bound) and bound > 0 else 0.0,
            predicted=predicted_figures(cm, self.knobs, self.placement),
            notes=tuple(notes))
        return SimResult(report, tuple(self.problems), self.slot_log, self.prefill_log, self.trace,
                         self.eng.events, wall, self.overflow)


def _fingerprint(obj) -> str:
    from ..schema import fingerprint

    return fingerprint(obj)


def resolve_profile(plan: Plan, profile: HardwareProfile | str | None = None) -> HardwareProfile:
    """The profile to simulate on: given, a path or shipped name, or the one the plan names."""
    if isinstance(profile, HardwareProfile):
        return profile
    if profile is not None:
        return load_profile(profile)
    try:
        return load_profile(plan.profile)
    except SchemaError:
        raise SchemaError(f"the plan was made for profile '{plan.profile}', which is not a shipped profile; "
                          f"pass its file with --profile PATH") from None


def simulate(plan: Plan, profile: HardwareProfile | str | None = None, options: SimOptions = SimOptions()) -> SimResult:
    """Simulate `plan` on `profile` (default: the plan's own) and return the result with its report."""
    return Simulation(plan, resolve_profile(plan, profile), options).run()
