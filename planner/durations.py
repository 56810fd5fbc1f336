"""Per-resource time formulas: how long one piece of work takes on the GPU, the CPU attention pool
and the two copy engines, for a (profile, target, draft, workload).

The simulator uses these as task durations; the cost model (costmodel.py) sums them into the
per-step terms the LP sees. All times in seconds, sizes in bytes.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .memo import memo_method
from .models import ModelSpec
from .rounds import RoundStats, expected_tokens, round_stats, token_distribution
from .schema import HardwareProfile, Workload

if TYPE_CHECKING:
    from .knobs import Knobs


class Durations:
    """Durations of the primitive pieces of work for one (profile, target, draft, workload)."""

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
        if not knobs.speculative or self.d is None or batch <= 0:
            return {"gpu": 0.0, "cpu": 0.0, "h2d": 0.0, "d2h": 0.0}
        sub_batch = knobs.draft_sub_batch if knobs.draft_kv == "recompute" else 0  # read only when recomputing
        return self._draft_round(knobs.draft_kv, sub_batch, knobs.draft_len, knobs.num_batches, batch, context)

    @memo_method
    def _draft_round(self, draft_kv: str, sub_batch: int, k: int, num_batches: int, batch: float,
                     context: float | None) -> dict[str, float]:
        d = self.d
        zero = {"gpu": 0.0, "cpu": 0.0, "h2d": 0.0, "d2h": 0.0}
        L = d.num_layers
        weights = d.b(d.layer_params)
        in_flight = batch * num_batches
        ctx = self.attention_context(batch, in_flight) if context is None else context
        # Host attention (draft KV on the host, or everything on a CPU-only machine) reads rows to their own length.
        host_ctx = self.host_attention_context() if context is None else context
        step = self.draft_step_seconds
        out = dict(zero)
        host = self.draft_host_seconds(batch, k)
        if draft_kv == "recompute":
            s = min(sub_batch, batch)
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
        # KV kept: k steps of one token each, plus one catch-up token (the target's bonus token). A feature draft
        # instead re-reads every position the verification kept (accepted drafts + the bonus token) with the
        # target's true features: feature_first_step.
        if d.feature_draft:
            first, first_query = self.feature_first_step_seconds(k, batch), self.feature_catch_up(k, batch)
        else:
            first, first_query = step(batch, 2.0), 1.0
        out["gpu"] = (k - 1) * step(batch) + first + host
        if draft_kv == "gpu" and self.cpu_only:  # the "device" is the CPU: the same attention call
            attend, kv_ctx = self.cpu_attention_seconds, host_ctx
        elif draft_kv == "gpu":
            attend, kv_ctx = self.gpu_attention_seconds, ctx
        else:
            attend, kv_ctx = None, host_ctx
        if attend is not None:
            out["gpu"] += L * ((k - 1) * attend(d, batch, 1, kv_ctx) + attend(d, batch, first_query, kv_ctx))
        else:  # host KV, attention on the CPU workers, activations round-trip
            cpu = self.cpu_attention_seconds
            out["cpu"] = L * ((k - 1) * cpu(d, batch, 1, host_ctx) + cpu(d, batch, first_query, host_ctx))
            down1, up1 = self.attention_io_bytes(d, batch)
            down, up = self.attention_io_bytes(d, batch * first_query)
            out["d2h"] = L * ((k - 1) * self.d2h_seconds(down1) + self.d2h_seconds(down))
            out["h2d"] = L * ((k - 1) * self.h2d_seconds(up1) + self.h2d_seconds(up))
        return out

    def draft_step_seconds(self, s: float, tokens_per_seq: float = 1.0) -> float:
        """One draft step's device work beyond attention for `s` sequences of `tokens_per_seq` new tokens each:
        every layer's linear parts (a feature draft's fc over [embedding; feature] included) at s x
        tokens_per_seq tokens (FLOPs over the rate, or reading all weights), the LM head over the full
        vocabulary for the s rows' last tokens (a feature draft's is the target's), and the layers' fixed
        and per-token costs."""
        d = self.d
        L, tok = d.num_layers, s * tokens_per_seq
        lin = self.matmul_seconds(tok * d.linear_flops_per_token_per_layer * L, tok, d.b(d.layer_params) * L)
        return lin + self.lm_head_seconds(d, s) + L * self.layer_fixed_seconds(tok)

    def feature_catch_up(self, k: int, batch: float) -> float:
        """Padded width of a feature draft's first step: the runtime feeds every position the verification kept
        (a + 1 for a accepted drafts) in one forward whose attention runs on the [batch, longest row] layout,
        so its attention has E[max over the batch of a + 1] query rows per row. Rows taken as independent:
        E[max] = 1 + sum_j P(some row accepted >= j) = 1 + sum_j 1 - (1 - P(a >= j))^batch. (Its linear parts
        run packed: feature_first_step_seconds.)"""
        if k <= 0:
            return 1.0
        alpha = self.w.acceptance_vector(k)
        out, reach = 1.0, 1.0
        for j in range(k):
            reach *= alpha[j]  # P(a >= j + 1)
            out += 1.0 - (1.0 - reach) ** max(batch, 1.0)
        return out

    def feature_kept_mean(self, k: int) -> float:
        """Pairs per row a feature draft's first step computes in its linear parts: the runtime packs the valid
        pairs, so E[a + 1] = 1 + sum_j P(a >= j) (the mean tokens per verification), whatever the batch."""
        return expected_tokens(self.w.acceptance_vector(k)) if k > 0 else 1.0

    def feature_pack_probability(self, k: int, batch: float) -> float:
        """P(the first step packs): some rows kept fewer positions than others, 1 - sum_j P(a + 1 = j)^batch
        (when every row kept the same count the runtime runs the step unpacked; one row never packs)."""
        if k <= 0 or batch <= 1:
            return 0.0
        return max(0.0, 1.0 - sum(p ** batch for p in token_distribution(self.w.acceptance_vector(k))))

    def feature_first_step_seconds(self, k: int, batch: float) -> float:
        """A feature draft's first step beyond attention: its linear parts, norms and per-token costs over the
        packed E[a + 1] pairs per row (feature_kept_mean), the LM head over the batch's rows, and when the step
        packs, the gathers and scatters around the attention: about as many dispatched ops as one layer half
        (measured on the 2-core CPU with the tiny head: 30-120 us over the padded forward at 48-320 pairs, the
        profile's per-layer-half fixed cost there 64 us), charged as one device_op_overhead_seconds."""
        pack = self.feature_pack_probability(k, batch) * self.hw.device_op_overhead_seconds
        return self.draft_step_seconds(batch, self.feature_kept_mean(k)) + pack

    def draft_host_seconds(self, batch: float, k: int) -> float:
        """The runtime's bookkeeping per draft round (inputs, commits, the draft KV's rollback) and per step."""
        hw = self.hw
        return (hw.engine_draft_round_overhead_seconds + batch * hw.engine_draft_seq_overhead_seconds
                + k * hw.engine_draft_step_overhead_seconds)

    def host_pass_seconds(self, batch: float) -> float:
        """The runtime's bookkeeping per verification pass of `batch` sequences (profiled)."""
        hw = self.hw
        return (hw.engine_pass_overhead_seconds + batch * hw.engine_seq_overhead_seconds
                + self.t.num_layers * hw.engine_layer_overhead_seconds)

    def rounds(self, k: int) -> RoundStats:
        """Rounds per sequence: the prefill yields the first token, verifications the other G - 1."""
        return round_stats(self.w.acceptance_vector(k), self.w.gen_len_tokens - 1)

    def prefill_attention_seconds(self, spec: ModelSpec, prompts: float, width: float) -> float:
        """One layer's attention of `prompts` prompts padded to `width` tokens over themselves: on the
        device (causal half of the square), or on a CPU-only machine the CPU attention call the decode uses."""
        if self.cpu_only:
            return self.cpu_attention_seconds(spec, prompts, width, width)
        return self.matmul_seconds(prompts * spec.attention_flops(width, width) / 2.0, prompts * width, 0.0)
