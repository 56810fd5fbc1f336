"""The whole chain on the tiny model pair shipped in the package, on any machine, nothing to download.

    python tools/demo.py                 # uses the committed CPU profile (profiles/cpu-2core.yaml)
    python tools/demo.py --measure       # profile this machine first (quick mode, under a minute)

Steps, each the command a user would type (outputs under out/demo/):
  1. profile     the committed measured profile, or `specoffload-profile --quick`
  2. acceptance  `specoffload-profile --acceptance` on a sample of the bundled prompts -> workload.yaml
  3. plan        `specoffload-plan --model tiny-target --draft tiny-draft --workload ...`
  4. simulate    `specoffload-simulate plan.yaml`
  5. run         `specoffload-run plan.yaml --prompts <bundled 64 prompts>`
  6. a table of predicted (cost model), simulated and measured throughput, acceptance and busy fractions.
  7. the policies the planner did not choose, planned with --policy, simulated and run the same way:
     predicted against measured side by side, so the choice can be checked against what really ran.
  8. the feature draft `tiny-eagle` (an EAGLE-style head over the tiny target): its acceptance, its plan
     and its run, in the same table.
  9. the same prompts in one command, no plan file: `specoffload-run --model tiny-pair --prompts ... --ordered`
     (plans for the prompts on the profile, simulates, runs), its outputs checked against step 5's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "demo"
PROMPTS = ROOT / "runtime" / "assets" / "demo_prompts.jsonl"


#: module each step runs -> the command a user types (installed by `pip install`)
COMMANDS = {"specoffload.runtime.profile_cli": "specoffload-profile", "specoffload.planner.cli": "specoffload-plan",
            "specoffload.planner.sim.cli": "specoffload-simulate", "specoffload.runtime.run_cli": "specoffload-run"}


def shown(module: str, args: tuple[str, ...]) -> str:
    """The command line as a user would type it from the repository root (paths made relative)."""
    def rel(a: str) -> str:
        try:
            return str(Path(a).relative_to(ROOT)) if Path(a).is_absolute() else a
        except ValueError:
            return a
    return shlex.join([COMMANDS[module], *map(rel, args)])


def step(title: str, module: str, *args: str, quiet: bool = False) -> None:
    print(f"\n== {title}\n$ {shown(module, args)}", flush=True)
    cmd = (module, *args)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=quiet, text=True)
    if proc.returncode != 0:
        if quiet:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        sys.exit(f"demo: step '{title}' failed (exit {proc.returncode})")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="profile this machine instead of using the committed profile")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for profiling and running (default 1: the tiny pair's ops are too small to "
                         "gain from more, and a busy machine makes more threads wait on each other)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    profile = str(ROOT / "profiles" / "cpu-2core.yaml")
    if args.measure:
        profile = str(OUT / "profile.yaml")
        step("1. profile this machine", "specoffload.runtime.profile_cli", "--quick", "--threads", str(args.threads),
             "-o", profile)
    else:
        print(f"== 1. profile: {profile} (measured on a 2-core machine; --measure profiles this one)")
    workload = str(OUT / "workload.yaml")
    step("2. acceptance of the tiny pair on a sample of the bundled prompts", "specoffload.runtime.profile_cli",
         "--acceptance", "--target", "tiny-target", "--draft", "tiny-draft", "--prompts", str(PROMPTS),
         "-k", "6", "--max-new-tokens", str(args.gen_len), "--sample", "16", "-o", workload)
    plan = str(OUT / "plan.yaml")
    step("3. plan", "specoffload.planner.cli", "--model", "tiny-target", "--draft", "tiny-draft", "--profile", profile,
         "--workload", workload, "-o", plan)
    sim = str(OUT / "simulated.yaml")
    step("4. simulate", "specoffload.planner.sim.cli", plan, "--profile", profile, "--report", sim)
    run = str(OUT / "measured.yaml")
    step("5. run", "specoffload.runtime.run_cli", plan, "--prompts", str(PROMPTS), "--output", str(OUT / "out.jsonl"),
         "--profile", profile, "--report", run, "--trace", str(OUT / "trace.json"), "--threads", str(args.threads))

    from specoffload.planner.schema import Plan
    from specoffload.planner.sim import Report

    p, s, m = Plan.load(plan), Report.load(sim), Report.load(run)
    rows = [
        ("throughput end to end (tok/s)", "throughput_tokens_per_s"),
        ("throughput decode only (tok/s)", "decode_tokens_per_s"),
        ("time total (s)", "total_seconds"),
        ("tokens per verification", "acceptance.tokens_per_round"),
        ("busy gpu (device compute)", "busy_fraction.gpu"),
        ("busy cpu attention", "busy_fraction.cpu"),
    ]
    from specoffload.planner.sim.report import figures

    fs, fm = figures(s), figures(m)
    print(f"\n== 6. {p.policy} plan, batch {p.decode_batch}x{p.num_batches}, k={p.draft_len}, on the tiny pair "
          f"({m.sequences} prompts, {m.generated_tokens} tokens)")
    print(f"{'':34}{'predicted':>11}{'simulated':>11}{'measured':>11}{'meas/pred':>11}")
    for label, key in rows:
        pred, sv, mv = m.predicted.get(key, float('nan')), fs.get(key, float('nan')), fm.get(key, float('nan'))
        ratio = f"{mv / pred:.2f}" if pred else "-"
        print(f"{label:34}{pred:>11.3f}{sv:>11.3f}{mv:>11.3f}{ratio:>11}")
    acc = ", ".join(f"{a:.2f}" for a in m.acceptance.per_position)
    print(f"measured acceptance per position: [{acc}]")
    print(f"outputs: {OUT / 'out.jsonl'}; reports: {sim}, {run}; trace: {OUT / 'trace.json'} (ui.perfetto.dev)")

    # 7. The other policies, each planned, simulated and run the same way (outputs under out/demo/<policy>/).
    results = [(p.policy + " (chosen)", p, m)]
    for policy in [x for x in ("offload-only", "serial-spec", "interleaved") if x != p.policy]:
        d = OUT / policy
        d.mkdir()
        alt = str(d / "plan.yaml")
        step(f"7. the {policy} policy: plan", "specoffload.planner.cli", "--model", "tiny-target",
             "--draft", "tiny-draft", "--profile", profile, "--workload", workload, "--policy", policy, "-o", alt,
             quiet=True)
        step(f"   {policy}: simulate, then run", "specoffload.runtime.run_cli", alt, "--prompts", str(PROMPTS), "--output",
             str(d / "out.jsonl"), "--profile", profile, "--report", str(d / "measured.yaml"), "--threads",
             str(args.threads), "--quiet", quiet=True)
        results.append((policy, Plan.load(alt), Report.load(d / "measured.yaml")))
    # 8. The feature draft (tiny-eagle, an EAGLE-style head over the tiny target): its own acceptance, then
    # planned (speculative) and run the same way, beside the draft-model policies.
    d = OUT / "tiny-eagle"
    d.mkdir()
    wl_e = str(d / "workload.yaml")
    step("8. the feature draft tiny-eagle: acceptance", "specoffload.runtime.profile_cli", "--acceptance", "--target",
         "tiny-target", "--draft", "tiny-eagle", "--prompts", str(PROMPTS), "-k", "6", "--max-new-tokens",
         str(args.gen_len), "--sample", "16", "-o", wl_e, quiet=True)
    alt = str(d / "plan.yaml")
    step("   tiny-eagle: plan", "specoffload.planner.cli", "--model", "tiny-target", "--draft", "tiny-eagle",
         "--profile", profile, "--workload", wl_e, "-o", alt, quiet=True)
    if Plan.load(alt).policy == "offload-only":  # the planner declined: show the best speculative plan anyway
        step("   tiny-eagle: plan (serial-spec)", "specoffload.planner.cli", "--model", "tiny-target", "--draft",
             "tiny-eagle", "--profile", profile, "--workload", wl_e, "--policy", "serial-spec", "-o", alt, quiet=True)
    step("   tiny-eagle: run", "specoffload.runtime.run_cli", alt, "--prompts", str(PROMPTS), "--output",
         str(d / "out.jsonl"), "--profile", profile, "--report", str(d / "measured.yaml"), "--threads",
         str(args.threads), "--quiet", quiet=True)
    pe = Plan.load(alt)
    results.append((f"{pe.policy}, tiny-eagle", pe, Report.load(d / "measured.yaml")))

    print(f"\n== the three policies with the draft model, and the feature draft, on this machine "
          f"({m.sequences} prompts, each run once, cold)")
    print(f"{'policy':24}{'plan':>16}{'predicted tok/s':>17}{'measured':>10}{'meas/pred':>11}"
          f"{'tokens/verif pred':>19}{'meas':>7}")
    for name, pl, rep in results:
        pred = rep.predicted.get("throughput_tokens_per_s", float("nan"))
        tpv = rep.predicted.get("acceptance.tokens_per_round", float("nan"))
        print(f"{name:24}{f'b={pl.decode_batch}x{pl.num_batches} k={pl.draft_len}':>16}{pred:>17.1f}"
              f"{rep.throughput_tokens_per_s:>10.1f}{rep.throughput_tokens_per_s / pred:>11.2f}{tpv:>19.2f}"
              f"{rep.acceptance.tokens_per_round:>7.2f}")
    best = max(results, key=lambda r: r[2].throughput_tokens_per_s)[0]
    print(f"fastest measured: {best}. The machine is shared and noisy: tools/bench.py repeats each run and reports "
          "medians.")

    # 9. One command, no plan file: the profile, a plan for these prompts, the simulation and the run.
    d = OUT / "one-shot"
    d.mkdir()
    step("9. the same prompts in one command (no plan file: planned for them, simulated, run)",
         "specoffload.runtime.run_cli", "--model", "tiny-pair", "--prompts", str(PROMPTS), "--output",
         str(d / "out.jsonl"), "--max-tokens", str(p.workload.gen_len_tokens), "--profile", profile, "--ordered",
         "--threads", str(args.threads), "--quiet")
    import json

    def tokens(path: Path) -> dict:
        return {o["id"]: o["tokens"] for o in map(json.loads, path.read_text().splitlines())}

    one, planned = tokens(d / "out.jsonl.ordered.jsonl"), tokens(OUT / "out.jsonl")
    same = sum(one[i] == planned.get(i) for i in one)
    print(f"one-shot outputs (greedy) equal to step 5's, token for token: {same} of {len(one)}; in input order: "
          f"{d / 'out.jsonl.ordered.jsonl'}")
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
