"""The planner's prediction for Mixtral-8x7B with a feature draft (eagle-mixtral-8x7b) against the best
offload-only plan and against a Mistral-7B draft, on each spec-sheet hardware preset.

Predictions on spec-sheet figures (no measurement): every policy planned at its best knobs, end-to-end
tokens/s (prefill included), 20000 prompts, 128 generated tokens, the acceptance given (per position).

    python tools/bench_eagle.py [--acceptance 0.7] [--prompt-lens 77,512] [--num-prompts 20000]
"""
from __future__ import annotations

import argparse
import time

from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import PlanInfeasible, make_plan
from specoffload.planner.schema import Workload, load_profile

PROFILES = ["rtx4090-pcie3", "rtx4090-pcie4", "l4", "t4", "h200-24g"]


def best(profile, target, draft, w, policy):
    try:
        r = make_plan(profile, target, draft, w, policy=policy)
    except PlanInfeasible:
        return None
    return r.plan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--acceptance", type=float, default=0.7)
    ap.add_argument("--prompt-lens", default="77,512")
    ap.add_argument("--num-prompts", type=int, default=20000)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    a = ap.parse_args(argv)
    target = load_model_spec("mixtral-8x7b")
    eagle, mistral = load_model_spec("eagle-mixtral-8x7b"), load_model_spec("mistral-7b")
    print(f"Mixtral-8x7B, {a.num_prompts} prompts, {a.gen_len} generated, acceptance {a.acceptance} "
          "(predicted end-to-end tok/s, best plan of each kind)\n")
    print("| profile, prompt | offload-only | mistral-7b draft | eagle-mixtral-8x7b | eagle vs offload-only |"
          " eagle plan |")
    print("|---|---|---|---|---|---|")
    t0 = time.time()
    for name in a.profiles.split(","):
        prof = load_profile(name)
        for plen in [int(x) for x in a.prompt_lens.split(",")]:
            w = Workload(prompt_len_tokens=plen, gen_len_tokens=a.gen_len, num_prompts=a.num_prompts,
                         acceptance=a.acceptance)
            off = best(prof, target, None, w, "offload-only")
            spec_m = best(prof, target, mistral, w, "specoffload")
            spec_e = best(prof, target, eagle, w, "specoffload")
            tp = lambda p: p.prediction.throughput_tokens_per_s if p else float("nan")  # noqa: E731
            ratio = tp(spec_e) / tp(off) if off and spec_e else float("nan")
            how = (f"{spec_e.policy}, b={spec_e.decode_batch}x{spec_e.num_batches}, k={spec_e.draft_len}, "
                   f"draft KV {spec_e.draft_kv}") if spec_e else "infeasible"
            print(f"| {name}, {plen} | {tp(off):.0f} | {tp(spec_m):.0f} ({spec_m.policy if spec_m else '-'}) | "
                  f"{tp(spec_e):.0f} | {ratio:.2f}x | {how} |", flush=True)
    print(f"\nplanned in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
