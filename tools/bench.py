"""Side-by-side benchmark on the tiny pair, one run, same prompts: our policies against transformers.

    python tools/bench.py [--threads 1] [--gen-len 32] [--profile profiles/cpu-2core.yaml | --measure]
    python tools/bench.py --terms                # also: the engine's trace against the cost model, term by term

Runs, on the bundled 64 prompts with the same generation length each:
  - our runtime with the specoffload, offload-only, serial-spec and interleaved plans (each planned
    by the planner for this profile and the measured acceptance), each simulated before it runs;
  - the same with the feature draft tiny-eagle (an EAGLE-style head over the tiny target, its own measured
    acceptance): "ours: serial-spec, tiny-eagle" and "ours: interleaved, tiny-eagle";
  - transformers' own `generate` (greedy, batched with left padding) and with `assistant_model`
    (assisted generation, one prompt at a time as transformers requires).
Prints throughput (generated tokens / wall seconds, each sequence capped at its requested length),
ratios against our offload-only run, and for each of our policies the simulator's prediction
against the measurement with the error in %. The machine is shared and noisy: one untimed warm-up
run first, then every timed run is repeated --reps times in rotating order and the median is
reported with its spread ((max - min) / median); compare ratios within one run, not absolute
numbers across runs.

--terms: before the benchmark, each policy's plan runs once more with the engine's trace on, and each
cost-model term is set beside what the engine's spans measured for the same shapes (per decode pass of
the target: its layers' QKV + FFN, its attention, its LM head; per prefill pass; the decode's time
outside the forwards), medians over the passes; with a draft, its steps (the first step's padded width
and its time at that width, the later steps), its prefill pass and the bookkeeping outside every forward
(serial plans): where a prediction is off, this says which term. The tiny-eagle plans are included.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "runtime" / "assets" / "demo_prompts.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--profile", default=str(ROOT / "profiles" / "cpu-2core.yaml"))
    ap.add_argument("--measure", action="store_true",
                    help="profile this machine first (quick mode, ~20 s) and predict with that profile: prediction "
                         "and measurement from the same minutes of a machine whose speed drifts")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each run (median reported)")
    ap.add_argument("--terms", action="store_true",
                    help="also set each cost-model term beside the engine's traced spans for the same shapes")
    args = ap.parse_args()
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from specoffload.planner.models import load_model_spec
    from specoffload.planner.planner import make_plan
    from specoffload.planner.schema import load_profile
    from specoffload.planner.sim import simulate
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.profiler.acceptance import measure_workload
    from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_paths, tiny_pair_tokenizer

    t_dir, d_dir = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    texts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()]
    prompts = [tok.encode(t).ids for t in texts]
    G = args.gen_len
    target_spec, draft_spec = load_model_spec("tiny-target"), load_model_spec("tiny-draft")
    if args.measure:
        from specoffload.runtime.profiler.probes import ProfileConfig, run_profile

        print("profiling this machine (quick mode) ...", flush=True)
        profile = run_profile(ProfileConfig.quick(model=target_spec), device="cpu",
                              name="bench-measured", progress=False, threads=args.threads,
                              warn=lambda m: print(f"profile: {m}")).profile
    else:
        profile = load_profile(args.profile)
    workload = measure_workload("tiny-target", "tiny-draft", PROMPTS, k=6, max_new_tokens=G, sample=16,
                                progress=False).workload
    eagle_spec, e_dir = load_model_spec("tiny-eagle"), tiny_eagle_path()
    eagle_workload = measure_workload("tiny-target", "tiny-eagle", PROMPTS, k=6, max_new_tokens=G, sample=16,
                                      progress=False).workload
    print(f"tiny pair, {len(prompts)} prompts (mean {workload.prompt_len_tokens} tokens) -> {G} tokens each, "
          f"{args.threads} torch thread(s), profile {profile.name}; measured acceptance "
          f"{[round(a, 2) for a in workload.acceptance]}, tiny-eagle's {[round(a, 2) for a in eagle_workload.acceptance]}")
    requests = [Request(str(i), p, G) for i, p in enumerate(prompts)]
    if args.terms:
        for policy in ("offload-only", "serial-spec", "interleaved"):
            plan = make_plan(profile, target_spec, draft_spec, workload, policy=policy).plan
            term_table(plan, profile, target_spec, draft_spec, workload, t_dir, d_dir, requests)
        for policy in ("serial-spec", "interleaved"):
            plan = make_plan(profile, target_spec, eagle_spec, eagle_workload, policy=policy).plan
            term_table(plan, profile, target_spec, eagle_spec, eagle_workload, t_dir, e_dir, requests, "tiny-eagle")
    runs = {}  # name -> (run() -> (tokens, seconds), simulated tok/s or None, plan summary)
    ours_runs = [(p, draft_spec, workload, d_dir, "") for p in ("specoffload", "offload-only", "serial-spec",
                                                                "interleaved")]
    ours_runs += [(p, eagle_spec, eagle_workload, e_dir, ", tiny-eagle") for p in ("serial-spec", "interleaved")]
    for policy, dspec, wl, ddir, tag in ours_runs:
        plan = make_plan(profile, target_spec, dspec, wl, policy=policy).plan
        sim = simulate(plan, profile).report

        def ours(plan=plan, ddir=ddir) -> tuple[int, float]:
            done = []
            eng = Engine(plan, t_dir, ddir)  # loading the checkpoints is not part of the run
            t0 = time.perf_counter()
            eng.run(requests, done.append)
            return sum(len(f.tokens) for f in done), time.perf_counter() - t0

        name = f"ours: {policy}" + (f" ({plan.policy})" if policy == "specoffload" else "") + tag
        runs[name] = (ours, sim.throughput_tokens_per_s, f"b={plan.decode_batch}x{plan.num_batches} k={plan.draft_len}")

    hf = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float32)
    assistant = AutoModelForCausalLM.from_pretrained(d_dir, dtype=torch.float32)
    eos = hf.config.eos_token_id
    pad = hf.config.pad_token_id if hf.config.pad_token_id is not None else eos

    def count(gen: torch.Tensor) -> int:
        n = 0
        for t in gen.tolist()[:G]:
            n += 1
            if t == eos:
                break
        return n

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for batched decoding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1

    def hf_batched() -> tuple[int, float]:
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=G, pad_token_id=pad)
        return sum(count(o[width:]) for o in out), time.perf_counter() - t0

    def hf_assisted() -> tuple[int, float]:
        total, t0 = 0, time.perf_counter()
        for p in prompts:
            x = torch.tensor([p])
            o = hf.generate(x, attention_mask=torch.ones_like(x), assistant_model=assistant, do_sample=False,
                            max_new_tokens=G, pad_token_id=pad)
            total += count(o[0, len(p):])
        return total, time.perf_counter() - t0

    runs["transformers generate (batched)"] = (hf_batched, None, "")
    runs["transformers + assistant_model"] = (hf_assisted, None, "one prompt at a time, 1 rep")

    def timed(fn) -> float:
        tokens, seconds = fn()
        return tokens / seconds

    load_before = os.getloadavg()[0]
    timed(runs["ours: offload-only"][0])  # warm-up (untimed): first-call costs of torch and the allocator
    hf_batched()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = [n for n in runs if n != "transformers + assistant_model"]
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no run always goes first
            samples[name].append(timed(runs[name][0]))
    samples["transformers + assistant_model"].append(timed(hf_assisted))  # ~10 s a run: once
    rows = []
    for name, (_, sim, what) in runs.items():
        xs = sorted(samples[name])
        med = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
        rows.append((name, med, (xs[-1] - xs[0]) / med, sim, what))

    base = next(r[1] for r in rows if r[0] == "ours: offload-only")
    print(f"\n{'run':40}{'tok/s':>9}{'spread':>8}{'vs ours offload-only':>22}{'sim tok/s':>11}{'sim err':>9}  plan")
    for name, tps, spread, sim, what in rows:
        err = f"{100 * (sim - tps) / tps:+.0f}%" if sim else "-"
        print(f"{name:40}{tps:>9.1f}{100 * spread:>7.0f}%{tps / base:>21.2f}x{(f'{sim:.1f}' if sim else '-'):>11}"
              f"{err:>9}  {what}")
    print(f"\nload average (1 min) {load_before:.2f} before the timed runs, {os.getloadavg()[0]:.2f} after, on "
          f"{os.cpu_count()} CPUs")
    print(f"tok/s: median of {args.reps} timed run(s) after a warm-up; spread = (max - min) / median. "
          "sim err = (simulated - measured median) / measured median; the simulator and the planner share "
          "the cost model, so this is the cost model's error on this machine")


def term_table(plan, profile, target, draft, workload, t_dir, d_dir, requests, label: str = "") -> None:
    """Print the engine's traced pieces against the cost model's terms for one plan (see --terms)."""
    import numpy as np

    from specoffload.planner.durations import Durations
    from specoffload.planner.sim import simulate
    from specoffload.planner.trace_names import SPAN_DRAFT_STEP, SPAN_LM_HEAD
    from specoffload.runtime.engine import Engine
    from specoffload.runtime.profiler.in_engine import layer_and_attention_seconds

    du = Durations(profile, target, draft, workload)
    L = target.num_layers
    Engine(plan, t_dir, d_dir).run(requests, lambda f: None)  # warm-up
    eng = Engine(plan, t_dir, d_dir, trace=True)
    eng.run(requests, lambda f: None)
    spans = eng.timeline.spans
    dec, pre = [], []
    for rec in eng.timeline.passes:
        if rec.model != "target":
            continue
        inside = [sp for sp in spans if sp[2] >= rec.start and sp[3] <= rec.end]
        layer, attn = layer_and_attention_seconds(inside)
        lm = sum(e - s_ for _, nm, s_, e in inside if nm == SPAN_LM_HEAD)
        tokens = rec.batch * rec.query
        if rec.prefill:
            model = (L * (du.qkv_seconds(target, tokens) + du.ffn_seconds(target, tokens)
                          + du.prefill_attention_seconds(target, rec.batch, rec.query))
                     + du.lm_head_seconds(target, rec.batch))
            pre.append((rec.end - rec.start, model))
            continue
        dec.append((layer / L, du.qkv_seconds(target, tokens) + du.ffn_seconds(target, tokens), attn / L,
                    du.cpu_attention_seconds(target, rec.batch, rec.query, rec.keys), lm,
                    du.lm_head_seconds(target, tokens), rec.end - rec.start, rec.batch))
    rep = simulate(plan, profile).report
    st = eng.stats
    fwd = sum(r.end - r.start for r in eng.timeline.passes if not r.prefill and r.model == "target")
    b = plan.decode_batch
    rows = []
    if dec:
        a = np.median(np.array(dec), axis=0)
        rows += [("target decode: QKV + FFN per layer", a[0], a[1]), ("target decode: attention per layer", a[2], a[3]),
                 ("target decode: LM head span (model: + logit scan)", a[4], a[5])]
        a_lm, m_lm = a[4], a[5]
    if pre:
        a = np.median(np.array(pre), axis=0)
        rows.append(("target prefill pass", a[0], a[1]))
    k = plan.draft_len
    print(f"\nterms, {plan.policy}{', ' + label if label else ''} b={plan.decode_batch}x{plan.num_batches} k={k} (one "
          f"traced run; {len(dec)} decode passes of the target, medians)")
    if k:
        rows += draft_terms(du, eng, plan, draft)
    if plan.num_batches == 1:  # interleaved: the draft's steps overlap the target's layers
        draft_steps = sum(e - s_ for _, nm, s_, e in spans if nm.startswith(SPAN_DRAFT_STEP))
        outside = (st.decode_seconds - fwd - draft_steps) / max(st.slots, 1)
        host = du.host_pass_seconds(b) + (du.draft_host_seconds(b, k) - k * profile.engine_draft_step_overhead_seconds
                                          if k else 0.0)
        rows.append(("LM head + logit scan + bookkeeping, per verification", (a_lm + outside) if dec else outside,
                     (m_lm if dec else 0.0) + host))
    rows += [("run: prefill", st.prefill_seconds, rep.prefill_seconds),
             ("run: decode", st.decode_seconds, rep.decode_seconds)]
    print(f"  {'term':50}{'measured us':>13}{'model us':>11}{'model err':>11}")
    for name, m, p in rows:
        print(f"  {name:50}{m * 1e6:>13.1f}{p * 1e6:>11.1f}{100 * (p - m) / m if m > 0 else float('nan'):>+10.0f}%")
    print("  (the engine scans the logits after its LM head span, in the time outside the forwards; the model charges "
          "the scan with the LM head: compare their sum. Draft steps: each step's whole span against the model at its "
          "traced width and keys; bookkeeping per verification includes the draft round's outside its steps)")


def draft_terms(du, eng, plan, draft) -> list[tuple[str, float, float]]:
    """The draft's traced steps against the cost model's terms (see --terms): each step's span (forward, logit scan,
    bookkeeping) against the model at its traced shape, the first step's width, its prefill pass."""
    import numpy as np

    from specoffload.planner.trace_names import SPAN_DRAFT_STEP

    k, b, L = plan.draft_len, plan.decode_batch, draft.num_layers
    passes = [r for r in eng.timeline.passes if r.model == "draft"]
    steps = [r for r in passes if not r.prefill]
    attend = du.cpu_attention_seconds if (du.cpu_only or plan.draft_kv == "host") else du.gpu_attention_seconds

    def model_step(r, first: bool = False) -> float:  # one step at the traced shape: linear parts, LM head and logit
        # scan, KV attention, and the step's bookkeeping. A feature draft's first step records the pairs its packed
        # linear parts computed; its attention runs padded to the longest row, and its gathers cost a layer half's ops.
        query = r.query
        if first and draft.feature_draft and r.query > 1:
            query = du.feature_catch_up(k, r.batch)
        pack = du.hw.device_op_overhead_seconds * (first and draft.feature_draft and float(r.query) != int(r.query))
        return (du.draft_step_seconds(r.batch, r.query) + L * attend(draft, r.batch, query, r.keys) + pack
                + du.hw.engine_draft_step_overhead_seconds)

    # Each step's whole span (forward, logit scan, drawing, bookkeeping), in order: one per traced step pass.
    spans = sorted((s_, e) for _, nm, s_, e in eng.timeline.spans if nm.startswith(SPAN_DRAFT_STEP))
    rows = []
    if len(spans) != len(steps):
        return rows
    first = [(r, e - s_) for i, (r, (s_, e)) in enumerate(zip(steps, spans)) if i % k == 0]  # rounds: k steps each
    later = [(r, e - s_) for i, (r, (s_, e)) in enumerate(zip(steps, spans)) if i % k]
    full = [r for r, _ in first[1:] if r.batch == b]  # full batches, after the first round (one pending pair per row)
    if full:
        width = du.feature_kept_mean(k) if draft.feature_draft else 2.0
        print(f"  draft first step's width (tokens per row its linear parts compute; "
              f"{'packed: the mean kept' if draft.feature_draft else 'padded to the longest row'}): traced "
              f"{np.mean([r.query for r in full]):.2f} over {len(full)} full-batch rounds, model {width:.2f}"
              + (f" (attention padded to {du.feature_catch_up(k, b):.2f})" if draft.feature_draft else ""))
    for name, rs, is_first in (("draft first step, at its traced width", first, True),
                               ("draft later step", later, False)):
        if rs:
            rows.append((name, float(np.median([t for _, t in rs])),
                         float(np.median([model_step(r, is_first) for r, _ in rs]))))
    pre = [r for r in passes if r.prefill]
    if pre:
        def model_pre(r) -> float:
            padded = r.batch * r.query
            t = (L * (du.qkv_seconds(draft, padded) + du.ffn_seconds(draft, padded)
                      + du.prefill_attention_seconds(draft, r.batch, r.query)) + du.lm_head_seconds(draft, r.batch))
            if draft.feature_draft:
                t += du.matmul_seconds(2.0 * padded * draft.fc_params, padded, draft.b(draft.fc_params))
            return t
        rows.append(("draft prefill pass", float(np.median([r.end - r.start for r in pre])),
                     float(np.median([model_pre(r) for r in pre]))))
    return rows


if __name__ == "__main__":
    main()
