"""specoffload-run: run prompts on real checkpoints, with a plan made now or a plan file; JSONL in, JSONL out (resumable).

    specoffload-run --model DIR [--draft DIR|none] --prompts in.jsonl --output out.jsonl [--ordered]
    specoffload-run plan.yaml --prompts in.jsonl --output out.jsonl [--report report.yaml] [--trace trace.json]

Without a plan file (one-shot, runtime/oneshot.py) the run uses this machine's profile (--profile, else the
cached one, else a quick profile measured now and cached), plans for the prompt file's own token lengths,
generation lengths and count, prints the plan's summary, simulates it and runs it. A plan file pins or
shares a configuration. --ordered also writes the outputs in input order at the end (<output>.ordered.jsonl).

Input lines: {"id": ..., "prompt": "..." or "messages": [{"role", "content"}, ...], "max_tokens": N,
"min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos"}
(all but id and prompt/messages optional; runtime/prompts.py; max_tokens defaults to the plan's
generation length, sampling fields to the target's generation_config.json). Output lines, written
and flushed as each sequence finishes: {"id", "text", "tokens", "num_tokens", "prompt_tokens",
"finish_reason" ("stop" | "length"), "stop_reason" (the stop string or stop id, else null),
"usage": {"prompt_tokens", "completion_tokens"}}. Rerunning with the same output file skips the ids already there (a line cut short
by a crash is dropped and redone), so nothing is duplicated or lost. An existing output file that is
not this command's JSONL is refused and left untouched; a run holds a lock on it, so a second run
on the same file refuses at once. SIGINT and SIGTERM finish the line being written and stop; a full
disk or a file size limit stops the run with what was finished saved.

Before starting, the plan is simulated on its profile and refused if the simulator rejects it
(--force runs it anyway). The report has the simulator's fields, measured, next to the plan's
prediction.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from specoffload.planner.trace_names import resource_of, track_name

from .oneshot import DEFAULT_MAX_TOKENS, DTYPES, OneShotError
from .outputs import OutputFile, OutputFileError, OutputWriteError, finished_ids  # noqa: F401 (re-exported)
from .prompts import Prompt, PromptFileError, resolve_model_dir
from .prompts import read_prompts as _read_prompts

if TYPE_CHECKING:  # annotations only: the functions load plans where they use them
    from specoffload.planner.schema import Plan

EXAMPLE = """example: from the repository root, the tiny pair and the demo prompts shipped with it; a plan made first
(the way to pin or share a configuration), then run:
  specoffload-plan --model tiny-target --draft tiny-draft --profile cpu-2core --prompt-len 20 \\
      --max-prompt-len 32 --gen-len 32 --num-prompts 64 -o plan.yaml
  specoffload-run plan.yaml --prompts runtime/assets/demo_prompts.jsonl --output out.jsonl --report report.yaml

  or in one command, planned now for these prompts on this machine's profile (--profile cpu-2core to use
  the shipped one), outputs also in input order in out2.jsonl.ordered.jsonl:
  specoffload-run --model tiny-pair --prompts runtime/assets/demo_prompts.jsonl --output out2.jsonl --ordered

  --max-prompt-len is the longest prompt in tokens: the KV cache is sized for it, and longer prompts are
  refused. A plan made for a preset (e.g. mixtral-8x7b) needs the checkpoint folder: --target DIR
  [--draft DIR]. Rerun the same command after an interruption to resume; the output file is locked while
  a run writes it, and a file that is not this command's output is never overwritten.

  input lines (JSONL), a plain prompt and a chat:
  {"id": "a", "prompt": "def fib(n):", "max_tokens": 64, "stop": ["\\n\\n"], "temperature": 0.8, "top_k": 40}
  {"id": "b", "messages": [{"role": "user", "content": "sum a list"}], "stop_token_ids": [201], "min_tokens": 4}
"""


class RunError(ValueError):
    """Bad input: names the file, line or field, and the fix."""


def read_prompts(path: str | Path) -> list[Prompt]:
    """The shared JSONL reader (runtime/prompts.py); every line needs an id here (resume matches by id)."""
    try:
        return _read_prompts(path, require_id=True)
    except PromptFileError as exc:
        raise RunError(str(exc)) from None


def resolve_models(plan: Plan, target: str | None, draft: str | None) -> tuple[Path, Path | None]:
    """Checkpoint folders for the plan's target and draft, checked against the plan's fingerprints."""
    from specoffload.planner.models import load_model_spec

    def folder(ref: str, given: str | None, role: str) -> Path:
        try:
            return resolve_model_dir(given or ref)
        except PromptFileError as exc:
            if given:
                raise RunError(str(exc)) from None
            raise RunError(f"the plan's {role} is {ref!r}, a preset without weights here; pass its checkpoint "
                           f"folder with --{'target' if role == 'model' else 'draft'} DIR") from None

    dirs = []
    for role, ref, fp, given in (("model", plan.model, plan.model_fingerprint, target),
                                 ("draft", plan.draft, plan.draft_fingerprint, draft)):
        if not ref:
            dirs.append(None)
            continue
        d = folder(ref, given, role)
        if not (d / "config.json").is_file():
            raise RunError(f"{d}: no config.json; a checkpoint folder in Hugging Face format is needed")
        spec = load_model_spec(str(d))
        if fp and spec.fingerprint != fp:
            raise RunError(f"plan was made for {role} {ref!r} but {d} holds a different model ({spec.describe()}); "
                           f"re-plan with --{'model' if role == 'model' else 'draft'} {d}")
        dirs.append(d)
    return dirs[0], dirs[1]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="specoffload-run", description=__doc__.split("\n\n")[0], epilog=EXAMPLE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", nargs="?", default=None,
                    help="plan.yaml from specoffload-plan (omit it and give --model to plan for these prompts now)")
    ap.add_argument("--model", default=None,
                    help="without a plan: the target, an HF model folder (tiny-target, or tiny-pair for the shipped "
                         "pair with its draft)")
    ap.add_argument("--prompts", required=True, help="JSONL input: id, prompt or messages (a chat), optional max_tokens/min_tokens/temperature/"
                    "top_p/top_k/min_p/seed/stop/stop_token_ids/ignore_eos")
    ap.add_argument("--output", required=True, help="JSONL output; rerunning with the same file resumes")
    ap.add_argument("--ordered", nargs="?", const="", default=None, metavar="PATH",
                    help="at the end, also write the outputs in input order (default PATH <output>.ordered.jsonl); "
                         "the output file itself stays in completion order")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="tokens for prompts without max_tokens (default: the plan's generation length; without a "
                         f"plan {DEFAULT_MAX_TOKENS})")
    ap.add_argument("--dtype", default=None, choices=DTYPES,
                    help="compute dtype (default: the plan's, else bf16 on a GPU, fp32 on the CPU); fp16 is for cards "
                         "without bf16 and can overflow")
    ap.add_argument("--no-profile-make", action="store_true",
                    help="without a plan: do not measure a profile when none is given or cached; stop with an error")
    ap.add_argument("--policy", default=None, choices=("specoffload", "offload-only", "serial-spec", "interleaved"),
                    help="without a plan: the policy to plan for (default specoffload: the best of the other three)")
    ap.add_argument("--save-plan", default=None, metavar="PATH",
                    help="without a plan: also write the plan made (pass it later to pin this configuration)")
    ap.add_argument("--report", default=None, help="write the measured report (YAML)")
    ap.add_argument("--trace", default=None, help="write a Chrome trace (open in Perfetto)")
    ap.add_argument("--target", default=None, help="target checkpoint folder (when the plan names a preset)")
    ap.add_argument("--draft", default=None,
                    help="draft checkpoint folder (without a plan: a folder, tiny-draft, or none for no draft)")
    ap.add_argument("--profile", default=None,
                    help="profile (YAML path or shipped name) for the pre-run simulation (default: the plan's); "
                         "without a plan also the one planned on (default: this machine's, cached or measured now)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for host attention and other CPU work (default: the cores this process may "
                         "use less one for the driving thread, at least 1); match the profile's")
    ap.add_argument("--force", action="store_true",
                    help="run even if the simulator rejects the plan, or if prompts are longer than it was made for")
    ap.add_argument("--no-simulate", action="store_true", help="skip the pre-run simulation")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    from .cluster import add_arguments as add_cluster_arguments

    add_cluster_arguments(ap)  # --ray ADDRESS: the same run across a Ray cluster (runtime/cluster.py)
    args = ap.parse_args(argv)
    if args.plan is None and not args.model:
        ap.error("give a plan file, or --model DIR to plan for these prompts now (e.g. --model tiny-pair)")
    if args.plan is not None and args.model:
        ap.error("--model goes with a run without a plan; with a plan file, name checkpoint folders with --target "
                 "(and --draft)")
    if args.plan is None:
        for flag in ("target", "ray"):
            if getattr(args, flag):
                ap.error(f"--{flag} needs a plan file (without one, name the target with --model)")
    else:
        for flag in ("no_profile_make", "save_plan", "policy"):
            if getattr(args, flag):
                ap.error(f"--{flag.replace('_', '-')} goes with a run without a plan (a plan file has its own)")
    if args.ray:
        for flag in ("dtype", "max_tokens"):
            if getattr(args, flag) is not None:
                ap.error(f"--{flag.replace('_', '-')} is not passed to --ray workers yet; set it in the plan "
                         "(specoffload-plan --dtype, --gen-len) or run on one machine")
    if args.max_tokens is not None and args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, found {args.max_tokens}")
    return args


def open_output(out: OutputFile, prompts: list[Prompt], prompts_path: str) -> tuple[set[str], list[Prompt]]:
    """Check, lock and read the output file; (ids already finished, prompts still to run). Says so when a torn
    last line was dropped, and when nothing is left to run (the caller then stops)."""
    done = out.open()
    if out.dropped_bytes:
        print(f"specoffload-run: {out.path}: dropped an unfinished last line ({out.dropped_bytes} bytes, left by an "
              "interrupted write); that sequence is run again", file=sys.stderr)
    todo = [p for p in prompts if p.id not in done]
    if not todo:
        print(f"specoffload-run: nothing to run: all {len(prompts)} prompts of {prompts_path} are already in "
              f"{out.path} (give a new --output to run them again)", file=sys.stderr)
    return done, todo


def simulate_first(plan: Plan, profile_ref: str | None, force: bool) -> tuple[object | None, list[str]]:
    """Simulate the plan; refuse it (RunError) if the simulator rejects it, unless forced."""
    from specoffload.planner.sim import simulate
    from specoffload.planner.strict import SchemaError

    notes = []
    try:
        result = simulate(plan, profile_ref)
    except SchemaError as exc:
        notes.append(f"pre-run simulation skipped: {exc}")
        return None, notes
    if not result.ok:
        why = "; ".join(p.message for p in result.problems)
        if not force:
            raise RunError(f"the simulator rejects this plan: {why} (re-plan, or --force to run anyway)")
        notes.append(f"simulator rejected the plan, run forced: {why}")
    return result, notes


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; raised between output lines, never inside one."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class SignalGuard:
    """SIGINT and SIGTERM stop the run the same way: an output line being written is finished first."""

    def __init__(self):
        self.critical = False
        self.pending: int | None = None
        self.previous = {}

    def _handler(self, signum, frame) -> None:
        if self.critical:
            self.pending = signum
            return
        raise Interrupted(signum)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self.previous.items():
            signal.signal(sig, h)

    def write(self, out: OutputFile, obj: dict) -> None:
        self.critical = True
        try:
            out.write(obj)
        finally:
            self.critical = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Interrupted(signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    from specoffload.planner.strict import SchemaError

    out = OutputFile(args.output)
    guard = SignalGuard() if threading.current_thread() is threading.main_thread() else None
    try:
        if guard is not None:
            guard.__enter__()
        if args.ordered is not None:
            from .oneshot import check_ordered_target

            check_ordered_target(args.output, args.ordered or None)  # refused before the run, not after it
        if args.ray:
            from .cluster import run_cluster

            rc = run_cluster(args, out, guard)
        else:
            rc = _run(args, out, guard)
        if rc == 0 and args.ordered is not None:
            from .oneshot import write_ordered

            path = write_ordered(args.output, args.ordered or None, [p.id for p in read_prompts(args.prompts)])
            print(f"wrote {path} (the outputs in input order)", file=sys.stderr)
        return rc
    except OutputWriteError as exc:
        print(f"specoffload-run: error: {exc}", file=sys.stderr)
        return 1
    except (RunError, SchemaError, OutputFileError, OneShotError) as exc:
        print(f"specoffload-run: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        saved = (f"{len(out.done) + out.written} finished sequences are in {args.output}" if out.fd is not None
                 else "nothing was written")
        print(f"specoffload-run: stopped by {name}; {saved}. Rerun the same command to resume (finished ids are "
              "skipped)", file=sys.stderr)
        return 128 + int(signum)
    finally:
        out.close(failed=out.written == 0)
        if guard is not None:
            guard.__exit__()


def _run(args: argparse.Namespace, out: OutputFile, guard: SignalGuard | None) -> int:
    from specoffload.planner.schema import Plan

    from . import oneshot

    plan = Plan.load(args.plan) if args.plan else None
    prompts = read_prompts(args.prompts)
    for flag in ("report", "trace", "save_plan"):
        given = getattr(args, flag)
        if given and Path(given).is_dir():
            raise RunError(f"--{flag.replace('_', '-')} {given} is a directory; give a file name")
    if plan is not None:
        target_dir, draft_dir = resolve_models(plan, args.target, args.draft)
    else:
        target_dir, draft_dir, target_ref, draft_ref = oneshot.model_dirs(args.model, args.draft)
    oneshot.tokenizer_path(target_dir)
    # The output file is checked, locked and read before anything heavy is loaded.
    out_path = out.path
    done, todo = open_output(out, prompts, args.prompts)
    if not todo:
        return 0

    import torch
    from tqdm import tqdm

    from .config import ConfigError
    from .engine import Engine, EngineError
    from .loader import CheckpointError
    from .requests_io import RequestError, RequestIO

    from .host_attention import set_threads

    try:
        set_threads(args.threads)
    except ValueError as exc:
        raise RunError(str(exc)) from None
    try:
        rio = RequestIO.from_model_dir(target_dir)  # tokenizer, generation_config.json, chat template
        ids = rio.all_prompt_ids(todo, args.prompts)
    except RequestError as exc:
        raise RunError(str(exc)) from None
    gen_len = args.max_tokens or (plan.workload.gen_len_tokens if plan is not None else DEFAULT_MAX_TOKENS)
    if plan is None:  # one-shot: this machine's profile, a plan for these prompts
        device = oneshot.default_device(args.device)
        profile, args.profile = oneshot.find_profile(args.profile, device, args.dtype, make=not args.no_profile_make,
                                                     threads=args.threads)
        workload = oneshot.workload_for([len(i) for i in ids], [p.max_tokens or gen_len for p in todo])
        policy = args.policy or "specoffload"
        result = oneshot.plan_for_prompts(target_ref, draft_ref, profile, workload, args.dtype, policy)
        plan = result.plan
        print(oneshot.plan_summary(result, policy))
        if args.save_plan:
            plan.save(args.save_plan)
            print(f"wrote {args.save_plan} (pass it instead of --model to run this configuration again)",
                  file=sys.stderr)
    dtype = oneshot.torch_dtype(args.dtype or plan.dtype)
    sim, notes = (None, ["pre-run simulation skipped (--no-simulate)"]) if args.no_simulate else \
        simulate_first(plan, args.profile, args.force)
    if args.dtype and plan.dtype and args.dtype != plan.dtype:
        notes.append(f"run in {args.dtype}; the plan was made for {plan.dtype} (its memory figures assume that)")
    pending = [(p, rio.request(p, gen_len, i)) for p, i in zip(todo, ids)]
    # The KV cache is sized for the plan's workload; longer requests are refused below (or, forced, the
    # cache grows to fit them, beyond what the plan and the simulator checked).
    need = max((len(r.prompt) + r.max_tokens + plan.draft_len + 1 for _, r in pending), default=0)
    planned = plan.workload.max_context_tokens + plan.draft_len + 1
    max_len = None
    if need > planned and args.force:
        max_len = need
        notes.append(f"forced: KV cache sized for {need} tokens per sequence, beyond the plan's {planned}")
    try:
        engine = Engine(plan, target_dir, draft_dir, device=args.device, dtype=dtype, trace=bool(args.trace),
                        max_len=max_len)
    except (ConfigError, CheckpointError, EngineError) as exc:
        raise RunError(str(exc)) from None
    requests = []
    for p, req in pending:
        try:
            engine.check(req)
        except EngineError as exc:
            raise RunError(f"{args.prompts}:{p.line}: {exc}") from None
        requests.append(req)
    print(f"specoffload-run: {len(prompts)} prompts, {len(done)} already in {out_path}, {len(requests)} to run; "
          f"policy {plan.policy}, batch {plan.decode_batch}x{plan.num_batches}, k={plan.draft_len}, "
          f"device {engine.device}", file=sys.stderr)
    total_tokens = sum(r.max_tokens for r in requests)
    bar = tqdm(total=total_tokens, unit="tok", disable=args.quiet or not requests, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()

    def on_finish(f) -> None:
        line = rio.output_line(f)
        if guard is not None:
            guard.write(out, line)
        else:
            out.write(line)
        bar.update(f.request.max_tokens)  # a sequence done early frees its remaining budget
        acc = engine.stats.acceptance
        elapsed = time.perf_counter() - t0
        bar.set_postfix_str(f"{engine.stats.generated_tokens / max(elapsed, 1e-9):.1f} tok/s"
                            + (f", {acc.mean_tokens_per_round:.2f} tok/round" if acc.rounds else ""))

    try:
        stats = engine.run(requests, on_finish)
    except CheckpointError as exc:  # the disk tier: a checkpoint file changed or disappeared mid-run
        bar.close()
        kept = len(done) + out.written
        raise RunError(f"{exc} [{kept} finished sequences are kept in {out_path}; rerun the same command to "
                       "resume]") from None
    bar.close()
    wall = time.perf_counter() - t0
    report = measured_report(plan, engine, stats, wall, sim, notes, args.profile)
    from specoffload.planner.sim import format_report

    print(format_report(report))
    out.close()  # the outputs are complete: release the lock before writing the reports
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}", file=sys.stderr)
    if args.trace:
        write_trace(engine.timeline, args.trace)
        print(f"wrote {args.trace}", file=sys.stderr)
    return 0


def measured_report(plan: Plan, engine, stats, wall: float, sim, notes: list[str], profile_ref: str | None):
    """The run as a Report(kind="measured"), with the plan's closed-form prediction alongside."""
    import torch

    from specoffload.planner.schema import fingerprint
    from specoffload.planner.sim import AcceptanceStats, Report
    from specoffload.planner.sim.predict import plan_cost_model, predicted_figures
    from specoffload.planner.sim.simulator import resolve_profile
    from specoffload.planner.strict import SchemaError

    predicted, bound, caps, prof_name, prof_fp = {}, 0.0, {}, plan.profile, plan.profile_fingerprint
    try:
        profile = resolve_profile(plan, profile_ref)
        cm, knobs, placement = plan_cost_model(plan, profile)
        predicted = predicted_figures(cm, knobs, placement)
        bound = cm.physical_bound(knobs)
        caps = {k: (v if math.isfinite(v) else 0.0) for k, v in cm.capacities().items()}
        prof_name, prof_fp = profile.name, fingerprint(profile)
    except SchemaError as exc:
        notes = notes + [f"no prediction: {exc}"]
    tokens = stats.generated_tokens
    decode = max(wall - stats.prefill_seconds, 1e-9)
    # Busy seconds per resource key (the report's names), read from the timeline's tracks.
    busy = {r: engine.timeline.busy.get(track_name(r), 0.0)
            for r in ("gpu", "cpu", "h2d", "d2h") + (("disk",) if engine.target.disk is not None else ())}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    host_peak = engine.host_tensor_bytes()
    notes = notes + [f"host memory: the engine's tensors (weights, KV caches) {host_peak / 2**30:.3f} GiB; the "
                     f"process's peak RSS {rss / 2**30:.3f} GiB (interpreter, torch and libraries included)"]
    disk = engine.target.disk
    if disk is not None:
        per_sweep = plan.prediction.disk_bytes_per_sweep
        notes = notes + [
            f"disk tier: {len(disk.layers)} layers read from the checkpoint every sweep ({disk.mode} I/O): "
            f"{stats.disk_bytes_per_sweep / 2**20:.3f} MiB per sweep over {stats.sweeps} sweeps (the plan says "
            f"{per_sweep / 2**20:.3f} MiB), {stats.disk_read_bytes / 2**20:.1f} MiB read in all (reads ahead "
            f"included); {disk.staging_bytes / 2**20:.1f} MiB of staging buffers"]
    if engine.device.type == "cuda":
        peak = {"gpu": float(torch.cuda.max_memory_allocated(engine.device)),
                "pinned": float(engine.target.streamer.pinned_bytes() + (disk.staging_bytes if disk else 0)),
                "host": host_peak}
    else:
        peak = {"gpu": 0.0, "pinned": 0.0, "host": host_peak}
    acc = stats.acceptance
    rounds = acc.rounds
    useful = (tokens - stats.sequences) / rounds if rounds else 0.0
    slot_times = sorted(stats.slot_times)
    return Report(
        kind="measured", policy=plan.policy, model=plan.model, draft=plan.draft, profile=prof_name,
        profile_fingerprint=prof_fp, plan_fingerprint=fingerprint(plan), seed=0, sequences=stats.sequences,
        generated_tokens=tokens, total_seconds=wall, prefill_seconds=stats.prefill_seconds, decode_seconds=decode,
        throughput_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        decode_tokens_per_s=tokens / decode,  # as the cost model and simulator define it
        slots=stats.slots, slot_seconds=decode / stats.slots if stats.slots else 0.0,
        slot_seconds_median=slot_times[len(slot_times) // 2] if slot_times else 0.0,
        prefill_passes=stats.prefill_passes, fused_passes=stats.fused_passes,
        busy_fraction={r: v / wall for r, v in busy.items()},
        peak_mem_bytes=peak, capacity_bytes=caps or {"gpu": 0.0, "pinned": 0.0, "host": 0.0},
        acceptance=AcceptanceStats(plan.draft_len, rounds, acc.mean_tokens_per_round, useful,
                                   tuple(acc.per_position())),
        physical_bound_tokens_per_s=bound if math.isfinite(bound) else 0.0,
        bound_fraction=(tokens / wall) / bound if bound and math.isfinite(bound) else 0.0,
        predicted=predicted, notes=tuple(notes) + (f"device {engine.device}, compute dtype {engine.dtype}, "
                                                   f"{torch.get_num_threads()} torch threads",))


def write_trace(timeline, path: str) -> None:
    from specoffload.planner.sim.trace import ChromeTrace

    trace = ChromeTrace(process="specoffload-run")
    for track, name, start, end in timeline.spans:
        trace.slice(resource_of(track), name, start, end - start)  # the writer names the track again
    Path(path).write_text(json.dumps(trace.to_json()))


if __name__ == "__main__":
    sys.exit(main())
