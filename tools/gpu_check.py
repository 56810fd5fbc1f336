"""GPU validation with nothing to download: Mixtral-8x7B-shaped random weights on a card capped at 24 GB.

    python tools/gpu_check.py --out bench/results/gpu_check           # on a GPU machine (tools/gpu_check.sh)
    python tools/gpu_check.py --tiny --device cpu --out /tmp/gc       # a smoke run of the same path on a CPU

Steps: write random-weight checkpoints in HF format (a Mixtral-8x7B-shaped target with --layers of
its 32 layers, a Mistral-7B-shaped draft with --draft-layers of its 32); cap the GPU's memory
(--cap-gib, the paper's 24 GB card); profile the machine (quick); plan specoffload, offload-only,
serial-spec and interleaved for the job (each policy forced but specoffload; the offload-only plan
keeps no layer resident, so every layer's weights stream from host memory each pass, the baseline
this check exists to measure); simulate each plan; run each on our engine; run transformers with accelerate offload
(device_map="auto", max_memory) on the same prompts; print throughputs, ratios, the simulator's
prediction against the measurement, and the fraction of the physical bound. Right after the profile, a short
step (under a minute) measures the host attention's thread scaling on the machine's CPU cores against a copy and
a read-only baseline (tools/bench_cpu_attention.py --scaling; out/attention_scaling.txt, one summary line per
point in gpu_check.txt).

The "eagle" row plans and runs the same target with an EAGLE-shaped feature draft (the published
Mixtral-8x7B head's shapes: fc 2H -> H, one layer, 32 KV heads, FFN 14336) instead of the draft model,
on the best speculative plan for it (serial-spec or interleaved, whichever the planner predicts faster),
so the head runs even where the planner's own choice would be offload-only.

Random weights accept nothing, so our runs use a TIMING MODE: each draft token is kept with
probability --acceptance whatever it is, and every line printed says so. Outputs are meaningless;
the timings are what is measured.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

MIXTRAL = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
           "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "hidden_act": "silu", "torch_dtype": "bfloat16"}
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "bfloat16",
           "sliding_window": None}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": 1000}


def hf_accelerate(target: Path, prompts: list[list[int]], gen: int, cap_gib: float, device: torch.device) -> float:
    """transformers with accelerate offload (device_map=auto, max_memory): generated tokens per second."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch.bfloat16 if device.type == "cuda" else torch.float32}
    if device.type == "cuda":
        kw.update(device_map="auto", max_memory={0: f"{cap_gib:.0f}GiB", "cpu": "400GiB"})
    model = AutoModelForCausalLM.from_pretrained(target, **kw)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    first = next(model.parameters()).device
    t0 = time.perf_counter()
    out = model.generate(ids.to(first), attention_mask=mask.to(first), do_sample=False, max_new_tokens=gen,
                         min_new_tokens=gen, pad_token_id=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return (out.shape[1] - width) * len(prompts) / wall


def attention_scaling(out: Path, note, tiny: bool = False, contexts=None, batches=None, threads=None,
                      rounds: int | None = None, budget_s: float = 45.0, pool_bytes: int | None = None) -> list[dict]:
    """The host attention's thread scaling on this machine's CPU (tools/bench_cpu_attention.py's --scaling tables):
    copy, the read-only baseline and the host path at Q=1 over a bf16 cache, Mixtral heads, threads 1, 2, 4, 8
    and all usable cores less one (the engine's default), contexts 512 and 4096 x batches 32 and 256, uniform and
    ragged rows (--tiny: context 512, batch 32, one round). Each line goes through ``note`` and into
    out/attention_scaling.txt (the run's gpu_check.txt gets :func:`scaling_summary`'s lines); points that would
    start past ``budget_s`` seconds are skipped (said so)."""
    import importlib.util

    from specoffload.runtime.host_attention import usable_cores

    spec = importlib.util.spec_from_file_location("bench_cpu_attention", Path(__file__).with_name("bench_cpu_attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cores = usable_cores()
    threads = threads or sorted({t for t in (1, 2, 4, 8, cores - 1) if 1 <= t <= cores})
    contexts = contexts or ([512] if tiny else [512, 4096])
    batches = batches or ([32] if tiny else [32, 256])
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        note(line)

    rows = bench.scaling_table(threads, contexts, batches, rounds=rounds or (1 if tiny else 3),
                               min_s=0.01 if tiny else 0.03, say=say, budget_s=budget_s,
                               pool_bytes=pool_bytes or bench.POOL_BYTES)
    (out / "attention_scaling.txt").write_text("\n".join(lines) + "\n")
    return rows


def scaling_summary(rows: list[dict]) -> list[str]:
    """One line per point of :func:`attention_scaling`'s tables: each rate's speed-up from the fewest threads to the
    most, and the host path's GB/s at the most threads against the copy's and the read baseline's."""
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault((r["ctx"], r["batch"], r["rows"]), []).append(r)
    lines = []
    for (ctx, batch, kind), rs in points.items():
        lo, hi = min(rs, key=lambda r: r["threads"]), max(rs, key=lambda r: r["threads"])
        lines.append(f"host attention scaling (CPU, bf16, Q=1) ctx {ctx} batch {batch} {kind}: {lo['threads']} -> "
                     f"{hi['threads']} threads copy {hi['copy'] / lo['copy']:.2f}x, read {hi['read'] / lo['read']:.2f}x, "
                     f"host {hi['host'] / lo['host']:.2f}x; at {hi['threads']} host {hi['host']:.1f} GB/s = "
                     f"{hi['host'] / hi['copy']:.2f} of the copy, {hi['host'] / hi['read']:.2f} of the read")
    return lines


POLICIES = ("specoffload", "offload-only", "serial-spec", "interleaved")


def plans_for(profile, target, draft, work, say, eagle=None) -> dict:
    """{name: Plan} for each policy that fits. The offload-only plan is re-made with every layer streamed
    (the planner would keep what fits resident: at 4 layers on a 24 GB card, all of them). With `eagle`
    (a feature draft's spec), an "eagle" entry: the planner's best speculative plan (serial-spec or interleaved)
    with that head as the draft, so that the head runs even where the planner's own choice would not speculate."""
    from specoffload.planner.planner import PlanInfeasible, knobs_from_plan, make_plan, placement_from_plan
    from specoffload.planner.sim.scenario import plan_at

    plans = {}
    for policy in POLICIES:
        try:
            plan = make_plan(profile, target, None if policy == "offload-only" else draft, work, policy=policy).plan
        except PlanInfeasible as exc:
            say(f"{policy}: no plan fits: {exc}")
            continue
        if policy == "offload-only" and (plan.gpu_attn_layers or plan.gpu_ffn_layers):
            placement = dict(placement_from_plan(plan, target), attn_gpu=0.0, ffn_gpu=0.0)
            plan = plan_at(profile, target, None, work, knobs_from_plan(plan), placement,
                           notes=("offload-only with every layer streamed (gpu_check)",))
        plans[policy] = plan
    # The fused prefill on the device (the chunk on its own CUDA stream): offload-only with a batch of a quarter
    # of the job, so refill chunks ride in verifications.
    try:
        plan = make_plan(profile, target, None, work, policy="offload-only",
                         fixed={"fuse_prefill": True, "decode_batch": max(1, work.num_prompts // 4)}).plan
        plans["offload-only-fused"] = plan
    except PlanInfeasible as exc:
        say(f"offload-only-fused: no plan fits: {exc}")
    if eagle is not None:  # the best speculative plan: the head must run even where speculation would not pay
        best = None
        for policy in ("serial-spec", "interleaved"):
            try:
                plan = make_plan(profile, target, eagle, work, policy=policy).plan
            except PlanInfeasible as exc:
                say(f"eagle ({policy}): no plan fits: {exc}")
                continue
            if best is None or plan.prediction.throughput_tokens_per_s > best.prediction.throughput_tokens_per_s:
                best = plan
        if best is not None:
            plans["eagle"] = best
    return plans


def result_line(policy: str, plan, sim_tps: float, tps: float, tokens: int, wall: float) -> str:
    """One policy's line: measured, simulated, planned, and the fraction of the physical bound when the
    profile gives one (0 is written for an unbounded one)."""
    bound = plan.prediction.physical_bound_tokens_per_s
    line = (f"{policy} -> {plan.policy} b={plan.decode_batch}x{plan.num_batches} k={plan.draft_len} "
            f"resident attn/ffn layers {plan.gpu_attn_layers}/{plan.gpu_ffn_layers}: measured "
            f"{tps:.1f} tok/s ({tokens} tokens in {wall:.1f} s), simulated {sim_tps:.1f} "
            f"({100 * (sim_tps - tps) / tps:+.0f}%), planned {plan.prediction.throughput_tokens_per_s:.1f}; ")
    if bound and bound > 0:
        return line + f"{100 * tps / bound:.1f}% of the physical bound ({bound:.1f})"
    return line + "no finite physical bound"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench/results/gpu_check")
    ap.add_argument("--layers", type=int, default=4, help="Mixtral-8x7B layers kept (of 32)")
    ap.add_argument("--draft-layers", type=int, default=32, help="Mistral-7B layers kept (of 32)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="GPU memory cap (the paper's 24 GB card)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--acceptance", type=float, default=0.7, help="synthetic acceptance (timing mode)")
    ap.add_argument("--hf-prompts", type=int, default=16, help="prompts for the transformers+accelerate baseline")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run of the whole path)")
    args = ap.parse_args(argv)

    from specoffload.planner.models import load_model_spec
    from specoffload.planner.schema import Workload
    from specoffload.planner.sim import simulate
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.profiler.probes import ProfileConfig, run_profile
    from specoffload.runtime.random_checkpoint import write_random_checkpoint

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mode = f"[timing mode: synthetic acceptance {args.acceptance}, random weights]"
    log_lines: list[str] = []

    def say(line: str) -> None:
        print(f"{mode} {line}", flush=True)
        log_lines.append(f"{mode} {line}")

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total), device)
        say(f"{torch.cuda.get_device_name(device)}: memory capped at {args.cap_gib:.0f} GiB of {total / 2**30:.0f}")
    target_cfg = dict(MIXTRAL, num_hidden_layers=args.layers, **(TINY if args.tiny else {}))
    draft_cfg = dict(MISTRAL, num_hidden_layers=args.draft_layers, **(TINY if args.tiny else {}))
    t0 = time.perf_counter()
    tdir, ddir = out / "ckpt-target", out / "ckpt-draft"
    write_random_checkpoint(tdir, target_cfg, 0, device)
    write_random_checkpoint(ddir, draft_cfg, 1, device)
    # An EAGLE-shaped feature draft over the target: the published Mixtral-8x7B head's shapes (fc 2H -> H,
    # one layer with as many KV heads as query heads, dense FFN of the target's expert width), random weights.
    from specoffload.runtime.config import load_args
    from specoffload.runtime.feature_draft import write_random_head

    edir = out / "ckpt-eagle"
    targs = load_args(tdir)
    write_random_head(edir, targs, "eagle", seed=2, n_kv_heads=targs.n_heads, ffn_dim=targs.ffn_dim)
    target, draft = load_model_spec(str(tdir)), load_model_spec(str(ddir))
    eagle = load_model_spec(str(edir))
    say(f"checkpoints written in {time.perf_counter() - t0:.0f} s: {target.describe()}; draft {draft.describe()}")

    t0 = time.perf_counter()
    cfg = ProfileConfig.quick(model=target)
    profile = run_profile(cfg, device, name="gpu-check", progress=False).profile
    profile.save(out / "profile.yaml")
    say(f"profiled in {time.perf_counter() - t0:.0f} s -> {out / 'profile.yaml'} "
        f"(gpu memory {profile.gpu_mem_bytes / 2**30:.1f} GiB usable)")
    t0 = time.perf_counter()
    try:  # the CPU side of the host: attention thread scaling (a short step; the engine runs below never need it)
        rows = attention_scaling(out, lambda line: print(line, flush=True), tiny=args.tiny)
        say(f"host attention thread scaling in {time.perf_counter() - t0:.0f} s -> {out / 'attention_scaling.txt'}")
        for line in scaling_summary(rows):
            say(line)
    except Exception as exc:
        say(f"host attention thread scaling skipped: {type(exc).__name__}: {exc}")
    work = Workload(prompt_len_tokens=args.prompt_len, gen_len_tokens=args.gen_len, num_prompts=args.prompts,
                    acceptance=args.acceptance, acceptance_source="synthetic (timing mode)")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, target.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.prompts)]
    results = {}
    for policy, plan in plans_for(profile, target, draft, work, say, eagle=eagle).items():
        plan.save(out / f"plan-{policy}.yaml")
        sim = simulate(plan, profile).report
        eng = Engine(plan, tdir, (edir if policy == "eagle" else ddir) if plan.draft_len else None, device=device,
                     synthetic_acceptance=args.acceptance if plan.draft_len else None)
        done = []
        t0 = time.perf_counter()
        eng.run([Request(str(i), p, args.gen_len) for i, p in enumerate(prompts)], done.append)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tokens = sum(len(f.tokens) for f in done)
        tps = tokens / wall
        results[policy] = tps
        say(result_line(policy, plan, sim.throughput_tokens_per_s, tps, tokens, wall))
    try:
        hf = hf_accelerate(tdir, prompts[:args.hf_prompts], args.gen_len, args.cap_gib, device)
        results["transformers+accelerate"] = hf
        say(f"transformers + accelerate offload (batch {args.hf_prompts}): {hf:.1f} tok/s")
    except Exception as exc:  # the baseline is optional (accelerate may be missing)
        say(f"transformers + accelerate baseline skipped: {type(exc).__name__}: {exc}")
    base = results.get("offload-only")
    if base:
        for name, tps in results.items():
            if name != "offload-only":
                say(f"ratio {name} / offload-only: {tps / base:.2f}x")
    (out / "gpu_check.txt").write_text("\n".join(log_lines) + "\n")
    for p in (tdir, ddir, edir):  # the checkpoints are large and random: do not keep them
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
