"""Side-by-side benchmark on the tiny pair, one run, same prompts: our policies against transformers.

    python tools/bench.py [--threads 1] [--gen-len 32] [--profile profiles/cpu-2core.yaml | --measure]

Runs, on the bundled 64 prompts with the same generation length each:
  - our runtime with the specoffload, offload-only, serial-spec and interleaved plans (each planned
    by the planner for this profile and the measured acceptance), each simulated before it runs;
  - transformers' own `generate` (greedy, batched with left padding) and with `assistant_model`
    (assisted generation, one prompt at a time as transformers requires).
Prints throughput (generated tokens / wall seconds, each sequence capped at its requested length),
ratios against our offload-only run, and for each of our policies the simulator's prediction
against the measurement with the error in %. The machine is shared and noisy: one untimed warm-up
run first, then every timed run is repeated --reps times in rotating order and the median is
reported with its spread ((max - min) / median); compare ratios within one run, not absolute
numbers across runs.
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
    from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

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
    print(f"tiny pair, {len(prompts)} prompts (mean {workload.prompt_len_tokens} tokens) -> {G} tokens each, "
          f"{args.threads} torch thread(s), profile {profile.name}; measured acceptance "
          f"{[round(a, 2) for a in workload.acceptance]}")
    requests = [Request(str(i), p, G) for i, p in enumerate(prompts)]
    runs = {}  # name -> (run() -> (tokens, seconds), simulated tok/s or None, plan summary)
    for policy in ("specoffload", "offload-only", "serial-spec", "interleaved"):
        plan = make_plan(profile, target_spec, draft_spec, workload, policy=policy).plan
        sim = simulate(plan, profile).report

        def ours(plan=plan) -> tuple[int, float]:
            done = []
            eng = Engine(plan, t_dir, d_dir)  # loading the checkpoints is not part of the run
            t0 = time.perf_counter()
            eng.run(requests, done.append)
            return sum(len(f.tokens) for f in done), time.perf_counter() - t0

        name = f"ours: {policy}" + (f" ({plan.policy})" if policy == "specoffload" else "")
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
    print(f"\n{'run':38}{'tok/s':>9}{'spread':>8}{'vs ours offload-only':>22}{'sim tok/s':>11}{'sim err':>9}  plan")
    for name, tps, spread, sim, what in rows:
        err = f"{100 * (sim - tps) / tps:+.0f}%" if sim else "-"
        print(f"{name:38}{tps:>9.1f}{100 * spread:>7.0f}%{tps / base:>21.2f}x{(f'{sim:.1f}' if sim else '-'):>11}"
              f"{err:>9}  {what}")
    print(f"\nload average (1 min) {load_before:.2f} before the timed runs, {os.getloadavg()[0]:.2f} after, on "
          f"{os.cpu_count()} CPUs")
    print(f"tok/s: median of {args.reps} timed run(s) after a warm-up; spread = (max - min) / median. "
          "sim err = (simulated - measured median) / measured median; the simulator and the planner share "
          "the cost model, so this is the cost model's error on this machine")


if __name__ == "__main__":
    main()
