"""The cost model: one set of formulas for the LP (as linear forms) and the simulator (as durations).

A decode *slot*: the target verifies one batch of b sequences carrying k draft tokens each
(b·(k+1) query tokens), layer by layer, with layer j+1's streamed weights copied in while layer j
computes; attention runs on the CPU over the host KV cache (a fraction of sequences may keep their
KV on the GPU); the draft drafts k tokens for the other batch on the same GPU (interleaved) or
before the verification (serial). Resources: `gpu`, `cpu` (attention workers), `h2d`, `d2h`.

Placement variables (continuous, what the LP chooses):
  attn_gpu  fraction of layers whose attention weights stay resident on the GPU
  ffn_gpu   fraction of layers whose FFN / expert weights stay resident on the GPU
  kv_gpu    fraction of each batch's sequences whose target KV cache lives on the GPU
Every time and memory figure is a `Linear` form in these, so the LP and the closed-form
evaluation share one definition.

All times in seconds, sizes in bytes. Activations and KV use the checkpoint's element size (bf16).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np

from .models import ModelSpec
from .schema import HardwareProfile, Workload

PLACEMENT_VARS = ("attn_gpu", "ffn_gpu", "kv_gpu")
LOGIT_BYTES = 4  # logits are produced in fp32
EXACT_SUMS = 16  # sums of up to this many sequences' rounds are convolved exactly (RoundStats.sum_cdf)
PREFILL_MICRO_TOKENS = 8192  # tokens the GPU holds at once during prefill (see prefill_split)
# On a CPU-only machine every weight is "resident" in the one memory and attention runs in place.
CPU_ONLY_PLACEMENT = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": 0.0}


class Linear:
    """const + attn_gpu·a + ffn_gpu·f + kv_gpu·k: a linear form over the three placement variables.

    Plain floats in slots (not a dict): the planner builds hundreds of thousands of these.
    """

    __slots__ = ("const", "a", "f", "k")

    def __init__(self, const: float = 0.0, a: float = 0.0, f: float = 0.0, k: float = 0.0):
        self.const, self.a, self.f, self.k = const, a, f, k

    @staticmethod
    def of(const: float = 0.0, attn_gpu: float = 0.0, ffn_gpu: float = 0.0, kv_gpu: float = 0.0) -> "Linear":
        return Linear(float(const), float(attn_gpu), float(ffn_gpu), float(kv_gpu))

    @property
    def coef(self) -> tuple[tuple[str, float], ...]:
        return tuple((n, v) for n, v in zip(PLACEMENT_VARS, (self.a, self.f, self.k)) if v)

    def __add__(self, other: "Linear | float") -> "Linear":
        if isinstance(other, Linear):
            return Linear(self.const + other.const, self.a + other.a, self.f + other.f, self.k + other.k)
        return Linear(self.const + other, self.a, self.f, self.k)

    __radd__ = __add__

    def __mul__(self, s: float) -> "Linear":
        return Linear(self.const * s, self.a * s, self.f * s, self.k * s)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Linear) and (self.const, self.a, self.f, self.k) == (
            other.const, other.a, other.f, other.k)

    def __repr__(self) -> str:
        return f"Linear({self.const!r}, attn_gpu={self.a!r}, ffn_gpu={self.f!r}, kv_gpu={self.k!r})"

    def at(self, placement: dict[str, float]) -> float:
        return (self.const + self.a * placement["attn_gpu"] + self.f * placement["ffn_gpu"]
                + self.k * placement["kv_gpu"])

    def minimum(self) -> float:
        """Smallest value over the unit box (a cheap bound)."""
        return self.const + min(self.a, 0.0) + min(self.f, 0.0) + min(self.k, 0.0)


def streamed(total: float, var: str) -> Linear:
    """`total * (1 - var)`: the part of `total` not resident."""
    return Linear.of(total, **{var: -total})


@dataclass(frozen=True)
class Knobs:
    """The integer choices the planner enumerates."""

    policy: str  # offload-only | serial-spec | interleaved
    decode_batch: int
    prefill_batch: int
    draft_len: int
    micro_batches: int
    draft_kv: str = "gpu"  # gpu | host | recompute
    draft_sub_batch: int = 1  # sequences per draft forward when recomputing the context
    weight_buffers: int = 2  # 0: everything resident, nothing streamed

    @property
    def num_batches(self) -> int:
        return 2 if self.policy == "interleaved" else 1

    @property
    def speculative(self) -> bool:
        return self.draft_len > 0


@dataclass(frozen=True)
class SlotTerms:
    """Per-slot busy time of each resource, the dependency-chain bounds, and fixed serial parts."""

    busy: dict[str, Linear]  # resource -> busy seconds in one slot
    chain: tuple[Linear, ...]  # slot time >= each (per-layer critical path with micro-batches)
    serial_seconds: float  # added after the overlapped part (serial-spec: the draft round)
    tokens_per_slot: float  # expected verified tokens in one slot (full batch)
    shared_device: bool  # CPU-only machine: gpu and cpu are one resource
    host_seconds: float = 0.0  # the runtime's bookkeeping between passes (serial, on the host)

    @property
    def serial_total(self) -> float:
        return self.serial_seconds + self.host_seconds


@dataclass(frozen=True)
class RoundStats:
    """Verification rounds a sequence needs to reach its generation length (the first token comes
    from the prefill, so rounds produce the other gen_len - 1)."""

    expected_tokens: float  # E[tokens per round], uncapped
    mean_rounds: float
    cdf: tuple[float, ...]  # P(rounds <= r) for r = 0, 1, ...

    def expected_max(self, n: float) -> float:
        """E[max of n i.i.d. round counts]: the slowest of n sequences."""
        if n <= 1:
            return self.mean_rounds
        return float(np.sum(1.0 - self._cdf ** n))

    @functools.cached_property
    def _cdf(self) -> np.ndarray:
        return np.asarray(self.cdf)

    @functools.cached_property
    def pmf(self) -> np.ndarray:
        return np.diff(self._cdf, prepend=0.0).clip(min=0.0)

    @functools.cached_property
    def _sums(self) -> dict[int, np.ndarray]:
        return {}

    def sum_cdf(self, q: int) -> tuple[int, np.ndarray]:
        """(offset, CDF from there) of the rounds q sequences run back to back need, cached per q.

        The CDF is 0 below the offset and 1 past the array. Exact (FFT convolution) up to
        EXACT_SUMS sequences; beyond, the central limit: a normal with q times the mean and variance.
        """
        if q not in self._sums:
            if q <= 1:
                self._sums[q] = (0, self._cdf)
            elif q <= EXACT_SUMS:
                self._sums[q] = (0, np.cumsum(_sum_pmf(self.pmf, q)).clip(max=1.0))
            else:
                r = np.arange(len(self.pmf))
                mean = float(np.sum(r * self.pmf))
                var = float(np.sum((r - mean) ** 2 * self.pmf))
                mu, sd = q * mean, max(math.sqrt(q * var), 1e-9)
                lo, hi = max(0, int(mu - 10 * sd)), int(math.ceil(mu + 10 * sd)) + 1
                z = [(x + 0.5 - mu) / (sd * math.sqrt(2.0)) for x in range(lo, hi)]
                self._sums[q] = (lo, np.array([0.5 * (1.0 + math.erf(v)) for v in z]))
        return self._sums[q]

    def makespan(self, n: int, b: int) -> float:
        """Expected rounds until the last of n sequences finishes on b slots with refill.

        Each slot runs q = n // b sequences back to back (their rounds add: S_q), and the r = n % b
        left over start in the slots that finish their q first (about the r/b quantile of S_q), then
        need one more sequence's rounds: the makespan is the later of the slowest slot with q
        sequences and the slowest of the r late starters. Exact for deterministic rounds (whole
        waves); for random rounds it captures the nearly empty last wave that a fluid model misses.
        """
        if n <= 0:
            return 0.0
        q, r = divmod(int(math.ceil(n)), b)
        if q == 0:
            return self.expected_max(r)
        offset, cdf_q = self.sum_cdf(q)
        slow_full = offset + float(np.sum(1.0 - cdf_q ** (b - r))) if b > r else 0.0
        if r == 0:
            return slow_full
        start = offset + float(np.searchsorted(cdf_q, r / b))  # quantile of S_q: when the r-th slot frees up
        return max(slow_full, start + self.expected_max(r))


def _sum_pmf(pmf: np.ndarray, q: int) -> np.ndarray:
    """pmf of the sum of q i.i.d. copies (repeated squaring, FFT convolution, tiny tails trimmed)."""
    def conv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = len(a) + len(b) - 1
        size = 1 << (n - 1).bit_length()
        out = np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(b, size), size)[:n]
        return out.clip(min=0.0)

    result, base = np.array([1.0]), pmf
    while q:
        if q & 1:
            result = conv(result, base)
        q >>= 1
        if q:
            base = conv(base, base)
    return result / result.sum()


def token_distribution(acceptance: tuple[float, ...]) -> list[float]:
    """P(X = j), j = 1..k+1: tokens one verification yields (accepted draft tokens + one from the target)."""
    probs, alive = [], 1.0
    for a in acceptance:
        probs.append(alive * (1.0 - a))
        alive *= a
    probs.append(alive)
    return probs


def expected_tokens(acceptance: tuple[float, ...]) -> float:
    """E[X] = 1 + sum_i prod_{j<=i} a_j; for i.i.d. p this is (1 - p^(k+1)) / (1 - p)."""
    total, alive = 1.0, 1.0
    for a in acceptance:
        alive *= a
        total += alive
    return total


@functools.lru_cache(maxsize=256)
def round_stats(acceptance: tuple[float, ...], gen_len: int) -> RoundStats:
    """Exact distribution of rounds to produce gen_len tokens, each round capped at what is left."""
    if gen_len <= 0:
        return RoundStats(expected_tokens(acceptance), 0.0, (1.0,))
    px = np.array(token_distribution(acceptance))
    mass = np.zeros(gen_len)  # mass[n]: P(n tokens produced so far and not yet done)
    mass[0] = 1.0
    done, cdf, mean = 0.0, [0.0], 0.0
    r = 0
    while done < 1.0 - 1e-12 and r <= gen_len:
        r += 1
        new = np.convolve(mass, px)  # index n + j - 1 for X = j: shift by one below
        new = np.concatenate(([0.0], new))
        finished = float(new[gen_len:].sum())
        mass = new[:gen_len]
        done += finished
        mean += r * finished
        cdf.append(min(done, 1.0))
    return RoundStats(expected_tokens(acceptance), mean, tuple(cdf))


class CostModel:
    """Durations and memory for one (profile, target, draft, workload)."""

    def __init__(self, profile: HardwareProfile, target: ModelSpec, draft: ModelSpec | None,
                 workload: Workload):
        self.hw, self.t, self.d, self.w = profile, target, draft, workload
        self.cpu_only = profile.cpu_only
        need = "by the cost model"
        self._rate = profile.require("gpu_matmul_flops_per_s", need)
        self._gpu_bw = profile.require("gpu_mem_bandwidth_bytes_per_s", need)
        self._kv_bw = profile.require("cpu_attn_kv_read_bytes_per_s", need)
        self._attn_rate = profile.require("cpu_attn_flops_per_s", need)
        if not self.cpu_only:
            self._h2d = profile.require("h2d_pinned_bytes_per_s", "to stream weights")
            self._d2h = profile.require("d2h_pinned_bytes_per_s", "to move activations and KV")
        self.act_bytes = target.weight_bytes_per_param
        # On a CPU-only machine the runtime computes in fp32 (exactness; no bf16 units): weights take
        # twice the checkpoint's bytes in memory and in every read.
        self.weight_read_factor = 4.0 / target.weight_bytes_per_param if self.cpu_only else 1.0
        # Average context over decoding (prompt + half the generation) and the maximum.
        self.ctx_avg = workload.prompt_len_tokens + workload.gen_len_tokens / 2.0
        self.ctx_max = workload.max_context_tokens
        self._target_cache: dict[tuple, tuple] = {}
        self._draft_cache: dict[tuple, dict[str, float]] = {}
        self._slots_cache: dict[tuple, tuple[float, float]] = {}

    # --- contexts ------------------------------------------------------------------------------
    def padded_prompt(self, rows: float) -> float:
        """Expected longest prompt among `rows` sequences: between the mean (one row) and the workload's
        longest (many rows). A batched attention call reads every row up to its longest row's keys."""
        w = self.w
        return w.prompt_len_tokens + (w.max_prompt_len - w.prompt_len_tokens) * (1.0 - 1.0 / max(rows, 1.0))

    def attention_context(self, rows: float, in_flight: float | None = None) -> float:
        """Keys per row that one decode attention call over `rows` sequences reads, averaged over the job.

        The runtime pads a call to its longest row: the longest prompt among the rows plus the generation
        of the furthest row. `in_flight` is how many sequences the plan holds at once (default: `rows`):
        when that covers the whole job (one wave) all rows advance together, G/2 on average; when batches
        are refilled, rows drift apart and the furthest is rows/(rows+1) of the way through G."""
        w = self.w
        rows = max(rows, 1.0)
        drift = max(0.0, 1.0 - (in_flight or rows) / w.num_prompts)  # 0 for a single wave
        gen = w.gen_len_tokens / 2.0 + drift * w.gen_len_tokens * (rows / (rows + 1.0) - 0.5)
        return self.padded_prompt(rows) + gen

    def host_attention_context(self) -> float:
        """Keys per row that host attention reads, averaged over the job: the runtime's host attention reads
        each row only up to its own length (no padding to the longest row), so a call over any rows reads
        the mean context, prompt + half the generation."""
        return self.ctx_avg

    # --- primitive durations (the simulator uses these as task durations) ----------------------
    def matmul_seconds(self, flops: float, tokens: float, weight_bytes: float) -> float:
        """Roofline on the compute device: max(FLOPs / achieved rate at this token count, bytes / bandwidth)."""
        if flops <= 0:
            return 0.0
        return max(flops / self._rate(max(tokens, 1.0)), weight_bytes * self.weight_read_factor / self._gpu_bw)

    def h2d_seconds(self, nbytes: float) -> float:
        if self.cpu_only or nbytes <= 0:
            return 0.0
        return nbytes / self._h2d(nbytes)

    def d2h_seconds(self, nbytes: float) -> float:
        if self.cpu_only or nbytes <= 0:
            return 0.0
        return nbytes / self._d2h(nbytes)

    def qkv_seconds(self, spec: ModelSpec, tokens: float) -> float:
        """One layer's Q, K, V projections (+ norm) for `tokens` tokens."""
        h = spec.hidden_size
        params = h * (spec.q_dim + 2 * spec.kv_dim)
        # The profile's per-layer fixed and per-token costs are split between the layer's two halves
        # (QKV here, FFN below).
        return self.matmul_seconds(2.0 * tokens * params, tokens, spec.b(params)) + self.layer_fixed_seconds(tokens) / 2

    def ffn_seconds(self, spec: ModelSpec, tokens: float) -> float:
        """One layer's output projection, router and FFN / experts for `tokens` tokens."""
        h = spec.hidden_size
        o = self.matmul_seconds(2.0 * tokens * spec.q_dim * h, tokens, spec.b(spec.q_dim * h))
        if spec.num_experts:
            touched = spec.expected_experts(tokens)
            per_expert = tokens * spec.experts_per_token / touched
            flops = 2.0 * tokens * spec.experts_per_token * spec.expert_params
            ffn = self.matmul_seconds(flops, per_expert, touched * spec.expert_bytes)
            ffn += touched * self.hw.device_expert_overhead_seconds  # launches / gathers per invoked expert
            ffn += self.matmul_seconds(2.0 * tokens * spec.router_params_per_layer, tokens,
                                       spec.b(spec.router_params_per_layer))
        else:
            ffn = self.matmul_seconds(2.0 * tokens * spec.expert_params, tokens, spec.expert_bytes)
        return o + ffn + self.layer_fixed_seconds(tokens) / 2

    def layer_fixed_seconds(self, tokens: float) -> float:
        """One layer's device cost beyond its matmuls for one forward of `tokens` tokens: a fixed part
        (op dispatch) and a per-token part (norms, RoPE, residual adds, routing), both profiled."""
        return self.hw.device_op_overhead_seconds + tokens * self.hw.device_op_token_seconds

    def lm_head_seconds(self, spec: ModelSpec, tokens: float) -> float:
        """Logits for `tokens` rows: the projection, and the scan every row's logits get (argmax, acceptance)."""
        return (self.matmul_seconds(tokens * spec.lm_head_flops_per_token, tokens,
                                    spec.b(spec.vocab_size * spec.hidden_size))
                + tokens * spec.vocab_size * self.hw.device_logit_element_seconds)

    def cpu_attention_seconds(self, spec: ModelSpec, batch: float, query: float, context: float) -> float:
        """One layer's decode/verify attention on the CPU: batch sequences, `query` new tokens each, over
        `context` keys per sequence (the ragged mean: host attention reads each row to its own length).
        Per call a fixed cost; per sequence a fixed cost, a cost per query row, its KV bytes (in the
        profile's accounting) over the measured read rate and the FLOPs of its query rows over the
        measured arithmetic rate."""
        if batch <= 0:
            return 0.0
        hw = self.hw
        per_seq = (hw.cpu_attn_seq_overhead_seconds + query * hw.cpu_attn_row_overhead_seconds
                   + context * spec.kv_bytes_per_token_per_layer / self._kv_bw
                   + spec.attention_flops(query, context) / self._attn_rate)
        return self.hw.cpu_attn_overhead_seconds + batch * per_seq

    def gpu_attention_seconds(self, spec: ModelSpec, batch: float, query: float, context: float) -> float:
        """One layer's attention on the device over a KV cache held there (memory-bound at decode)."""
        if batch <= 0:
            return 0.0
        return max(batch * spec.attention_flops(query, context) / self._rate(batch * query),
                   batch * context * spec.kv_bytes_per_token_per_layer / self._gpu_bw)

    def attention_io_bytes(self, spec: ModelSpec, tokens: float) -> tuple[float, float]:
        """(down, up) activation bytes for one layer's CPU attention: q, k, v out; attention output in."""
        return tokens * (spec.q_dim + 2 * spec.kv_dim) * self.act_bytes, tokens * spec.q_dim * self.act_bytes

    # --- streamed weights ----------------------------------------------------------------------
    def ffn_streamed_bytes(self, tokens: float) -> float:
        """Bytes of one layer's FFN that must be copied for `tokens` routed tokens (routed experts only)."""
        t = self.t
        if t.num_experts:
            return t.b(t.router_params_per_layer) + t.expected_experts(tokens) * t.expert_bytes
        return t.ffn_bytes_per_layer

    def draft_round(self, knobs: Knobs, batch: float, context: float | None = None) -> dict[str, float]:
        """Busy seconds per resource for the draft proposing k tokens for `batch` sequences whose
        mean context is `context` (default: the job's average)."""
        d, k = self.d, knobs.draft_len
        zero = {"gpu": 0.0, "cpu": 0.0, "h2d": 0.0, "d2h": 0.0}
        if not knobs.speculative or d is None or batch <= 0:
            return zero
        key = (knobs.draft_kv, knobs.draft_sub_batch if knobs.draft_kv == "recompute" else 0, k, batch, context,
               knobs.num_batches)
        if key not in self._draft_cache:
            self._draft_cache[key] = self._draft_round(knobs, batch, context)
        return self._draft_cache[key]

    def _draft_round(self, knobs: Knobs, batch: float, context: float | None) -> dict[str, float]:
        d, k = self.d, knobs.draft_len
        zero = {"gpu": 0.0, "cpu": 0.0, "h2d": 0.0, "d2h": 0.0}
        L = d.num_layers
        weights = d.b(d.layer_params)
        in_flight = batch * knobs.num_batches
        ctx = self.attention_context(batch, in_flight) if context is None else context
        # Host attention (draft KV on the host, or everything on a CPU-only machine) reads rows to their own length.
        host_ctx = self.host_attention_context() if context is None else context
        # Each step's linear layers for s sequences: FLOPs over the rate at s tokens, or reading all weights.
        def step(s: float, tokens_per_seq: float = 1.0) -> float:
            tok = s * tokens_per_seq
            lin = self.matmul_seconds(tok * d.linear_flops_per_token_per_layer * L, tok, weights * L)
            return lin + self.lm_head_seconds(d, s) + L * self.layer_fixed_seconds(tok)

        out = dict(zero)
        hw = self.hw
        # The runtime's bookkeeping per round (inputs, commits, the draft KV's rollback) and per step.
        host = (hw.engine_draft_round_overhead_seconds + batch * hw.engine_draft_seq_overhead_seconds
                + k * hw.engine_draft_step_overhead_seconds)
        if knobs.draft_kv == "recompute":
            s = min(knobs.draft_sub_batch, batch)
            subs = math.ceil(batch / s)
            if context is None:  # each sub-batch is its own forward, padded to its longest context
                ctx = self.attention_context(s, in_flight)
            tok = s * ctx
            # Re-read the context: one forward over s*ctx tokens (linear + causal attention), then k-1 steps.
            pre = (self.matmul_seconds(tok * d.linear_flops_per_token_per_layer * L, tok, weights * L)
                   + self.matmul_seconds(s * L * d.attention_flops(ctx, ctx) / 2.0, tok, 0.0)
                   + self.lm_head_seconds(d, s) + L * self.layer_fixed_seconds(tok))
            attend = self.cpu_attention_seconds if self.cpu_only else self.gpu_attention_seconds
            steps = (k - 1) * (step(s) + L * attend(d, s, 1, ctx))
            out["gpu"] = subs * (pre + steps) + host
            return out
        # KV kept: k steps of one token each, plus one catch-up token (the target's bonus token). A feature
        # draft instead re-reads every position the verification kept (accepted drafts + the bonus token) with
        # the target's true features: E[tokens per round] pairs in its first step.
        catch_up = self.rounds(k).expected_tokens if d.feature_draft else 2.0
        out["gpu"] = (k - 1) * step(batch) + step(batch, catch_up) + host
        if knobs.draft_kv == "gpu" and self.cpu_only:  # the "device" is the CPU: the same attention call
            out["gpu"] += k * L * self.cpu_attention_seconds(d, batch, 1, host_ctx)
        elif knobs.draft_kv == "gpu":
            out["gpu"] += k * L * self.gpu_attention_seconds(d, batch, 1, ctx)
        else:  # host KV, attention on the CPU workers, activations round-trip
            out["cpu"] = k * L * self.cpu_attention_seconds(d, batch, 1, host_ctx)
            down, up = self.attention_io_bytes(d, batch)
            out["d2h"] = k * L * self.d2h_seconds(down)
            out["h2d"] = k * L * self.h2d_seconds(up)
        return out

    # --- the slot ------------------------------------------------------------------------------
    def slot_terms(self, knobs: Knobs) -> SlotTerms:
        b, k = knobs.decode_batch, knobs.draft_len
        key = (b, k, knobs.micro_batches, knobs.num_batches)
        if key not in self._target_cache:
            self._target_cache[key] = self._target_slot(b, k, knobs.micro_batches, knobs.num_batches)
        busy, chain = self._target_cache[key]
        busy = dict(busy)
        # The draft works on the other batch (interleaved) or on this one before verifying (serial).
        # Within one batch its steps are a chain: GPU layers, and for host KV the CPU attention between them.
        dr = self.draft_round(knobs, b)
        draft_chain = sum(dr.values())
        serial = 0.0
        if knobs.policy == "interleaved":
            for r in busy:
                busy[r] = busy[r] + dr[r]
            chain = chain + (Linear(draft_chain),)
        elif knobs.policy == "serial-spec":
            serial = draft_chain
        stats = self.rounds(k)
        return SlotTerms(busy, chain, serial, b * stats.expected_tokens, self.cpu_only, self.host_pass_seconds(b))

    def host_pass_seconds(self, batch: float) -> float:
        """The runtime's bookkeeping per verification pass of `batch` sequences (profiled)."""
        hw = self.hw
        return (hw.engine_pass_overhead_seconds + batch * hw.engine_seq_overhead_seconds
                + self.t.num_layers * hw.engine_layer_overhead_seconds)

    def _target_slot(self, b: int, k: int, m: int, nb: int = 1) -> tuple[dict[str, Linear], tuple[Linear, ...]]:
        """The target's verification of b sequences x (k+1) tokens in m micro-batches: busy and chain."""
        t = self.t
        L = t.num_layers
        tokens = b * (k + 1)
        mb_tokens = tokens / m
        ctx = self.attention_context(b / m, b * nb)  # device attention: one call padded to its longest row
        qkv = self.qkv_seconds(t, mb_tokens)  # per micro-batch, per layer
        ffn = self.ffn_seconds(t, mb_tokens)
        # Host attention reads each row to its own length: the mean context, whatever the micro-batch.
        cpu_attn_seq = (self.cpu_attention_seconds(t, 1, k + 1, self.host_attention_context())
                        - self.hw.cpu_attn_overhead_seconds)
        gpu_attn_seq = self.gpu_attention_seconds(t, 1, k + 1, ctx)
        down, up = self.attention_io_bytes(t, mb_tokens)
        d2h_mb, h2d_mb = self.d2h_seconds(down), self.h2d_seconds(up)
        overhead = self.hw.cpu_attn_overhead_seconds

        # Per micro-batch, per layer, as linear forms in kv_gpu (the GPU-KV sequences skip the CPU trip).
        s_qkv = Linear.of(qkv)
        s_ffn = Linear.of(ffn)
        s_gpu_attn = Linear.of(0.0, kv_gpu=gpu_attn_seq * b / m)
        s_d2h = streamed(d2h_mb, "kv_gpu")
        s_cpu = Linear.of(overhead) + streamed(cpu_attn_seq * b / m, "kv_gpu")
        s_h2d = streamed(h2d_mb, "kv_gpu")

        gpu = L * m * (s_qkv + s_ffn + s_gpu_attn) + self.lm_head_seconds(t, tokens)
        cpu = L * m * s_cpu
        d2h = L * m * s_d2h
        h2d = L * m * s_h2d
        if not self.cpu_only:
            h2d = h2d + L * (streamed(self.h2d_seconds(t.attn_bytes_per_layer), "attn_gpu")
                             + streamed(self.h2d_seconds(self.ffn_streamed_bytes(tokens)), "ffn_gpu"))
        # Dependency chain of one layer with m micro-batches in a pipeline:
        # sum of the stages for one micro-batch, plus (m-1) times the slowest stage.
        stages = [s_qkv + s_gpu_attn, s_d2h, s_cpu, s_h2d, s_ffn]
        total = stages[0] + stages[1] + stages[2] + stages[3] + stages[4]
        chain = tuple(L * (total + (m - 1) * s) for s in stages) if m > 1 else (L * total,)
        return {"gpu": gpu, "cpu": cpu, "h2d": h2d, "d2h": d2h}, chain

    def rounds(self, k: int) -> RoundStats:
        """Rounds per sequence: the prefill yields the first token, verifications the other G - 1."""
        return round_stats(self.w.acceptance_vector(k), self.w.gen_len_tokens - 1)

    def slot_seconds(self, terms: SlotTerms, placement: dict[str, float]) -> tuple[float, str]:
        """Closed-form slot time at a placement, and what binds it."""
        cands = {r: f.at(placement) for r, f in terms.busy.items()}
        if terms.shared_device:
            cands = {"device": cands["gpu"] + cands["cpu"], "h2d": cands["h2d"], "d2h": cands["d2h"]}
        for i, c in enumerate(terms.chain):
            cands[f"chain{i}"] = c.at(placement)
        binding = max(cands, key=cands.get)
        if binding.startswith("chain"):
            binding = "layer-chain"
        return max(cands.values()) + terms.serial_total, binding

    # --- prefill -------------------------------------------------------------------------------
    def prefill_split(self, knobs: Knobs) -> tuple[int, int]:
        """(micro-chunks, tokens each) that one prefill chunk is processed in, layer by layer.

        A chunk of prefill_batch prompts streams the weights once; its hidden states wait in pinned
        host memory between layers when they exceed PREFILL_MICRO_TOKENS, so the GPU working set stays small.
        """
        tok = knobs.prefill_batch * self.w.max_prompt_len
        n = max(1, math.ceil(tok / PREFILL_MICRO_TOKENS))
        return n, math.ceil(tok / n)

    def prefill_attention_seconds(self, spec: ModelSpec, prompts: float, width: float) -> float:
        """One layer's attention of `prompts` prompts padded to `width` tokens over themselves: on the
        device (causal half of the square), or on a CPU-only machine the CPU attention call the decode uses."""
        if self.cpu_only:
            return self.cpu_attention_seconds(spec, prompts, width, width)
        return self.matmul_seconds(prompts * spec.attention_flops(width, width) / 2.0, prompts * width, 0.0)

    def prefill_terms(self, knobs: Knobs) -> dict[str, Linear]:
        """Busy seconds per resource for one prefill chunk (prefill_batch prompts).

        The runtime pads a chunk's prompts to the longest: compute counts prefill_batch x the longest
        prompt (the workload's max_prompt_len_tokens), KV the real tokens."""
        t, bp, P = self.t, knobs.prefill_batch, self.w.prompt_len_tokens
        width = self.w.max_prompt_len
        L, tok = t.num_layers, bp * P
        n, micro = self.prefill_split(knobs)
        per_seq = max(1.0, micro / width)  # prompts per micro-chunk
        gpu = L * n * (self.qkv_seconds(t, micro) + self.ffn_seconds(t, micro)
                       + self.prefill_attention_seconds(t, per_seq, width))
        gpu += self.lm_head_seconds(t, bp)
        d2h = self.d2h_seconds(tok * t.kv_bytes_per_token)  # KV written to host
        h2d = 0.0
        if n > 1:  # hidden states round-trip through host memory at every layer
            hidden = micro * t.hidden_size * self.act_bytes
            d2h += L * n * self.d2h_seconds(hidden)
            h2d += L * n * self.h2d_seconds(hidden)
        if knobs.speculative and knobs.draft_kv != "recompute" and self.d is not None:
            d, padded = self.d, bp * width  # the draft reads the same padded chunk, in one forward
            gpu += d.num_layers * (self.qkv_seconds(d, padded) + self.ffn_seconds(d, padded)
                                   + self.prefill_attention_seconds(d, bp, width))
            gpu += self.lm_head_seconds(d, bp)
            if d.feature_draft:  # its fc over [embedding; feature] of every prompt position
                gpu += self.matmul_seconds(2.0 * padded * d.fc_params, padded, d.b(d.fc_params))
            if knobs.draft_kv == "host":
                d2h += self.d2h_seconds(tok * d.kv_bytes_per_token)
        out = {"gpu": Linear.of(gpu), "cpu": Linear.of(0.0), "d2h": Linear.of(d2h), "h2d": Linear.of(h2d)}
        if not self.cpu_only:
            out["h2d"] = out["h2d"] + L * (streamed(self.h2d_seconds(t.attn_bytes_per_layer), "attn_gpu")
                                           + streamed(self.h2d_seconds(self.ffn_streamed_bytes(tok)), "ffn_gpu"))
        return out

    def prefill_chunks(self, knobs: Knobs) -> int:
        return math.ceil(self.w.num_prompts / knobs.prefill_batch)

    # --- memory --------------------------------------------------------------------------------
    def memory_terms(self, knobs: Knobs) -> dict[str, Linear]:
        """Peak bytes per tier as linear forms; capacities in `capacities()`."""
        t, d, b, k = self.t, self.d, knobs.decode_batch, knobs.draft_len
        L, nb = t.num_layers, knobs.num_batches
        act = self.act_bytes
        # FFN intermediates: experts run one at a time, each on its share of the routed tokens.
        ffn_width = (t.experts_per_token / t.num_experts if t.num_experts else 1) * t.intermediate_size
        per_token_ws = act * (4 * t.hidden_size + t.q_dim + 2 * t.kv_dim + 2 * ffn_width)
        decode_tokens = b * (k + 1)
        decode_ws = decode_tokens / knobs.micro_batches * per_token_ws + decode_tokens * t.vocab_size * LOGIT_BYTES
        n_micro, micro = self.prefill_split(knobs)
        prefill_ws = (micro * per_token_ws + micro * t.kv_bytes_per_token_per_layer
                      + knobs.prefill_batch * t.vocab_size * LOGIT_BYTES)
        # Hidden states of a chunk split into micro-chunks wait in pinned host memory (in and out).
        prefill_host = 2 * n_micro * micro * t.hidden_size * act if n_micro > 1 else 0.0
        kv_seq = self.ctx_max * t.kv_bytes_per_token  # one sequence at full length, all layers
        attn_all, ffn_all = L * t.attn_bytes_per_layer, L * t.ffn_bytes_per_layer
        gpu = Linear.of(t.outer_bytes + max(decode_ws, prefill_ws),
                        attn_gpu=attn_all, ffn_gpu=ffn_all, kv_gpu=nb * b * kv_seq)
        gpu += knobs.weight_buffers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        host = streamed(attn_all, "attn_gpu") + streamed(ffn_all, "ffn_gpu") + streamed(nb * b * kv_seq, "kv_gpu")
        pinned = streamed(attn_all, "attn_gpu") + streamed(ffn_all, "ffn_gpu") + prefill_host
        host = host + prefill_host
        if knobs.speculative and d is not None:
            dkv_seq = self.ctx_max * d.kv_bytes_per_token
            gpu += d.total_bytes
            d_ws = act * (4 * d.hidden_size + 2 * d.intermediate_size)
            if d.feature_draft:
                # The feature hand-off: the verification's final hidden states of the k + 1 positions of
                # every sequence in flight stay on the device until the draft has read them.
                gpu += nb * b * (k + 1) * d.hidden_size * act
            if knobs.draft_kv == "gpu":
                gpu += nb * b * dkv_seq + b * d_ws + b * d.vocab_size * LOGIT_BYTES
            elif knobs.draft_kv == "host":
                host += nb * b * dkv_seq
                gpu += b * d_ws + b * d.vocab_size * LOGIT_BYTES
            else:
                s = min(knobs.draft_sub_batch, b)
                gpu += s * dkv_seq + s * self.ctx_max * d_ws + s * d.vocab_size * LOGIT_BYTES
        if self.cpu_only:
            # One memory: everything lives in host memory; nothing is pinned or streamed.
            held = L * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer) + t.outer_bytes
            held += d.total_bytes if (knobs.speculative and d is not None) else 0.0
            everything = Linear.of(gpu.at(CPU_ONLY_PLACEMENT) + host.at(CPU_ONLY_PLACEMENT)
                                   + (self.weight_read_factor - 1.0) * held)
            return {"gpu": Linear.of(0.0), "pinned": Linear.of(0.0), "host": everything}
        return {"gpu": gpu, "pinned": pinned, "host": host}

    def capacities(self) -> dict[str, float]:
        hw = self.hw
        if self.cpu_only:
            return {"gpu": math.inf, "pinned": math.inf, "host": hw.host_mem_bytes}
        return {"gpu": hw.gpu_mem_bytes - hw.gpu_mem_reserve_bytes, "pinned": hw.pinned_mem_bytes,
                "host": hw.host_mem_bytes}

    # --- the whole job -------------------------------------------------------------------------
    def decode_slots(self, knobs: Knobs) -> tuple[float, float]:
        """(expected slots for the whole job, of which tail): verifications of one batch, summed over batches.

        Each batch serves its share of the prompts with refill; the tail is what the slowest
        sequences and the last, partly empty wave add over a perfectly packed (fluid) schedule.
        """
        key = (knobs.decode_batch, knobs.draft_len, knobs.num_batches)
        if key not in self._slots_cache:
            b, nb = knobs.decode_batch, knobs.num_batches
            per_stream = math.ceil(self.w.num_prompts / nb)
            stats = self.rounds(knobs.draft_len)
            span = stats.makespan(per_stream, b)
            fluid = per_stream * stats.mean_rounds / b
            self._slots_cache[key] = (nb * span, nb * max(0.0, span - fluid))
        return self._slots_cache[key]

    def physical_bound(self, knobs: Knobs) -> float:
        """Tokens/s no plan can beat: in-flight capacity x E[tokens] per weight sweep at the H2D limit."""
        t = self.t
        weights = t.num_layers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        kv_seq = self.ctx_max * t.kv_bytes_per_token
        e = self.rounds(knobs.draft_len).expected_tokens
        if self.cpu_only:
            t_io = (weights + t.outer_bytes) * self.weight_read_factor / self._gpu_bw
            b_max = max(1.0, (self.hw.host_mem_bytes - weights) / kv_seq)
        else:
            room = self.hw.gpu_mem_bytes - self.hw.gpu_mem_reserve_bytes - t.outer_bytes
            resident = min(weights, max(0.0, room - 2 * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)))
            stream = weights - resident
            if stream <= 0:
                return math.inf
            t_io = stream / self._h2d.peak
            b_max = max(1.0, (self.hw.host_mem_bytes - stream) / kv_seq)
        return min(self.w.num_prompts, b_max) * e / t_io

    def evaluate(self, knobs: Knobs, placement: dict[str, float]):
        """The closed-form Prediction at a fixed placement (imported lazily to avoid a cycle)."""
        from .schema import Prediction

        terms = self.slot_terms(knobs)
        slot, binding = self.slot_seconds(terms, placement)
        pre = self.prefill_terms(knobs)
        pre_vals = {r: f.at(placement) for r, f in pre.items()}
        chunk = (pre_vals["gpu"] + pre_vals["cpu"]) if self.cpu_only else max(pre_vals.values())
        chunk = max(chunk, pre_vals["h2d"], pre_vals["d2h"])
        prefill = self.prefill_chunks(knobs) * chunk
        slots, tail = self.decode_slots(knobs)
        decode = slots * slot
        tokens = self.w.num_prompts * self.w.gen_len_tokens
        total = prefill + decode
        mem = {tier: f.at(placement) for tier, f in self.memory_terms(knobs).items()}
        caps = self.capacities()
        bound = self.physical_bound(knobs)
        tput = tokens / total
        busy = {r: f.at(placement) for r, f in terms.busy.items()}
        if terms.serial_seconds:
            busy["draft_serial"] = terms.serial_seconds
        if terms.host_seconds:
            busy["host"] = terms.host_seconds
        return Prediction(
            throughput_tokens_per_s=tput,
            decode_tokens_per_s=tokens / decode if decode > 0 else tput,
            total_seconds=total,
            prefill_seconds=prefill,
            decode_seconds=decode,
            slot_seconds=slot,
            slots=slots,
            tail_slots=tail,
            expected_tokens_per_round=self.rounds(knobs.draft_len).expected_tokens,
            busy_seconds_per_slot=busy,
            peak_mem_bytes=mem,
            capacity_bytes={k: (v if math.isfinite(v) else 0.0) for k, v in caps.items()},
            binding=binding,
            physical_bound_tokens_per_s=bound if math.isfinite(bound) else 0.0,
            bound_fraction=tput / bound if math.isfinite(bound) and bound > 0 else 0.0,
        )


def fits(mem: dict[str, float], caps: dict[str, float], rel_tol: float = 1e-9) -> bool:
    return all(mem[t] <= caps[t] * (1 + rel_tol) + 1.0 for t in mem)
