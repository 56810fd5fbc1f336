"""specoffload-simulate: check a plan before running it, and ask hardware what-ifs."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ..models import load_model_spec
from ..schema import Plan, fingerprint
from ..strict import SchemaError
from .report import format_report
from .simulator import SimOptions, resolve_profile, simulate
from .sweep import parse_sweep, parse_value, plot, progress_log, run_sweep, write_csv

EXAMPLE = """\
example (Mixtral-8x7B with a Mistral-7B draft on an RTX 4090, PCIe Gen4):
  specoffload-plan --model mixtral --draft mistral-7b --profile rtx4090-pcie4 \\
      --prompt-len 512 --gen-len 128 --num-prompts 2000 --acceptance 0.7 -o plan.yaml
  specoffload-simulate plan.yaml --trace trace.json --report report.yaml
      prints simulated vs predicted throughput, busy fractions, peak memory per pool, acceptance;
      open trace.json in https://ui.perfetto.dev (tracks gpu, h2d, d2h, cpu-attn, memory counters)
  specoffload-simulate plan.yaml --set h2d_bytes_per_s=50e9 --set gpu_mem_bytes=48e9
      the same plan on a PCIe Gen5 machine with a 48 GB card
  specoffload-simulate plan.yaml --sweep h2d_bytes_per_s+d2h_bytes_per_s=12.6e9,25.2e9,50.4e9 \\
      --replan all --draft mistral-7b --csv pcie.csv --plot pcie.png
      re-plan and simulate every policy at PCIe Gen3, Gen4 and Gen5 bandwidth (both directions)
  specoffload-simulate plan.yaml --sweep gpu_mem_bytes=16e9:48e9:5 --sweep h2d_bytes_per_s=12e9:64e9:4 --replan
  specoffload-simulate plan.yaml --set disk_read_bytes_per_s=6e9
      a plan with layers on disk (specoffload-plan --host-mem-limit) with a second NVMe drive (the disk
      tier's reads show on the trace's disk track)

exit status: 0 the plan runs; 1 the simulation rejects it (a memory pool overflows, a deadlock, a
sequence that never finishes; the reason is printed); 2 bad input.
"""


_DEFAULTS = SimOptions()  # the CLI's defaults are the options' own


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="specoffload-simulate",
        description="Simulate a plan event by event (weight stream, GPU, copy engines, CPU attention, memory "
                    "pools) with the planner's cost model; compare with the plan's prediction; what-ifs.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", help="plan.yaml written by specoffload-plan")
    ap.add_argument("--profile", help="simulate on this profile (YAML path or shipped name) instead of the plan's")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a profile field (repeatable); aliases h2d_bytes_per_s, d2h_bytes_per_s, "
                         "gpu_flops_per_s set the whole curve to a constant")
    ap.add_argument("--seed", type=int, default=_DEFAULTS.seed, help=f"acceptance draws (default {_DEFAULTS.seed})")
    ap.add_argument("--context", choices=("live", "average"), default=_DEFAULTS.context,
                    help="durations at each verification's live contexts (default) or at the cost model's "
                         "average context")
    ap.add_argument("--copy-chunk-bytes", type=float, default=_DEFAULTS.weight_chunk_bytes, metavar="BYTES",
                    help="granularity at which a weight copy yields the copy engine to an activation transfer "
                         f"(default {_DEFAULTS.weight_chunk_bytes / 2**20:g} MiB; e.g. 117e6 for whole Mixtral "
                         "expert matrices)")
    ap.add_argument("--trace", metavar="PATH", help="write a Chrome trace (JSON; opens in Perfetto)")
    ap.add_argument("--trace-slots", type=int, default=_DEFAULTS.trace_slots, metavar="N",
                    help=f"trace the tasks of the first N passes (default {_DEFAULTS.trace_slots}; memory counters "
                         "cover the whole run)")
    ap.add_argument("--report", metavar="PATH", help="write the report as YAML")
    ap.add_argument("--sweep", action="append", default=[], metavar="FIELD=START:STOP:N",
                    help="sweep a profile field (or FIELD=V1,V2,..., or a+b=... for several fields); twice "
                         "for a grid")
    ap.add_argument("--replan", nargs="?", const="own", choices=("own", "all"),
                    help="with --sweep: re-plan at each point with the plan's policy (own, the default) or "
                         "every policy (all)")
    ap.add_argument("--draft", metavar="MODEL",
                    help="with --replan: the draft model to plan with (a plan where offload-only won names none)")
    ap.add_argument("--csv", default="whatif.csv", metavar="PATH", help="sweep table (default whatif.csv)")
    ap.add_argument("--plot", default="whatif.png", metavar="PATH", help="sweep plot (default whatif.png)")
    ap.add_argument("--quiet", action="store_true", help="no progress output")
    return ap


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SchemaError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except SchemaError as exc:
        print("specoffload-simulate: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specoffload-simulate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _run(args) -> int:
    plan = Plan.load(args.plan)
    profile = resolve_profile(plan, args.profile)
    notes = []
    if args.profile is None and fingerprint(profile) != plan.profile_fingerprint:
        notes.append(f"profile '{profile.name}' has changed since the plan was made (fingerprint "
                     f"{fingerprint(profile)}, plan says {plan.profile_fingerprint})")
    if args.set:
        profile = profile.with_overrides(_overrides(args.set), source="--set")
    what_if = args.profile is not None or bool(args.set)
    options = SimOptions(seed=args.seed, context=args.context, trace=bool(args.trace), trace_slots=args.trace_slots,
                         progress=not args.quiet, weight_chunk_bytes=args.copy_chunk_bytes)
    if args.replan and not args.sweep:
        raise SchemaError("--replan needs --sweep")
    if args.draft and not args.replan:
        raise SchemaError("--draft is for re-planning (--sweep ... --replan)")
    draft = load_model_spec(args.draft) if args.draft else None
    if args.replan == "all" and draft is None and not plan.draft:
        raise SchemaError("--replan all: this plan has no draft model (the planner chose offload-only); "
                          "name one with --draft, e.g. --draft mistral-7b")
    if args.sweep:
        axes = [parse_sweep(s) for s in args.sweep]
        if len(axes) > 2:
            raise SchemaError("--sweep: give one or two fields")
        rows = run_sweep(plan, profile, axes, args.replan,
                         SimOptions(seed=args.seed, context=args.context, weight_chunk_bytes=args.copy_chunk_bytes),
                         log=None if args.quiet else progress_log, draft=draft)
        write_csv(rows, args.csv)
        print(f"wrote {args.csv} ({len(rows)} rows)")
        title = (f"{plan.model}{' + ' + plan.draft if plan.draft else ''} on {profile.name}, "
                 f"{plan.workload.num_prompts} prompts x {plan.workload.gen_len_tokens} tokens"
                 + (" (re-planned)" if args.replan else f" ({plan.policy} plan)"))
        if plot(rows, axes, args.plot, title):
            print(f"wrote {args.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install 'specoffload[plot]')")
        bad = [r for r in rows if not r.get("feasible")]
        return 0 if len(bad) < len(rows) else 1
    result = simulate(plan, profile, options)
    report = result.report
    if notes or what_if:
        if what_if:
            notes.append(f"what-if: 'predicted' is the cost model for this plan on the modified profile; the plan's "
                         f"own prediction ({plan.profile}) was {plan.prediction.throughput_tokens_per_s:.1f} tok/s")
        report = dataclasses.replace(report, notes=report.notes + tuple(notes))
    print(format_report(report))
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}")
    if args.trace and result.trace is not None:
        result.trace.write(args.trace)
        print(f"wrote {args.trace} (open in https://ui.perfetto.dev)")
    if result.problems:
        for problem in result.problems:
            print(f"INFEASIBLE ({problem.kind}): {problem.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
