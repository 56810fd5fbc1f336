"""The job simulation: a Plan's prefill chunks, verifications and draft rounds as tasks on resources.

Where the parts live: the task-graph builders by pass kind in verify_pass.py (a verification, the
order of passes), prefill_pass.py (a prefill chunk, admission) and draft_round.py; the weight stream
in weight_stream.py; memory and KV accounting in accounting.py (the static layout in memory.py); the
heap loop, resources and pools in engine.py (`EventLoop`). This file holds the state they share,
the run and the report.

Model (what the runtime is expected to do; durations all come from the CostModel):

- Resources: `gpu` (compute), `h2d` and `d2h` copy engines, `cpu` (the CPU attention pool), and `disk`
  where the plan reads layers from the checkpoint every sweep (the disk stage: weight_stream.py). The CPU
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
- Schedule and refill: the steps of planner/schedule.py, which the runtime's engine takes too
  (runtime/engine/engine.py `run`; tests/test_schedule.py compares the two step for step): prompts are
  prefilled in chunks of plan.prefill_batch, each chunk its own weight sweep (`CostModel.prefill_terms`
  for the chunk's size, spread over layers and over up to `prefill_groups` groups of its micro-chunks:
  h2d hidden in -> gpu -> d2h out); the prefill's logits give each sequence its first token. The
  initial fill gives batch 0 min(decode_batch, prompts), then batch 1 the next ones. After a
  verification of batch X its finished sequences free their slots and X is refilled right away
  (before the next verification) with whole chunks of prefill_batch only (the rest of the free slots
  wait for the next refill), or all the prompts left when they fit; an idle X takes all min(free, left)
  waiting prompts (`schedule.admit_count`). Then X's draft round (its
  survivors and newcomers, after their prefill) is issued; interleaved: it runs while the other batch
  verifies; serial-spec: right before X's next verification.
- The fused prefill (`Plan.fuse_prefill`, one batch; fused_pass.py): a refill admits at most one chunk,
  and while the batch has live sequences the chunk gets no sweep of its own (`schedule.defer_prefill`):
  its rows hold their prompts' KV from admission, and it rides in the next verification's sweep, the
  "fused pass". Per streamed layer, once copied: after the first micro-batch's qkv, the chunk's layer
  (gpu; its KV down on d2h; hidden states through host memory as a stand-alone chunk's) beside the
  verification's layer, whose FFN does not wait for it, and before the next layer's work (the runtime's
  chunk stream), the buffer freed after both; on a CPU-only profile the chunk's layer after the
  verification's. No weight copy or disk read of its own (the routed experts copied
  count its tokens). After the verification's LM head: the chunk's LM head, the draft's prefill of it;
  then the pass ends and the chunk's sequences join with their first token, drafted in the next round.
  With nothing live the one chunk is prefilled at once on its own sweep, so a fused batch ramps up a
  chunk per sweep. A fused pass is a verification in the report (decode time, a slot); `prefill_passes`
  counts stand-alone sweeps, `fused_passes` the verifications that carried a chunk. Both working sets
  on the device at once: what the plan does not count is taken for the pass (an overflow names it).
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
from dataclasses import dataclass

import numpy as np

from ..acceptance import AcceptanceCounts
from ..schedule import schedule_for
from ..schema import HardwareProfile, Plan, load_profile, resident_layers
from ..strict import SchemaError
from .accounting import MemoryAccounting
from .draft_round import DraftRounds
from .engine import EventLoop, MemoryPool, Overflow, Task
from .fused_pass import FusedPasses
from .memory import POOLS, finite_capacity, memory_layout
from .predict import plan_cost_model, predicted_figures
from .prefill_pass import PrefillPasses
from .report import AcceptanceStats, Report, binned_peaks
from .state import BULK, DRAFT, TARGET, Problem, _Batch, _Chunk, _Pass, _prio
from .trace import ChromeTrace, slice_name
from .verify_pass import VerifyPasses
from .weight_stream import WeightStream

PROGRESS_LOG_S = 30.0  # without a terminal: a progress line this often (seconds of wall time)

__all__ = ["BULK", "DRAFT", "TARGET", "Problem", "SimOptions", "SimResult", "Simulation", "resolve_profile",
           "simulate"]


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
    progress: bool = False  # progress on stderr when the run takes over ~1 s (a terminal: one line in place)
    time_limit_factor: float = 50.0  # "never finishes": simulated time past this x the prediction

    def __post_init__(self):
        if self.context not in ("live", "average"):
            raise ValueError(f"context must be 'live' or 'average', not {self.context!r}")
        if self.residency not in ("prefix", "spread"):
            raise ValueError(f"residency must be 'prefix' or 'spread', not {self.residency!r}")
        if self.buffer_policy not in ("layers", "bytes"):
            raise ValueError(f"buffer_policy must be 'layers' or 'bytes', not {self.buffer_policy!r}")


@dataclass
class SimResult:
    report: Report
    problems: tuple[Problem, ...]
    step_log: list[tuple[int, int, float, float, int]]  # (pass, batch, start, end, live sequences)
    prefill_log: list[tuple[int, int, float, float, int]]  # (pass, batch, start, end, prompts)
    trace: ChromeTrace | None
    events: int
    wall_seconds: float
    overflow: Overflow | None = None
    schedule_log: tuple[tuple[str, int, int], ...] = ()  # the schedule's steps taken: (op, batch, sequences)
    fused_log: tuple[tuple[int, int], ...] = ()  # fused passes: (pass, prompts of the chunk it prefilled)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def slot_log(self) -> list[tuple[int, int, float, float, int]]:  # the report's word for a decode step
        return self.step_log

    def steady_step_seconds(self, skip: float = 0.25) -> float:
        """Mean verification time in steady state: verifications of a full batch, not the first of
        their batch nor next to a prefill pass, with the first and last `skip` of those dropped."""
        full = max((live for *_, live in self.step_log), default=0)
        near = {p for p, *_ in self.prefill_log} | {p + 1 for p, *_ in self.prefill_log}
        seen, spans = set(), []
        for p, batch, start, end, live in self.step_log:
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

    steady_slot_seconds = steady_step_seconds  # the report's word for a decode step is "slot"


class Simulation(VerifyPasses, PrefillPasses, FusedPasses, DraftRounds, WeightStream, MemoryAccounting):
    """One job's simulation. The task-graph builders live by pass kind (verify_pass.py, prefill_pass.py,
    draft_round.py), the weight stream in weight_stream.py, memory accounting in accounting.py; this
    class holds the state they share, the run and the report."""

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
        eng = self.eng = EventLoop()
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
        # The fused prefill (fused_pass.py): a chunk admitted while the batch is live waits here for the
        # next verification's sweep; fused passes counts the verifications that carried one.
        self.fused = bool(plan.fuse_prefill)
        self.deferred: _Chunk | None = None
        self.fused_passes = 0
        self.fused_log: list[tuple[int, int]] = []
        self._fused_cache: dict = {}
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
        self._init_disk_stage(rec)  # the disk tier's reads and staging buffers (weight_stream.py)

        self.passes: list[_Pass] = []
        self.batches = [_Batch(x, self.b) for x in range(self.nb)]
        self.queue_next = 0  # next prompt to admit
        self.finished = 0
        self.generated = 0
        self.last_end = 0.0
        self.phase = {"prefill": 0.0, "decode": 0.0}
        self.step_log: list[tuple[int, int, float, float, int]] = []
        self.schedule_log: list[tuple[str, int, int]] = []  # the schedule's steps taken: (op, batch, sequences)
        self.prefill_log: list[tuple[int, int, float, float, int]] = []
        self.acceptance = AcceptanceCounts(self.k)  # per-position counts over every verification round
        self.kept_sum = 0.0
        self.makespan = 0.0
        self._wall0 = 0.0
        self._progress_shown = False
        self._last_progress = 0.0

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

    def _new_pass(self, kind: str) -> _Pass:
        p = _Pass(len(self.passes), kind)
        self.passes.append(p)
        return p
    def _segment(self, phase: str, now: float) -> float:
        seg = max(0.0, now - self.last_end)
        self.last_end = max(self.last_end, now)
        self.phase[phase] += seg
        return seg

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
        # The schedule's steps (planner/schedule.py), as the runtime's engine follows them: the initial fill
        # (batch 0 first, then batch 1, each in prefill chunks), then verifications, refills and draft rounds.
        self._steps = schedule_for(self.nb, self.k).steps(self)
        self._advance()

    def _check(self, now: float, events: int) -> None:
        if now > self.time_limit:
            self.problems.append(Problem("unfinished", (
                f"sequences never finish: {self.N - self.finished} of {self.N} still unfinished at t={now:.1f} s, "
                f"past {self.opt.time_limit_factor:g}x the predicted {self.time_limit / self.opt.time_limit_factor:.1f} s")))
            self.eng.stopped = True
        if self.opt.progress:
            wall = time.perf_counter() - self._wall0
            # A terminal gets one line rewritten in place; a log file a line every PROGRESS_LOG_S.
            tty = sys.stderr.isatty()
            if wall > 1.0 and (tty or wall - self._last_progress >= PROGRESS_LOG_S):
                self._last_progress = wall
                self._progress_shown = tty
                sys.stderr.write(f"{chr(13) if tty else ''}  simulating: {self.finished}/{self.N} sequences done, "
                                 f"t={now:.1f} s simulated, {events} events{'' if tty else chr(10)}")
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
        if self.disk_layers:
            parts.append(self._disk_state())
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
        if self.disk_layers:
            busy["disk"] = 0.0
        for res in self.eng.resources:
            for label, v in res.busy_until(T).items():
                busy[label] = busy.get(label, 0.0) + v
        slots = len(self.step_log)
        spans = sorted(end - start for _, _, start, end, _ in self.step_log)
        decode = self.phase["decode"]
        acc = self.acceptance
        per_pos = tuple(acc.per_position()) if self.k else ()
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
            prefill_passes=len(self.prefill_log), fused_passes=self.fused_passes,
            busy_fraction={r: (v / T if T > 0 else 0.0) for r, v in busy.items()},
            peak_mem_bytes={p: self.pools[p].peak for p in POOLS},
            peak_mem_seconds={p: self.pools[p].peak_time for p in POOLS},
            mem_over_time={p: binned_peaks(self.pools[p].history, T) for p in POOLS},
            capacity_bytes={p: finite_capacity(self.layout.capacity[p]) for p in POOLS},
            acceptance=AcceptanceStats(
                draft_len=self.k, rounds=acc.rounds, tokens_per_round=acc.mean_tokens_per_round,
                useful_tokens_per_round=self.kept_sum / acc.rounds if acc.rounds else 0.0,
                per_position=per_pos),
            physical_bound_tokens_per_s=bound if math.isfinite(bound) else 0.0,
            bound_fraction=tput / bound if math.isfinite(bound) and bound > 0 else 0.0,
            predicted=predicted_figures(cm, self.knobs, self.placement),
            notes=tuple(notes))
        return SimResult(report, tuple(self.problems), self.step_log, self.prefill_log, self.trace,
                         self.eng.events, wall, self.overflow, tuple(self.schedule_log), tuple(self.fused_log))


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
