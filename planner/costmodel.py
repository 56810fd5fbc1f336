"""The cost model: one set of formulas for the LP (as linear forms) and the simulator (as durations).

A decode *step*: the target verifies one batch of b sequences carrying k draft tokens each
(b·(k+1) query tokens), layer by layer, with layer j+1's streamed weights copied in while layer j
computes; attention runs on the CPU over the host KV cache (a fraction of sequences may keep their
KV on the GPU); the draft drafts k tokens for the other batch on the same GPU (interleaved) or
before the verification (serial). Resources: `gpu`, `cpu` (attention workers), `h2d`, `d2h`, and `disk`
when the plan reads some layers from the checkpoint every sweep (the disk tier).
(Reports and plans call a decode step a "slot": `slot_seconds`, `slots`, `tail_slots`.)

Where the parts live:
  linear.py     Linear forms over the placement variables (attn_gpu, ffn_gpu, kv_gpu), `streamed`
  rounds.py     acceptance and rounds: token_distribution, expected_tokens, round_stats, RoundStats
  durations.py  per-resource time formulas (matmul, copies, attention, the draft round): `Durations`
  knobs.py      the integer choices the planner enumerates: `Knobs`
  this file     the step, prefill and memory terms as linear forms, the whole job, evaluate / fits

Every time and memory figure is a `Linear` form in the placement variables, so the LP and the
closed-form evaluation share one definition.

The disk tier: a fraction `disk` of the layers is neither resident on the GPU nor held in host
memory; each sweep (a verification or a prefill chunk) reads those layers from the checkpoint on disk
into `DISK_STAGING_BUFFERS` staging buffers (one layer each) a layer or two ahead, and copies them to
the GPU from there as any streamed layer. Disk -> host and host -> GPU are two pipelined stages on
their own resources (`disk`, `h2d`): they overlap, and the slower one binds. On a CPU-only machine
the layer is read into the staging buffer and used from there (converted to the compute dtype).
The tier's CPU work is charged where it lands (`disk_cpu_terms`): on a CPU-only machine the device
converts each disk layer (`disk_convert_seconds`) and each read in flight takes compute time from it
(`disk_read_compute_seconds`); beside a GPU the reads' CPU work lands on the `cpu` resource.
The staging buffers are a fixed cost paid only when some layer is on disk: the planner's LP carries
it with a 0/1 variable (`disk_staging_bytes`); `evaluate` adds it where the placement has disk > 0.

All times in seconds, sizes in bytes. Weights, activations and KV use the run's element size
(`ModelSpec.element_bytes`: the checkpoint's, 2 for bf16, unless the plan is made for another dtype).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .durations import Durations
from .knobs import Knobs
from .linear import CPU_ONLY_PLACEMENT, PLACEMENT_VARS, Linear, streamed
from .memo import memo_method
from .rounds import EXACT_SUMS, RoundStats, _sum_pmf, expected_tokens, round_stats, token_distribution
from .schedule import refill_rows
from .schema import Prediction

__all__ = [
    "CPU_ONLY_PLACEMENT", "EXACT_SUMS", "LOGIT_BYTES", "PLACEMENT_VARS", "PREFILL_MICRO_TOKENS", "CostModel",
    "Durations", "Knobs", "Linear", "RoundStats", "StepTerms", "expected_tokens", "fits", "round_stats",
    "streamed", "token_distribution", "_sum_pmf",
]

LOGIT_BYTES = 4  # logits are produced in fp32
DISK_STAGING_BUFFERS = 2  # staging buffers of one layer each for layers read from disk (read one ahead)
PREFILL_MICRO_TOKENS = 8192  # tokens the GPU holds at once during prefill (see prefill_split)


@dataclass(frozen=True)
class StepTerms:
    """Per-step busy time of each resource, the dependency-chain bounds, and fixed serial parts."""

    busy: dict[str, Linear]  # resource -> busy seconds in one decode step
    chain: tuple[Linear, ...]  # step time >= each (per-layer critical path with micro-batches)
    serial_seconds: float  # added after the overlapped part (serial-spec: the draft round)
    tokens_per_step: float  # expected verified tokens in one step (full batch)
    shared_device: bool  # CPU-only machine: gpu and cpu are one resource
    host_seconds: float = 0.0  # the runtime's bookkeeping between passes (serial, on the host)
    # Streams that run on through the serial part (serial-spec: the weight copies, the disk reads):
    # resource -> (seconds of the serial part it serves itself, its work for the next sweep that its free
    # buffers let it do meanwhile), see `bounds`.
    serial_overlap: dict[str, tuple[float, Linear]] = field(default_factory=dict)

    @property
    def serial_total(self) -> float:
        return self.serial_seconds + self.host_seconds

    def bounds(self) -> dict[str, Linear]:
        """The decode step is max(bounds) + serial_total: each resource's busy time (gpu and cpu as one
        device on a CPU-only machine) and each dependency chain, as linear forms.

        A stream in `serial_overlap` does not stop for the serial part: its buffers take the next sweep's
        first layers meanwhile (`ahead` seconds of its work), and it idles only for what of the serial part
        they do not cover. Its time is then max(busy + own, busy + serial_total - ahead) (own: the serial
        part's use of it), written as two bounds with serial_total taken off: `r` and `r:serial`."""
        busy = dict(self.busy)
        if self.shared_device:
            busy = {"device": busy["gpu"] + busy["cpu"], "h2d": busy["h2d"], "d2h": busy["d2h"],
                    **({"disk": busy["disk"]} if "disk" in busy else {})}
        out: dict[str, Linear] = {}
        for r, f in busy.items():
            if r in self.serial_overlap:
                own, ahead = self.serial_overlap[r]
                out[r] = f + (own - self.serial_total)
                out[f"{r}:serial"] = f + ahead * -1.0
            else:
                out[r] = f
        for i, c in enumerate(self.chain):
            out[f"chain{i}"] = c
        return out

    @property
    def tokens_per_slot(self) -> float:  # the report's word for a step
        return self.tokens_per_step


SlotTerms = StepTerms  # the report's word for a decode step is "slot"


class CostModel(Durations):
    """Durations and memory for one (profile, target, draft, workload).

    `host_mem_limit_bytes` (> 0) caps the host memory a plan may use (pinned included), below what the
    profile says the machine has: room left for other work, or a test of the disk tier.
    """

    def __init__(self, profile, target, draft, workload, host_mem_limit_bytes: float = 0.0):
        super().__init__(profile, target, draft, workload)
        if host_mem_limit_bytes < 0 or not math.isfinite(host_mem_limit_bytes):
            raise ValueError(f"host_mem_limit_bytes must be >= 0 and finite (0: no limit), found {host_mem_limit_bytes}")
        self.host_mem_limit_bytes = float(host_mem_limit_bytes)
        self.disk_rate = float(profile.disk_read_bytes_per_s)

    # --- the disk tier -------------------------------------------------------------------------
    @property
    def disk_tier(self) -> bool:
        """Whether plans may read layers from disk: the profile states the disk's read rate."""
        return self.disk_rate > 0

    @property
    def disk_layer_bytes(self) -> float:
        """Bytes one layer reads from the checkpoint (attention + FFN / all experts, on-disk dtype)."""
        return self.t.attn_bytes_per_layer + self.t.ffn_bytes_per_layer

    def disk_seconds(self, nbytes: float) -> float:
        return nbytes / self.disk_rate if nbytes else 0.0

    def disk_sweep_terms(self) -> Linear:
        """Disk busy seconds of one sweep (all disk layers read once), linear in `disk`."""
        L = self.t.num_layers
        return Linear.of(0.0, disk=self.disk_seconds(L * self.disk_layer_bytes))

    def disk_convert_seconds(self) -> float:
        """CPU-only machine: the device's time to convert one staged layer to the compute dtype; 0 on a GPU
        machine, where the copy to the GPU (h2d) moves the staged bytes as they are. The profile's measured
        `disk_convert_bytes_per_s` (the engine's own conversion) where it has one, else estimated at memory
        bandwidth (it reads the on-disk bytes and writes weight_read_factor times as many)."""
        if not self.cpu_only:
            return 0.0
        rate = self.hw.disk_convert_bytes_per_s
        if rate > 0:
            return self.disk_layer_bytes / rate
        return self.disk_layer_bytes * (1.0 + self.weight_read_factor) / self._gpu_bw

    def disk_read_compute_seconds(self) -> float:
        """Host compute time one layer read in flight takes from the compute beside it (the reader's CPU work:
        its threads, and a virtual disk's copies, on the cores the compute runs on): the profile's
        `disk_read_compute_seconds_per_byte` x the layer's bytes (0 where not measured)."""
        return self.disk_layer_bytes * self.hw.disk_read_compute_seconds_per_byte

    def disk_cpu_terms(self) -> dict[str, Linear]:
        """The disk tier's CPU costs per sweep, linear in `disk`, by the resource that pays them: on a CPU-only
        machine the device (the CPU) converts every disk layer and feels every read; beside a GPU the reads'
        CPU work lands on the host's attention workers (`cpu`), and nothing is converted."""
        L = self.t.num_layers
        if self.cpu_only:
            return {"gpu": Linear.of(0.0, disk=L * (self.disk_convert_seconds() + self.disk_read_compute_seconds()))}
        return {"cpu": Linear.of(0.0, disk=L * self.disk_read_compute_seconds())}

    def disk_bytes_per_sweep(self, placement: dict[str, float]) -> float:
        L = self.t.num_layers
        return round(placement.get("disk", 0.0) * L) * self.disk_layer_bytes

    def disk_staging_bytes(self) -> float:
        """Host memory the disk tier takes when some layer is on disk: the staging buffers, and on a
        CPU-only machine the layer converted to the compute dtype it is used in."""
        staging = DISK_STAGING_BUFFERS * self.disk_layer_bytes
        if self.cpu_only:
            staging += self.disk_layer_bytes * self.weight_read_factor
        return staging

    def memory_at(self, knobs: Knobs, placement: dict[str, float]) -> dict[str, float]:
        """Peak bytes per tier at a placement: the memory terms plus the disk staging where disk > 0."""
        mem = {tier: f.at(placement) for tier, f in self.memory_terms(knobs).items()}
        if placement.get("disk", 0.0) > 0:
            staging = self.disk_staging_bytes()
            mem["host"] += staging
            if not self.cpu_only:
                mem["pinned"] += staging
        return mem

    # --- the decode step -----------------------------------------------------------------------
    def step_terms(self, knobs: Knobs) -> StepTerms:
        b, k = knobs.decode_batch, knobs.draft_len
        busy, chain = self._target_step(b, k, knobs.micro_batches, knobs.num_batches)
        busy = dict(busy)
        # The draft works on the other batch (interleaved) or on this one before verifying (serial).
        # Within one batch its steps are a chain: GPU layers, and for host KV the CPU attention between them.
        dr = self.draft_round(knobs, b)
        draft_chain = sum(dr.values())
        serial, overlap = 0.0, {}
        if knobs.policy == "interleaved":
            for r in busy:
                busy[r] = busy[r] + dr.get(r, 0.0)
            chain = chain + (Linear(draft_chain),)
        elif knobs.policy == "serial-spec":
            serial = draft_chain
            overlap = self.serial_overlap(knobs, dr, busy["gpu"])
        stats = self.rounds(k)
        return StepTerms(busy, chain, serial, b * stats.expected_tokens, self.cpu_only, self.host_pass_seconds(b),
                         overlap)

    def serial_overlap(self, knobs: Knobs, dr: dict[str, float], gpu: Linear) -> dict[str, tuple[float, Linear]]:
        """Serial-spec: what the weight stream and the disk stage do while the draft round runs
        (StepTerms.serial_overlap; `gpu` is the verification's GPU busy time).

        Both run ahead in sweep order into the next pass as their buffers free up (planner/sim/weight_stream.py;
        the runtime's LayerStreamer fills every free buffer too): as the verification's last layers release
        theirs, the copy engine moves the next pass's first `weight_buffers` streamed layers and the disk
        reads its first DISK_STAGING_BUFFERS disk layers, then both wait for the next verification to free a
        buffer. So the stream idles from its last copy of the pass to that release, less those copies: the
        window is the last layer's compute, the LM head, the serial part and the next pass's first layer
        (two layers of the verification's GPU work, linear in the placement), and the credit returned is the
        copy work that fits in the buffers less the window's part besides the serial one. Copy seconds of
        those layers: weight_buffers times the mean copy per layer over all L layers (resident parts count
        as no copy), linear in the placement; exact when every layer streams the same parts, less than the
        real copies when some layers are wholly resident, and an estimate when the first streamed layers
        keep a part resident that others stream."""
        out: dict[str, tuple[float, Linear]] = {}
        t, L = self.t, self.t.num_layers
        tokens = knobs.decode_batch * (knobs.draft_len + 1)
        lm = self.lm_head_seconds(t, tokens)
        tail = (gpu + -lm) * (2.0 / L) + lm  # the last layer, the LM head, the next pass's first layer
        W = min(knobs.weight_buffers, L)
        if not self.cpu_only and W > 0:
            per_layer = (streamed(self.h2d_seconds(t.attn_bytes_per_layer), "attn_gpu")
                         + streamed(self.h2d_seconds(self.ffn_streamed_bytes(tokens)), "ffn_gpu"))
            out["h2d"] = (dr.get("h2d", 0.0), W * per_layer + tail * -1.0)
        if self.disk_tier:
            # The disk stage's second staging buffer frees only when the pass's last disk layer is computed,
            # and the next pass's first disk layer is released only after the layers before it compute: that
            # spacing (about L / disk-layers layers) is not linear in the placement. Credited: one read, which
            # the stage always overlaps when a layer computes faster than it is read (a lower bound).
            reads = self.disk_seconds(min(DISK_STAGING_BUFFERS - 1, L) * self.disk_layer_bytes)
            out["disk"] = (0.0, tail * -1.0 + reads)
        return out

    @memo_method
    def _target_step(self, b: int, k: int, m: int, nb: int) -> tuple[dict[str, Linear], tuple[Linear, ...]]:
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
        out = {"gpu": gpu, "cpu": cpu, "h2d": h2d, "d2h": d2h}
        if self.disk_tier:  # the disk stage runs beside the copies: its own resource, the slower binds
            out["disk"] = self.disk_sweep_terms()
            for r, f in self.disk_cpu_terms().items():  # its CPU work: conversion, reads in flight
                out[r] = out[r] + f
        # Dependency chain of one layer with m micro-batches in a pipeline:
        # sum of the stages for one micro-batch, plus (m-1) times the slowest stage.
        stages = [s_qkv + s_gpu_attn, s_d2h, s_cpu, s_h2d, s_ffn]
        total = stages[0] + stages[1] + stages[2] + stages[3] + stages[4]
        chain = tuple(L * (total + (m - 1) * s) for s in stages) if m > 1 else (L * total,)
        return out, chain

    def step_seconds(self, terms: StepTerms, placement: dict[str, float]) -> tuple[float, str]:
        """Closed-form decode-step time at a placement, and what binds it."""
        cands = {r: f.at(placement) for r, f in terms.bounds().items()}
        binding = max(cands, key=cands.get)
        if binding.startswith("chain"):
            binding = "layer-chain"
        return max(cands.values()) + terms.serial_total, binding.split(":")[0]

    # --- prefill -------------------------------------------------------------------------------
    def prefill_split(self, knobs: Knobs) -> tuple[int, int]:
        """(micro-chunks, tokens each) that one prefill chunk is processed in, layer by layer.

        A chunk of prefill_batch prompts streams the weights once; its hidden states wait in pinned
        host memory between layers when they exceed PREFILL_MICRO_TOKENS, so the GPU working set stays small.
        """
        tok = knobs.prefill_batch * self.w.max_prompt_len
        n = max(1, math.ceil(tok / PREFILL_MICRO_TOKENS))
        return n, math.ceil(tok / n)

    def prefill_terms(self, knobs: Knobs) -> dict[str, Linear]:
        """Busy seconds per resource for one prefill chunk (prefill_batch prompts) on a sweep of its own:
        the chunk's own work (`chunk_work`), the draft's prefill of it (`draft_prefill_work`) and the sweep
        (`sweep_terms`: the weight copies, the disk tier's reads and their CPU work)."""
        out = self.chunk_work(knobs)
        for part in (self.draft_prefill_work(knobs), self.sweep_terms(knobs.prefill_batch * self.w.prompt_len_tokens)):
            for r, f in part.items():
                out[r] = out[r] + f if r in out else f
        return out

    def chunk_work(self, knobs: Knobs) -> dict[str, Linear]:
        """The target's work on one prefill chunk, without the weight sweep: GPU compute, the KV written to
        the host, hidden states staged through host memory when the chunk is split in micro-chunks.

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
        return {"gpu": Linear.of(gpu), "cpu": Linear.of(0.0), "d2h": Linear.of(d2h), "h2d": Linear.of(h2d)}

    def draft_prefill_work(self, knobs: Knobs) -> dict[str, float]:
        """The draft's prefill of one chunk (speculative plans that keep a draft KV): GPU seconds for its
        forward over the padded chunk (a feature head: its fc over [embedding; feature] of every position,
        its one layer), and the draft KV written to the host in host mode."""
        out = {"gpu": 0.0, "d2h": 0.0}
        if not (knobs.speculative and knobs.draft_kv != "recompute" and self.d is not None):
            return out
        bp, width = knobs.prefill_batch, self.w.max_prompt_len
        d, padded = self.d, bp * width  # the draft reads the same padded chunk, in one forward
        gpu = d.num_layers * (self.qkv_seconds(d, padded) + self.ffn_seconds(d, padded)
                              + self.prefill_attention_seconds(d, bp, width))
        gpu += self.lm_head_seconds(d, bp)
        if d.feature_draft:  # its fc over [embedding; feature] of every prompt position
            gpu += self.matmul_seconds(2.0 * padded * d.fc_params, padded, d.b(d.fc_params))
        out["gpu"] = gpu
        if knobs.draft_kv == "host":
            out["d2h"] = self.d2h_seconds(bp * self.w.prompt_len_tokens * d.kv_bytes_per_token)
        return out

    def sweep_terms(self, tokens: float) -> dict[str, Linear]:
        """What one weight sweep costs whatever it computes: the streamed layers' copies (routed experts as
        `tokens` tokens touch them) and the disk tier's reads and CPU work."""
        t, L = self.t, self.t.num_layers
        out: dict[str, Linear] = {}
        if not self.cpu_only:
            out["h2d"] = L * (streamed(self.h2d_seconds(t.attn_bytes_per_layer), "attn_gpu")
                              + streamed(self.h2d_seconds(self.ffn_streamed_bytes(tokens)), "ffn_gpu"))
        if self.disk_tier:
            out["disk"] = self.disk_sweep_terms()
            for r, f in self.disk_cpu_terms().items():  # its CPU work: conversion, reads in flight
                out[r] = out[r] + f if r in out else f
        return out

    def fused_terms(self, knobs: Knobs) -> StepTerms:
        """A fused pass (Plan.fuse_prefill, planner/schedule.py `defer_prefill`): one verification whose weight
        sweep also runs a prefill chunk. Beside a GPU the runtime runs the chunk's layer on a stream of its own,
        beside the verification's layer and before its next one, so the chunk adds its work to each resource
        (not the sweep: the weights and disk layers are read once), the verification's chains stay, and one
        more bound counts the weight buffers' coupling layer by layer (`_fused_layer_bound`); on a CPU-only
        machine the device's time is the sum anyway. The draft's prefill of the chunk runs after the pass,
        before the draft round (serial)."""
        v = self.step_terms(knobs)
        work = self.chunk_work(knobs)
        dp = self.draft_prefill_work(knobs)
        busy = {r: f + work[r] if r in work else f for r, f in v.busy.items()}
        busy["d2h"] = busy["d2h"] + dp["d2h"]
        chain = v.chain
        if not self.cpu_only and knobs.weight_buffers > 0:
            chain = chain + (self._fused_layer_bound(knobs, busy["gpu"]),)
        return StepTerms(busy, chain, v.serial_seconds + dp["gpu"], v.tokens_per_step, v.shared_device,
                         v.host_seconds, v.serial_overlap)

    def _fused_layer_bound(self, knobs: Knobs, gpu: Linear) -> Linear:
        """A fused pass, layer by layer: a layer's buffer frees only when its GPU work (the verification's and
        the chunk's) is done, and with a few buffers the copies run at most that far ahead, so each layer takes
        about the longer of its copy and its GPU work: the sweep is the sum over layers of that maximum, not the
        larger of the two sums (which `busy` bounds). Written linear in the placement: a layer whose FFN
        streams takes max(its FFN copy, the GPU work per layer), one whose FFN is resident the GPU work; the
        attention's copy is left out (a lower bound)."""
        L = self.t.num_layers
        tokens = knobs.decode_batch * (knobs.draft_len + 1) + knobs.prefill_batch * self.w.prompt_len_tokens
        copy = self.h2d_seconds(self.ffn_streamed_bytes(tokens))
        per_layer = gpu.const / L
        return Linear.of(L * max(copy, per_layer), ffn_gpu=L * (per_layer - max(copy, per_layer)))

    def prefill_chunks(self, knobs: Knobs) -> int:
        return math.ceil(self.w.num_prompts / knobs.prefill_batch)

    # --- memory --------------------------------------------------------------------------------
    def working_sets(self, knobs: Knobs) -> tuple[float, float]:
        """(decode, prefill) device working sets in bytes: a verification's activations per micro-batch and
        its logits, and a prefill chunk's activations per micro-chunk, per-layer KV and last-position logits.
        One pass at a time holds the larger; a fused pass holds both (`memory_terms`)."""
        t, act = self.t, self.act_bytes
        # FFN intermediates: experts run one at a time, each on its share of the routed tokens.
        ffn_width = (t.experts_per_token / t.num_experts if t.num_experts else 1) * t.intermediate_size
        per_token_ws = act * (4 * t.hidden_size + t.q_dim + 2 * t.kv_dim + 2 * ffn_width)
        decode_tokens = knobs.decode_batch * (knobs.draft_len + 1)
        decode_ws = decode_tokens / knobs.micro_batches * per_token_ws + decode_tokens * t.vocab_size * LOGIT_BYTES
        _, micro = self.prefill_split(knobs)
        prefill_ws = (micro * per_token_ws + micro * t.kv_bytes_per_token_per_layer
                      + knobs.prefill_batch * t.vocab_size * LOGIT_BYTES)
        return decode_ws, prefill_ws

    def memory_terms(self, knobs: Knobs) -> dict[str, Linear]:
        """Peak bytes per tier as linear forms; capacities in `capacities()`."""
        t, d, b, k = self.t, self.d, knobs.decode_batch, knobs.draft_len
        L, nb = t.num_layers, knobs.num_batches
        act = self.act_bytes
        decode_ws, prefill_ws = self.working_sets(knobs)
        n_micro, micro = self.prefill_split(knobs)
        # Hidden states of a chunk split into micro-chunks wait in pinned host memory (in and out).
        prefill_host = 2 * n_micro * micro * t.hidden_size * act if n_micro > 1 else 0.0
        kv_seq = self.ctx_max * t.kv_bytes_per_token  # one sequence at full length, all layers
        attn_all, ffn_all = L * t.attn_bytes_per_layer, L * t.ffn_bytes_per_layer
        if knobs.fuse_prefill:
            # A fused pass holds both working sets, and the chunk's hidden states through the pass (a feature
            # draft's prefill reads them after it: held twice, the hand-off).
            chunk_hidden = knobs.prefill_batch * self.w.max_prompt_len * t.hidden_size * act
            held = 2 if (knobs.speculative and d is not None and d.feature_draft) else 1
            work = decode_ws + prefill_ws + held * chunk_hidden
        else:
            work = max(decode_ws, prefill_ws)
        gpu = Linear.of(t.outer_bytes + work,
                        attn_gpu=attn_all, ffn_gpu=ffn_all, kv_gpu=nb * b * kv_seq)
        gpu += knobs.weight_buffers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        host = streamed(attn_all, "attn_gpu") + streamed(ffn_all, "ffn_gpu") + streamed(nb * b * kv_seq, "kv_gpu")
        pinned = streamed(attn_all, "attn_gpu") + streamed(ffn_all, "ffn_gpu") + prefill_host
        # Layers on disk (both parts streamed) are not held in host memory; their staging is disk_staging_bytes.
        on_disk = Linear.of(0.0, disk=-(attn_all + ffn_all))
        host, pinned = host + on_disk, pinned + on_disk
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
                                   + (self.weight_read_factor - 1.0) * held,
                                   disk=-(attn_all + ffn_all) * self.weight_read_factor)
            return {"gpu": Linear.of(0.0), "pinned": Linear.of(0.0), "host": everything}
        return {"gpu": gpu, "pinned": pinned, "host": host}

    def capacities(self) -> dict[str, float]:
        hw = self.hw
        cap = self.host_mem_limit_bytes or math.inf
        if self.cpu_only:
            return {"gpu": math.inf, "pinned": math.inf, "host": min(hw.host_mem_bytes, cap)}
        return {"gpu": hw.gpu_mem_bytes - hw.gpu_mem_reserve_bytes, "pinned": min(hw.pinned_mem_bytes, cap),
                "host": min(hw.host_mem_bytes, cap)}

    # --- the whole job -------------------------------------------------------------------------
    def decode_steps(self, knobs: Knobs) -> tuple[float, float]:
        """(expected decode steps for the whole job, of which tail): verifications of one batch, summed over batches.

        Each batch serves its share of the prompts with refill; the tail is what the slowest
        sequences and the last, partly empty wave add over a perfectly packed (fluid) schedule.
        """
        if knobs.fuse_prefill:
            return self._fused_steps(knobs.decode_batch, knobs.draft_len, knobs.prefill_batch)
        return self._decode_steps(knobs.decode_batch, knobs.draft_len, knobs.num_batches,
                                  knobs.prefill_batch if knobs.draft_len else 1)

    @memo_method
    def _fused_steps(self, b: int, k: int, bp: int) -> tuple[float, float]:
        """Verifications of a fused plan (one batch; planner/schedule.py `defer_prefill`), and of them tail.

        - Each sequence holds its row one verification more than its rounds: the pass that prefills it.
        - A refill takes one chunk: rows wait for a whole chunk as in `_decode_steps` (speculation; offload-only
          rows free a chunk at a time, and the b % bp rows no whole chunk fits stay empty), and the batch runs
          on at most the rows one chunk per verification keeps busy (bp x the rows' verifications per sequence).
        - The batch ramps up a chunk per verification from one chunk prefilled on its own, so the first
          wave's rows start up to chunks - 1 verifications late. Offload-only rows keep that lag to the end
          (every sequence takes the same steps, and the last chunk's rows finish last); with speculation the
          rounds' spread mixes the rows' finishing order, and the mean lag, (chunks - 1) / 2, is what stays."""
        n = self.w.num_prompts
        stats = self.rounds(k).shifted(1)
        if k:
            chunk = min(bp, refill_rows(b))
            waiting = (chunk - 1) / 2 if n > b else 0.0
        else:  # rows free a chunk at a time: the b % bp rows left over stay empty unless enough for a refill
            rest = b % bp
            waiting = float(rest) if n > b and rest < refill_rows(b) else 0.0
        rows = max(1, round(min(b - waiting, bp * stats.mean_rounds)))
        first = math.ceil(min(b, n) / max(1, bp))
        span = stats.makespan(n, rows) + (first - 1) / (2 if k else 1)
        fluid = n * stats.mean_rounds / b
        return span, max(0.0, span - fluid)

    def fused_passes(self, knobs: Knobs) -> float:
        """Prefill chunks that ride in a verification (fused plans): all but the first, at most one per
        verification."""
        if not knobs.fuse_prefill:
            return 0.0
        slots, _ = self.decode_steps(knobs)
        return min(self.prefill_chunks(knobs) - 1.0, slots)

    def standalone_chunks(self, knobs: Knobs) -> float:
        """Prefill chunks on a weight sweep of their own: all (unfused), or what no verification carries."""
        return self.prefill_chunks(knobs) - self.fused_passes(knobs)

    @memo_method
    def _decode_steps(self, b: int, k: int, nb: int, bp: int = 1) -> tuple[float, float]:
        """With speculation rows free a few at a time and refills admit whole prefill chunks only
        (planner/schedule.py `admit_count`: chunks of bp, or of refill_rows(b) where bp is larger), so
        between refills (chunk - 1) / 2 rows wait empty on average:
        the batch runs as if that much smaller. (Offload-only rows free together: bp = 1 here.)"""
        per_stream = math.ceil(self.w.num_prompts / nb)
        stats = self.rounds(k)
        chunk = min(bp, refill_rows(b))  # the rows a refill waits for
        waiting = (chunk - 1) / 2 if per_stream > b else 0.0
        span = stats.makespan(per_stream, max(1, round(b - waiting)))
        fluid = per_stream * stats.mean_rounds / b
        return nb * span, nb * max(0.0, span - fluid)

    def physical_bound(self, knobs: Knobs) -> float:
        """Tokens/s no plan can beat: in-flight capacity x E[tokens] per weight sweep at the H2D limit."""
        t = self.t
        weights = t.num_layers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        kv_seq = self.ctx_max * t.kv_bytes_per_token
        e = self.rounds(knobs.draft_len).expected_tokens
        if self.cpu_only:
            t_io = (weights + t.outer_bytes) * self.weight_read_factor / self._gpu_bw
            host = self.capacities()["host"]
            b_max = max(1.0, (host - weights) / kv_seq)
            held = (weights + t.outer_bytes) * self.weight_read_factor
            if self.disk_tier and held > host:  # what memory cannot hold is read from disk every sweep
                t_io = max(t_io, self.disk_seconds((held - host) / self.weight_read_factor))
                b_max = max(1.0, host / kv_seq)
        else:
            room = self.hw.gpu_mem_bytes - self.hw.gpu_mem_reserve_bytes - t.outer_bytes
            resident = min(weights, max(0.0, room - 2 * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)))
            stream = weights - resident
            if stream <= 0:
                return math.inf
            t_io = stream / self._h2d.peak
            host = self.capacities()["host"]
            b_max = max(1.0, (host - stream) / kv_seq)
            if self.disk_tier and stream > host:
                # The disk tier: what host memory cannot hold is read from disk every sweep (at best
                # every host byte holds weights), and KV may take all of host memory (at best).
                t_io = max(t_io, self.disk_seconds(stream - host))
                b_max = max(1.0, host / kv_seq)
        return min(self.w.num_prompts, b_max) * e / t_io

    def evaluate(self, knobs: Knobs, placement: dict[str, float]) -> Prediction:
        """The closed-form Prediction at a fixed placement."""
        terms = self.step_terms(knobs)
        slot, binding = self.step_seconds(terms, placement)
        pre = self.prefill_terms(knobs)
        pre_vals = {r: f.at(placement) for r, f in pre.items()}
        chunk = (pre_vals["gpu"] + pre_vals["cpu"]) if self.cpu_only else max(pre_vals.values())
        chunk = max(chunk, pre_vals["h2d"], pre_vals["d2h"], pre_vals.get("disk", 0.0))
        prefill = self.standalone_chunks(knobs) * chunk
        slots, tail = self.decode_steps(knobs)
        fused_n = self.fused_passes(knobs)
        fused_slot = self.step_seconds(self.fused_terms(knobs), placement)[0] if fused_n else 0.0
        decode = (slots - fused_n) * slot + fused_n * fused_slot
        tokens = self.w.num_prompts * self.w.gen_len_tokens
        total = prefill + decode
        mem = self.memory_at(knobs, placement)
        caps = self.capacities()
        bound = self.physical_bound(knobs)
        tput = tokens / total
        busy = {r: f.at(placement) for r, f in terms.busy.items()}
        if terms.serial_seconds:
            busy["draft_serial"] = terms.serial_seconds
        if terms.host_seconds:
            busy["host"] = terms.host_seconds
        if not busy.get("disk"):
            busy.pop("disk", None)
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
            disk_bytes_per_sweep=self.disk_bytes_per_sweep(placement),
            fused_passes=fused_n,
            fused_seconds=fused_slot,
        )

    # The names these had before; reports and plans still say "slot" for a decode step (schema keys).
    slot_terms = step_terms
    slot_seconds = step_seconds
    decode_slots = decode_steps


def fits(mem: dict[str, float], caps: dict[str, float], rel_tol: float = 1e-9) -> bool:
    return all(mem[t] <= caps[t] * (1 + rel_tol) + 1.0 for t in mem)
