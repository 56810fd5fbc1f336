"""In-engine probes: the Engine itself on random checkpoints, its overheads fitted from its own trace."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from specoffload.planner.models import ModelSpec
from specoffload.planner.trace_names import FIT_ATTN_PREFIXES, FIT_LAYER_PREFIXES

from .config import GiB, MiB, ProbeFailure
from .fit import fit_excess, nnls, sig
from .timing import points_json



def engine_probe_shapes(spec: ModelSpec, vocab: int, budget_bytes: float) -> tuple[ModelSpec, int]:
    """The reference shapes the engine_layers probe runs, and the factor its widths were divided by.

    The spec itself when one fp32 layer and the embedding/head fit the budget; otherwise hidden size,
    heads (head_dim kept), KV heads and FFN width divided by the smallest power of two that fits (expert
    count and top-k kept), so a CPU-only machine runs the probe on the same kind of model, smaller.
    """
    import dataclasses

    scale = 1
    while True:
        heads = max(1, spec.num_heads // scale)
        kv = max(1, min(heads, spec.num_kv_heads // scale))
        while heads % kv:
            kv -= 1
        cand = spec if scale == 1 else dataclasses.replace(
            spec, hidden_size=max(spec.hidden_size // scale, 64), num_heads=heads, num_kv_heads=kv,
            intermediate_size=max(spec.intermediate_size // scale, 64))
        if 4.0 * (cand.layer_params + 2 * vocab * cand.hidden_size) <= budget_bytes or scale >= 256:
            return cand, scale
        scale *= 2


def engine_fit_shapes(spec: ModelSpec, narrow: tuple[int, int, int, int, int] | None) -> ModelSpec:
    """The model the engine_layers probe fits its fixed costs on: the reference's kind (family, expert count
    and top-k) at the narrow widths `narrow` = (hidden, heads, kv heads, head dim, FFN), unless the
    reference is already that narrow (or `narrow` is None: the reference itself).

    Why narrow: the fit sees (measured time - what the rates predict) and splits it into a per-layer
    constant, a per-token and a per-expert term. At a reference's own widths a layer takes milliseconds
    of matmuls, and the matmul curve (measured at one FFN shape) predicts other shapes only to some 10%;
    that error, milliseconds, is as constant in the token count as a fixed cost is (a decode reads the same
    weights at 1 or 64 tokens), so the fit books it as "fixed cost" (707 us per layer on a 2-core EPYC,
    against 84 us in the hot-loop micro-benchmark). At narrow widths the fixed costs are most of a layer's
    time, so the fit can see them; they are per op, so they hold at every width.
    """
    import dataclasses

    if narrow is None:
        return spec
    dim, heads, kv_heads, head_dim, ffn = narrow
    if spec.hidden_size <= dim and spec.intermediate_size <= ffn:
        return spec
    return dataclasses.replace(spec, name=f"{spec.name} (narrow)", hidden_size=dim, num_heads=heads,
                               num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=ffn)


def probe_plan(workload, batch: int, n_layers: int, draft_len: int = 0):
    """A hand-built Plan for the engine probes: one batch, everything resident, no weight streaming;
    serial-spec with a draft of `draft_len` tokens, or offload-only."""
    from specoffload.planner.schema import Plan, Prediction

    pred = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "-", 0, 0)
    return Plan(policy="serial-spec" if draft_len else "offload-only", model="probe", model_fingerprint="",
                draft="probe-draft" if draft_len else "", draft_fingerprint="", profile="-", profile_fingerprint="",
                workload=workload, decode_batch=batch, num_batches=1, prefill_batch=batch, draft_sub_batch=1,
                draft_len=draft_len, micro_batches=1, gpu_attn_layers=n_layers, gpu_ffn_layers=n_layers,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv="gpu", weight_buffers=0, prediction=pred)


def layer_and_attention_seconds(spans) -> tuple[float, float]:
    """(device layer work, attention) seconds in the engine's spans [(track, name, start, end)], selected
    by the span names planner/trace_names.py declares (the names the engine writes)."""
    layer = sum(e - s_ for _, nm, s_, e in spans if nm.startswith(FIT_LAYER_PREFIXES))
    attn = sum(e - s_ for _, nm, s_, e in spans if nm.startswith(FIT_ATTN_PREFIXES))
    return layer, attn

class EngineProbes:
    """The Profiler's in-engine probes (methods of Profiler)."""

    def probe_engine_overhead(self) -> dict[str, Any]:
        """The engine's own bookkeeping per verification pass and per sequence (Python work between
        the timed pieces: building inputs, verifying, rolling caches back, committing tokens): run the
        runtime's Engine on a tiny random MoE checkpoint at a few batch sizes and fit
        (slot time - time inside the timed pieces) = pass + batch * per_sequence."""
        import tempfile
        from pathlib import Path

        from specoffload.planner.schema import Workload

        from specoffload.runtime.engine import Engine, Request
        from specoffload.runtime.random_checkpoint import write_random_checkpoint

        self._check_forced("engine_overhead")
        dim, heads, kv_heads, dh, ffn_dim = self.cfg.op_overhead_shape
        points, rows = [(1, 4), (1, 64), (6, 4), (6, 64)], []  # (layers, batch): a wide lever on each
        for n_layers, b in points:
            config = {"architectures": ["MixtralForCausalLM"], "hidden_size": dim, "intermediate_size": ffn_dim,
                      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": dh,
                      "num_hidden_layers": n_layers, "num_local_experts": 8, "num_experts_per_tok": 2,
                      "vocab_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
                      "rope_theta": 10000.0, "eos_token_id": None, "hidden_act": "silu"}
            with tempfile.TemporaryDirectory() as tmp:
                write_random_checkpoint(Path(tmp), config, 0, torch.device("cpu"))
                plan = probe_plan(Workload(prompt_len_tokens=4, gen_len_tokens=17, num_prompts=b), b, n_layers)
                samples = []
                for _ in range(self.cfg.engine_overhead_reps or max(3, self.cfg.reps)):
                    eng = Engine(plan, tmp, device=self.device, trace=True)
                    eng.run([Request(str(i), [1, 2, 3, 4], 17) for i in range(b)], lambda f: None)
                    t0 = eng.timeline.t0
                    for start, end in eng.stats.slot_windows[2:]:  # skip the first slots (warm-up)
                        inside = sum(e - s_ for _, _, s_, e in eng.timeline.spans
                                     if s_ >= start - t0 and e <= end - t0)
                        samples.append((end - start) - inside)
                self.tick("engine overhead")
                rows.append((n_layers, b, sorted(samples)[len(samples) // 2]))
        ls, bs, ts = (np.array([r[i] for r in rows], dtype=float) for i in range(3))
        coef, _ = nnls(np.stack([np.ones_like(bs), bs, ls], axis=1), ts)
        self.prov["engine_overhead"] = (
            f"the engine's bookkeeping outside its timed pieces, per verification pass, on random MoE models "
            f"(dim {dim}) at (layers, batch) {', '.join(f'({l:.0f}, {b:.0f})' for l, b in zip(ls, bs))}: median "
            f"{', '.join(f'{t * 1e3:.3f} ms' for t in ts)}; fitted pass {coef[0] * 1e6:.1f} us + "
            f"{coef[1] * 1e6:.2f} us per sequence + {coef[2] * 1e6:.1f} us per layer")
        return {"engine_pass_overhead_seconds": sig(float(coef[0])), "engine_seq_overhead_seconds": sig(float(coef[1])),
                "engine_layer_overhead_seconds": sig(float(coef[2]))}

    def fallback_engine_overhead(self, reason: str) -> dict[str, Any]:
        self.prov["engine_overhead"] = f"0: the engine_overhead probe failed ({reason})"
        return {"engine_pass_overhead_seconds": 0.0, "engine_seq_overhead_seconds": 0.0,
                "engine_layer_overhead_seconds": 0.0}

    def probe_engine_layers(self) -> dict[str, Any]:
        """The per-layer fixed costs as the engine pays them (CPU device only).

        Micro-benchmarks call one op in a loop, hot in the CPU's caches; the engine runs a layer's ops
        once each between other layers' ops, and pays each dispatch cold. So: run the runtime's Engine
        on random weights of a narrow model of the reference's kind (engine_fit_shapes; a one-layer dense
        draft of the same dimensions proposes for the k > 0 runs, synthetic acceptance), take each decode pass's timed pieces, and
        fit on top of what the rates measured above predict for them:
          attention per layer   = KV bytes / bandwidth + FLOPs / rate
                                  + cpu_attn_overhead + batch * (seq_overhead + query * row_overhead)
          (qkv + ffn) per layer = matmuls + device_op_overhead + tokens * device_op_token
                                  (+ experts touched * device_expert_overhead)
        the layer rows coming from the target's passes (MoE) and the draft's steps (dense, less their
        attention and logits). These replace the micro-benchmark values of those figures (kept in
        provenance).
        """
        import dataclasses
        import tempfile
        from pathlib import Path

        from specoffload.planner.costmodel import CostModel
        from specoffload.planner.schema import Workload

        from specoffload.runtime.engine import Engine, Request
        from specoffload.runtime.random_checkpoint import hf_config_for, write_random_checkpoint

        self._check_forced("engine_layers")
        if self.cuda:
            raise ProbeFailure("CPU devices only (on CUDA the engine's host spans time kernel launches, not kernels)")
        lacking = [f for f in ("gpu_matmul_flops_per_s", "gpu_mem_bandwidth_bytes_per_s", "cpu_attn_kv_read_bytes_per_s",
                               "cpu_attn_flops_per_s") if self.fig.get(f) is None]
        if lacking:
            raise ProbeFailure(f"skipped: it fits on top of {', '.join(lacking)}, whose probe failed")
        c, spec = self.cfg, self.spec
        n_runs = len(c.engine_batches) * len(c.engine_draft_lens) * c.engine_reps
        if n_runs <= 6 or not any(c.engine_draft_lens) or c.engine_reps < 1:
            raise ProbeFailure(f"{n_runs} timed runs cannot fit the 6 bookkeeping terms; give engine_batches x "
                               "engine_draft_lens x engine_reps at least 7 runs, some with draft length > 0")
        vocab = min(spec.vocab_size, 8192)
        full_spec = spec
        spec = engine_fit_shapes(spec, c.op_overhead_shape if c.engine_narrow else None)
        narrowed = spec is not full_spec
        spec, scale = engine_probe_shapes(spec, vocab, c.engine_max_bytes)
        per_layer = 4.0 * spec.layer_params
        outer = 4.0 * 2 * vocab * spec.hidden_size
        n_layers = min(spec.num_layers, c.engine_max_layers, int((c.engine_max_bytes - outer) // per_layer))
        if n_layers < 1:
            raise ProbeFailure(f"one {spec.name} layer takes {per_layer / GiB:.1f} GiB in fp32, over the in-engine "
                               f"budget of {c.engine_max_bytes / GiB:.1f} GiB; the micro-benchmark figures stand")
        scaled = "" if not narrowed else (
            f"; narrow widths (hidden {spec.hidden_size}, {spec.num_heads} query / {spec.num_kv_heads} KV heads of "
            f"{spec.head_dim}, FFN {spec.intermediate_size}, {spec.num_experts} experts top-{spec.experts_per_token}"
            f"), where the fixed costs are most of a layer's time: at {full_spec.name}'s own widths they are a few "
            "percent of it, below the matmul curve's error at shapes other than the one it was measured at")
        scaled += "" if scale == 1 else (
            f"; one full {full_spec.name} layer ({4.0 * full_spec.layer_params / GiB:.1f} GiB in fp32) is over the "
            f"in-engine budget of {c.engine_max_bytes / MiB:.0f} MiB, so its widths were divided by {scale} (hidden "
            f"{spec.hidden_size}, {spec.num_heads} query / {spec.num_kv_heads} KV heads of {spec.head_dim}, FFN "
            f"{spec.intermediate_size}, {spec.num_experts} experts)")
        # Known parts: the rates measured above, with every fixed cost zeroed.
        base = self.assemble()
        zero = dataclasses.replace(base, device_op_overhead_seconds=0.0, device_expert_overhead_seconds=0.0,
                                   device_op_token_seconds=0.0, cpu_attn_overhead_seconds=0.0,
                                   cpu_attn_seq_overhead_seconds=0.0, cpu_attn_row_overhead_seconds=0.0,
                                   device_logit_element_seconds=0.0)
        ref = dataclasses.replace(spec, num_layers=n_layers, vocab_size=vocab)  # spec: scaled to fit, if needed
        draft_spec = dataclasses.replace(ref, family="mistral", num_layers=1, num_experts=0, experts_per_token=0)
        wl = Workload(prompt_len_tokens=c.engine_prompt_len, gen_len_tokens=c.engine_gen_len, num_prompts=1)
        cm = CostModel(zero, ref, draft_spec, wl)
        g = torch.Generator().manual_seed(0)
        target_passes, draft_passes, runs = [], [], []

        def collect(b: int, k: int, eng: Engine) -> None:
            spans = eng.timeline.spans
            tp = [r for r in eng.timeline.passes if r.model == "target" and not r.prefill]
            dp = [r for r in eng.timeline.passes if r.model == "draft" and not r.prefill]
            # The whole decode less the forwards: the runtime's bookkeeping, in totals per run.
            runs.append((b, k, eng.stats.decode_seconds - sum(r.end - r.start for r in tp + dp),
                         len(tp), sum(r.batch for r in tp), sum(r.batch * r.query for r in tp),
                         len(dp), sum(r.batch for r in dp)))
            for rec in eng.timeline.passes:  # prefills too: long queries, many tokens
                inside = [sp for sp in spans if sp[2] >= rec.start and sp[3] <= rec.end]
                if rec.model == "target":
                    layer, attn = layer_and_attention_seconds(inside)
                    target_passes.append((rec.batch, rec.query, rec.keys, layer / n_layers, attn / n_layers))
                else:
                    draft_passes.append((rec.batch, rec.query, rec.keys, rec.end - rec.start))

        with tempfile.TemporaryDirectory() as tmp:
            t_dir, d_dir = Path(tmp) / "target", Path(tmp) / "draft"
            write_random_checkpoint(t_dir, hf_config_for(spec, n_layers, vocab), 0, torch.device("cpu"))
            write_random_checkpoint(d_dir, hf_config_for(spec, 1, vocab, dense=True), 1, torch.device("cpu"))
            for b in c.engine_batches:
                for k in c.engine_draft_lens:
                    plan = probe_plan(dataclasses.replace(wl, num_prompts=b), b, n_layers, k)
                    prompts = torch.randint(3, vocab, (b, c.engine_prompt_len), generator=g).tolist()
                    for rep in range(1 + c.engine_reps):  # the first run warms up
                        eng = Engine(plan, t_dir, d_dir if k else None, device=self.device, trace=True,
                                     synthetic_acceptance=0.7 if k else None)
                        eng.run([Request(str(i), p, c.engine_gen_len) for i, p in enumerate(prompts)],
                                lambda f: None)
                        if rep:
                            collect(b, k, eng)
                    self.tick("engine layers")
        # Group medians per (batch, query): single passes are noisy.
        def grouped(rows: list[tuple]) -> list[tuple]:
            groups: dict[tuple[int, int], list[tuple]] = {}
            for row in rows:
                groups.setdefault((row[0], row[1]), []).append(row)
            return [(b, q, *(float(np.median([r[i] for r in rs])) for i in range(2, len(rs[0]))), len(rs))
                    for (b, q), rs in sorted(groups.items())]

        pts, dpts = grouped(target_passes), grouped(draft_passes)
        if len({b * q for b, q, *_ in pts}) < 4:
            raise ProbeFailure(f"only {len(pts)} distinct pass shapes were timed; need 4 token counts")
        moe = ref.num_experts > 0
        # Attention first (target passes), then the layers: the target's qkv + ffn pieces, and the draft's
        # steps less their attention (as just fitted) and logits: dense layers, no experts.
        att = fit_excess([p[4] for p in pts], [cm.cpu_attention_seconds(ref, b, q, keys) for b, q, keys, *_ in pts],
                         [[1.0, b, b * q] for b, q, *_ in pts])
        att_figs = {"cpu_attn_overhead_seconds": att.coef[0], "cpu_attn_seq_overhead_seconds": att.coef[1],
                    "cpu_attn_row_overhead_seconds": att.coef[2]}
        with_att = CostModel(dataclasses.replace(zero, **att_figs), ref, draft_spec, wl)
        Ld = draft_spec.num_layers
        seconds = [p[3] for p in pts] + [
            max(1e-9, (secs - with_att.lm_head_seconds(draft_spec, b)) / Ld
                - with_att.cpu_attention_seconds(draft_spec, b, q, keys)) for b, q, keys, secs, _ in dpts]
        known = ([cm.qkv_seconds(ref, b * q) + cm.ffn_seconds(ref, b * q) for b, q, *_ in pts]
                 + [cm.qkv_seconds(draft_spec, b * q) + cm.ffn_seconds(draft_spec, b * q) for b, q, *_ in dpts])
        cols = ([[1.0, b * q, ref.expected_experts(b * q) if moe else 0.0] for b, q, *_ in pts]
                + [[1.0, b * q, 0.0] for b, q, *_ in dpts])
        lay = fit_excess(seconds, known, cols)
        op, tok = lay.coef[0], lay.coef[1]
        expert = lay.coef[2] if moe else float(self.fig.get("device_expert_overhead_seconds", 0.0))
        out = {"device_op_overhead_seconds": sig(op), "device_op_token_seconds": sig(tok),
               "device_expert_overhead_seconds": sig(expert), **{f: sig(v) for f, v in att_figs.items()}}
        # The bookkeeping per run: verification passes (fixed, per sequence; the per-layer part is the
        # engine_overhead probe's), logits scanned (target rows x vocabulary, draft steps x vocabulary), and
        # for speculative runs per round, per sequence drafted for and per draft step.
        layer_oh = float(self.fig.get("engine_layer_overhead_seconds", 0.0))
        host_cols = [[n_p, sb, (sbq + sbd) * vocab, n_p if k else 0, sb if k else 0, n_d]
                     for b, k, _, n_p, sb, sbq, n_d, sbd in runs]
        host = fit_excess([r[2] for r in runs], [r[3] * n_layers * layer_oh for r in runs], host_cols)
        out.update({"engine_pass_overhead_seconds": sig(host.coef[0]), "engine_seq_overhead_seconds": sig(host.coef[1]),
                    "device_logit_element_seconds": sig(host.coef[2]),
                    "engine_draft_round_overhead_seconds": sig(host.coef[3]),
                    "engine_draft_seq_overhead_seconds": sig(host.coef[4]),
                    "engine_draft_step_overhead_seconds": sig(host.coef[5])})
        n_t = len(pts)
        t_res, d_res = np.abs(lay.residuals[:n_t]), np.abs(lay.residuals[n_t:])
        before = {f: self.fig.get(f) for f in out}
        self.prov["engine_layers"] = (
            f"the runtime's Engine on random weights of {full_spec.name}'s kind ({n_layers} of {spec.num_layers} "
            "layers, "
            f"vocabulary {vocab}, fp32{scaled}), batches {list(c.engine_batches)} x draft lengths "
            f"{list(c.engine_draft_lens)} (synthetic acceptance 0.7; a one-layer dense draft of the same dimensions), "
            f"prompts {c.engine_prompt_len} -> {c.engine_gen_len} tokens, {c.engine_reps} timed run(s) each after "
            "a warm-up; per forward (decode and prefill) the timed pieces per layer, group medians per (batch, "
            "query); fitted on top of the matmul and attention rates above by nonnegative relative least "
            "squares: first the target's attention = bytes and FLOPs at "
            "the rates + overhead + batch * (seq + query * row) "
            f"(residual rms {att.rel_rms_residual:.3f}, max {att.rel_max_residual:.3f}); then per layer, the "
            "target's (qkv + ffn) and the draft's step less its attention and logits, = matmuls + op_overhead + "
            "tokens * op_token" + (" + experts touched * expert_overhead (target)" if moe else "") +
            f" (residual rms {lay.rel_rms_residual:.3f}; median |residual| target "
            f"{float(np.median(t_res)):.3f}, draft {(float(np.median(d_res)) if len(d_res) else float('nan')):.3f}). "
            "Per run, the decode's time outside the forwards = verification passes x (pass + per-layer as the "
            "engine_overhead probe) + sequences verified x seq + logit elements x logit_element + (speculative) "
            "rounds x draft_round + sequences drafted for x draft_seq + draft steps x draft_step "
            f"(residual rms {host.rel_rms_residual:.3f}, max {host.rel_max_residual:.3f}). "
            "Values replaced: "
            + ", ".join(f"{f} {v:.4g}" for f, v in before.items() if v is not None))
        self.prov["data.engine_layers"] = (
            "target passes [batch, query, keys, layer_seconds, attention_seconds, passes, layer_fit_rel_residual, "
            "attention_fit_rel_residual]: " + points_json(
                (b, q, keys, ls, at, n, r1, r2) for (b, q, keys, ls, at, n), r1, r2
                in zip(pts, lay.residuals[:n_t], att.residuals))
            + "; draft steps [batch, query, keys, step_seconds, steps, layer_fit_rel_residual]: " + points_json(
                (b, q, keys, st, n, r) for (b, q, keys, st, n), r in zip(dpts, lay.residuals[n_t:]))
            + "; runs [batch, draft_len, seconds_outside_forwards, passes, fit_rel_residual]: " + points_json(
                (b, k, sec, n_p, r) for (b, k, sec, n_p, *_), r in zip(runs, host.residuals)))
        return out

    def fallback_engine_layers(self, reason: str) -> dict[str, Any]:
        self.prov["device_op_token_seconds"] = (f"0: the engine_layers probe did not run ({reason}); the per-layer "
                                                "fixed costs are the micro-benchmarks'")
        return {"device_op_token_seconds": 0.0, "device_logit_element_seconds": 0.0,
                "engine_draft_round_overhead_seconds": 0.0, "engine_draft_seq_overhead_seconds": 0.0,
                "engine_draft_step_overhead_seconds": 0.0}
