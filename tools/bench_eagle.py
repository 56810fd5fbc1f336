"""The planner's prediction for Mixtral-8x7B with a feature draft (eagle-mixtral-8x7b) against the best
offload-only plan and against a Mistral-7B draft, on each spec-sheet hardware preset.

Predictions on spec-sheet figures (no measurement): every policy planned at its best knobs, end-to-end
tokens/s (prefill included), 20000 prompts, 128 generated tokens, the acceptance given (per position).
The eagle plan and the best offload-only plan are also simulated event by event (planner/sim, the
same cost model; acceptance drawn per sequence, seed 0): "planned / simulated" in each cell. Every
policy may fuse its refill chunks into verifications (`--fuse-prefill auto`): "(fused)" and "prefill
fused" mark the plans that do.

    python tools/bench_eagle.py [--acceptance 0.7] [--prompt-lens 77,512] [--num-prompts 20000] [--no-simulate]
"""
from __future__ import annotations

import argparse
import time

from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import PlanInfeasible, make_plan
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import SimOptions, simulate

PROFILES = ["rtx4090-pcie3", "rtx4090-pcie4", "l4", "t4", "h200-24g"]


def best(profile, target, draft, w, policy):
    try:
        r = make_plan(profile, target, draft, w, policy=policy)
    except PlanInfeasible:
        return None
    return r.plan


def fused(plan) -> str:
    """', prefill fused (bp N)' for a plan whose refill chunks ride in verifications, else ''."""
    return f", prefill fused (bp {plan.prefill_batch})" if plan.fuse_prefill else ""


def simulated(plan, prof) -> float:
    """End-to-end tok/s of the plan's simulation (nan when it does not finish)."""
    if plan is None:
        return float("nan")
    res = simulate(plan, prof, SimOptions(seed=0))
    return res.report.throughput_tokens_per_s if res.ok else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="example: python tools/bench_eagle.py --profiles rtx4090-pcie3,l4 --prompt-lens 512")
    ap.add_argument("--acceptance", type=float, default=0.7)
    ap.add_argument("--prompt-lens", default="77,512")
    ap.add_argument("--num-prompts", type=int, default=20000)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--no-simulate", action="store_true", help="planned figures only (seconds instead of minutes)")
    a = ap.parse_args(argv)
    target = load_model_spec("mixtral-8x7b")
    eagle, mistral = load_model_spec("eagle-mixtral-8x7b"), load_model_spec("mistral-7b")
    sim = not a.no_simulate
    what = "planned / simulated" if sim else "planned"
    print(f"Mixtral-8x7B, {a.num_prompts} prompts, {a.gen_len} generated, acceptance {a.acceptance} "
          f"(end-to-end tok/s, best plan of each kind; {what})\n")
    print(f"| profile, prompt | offload-only ({what}) | mistral-7b draft (planned) | eagle-mixtral-8x7b ({what}) | "
          f"eagle vs offload-only ({what}) | eagle plan |")
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
                   f"draft KV {spec_e.draft_kv}" + (f", {spec_e.disk_layers} layers on disk" if spec_e.disk_layers
                                                     else "") + fused(spec_e)) if spec_e else "infeasible"
            off_cell, e_cell, gain = f"{tp(off):.0f}", f"{tp(spec_e):.0f}", f"{ratio:.2f}x"
            if off is not None and off.fuse_prefill:
                off_cell += " (fused)"
            if sim:
                s_off, s_e = simulated(off, prof), simulated(spec_e, prof)
                off_cell += f" / {s_off:.0f}"
                e_cell += f" / {s_e:.0f}"
                gain += f" / {s_e / s_off:.2f}x"
            print(f"| {name}, {plen} | {off_cell} | {tp(spec_m):.0f} ({spec_m.policy if spec_m else '-'}) | "
                  f"{e_cell} | {gain} | {how} |", flush=True)
    print(f"\n{'planned and simulated' if sim else 'planned'} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
