"""specoffload-plan: choose batch sizes, draft length and placement for a job; write plan.yaml."""
from __future__ import annotations

import argparse
import sys

from .models import DTYPE_BYTES, load_model_spec, with_dtype
from .planner import DEFAULT_MAX_DRAFT_LEN, PLAN_POLICIES, Candidate, PlanResult, make_plan
from .schema import Workload, load_profile
from .strict import SchemaError

GiB = 2**30
_DEFAULT_ACCEPTANCE = Workload.__dataclass_fields__["acceptance"].default  # the workload's own default

EXAMPLE = """example:
  specoffload-plan --model mixtral --draft mistral-7b --profile profiles/rtx4090-pcie4.yaml \\
      --prompt-len 512 --gen-len 128 --num-prompts 2000 --acceptance 0.7 -o plan.yaml

  specoffload-plan --model mixtral-8x22b --draft mistral-7b --profile rtx4090-pcie3 \\
      --prompt-len 512 --gen-len 64 --num-prompts 400 --host-mem-limit 200 --explain

  --host-mem-limit caps host memory; layers that do not fit are read from the checkpoint on disk every
  sweep at the profile's disk_read_bytes_per_s (measure it: specoffload-profile --disk DIR).
  --model/--draft take a preset (mixtral-8x7b, mixtral-8x22b, mistral-7b, llama-3-70b, llama-3.2-1b,
  tiny-target, tiny-draft) or an HF config.json / model folder. --profile takes a YAML path or the
  name of a shipped profile (rtx4090-pcie3, rtx4090-pcie4, l4, t4, h200-24g, ...).
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="specoffload-plan", description=__doc__, epilog=EXAMPLE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="target model: preset name or HF config path")
    ap.add_argument("--draft", default=None, help="draft model (omit for offload-only)")
    ap.add_argument("--profile", default=None, help="hardware profile YAML or shipped profile name")
    ap.add_argument("--cluster", default=None, metavar="PROFILE:NODES[xENGINES],...",
                    help="plan one job for a cluster instead of --profile: a plan per kind of node, the prompts split "
                         "by predicted speed (e.g. rtx4090-pcie4:16, or rtx4090-pcie4:12,l4:4x2)")
    ap.add_argument("--workload", default=None, help="workload YAML (e.g. from specoffload-profile --acceptance)")
    ap.add_argument("--prompt-len", type=int, help="prompt length in tokens")
    ap.add_argument("--max-prompt-len", type=int, default=None,
                    help="longest prompt in tokens (default: --prompt-len); the run sizes its KV cache for it")
    ap.add_argument("--gen-len", type=int, help="tokens to generate per prompt")
    ap.add_argument("--num-prompts", type=int, help="number of prompts in the job")
    ap.add_argument("--acceptance", type=float, default=None,
                    help=f"assumed per-token acceptance of the draft (default {_DEFAULT_ACCEPTANCE} when no --workload)")
    ap.add_argument("--policy", default="specoffload", choices=PLAN_POLICIES,
                    help="specoffload (default) picks the best of the other three")
    ap.add_argument("--max-draft-len", type=int, default=DEFAULT_MAX_DRAFT_LEN,
                    help=f"longest draft length k the planner considers (default {DEFAULT_MAX_DRAFT_LEN}; fewer if "
                         "the context is short)")
    ap.add_argument("--batch", type=int, default=None, help="pin the decode batch (sequences per batch)")
    ap.add_argument("--draft-len", type=int, default=None, help="pin the draft length k")
    ap.add_argument("--micro-batches", type=int, default=None, help="pin the micro-batch count")
    ap.add_argument("--fuse-prefill", default="auto", choices=("auto", "on", "off"),
                    help="prefill chunks of refills inside the next verification's weight sweep (on), on sweeps of "
                         "their own (off), or whichever the planner predicts faster (auto, the default); one-batch "
                         "policies only (the interleaved policy never fuses)")
    ap.add_argument("--dtype", default=None, choices=tuple(DTYPE_BYTES),
                    help="compute dtype of the run (weights and KV are sized in it; default: the checkpoint's 2 bytes "
                         "per element, as bf16 on a GPU)")
    ap.add_argument("--host-mem-limit", type=float, default=None, metavar="GIB",
                    help="host memory (GiB, pinned included) the plan may use, below the profile's; layers that do "
                         "not fit are read from disk every sweep (the disk tier)")
    ap.add_argument("-o", "--output", default=None, help="where to write the plan (YAML)")
    ap.add_argument("--explain", action="store_true", help="also show the best alternatives and why they lost")
    return ap.parse_args(argv)


def build_workload(args: argparse.Namespace) -> Workload:
    if args.workload:
        w = Workload.load(args.workload)
        changes = {k: v for k, v in (("prompt_len_tokens", args.prompt_len), ("gen_len_tokens", args.gen_len),
                                     ("num_prompts", args.num_prompts), ("acceptance", args.acceptance),
                                     ("max_prompt_len_tokens", args.max_prompt_len))
                   if v is not None}
        if args.prompt_len is not None and args.max_prompt_len is None and w.max_prompt_len < args.prompt_len:
            changes["max_prompt_len_tokens"] = 0  # the file's longest prompt is shorter than the new mean
        if changes:
            import dataclasses
            if "acceptance" in changes:
                changes["acceptance_source"] = "assumed (--acceptance)"
            try:
                w = dataclasses.replace(w, **changes)
            except ValueError as exc:
                raise SchemaError(f"workload: {exc}") from None
        return w
    missing = [f"--{n}" for n, v in (("prompt-len", args.prompt_len), ("gen-len", args.gen_len),
                                     ("num-prompts", args.num_prompts)) if v is None]
    if missing:
        raise SchemaError(f"give {', '.join(missing)} (or a --workload file)")
    try:
        return Workload(prompt_len_tokens=args.prompt_len, gen_len_tokens=args.gen_len, num_prompts=args.num_prompts,
                        max_prompt_len_tokens=args.max_prompt_len or 0,
                        acceptance=_DEFAULT_ACCEPTANCE if args.acceptance is None else args.acceptance,
                        acceptance_source="assumed" if args.acceptance is None else "assumed (--acceptance)")
    except ValueError as exc:
        raise SchemaError(f"workload: {exc}") from None


def gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def describe_candidate(c: Candidate) -> str:
    k = c.knobs
    kv = f", draft KV {k.draft_kv}" + (f" (sub-batch {k.draft_sub_batch})" if k.draft_kv == "recompute" else "") \
        if k.speculative else ""
    return (f"{k.policy:<12} batch {k.decode_batch}x{k.num_batches}, k={k.draft_len}, micro-batches "
            f"{k.micro_batches}, prefill {k.prefill_batch}{' fused' if k.fuse_prefill else ''}{kv}")


def summary(result: PlanResult, requested: str, explain: bool) -> str:
    plan, pr = result.plan, result.plan.prediction
    w = plan.workload
    acc = w.acceptance if not isinstance(w.acceptance, tuple) else "[" + ", ".join(f"{a:.2f}" for a in w.acceptance) + "]"
    lines = [
        f"plan: {plan.model}" + (f" + draft {plan.draft}" if plan.draft else "") + f" on profile {plan.profile}",
        f"workload: {w.num_prompts} prompts x {w.prompt_len_tokens} tokens -> {w.gen_len_tokens} generated; "
        f"acceptance {acc} ({w.acceptance_source})",
        f"policy: {plan.policy}" + (f" (requested {requested})" if requested != plan.policy else ""),
        f"knobs: decode batch {plan.decode_batch} x {plan.num_batches} batch(es) = {plan.sequences_in_flight} in flight, "
        f"prefill batch {plan.prefill_batch}, draft length {plan.draft_len}, micro-batches {plan.micro_batches}"
        + (f", draft KV {plan.draft_kv} (sub-batch {plan.draft_sub_batch})" if plan.draft_len else ""),
        f"placement: attention weights resident in {plan.gpu_attn_layers} of {result.num_layers} layers, FFN/experts "
        f"in {plan.gpu_ffn_layers}; target KV on GPU for {plan.gpu_kv_sequences} of {plan.decode_batch} sequences "
        f"per batch; target attention on {plan.target_attention}; {plan.weight_buffers} weight buffers"
        + (f"; {plan.disk_layers} of {result.num_layers} layers read from disk every sweep "
           f"({gib(pr.disk_bytes_per_sweep)} per sweep)" if plan.disk_layers else ""),
        f"predicted throughput: {pr.throughput_tokens_per_s:.2f} tok/s end to end, {pr.decode_tokens_per_s:.2f} tok/s "
        f"decode only (prefill {pr.prefill_seconds:.1f} s + decode {pr.decode_seconds:.1f} s = {pr.total_seconds:.1f} s)",
        f"decode slot: {pr.slot_seconds:.4g} s for {pr.expected_tokens_per_round:.2f} tokens per sequence per "
        f"verification; {pr.slots:.0f} slots ({pr.tail_slots:.1f} of them tail); binding: {pr.binding}",
        *([f"fused prefill: {pr.fused_passes:.0f} of the {pr.slots:.0f} verifications also prefill a chunk of "
           f"{plan.prefill_batch} prompts in their weight sweep ({pr.fused_seconds:.4g} s each, against "
           f"{pr.slot_seconds:.4g} s without); one chunk on a sweep of its own ({pr.prefill_seconds:.1f} s)"]
          if plan.fuse_prefill else []),
        "busy per slot: " + ", ".join(f"{r} {s:.4g} s ({100 * s / pr.slot_seconds:.0f}%)"
                                      for r, s in pr.busy_seconds_per_slot.items()),
        "memory peak / capacity: " + ", ".join(
            f"{t} {gib(pr.peak_mem_bytes[t])} / {gib(pr.capacity_bytes[t]) if pr.capacity_bytes[t] else 'shared'}"
            for t in pr.peak_mem_bytes),
        f"physical bound: {pr.physical_bound_tokens_per_s:.1f} tok/s (in-flight capacity x E[tokens] per "
        f"weight sweep at peak H2D); this plan reaches {100 * pr.bound_fraction:.1f}% of it",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"planned in {result.seconds:.2f} s: {result.candidates} candidates, {result.lp_solves} LP solves")
    if explain:
        if plan.disk_layers:
            bind = ("the disk is the binding resource of the decode slot" if pr.binding == "disk" else
                    f"the disk is not the binding resource ({pr.binding} is); its "
                    f"{pr.busy_seconds_per_slot.get('disk', 0):.4g} s per slot hides under it")
            lines.append(f"disk tier: {bind}")
        lines.append("alternatives (best first) and why they lost:")
        best = result.best_by_policy[plan.policy]
        for c in result.alternatives:
            p = c.prediction
            loss = 100 * (1 - c.throughput / best.throughput)
            disk = round(c.placement.get("disk", 0.0) * result.num_layers)
            lines.append(f"  {describe_candidate(c)}{f', {disk} layers on disk' if disk else ''}: {c.throughput:.2f} tok/s ({loss:.1f}% lower); slot {p.slot_seconds:.4g} s "
                         f"bound by {p.binding} for {p.expected_tokens_per_round:.2f} tokens/sequence, prefill "
                         f"{p.prefill_seconds:.0f} s, tail {p.tail_slots:.1f} slots")
    return "\n".join(lines)


def check_args(args: argparse.Namespace) -> None:
    """Knob values the planner cannot take, refused before any work (each names the flag and the fix)."""
    from pathlib import Path

    if args.output and Path(args.output).is_dir():
        raise SchemaError(f"-o {args.output} is a directory; give a file name, e.g. {Path(args.output) / 'plan.yaml'}")
    for flag, value, low in (("--batch", args.batch, 1), ("--micro-batches", args.micro_batches, 1),
                             ("--draft-len", args.draft_len, 0), ("--max-draft-len", args.max_draft_len, 1),
                             ("--prompt-len", args.prompt_len, 1), ("--max-prompt-len", args.max_prompt_len, 1),
                             ("--gen-len", args.gen_len, 1), ("--num-prompts", args.num_prompts, 1)):
        if value is not None and value < low:
            raise SchemaError(f"{flag} must be >= {low}, got {value}")
    import math
    if args.host_mem_limit is not None and not (math.isfinite(args.host_mem_limit) and args.host_mem_limit > 0):
        raise SchemaError(f"--host-mem-limit must be a positive number of GiB, got {args.host_mem_limit:g}")
    if args.acceptance is not None and not 0.0 <= args.acceptance <= 1.0:
        raise SchemaError(f"--acceptance must be in [0, 1], got {args.acceptance}")
    if getattr(args, "fuse_prefill", "auto") == "on" and args.policy == "interleaved":
        raise SchemaError("--fuse-prefill on needs one batch; the interleaved policy prefills on sweeps of its own "
                          "(use --policy serial-spec or offload-only, or --fuse-prefill auto)")
    speculative = args.policy in ("serial-spec", "interleaved")
    if args.draft_len is not None:
        if args.draft_len == 0 and speculative:
            raise SchemaError(f"--policy {args.policy} drafts tokens: --draft-len must be >= 1 (or use "
                              "--policy offload-only)")
        if args.draft_len > 0 and args.policy == "offload-only":
            raise SchemaError("--policy offload-only drafts nothing: drop --draft-len (or pick a speculative policy)")
    if speculative and not args.draft:
        raise SchemaError(f"--policy {args.policy} needs a draft model (--draft)")


def context_limit(target, draft, workload: Workload, args: argparse.Namespace) -> int:
    """The longest draft length the models' context leaves room for; SchemaError if even k=0 does not fit."""
    models = [target] + ([draft] if draft is not None else [])
    ctx = min(m.max_position_embeddings for m in models)
    who = min(models, key=lambda m: m.max_position_embeddings).name
    need = workload.max_context_tokens + 1  # + the verification's one extra position
    if need > ctx:
        raise SchemaError(f"the longest prompt ({workload.max_prompt_len} tokens) + generation "
                          f"({workload.gen_len_tokens}) needs {workload.max_context_tokens} positions, over "
                          f"{who}'s context of {ctx} tokens; shorten --prompt-len/--max-prompt-len or --gen-len")
    room = ctx - need  # draft tokens that still fit: prompt + gen + k + 1 <= ctx
    if args.draft_len is not None and args.draft_len > room:
        raise SchemaError(f"--draft-len {args.draft_len}: prompt ({workload.max_prompt_len}) + generation "
                          f"({workload.gen_len_tokens}) + k + 1 would exceed {who}'s context of {ctx} tokens; "
                          f"the most that fits is {room}")
    return room


def pinned_knobs(args: argparse.Namespace) -> dict[str, int | bool]:
    """The knobs the flags pin (Planner's `fixed`): --batch, --draft-len, --micro-batches, --fuse-prefill on/off."""
    fixed = {k: v for k, v in (("decode_batch", args.batch), ("draft_len", args.draft_len),
                               ("micro_batches", args.micro_batches)) if v is not None}
    fuse = getattr(args, "fuse_prefill", None) or "auto"
    if fuse != "auto":
        fixed["fuse_prefill"] = fuse == "on"
    return fixed


def plan_job(args: argparse.Namespace, profile, workload: Workload) -> PlanResult:
    """Plan one machine's job: args.model / args.draft (preset, folder or config), args.policy, the pinned knobs
    (args.batch, args.draft_len, args.micro_batches), args.max_draft_len, args.dtype and args.host_mem_limit (GiB). Shared by this command and
    the one-shot run (specoffload-run without a plan, and the Python API)."""
    dtype = getattr(args, "dtype", None) or ""
    target = with_dtype(load_model_spec(args.model), dtype)
    draft = with_dtype(load_model_spec(args.draft), dtype) if args.draft else None
    fixed = pinned_knobs(args)
    room = context_limit(target, draft, workload, args)
    max_draft_len = min(args.max_draft_len, room)
    if draft is not None and max_draft_len < 1 and args.policy != "offload-only":
        raise SchemaError(f"prompt ({workload.max_prompt_len}) + generation ({workload.gen_len_tokens}) + 1 "
                          f"leaves no room in the context for draft tokens; shorten them, or --policy "
                          "offload-only")
    result = make_plan(profile, target, draft, workload, policy=args.policy,
                       max_draft_len=max(max_draft_len, 1), fixed=fixed,
                       host_mem_limit_bytes=(getattr(args, "host_mem_limit", None) or 0.0) * GiB)
    if dtype:
        result.plan = result.plan.replace(dtype=dtype)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if bool(args.profile) == bool(args.cluster):
        print("specoffload-plan: error: give --profile (one machine) or --cluster (a job across nodes)", file=sys.stderr)
        return 2
    if args.cluster:
        if args.host_mem_limit is not None:
            print("specoffload-plan: error: --host-mem-limit applies to one machine (--profile); for a cluster, "
                  "give each kind of node a profile with its host memory", file=sys.stderr)
            return 2
        return cluster_main(args)
    try:
        check_args(args)
        profile = load_profile(args.profile)
        result = plan_job(args, profile, build_workload(args))
    except SchemaError as exc:
        print(f"specoffload-plan: error: {exc}", file=sys.stderr)
        return 2
    print(summary(result, args.policy, args.explain))
    if args.output:
        try:
            result.plan.save(args.output)
        except OSError as exc:
            print(f"specoffload-plan: error: cannot write {args.output} ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
    return 0


def cluster_main(args: argparse.Namespace) -> int:
    """--cluster: a plan per kind of node (planner/cluster.py) and the job's prediction."""
    from .cluster import cluster_summary, parse_cluster, plan_cluster, plan_paths

    try:
        kinds = parse_cluster(args.cluster)
        target = load_model_spec(args.model)
        draft = load_model_spec(args.draft) if args.draft else None
        workload = build_workload(args)
        fixed = pinned_knobs(args)
        plan_cluster(kinds, target, draft, workload, policy=args.policy, max_draft_len=args.max_draft_len, fixed=fixed)
        paths = plan_paths(kinds, args.output) if args.output else []
    except SchemaError as exc:
        print(f"specoffload-plan: error: {exc}", file=sys.stderr)
        return 2
    for k in kinds:
        print(f"== {k.profile_ref} ({k.nodes} nodes x {k.engines_per_node} engines)")
        print(summary(k.result, args.policy, args.explain))
    print(cluster_summary(kinds, workload))
    for k, path in zip(kinds, paths):
        k.result.plan.save(path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
