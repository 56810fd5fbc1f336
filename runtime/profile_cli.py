"""specoffload-profile: measure this machine into a hardware profile, or a model pair's acceptance into a workload."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE = """examples:
  specoffload-profile --quick -o my-machine.yaml              # this machine, under a minute
  specoffload-profile -o my-machine-full.yaml                 # full mode (default file: <machine>.yaml)
  specoffload-profile --acceptance --target tiny-target --draft tiny-draft \\
      --prompts prompts.jsonl -k 8 --max-new-tokens 64 -o workload.yaml
  specoffload-plan --model tiny-target --draft tiny-draft --profile my-machine.yaml \\
      --workload workload.yaml
  specoffload-profile --quick -o my-machine.yaml --disk /nvme/models  # ... and the disk holding a checkpoint
  specoffload-profile --disk /nvme/models --disk-only -o my-machine.yaml  # add the disk to an existing profile
  specoffload-profile --disk /nvme/models --disk-only --disk-checkpoint /nvme/models/mixtral -o my-machine.yaml
  specoffload-profile --ray HEAD_IP:6379 --quick -o cluster/   # every node of a Ray cluster, a file per kind

Hardware mode measures what the planner's cost model consumes (transfer curves, matmul rate over
token count, memory bandwidth, the runtime's own CPU attention fitted to overhead + bytes/bandwidth
+ flops/rate, per-layer device overhead, usable memory) and writes a HardwareProfile (source:
measured) with medians, spreads and raw points in `provenance`. On a machine without CUDA the
device is the CPU (fp32), and the transfer curves are host memcpy rates. A probe that fails is
reported on stderr; its figures are written as null and listed in `missing`.

--disk DIR (default: the current folder) also measures the sequential read rate of the disk holding
DIR (the disk tier's figure, disk_read_bytes_per_s): a temporary test file is written there, read
with O_DIRECT (or buffered + posix_fadvise where the file system refuses O_DIRECT) over block sizes
and reader threads, and deleted. Without --disk the figure is 0 (not measured). --disk-only skips
the other probes: it writes the figure into the existing profile -o names, or prints it.
--disk-file FILE reads an existing large file there (a checkpoint shard) instead of writing one.
--disk also times the disk tier's CPU costs in the engine's own code, on --disk-checkpoint DIR (default: the
shipped tiny target): converting a staged layer to the compute dtype (disk_convert_bytes_per_s) and the compute
time a read in flight takes from a layer's compute beside it, per byte read (disk_read_compute_seconds_per_byte).

--ray ADDRESS profiles every node of a Ray cluster on itself (one task per node, pinned to it, with all its
CPUs and GPUs; the same probes and options), groups the nodes by hardware (GPU model and count, CPU model,
cores, host memory), writes one profile per kind into the -o folder (FOLDER/KIND.yaml; the median of each
figure over the kind's nodes) and prints the `specoffload-plan --cluster` argument that uses them, and the
node labels `specoffload-run --ray` needs where the kinds differ. Needs pip install 'specoffload[cluster]'.

Acceptance mode runs the target greedily on the prompts (JSONL lines {"id": ..., "prompt": "..."})
and counts, per draft position i, how often the draft's i-th greedy proposal is accepted given
1..i-1 were; it writes a Workload (specoffload-plan --workload) with that vector. --target/--draft
take an HF model folder or tiny-target / tiny-draft (the pair shipped with the package).
"""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="specoffload-profile", description=__doc__, epilog=EXAMPLE,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=None,
                    help="where to write the YAML (hardware: default <machine>.yaml in the current folder; acceptance: "
                         "default stdout)")
    hw = ap.add_argument_group("hardware profile")
    hw.add_argument("--quick", action="store_true", help="quick mode (under a minute), fewer and smaller points")
    hw.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="device to profile (default: cuda when available, else the CPU)")
    hw.add_argument("--model", default="mixtral-8x7b",
                    help="model whose shapes the matmul and attention probes use (preset or config.json; "
                         "default mixtral-8x7b)")
    hw.add_argument("--threads", type=int, default=None,
                    help="CPU threads while measuring, both modes (default: what specoffload-run uses, the cores "
                         "this process may use less one, at least 1)")
    hw.add_argument("--kv-dtype", default=None, choices=("bf16", "fp16", "fp32"),
                    help="host KV dtype the attention probe measures (default: the engine's here, bf16 beside a "
                         "GPU, fp32 on a CPU-only machine)")
    hw.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    hw.add_argument("--no-progress", action="store_true", help="no progress bar")
    hw.add_argument("--disk", nargs="?", const=".", default=None, metavar="DIR",
                    help="also measure the read rate of the disk holding DIR (default DIR: the current folder); "
                         "writes a temporary test file there")
    hw.add_argument("--disk-only", action="store_true",
                    help="with --disk: measure only the disk and write the figure into the existing profile -o "
                         "names (without -o, print it)")
    hw.add_argument("--disk-file", default=None, metavar="FILE",
                    help="with --disk: read this existing large file (e.g. a checkpoint shard) instead of writing "
                         "a test file")
    hw.add_argument("--disk-checkpoint", default=None, metavar="DIR",
                    help="with --disk: the safetensors checkpoint whose layers time the disk tier's CPU costs (the "
                         "engine's conversion, and what a read in flight takes from compute); default: the shipped "
                         "tiny target")
    hw.add_argument("--disk-size-mib", type=int, default=None,
                    help="size of the disk probe's test file in MiB (default 1024, --quick 64)")
    hw.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="profile every node of a Ray cluster (HOST:PORT, 'auto', or 'local' to start one here), each "
                         "on itself; -o is then a folder (default: the current one) that gets one profile per kind of "
                         "node, and the specoffload-plan --cluster argument for them is printed")
    hw.add_argument("--force-fail", action="append", default=[], metavar="PROBE",
                    help=argparse.SUPPRESS)  # test hook: make a probe fail (also SPECOFFLOAD_PROFILE_FAIL)
    acc = ap.add_argument_group("acceptance (writes a Workload)")
    acc.add_argument("--acceptance", action="store_true", help="measure a model pair's per-position acceptance")
    acc.add_argument("--target", help="target model folder, or tiny-target")
    acc.add_argument("--draft", help="draft model folder, or tiny-draft")
    acc.add_argument("--prompts", help="JSONL prompt sample: one {\"id\": ..., \"prompt\": \"...\"} per line")
    acc.add_argument("-k", "--draft-len", type=int, default=8, help="draft tokens per round (default 8)")
    acc.add_argument("--max-new-tokens", type=int, default=64,
                     help="tokens the target generates per prompt; also the workload's gen_len_tokens (default 64)")
    acc.add_argument("--sample", type=int, default=None,
                     help="measure on the first N prompts only (lengths and num_prompts still use all)")
    acc.add_argument("--batch", type=int, default=32, help="prompts processed together (default 32)")
    args = ap.parse_args(argv)
    if args.disk_only and args.disk is None:
        args.disk = "."
    if args.disk_file and args.disk is None:
        args.disk = str(Path(args.disk_file).parent)
    if args.disk_checkpoint is not None and not Path(args.disk_checkpoint).is_dir():
        ap.error(f"--disk-checkpoint {args.disk_checkpoint}: no such folder; give a safetensors checkpoint folder "
                 "(e.g. the target's), or leave it out to use the shipped tiny target")
    if args.disk_checkpoint is not None and args.disk is None:
        args.disk = "."
    if args.disk_size_mib is not None and args.disk_size_mib < 1:
        ap.error(f"--disk-size-mib must be >= 1, found {args.disk_size_mib}")
    if args.acceptance and args.disk is not None:
        ap.error("--disk goes with the hardware profile, not --acceptance")
    if args.ray is not None and (args.acceptance or args.disk_only):
        ap.error("--ray profiles the nodes' hardware; it does not go with --acceptance or --disk-only")
    if args.acceptance:
        missing = [f"--{n}" for n in ("target", "draft", "prompts") if not getattr(args, n)]
        if missing:
            ap.error(f"--acceptance needs {', '.join(missing)}")
    elif args.target or args.draft or args.prompts:
        ap.error("--target/--draft/--prompts go with --acceptance")
    return args


def summary(profile) -> str:
    """A short human-readable table of the figures: a line per summary group of planner/cost_terms.py."""
    from specoffload.planner.cost_terms import CURVE, summary_lines
    from specoffload.planner.schema import Curve

    def fig(term, v):
        if v is None:
            return "MISSING"
        if term.kind == CURVE and isinstance(v, Curve):
            return ", ".join(f"{_short(x)}:{y / 1e9:.3g}G" for x, y in v.points)
        if term.scale != 1.0:
            return f"{v * term.scale:.3g}{term.shown_unit}"
        return f"{v:.4g}{term.shown_unit}"

    p = profile
    lines = [f"profile {p.name} ({p.device_kind}: {p.device_name})",
             f"  cores {p.cpu_cores}, host memory {p.host_mem_bytes / 2**30:.1f} GiB usable, device memory "
             f"{p.gpu_mem_bytes / 2**30:.1f} GiB (reserve {p.gpu_mem_reserve_bytes / 2**30:.2f} GiB)"]
    for label, terms in summary_lines():
        if label == "disk sequential read" and not p.disk_read_bytes_per_s:
            continue  # not measured
        parts = [f"{fig(t, getattr(p, t.name))}{' ' + t.summary_as if t.summary_as else ''}" for t in terms]
        lines.append(f"  {label:<26} {', '.join(parts)}")
    if "engine_layers" in p.provenance:
        lines.append("  (fixed costs fitted inside the engine: provenance engine_layers)")
    if "fit.cpu_attention" in p.provenance:
        lines.append(f"  attention fit (micro)      {p.provenance['fit.cpu_attention']}")
    if p.missing:
        lines.append(f"  MISSING: {', '.join(p.missing)}")
    return "\n".join(lines)


def _short(x: float) -> str:
    for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if x >= scale and x % scale == 0:
            return f"{int(x // scale)}{unit}"
    return f"{x:g}"


def measure_disk_figure(args, quiet: bool = False) -> tuple[float, dict[str, str]]:
    """(disk_read_bytes_per_s, provenance entries) for --disk, with a line on stderr."""
    from specoffload.runtime.profiler.disk import measure_disk

    size = (args.disk_size_mib << 20) if args.disk_size_mib else (64 << 20 if args.quick else 1 << 30)
    rate = measure_disk(args.disk, file=args.disk_file, file_bytes=size, quick=args.quick)
    if not quiet:
        print(f"disk: {rate.bytes_per_s / 1e9:.3g} GB/s sequential read ({rate.mode}, {rate.fs_type}, block "
              f"{rate.block_bytes >> 10} KiB x {rate.threads} thread(s), {rate.seconds:.1f} s)", file=sys.stderr)
    return rate.bytes_per_s, rate.provenance


def measure_disk_cpu_figures(args, quiet: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """The disk tier's CPU costs (disk_convert_bytes_per_s, disk_read_compute_seconds_per_byte) for --disk,
    timed in the engine's own code on --disk-checkpoint (default: the tiny target), with a line on stderr."""
    from specoffload.runtime.profiler.disk import measure_disk_cpu_costs

    ckpt = args.disk_checkpoint
    if ckpt is None:
        from specoffload.runtime.tiny_pair import tiny_pair_paths

        ckpt = tiny_pair_paths()[0]
    c = measure_disk_cpu_costs(ckpt, pairs=30 if args.quick else 60)
    if not quiet:
        print(f"disk tier CPU: conversion {c.convert_bytes_per_s / 1e9:.3g} GB/s ({c.convert_seconds * 1e3:.3f} ms "
              f"per layer), a read in flight takes {c.read_compute_seconds_per_byte * 1e9:.3g} ns of compute per "
              f"byte ({c.slowdown_seconds * 1e3:.3f} ms per {c.layer_bytes / 2**20:.2f} MiB layer)", file=sys.stderr)
    return ({"disk_convert_bytes_per_s": c.convert_bytes_per_s,
             "disk_read_compute_seconds_per_byte": c.read_compute_seconds_per_byte}, c.provenance)


def check_disk_args(args) -> None:
    """Refuse an unusable --disk folder and --disk-checkpoint before any probe runs (a clear one-line error)."""
    from specoffload.runtime.profiler.disk import check_checkpoint, check_folder

    if not args.disk_file:
        check_folder(args.disk)
    if args.disk_checkpoint:
        check_checkpoint(args.disk_checkpoint)


def run_disk_only(args) -> int:
    import dataclasses

    from specoffload.planner.schema import HardwareProfile
    from specoffload.planner.strict import SchemaError, dump_yaml

    check_disk_args(args)
    out = Path(args.output) if args.output else None
    if out is not None and not out.is_file():
        raise SchemaError(f"--disk-only -o {out}: no such profile; --disk-only adds the disk figure to an existing "
                          "profile (make one with specoffload-profile -o FILE, or drop --disk-only to profile "
                          "everything)")
    base = HardwareProfile.load(out) if out is not None else None
    from specoffload.runtime.host_attention import set_threads

    try:
        set_threads(args.threads)  # the engine's setting: the CPU costs are timed under it
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    rate, prov = measure_disk_figure(args)
    cpu, cpu_prov = measure_disk_cpu_figures(args)
    if base is None:
        sys.stdout.write(dump_yaml({"disk_read_bytes_per_s": rate, **cpu, "provenance": {**prov, **cpu_prov}}))
        return 0
    p = dataclasses.replace(base, disk_read_bytes_per_s=rate, **cpu,
                            provenance={**base.provenance, **prov, **cpu_prov})
    p.save(out)
    print(f"wrote disk_read_bytes_per_s {rate:.4g}, disk_convert_bytes_per_s {cpu['disk_convert_bytes_per_s']:.4g} "
          f"and disk_read_compute_seconds_per_byte {cpu['disk_read_compute_seconds_per_byte']:.4g} into {out}")
    return 0


def measure_here(args, name: str, progress: bool = True, warn=None, quiet_disk: bool = False):
    """Run the hardware probes on this machine as `args` say (--quick, --model, --threads, --device, --kv-dtype,
    --disk ...) and return the ProfileResult (not written). specoffload-profile --ray runs this on every node."""
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.strict import SchemaError
    from specoffload.runtime.host_attention import set_threads
    from specoffload.runtime.profiler.probes import ProfileConfig, resolve_device, run_profile

    spec = load_model_spec(args.model)
    cfg = (ProfileConfig.quick if args.quick else ProfileConfig.full)(model=spec, attn_kv_dtype=args.kv_dtype,
                                                                        force_fail=frozenset(args.force_fail))
    try:
        threads = set_threads(args.threads)
    except ValueError as exc:
        raise SchemaError(str(exc)) from None
    device = resolve_device(args.device)
    if args.disk is not None:
        check_disk_args(args)  # before minutes of other probes
    result = run_profile(cfg, device, name=name, progress=progress, threads=threads,
                         **({"warn": warn} if warn is not None else {}))
    if args.disk is not None:
        import dataclasses

        from specoffload.runtime.loader import CheckpointError
        from specoffload.runtime.profiler.disk import DiskProbeError

        def warned(msg: str) -> None:
            if warn is not None:
                warn(msg)
            else:
                print(f"specoffload-profile: warning: {msg}", file=sys.stderr)

        cpu: dict[str, float] = {}
        try:
            rate, prov = measure_disk_figure(args, quiet=quiet_disk)
        except (DiskProbeError, OSError) as exc:  # keep the other probes' minutes of work
            warned(f"the disk probe failed ({exc}); disk_read_bytes_per_s stays 0 (not measured); retry with --disk "
                   "DIR --disk-only -o FILE")
            rate, prov = 0.0, {"disk_read_bytes_per_s": f"not measured: the disk probe failed ({exc})"}
        else:  # the CPU costs apart: their failure keeps the read rate just measured
            try:
                cpu, cpu_prov = measure_disk_cpu_figures(args, quiet=quiet_disk)
                prov = {**prov, **cpu_prov}
            except (DiskProbeError, CheckpointError, OSError) as exc:
                warned(f"the disk tier's CPU-cost probe failed ({exc}); disk_convert_bytes_per_s and "
                       "disk_read_compute_seconds_per_byte stay 0 (not measured); retry with --disk DIR --disk-only "
                       "-o FILE")
                cpu = {"disk_convert_bytes_per_s": 0.0, "disk_read_compute_seconds_per_byte": 0.0}
                prov = {**prov, **{k: f"not measured: the CPU-cost probe failed ({exc})" for k in cpu}}
        result.profile = dataclasses.replace(result.profile, disk_read_bytes_per_s=rate, **cpu,
                                             provenance={**result.profile.provenance, **prov})
    return result


def run_hardware(args) -> int:
    if args.disk_only:
        return run_disk_only(args)
    if args.ray:
        from specoffload.runtime.profile_cluster import gather_profiles

        return gather_profiles(args)
    from specoffload.planner.strict import SchemaError
    from specoffload.runtime.profiler.probes import default_name, resolve_device

    device = resolve_device(args.device)
    # Never into the package's profiles/ by default: a file there would pass for a shipped profile.
    out = Path(args.output) if args.output else Path(f"{default_name(device.type)}.yaml")
    if out.is_dir():
        raise SchemaError(f"-o {out} is a directory; give a file name, e.g. {out / (default_name(device.type) + '.yaml')}")
    result = measure_here(args, args.name or out.stem, progress=not args.no_progress)
    result.profile.save(out)
    print(summary(result.profile))
    print(f"wrote {out} in {result.seconds:.1f} s ({result.profile.provenance.get('mode', '?')} mode)")
    if result.failed:
        print(f"{len(result.failed)} probe(s) failed: {', '.join(result.failed)} (see warnings above)", file=sys.stderr)
    return 0


def run_acceptance(args) -> int:
    from specoffload.planner.strict import SchemaError, dump_yaml
    from specoffload.runtime.profiler.acceptance import measure_workload

    if args.output and Path(args.output).is_dir():
        raise SchemaError(f"-o {args.output} is a directory; give a file name, e.g. {Path(args.output) / 'workload.yaml'}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = measure_workload(args.target, args.draft, args.prompts, k=args.draft_len,
                           max_new_tokens=args.max_new_tokens, sample=args.sample, batch=args.batch,
                           progress=not args.no_progress)
    w, c = res.workload, res.counts
    print(f"acceptance per position (k={c.k}): " + " ".join(f"{a:.3f}" for a in w.acceptance), file=sys.stderr)
    print(f"  tried {c.tried}\n  accepted {c.accepted}\n  {c.rounds} rounds over {c.target_tokens} target tokens, "
          f"{c.target_tokens / max(c.rounds, 1):.2f} tokens per round", file=sys.stderr)
    if args.output:
        w.save(args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(dump_yaml(w))
    return 0


def main(argv=None) -> int:
    from specoffload.planner.strict import SchemaError
    from specoffload.runtime.config import ConfigError
    from specoffload.runtime.loader import CheckpointError
    from specoffload.runtime.profiler.acceptance import AcceptanceError
    from specoffload.runtime.profiler.disk import DiskProbeError
    from specoffload.runtime.profiler.probes import ProbeFailure
    from specoffload.runtime.run_cli import RunError

    args = parse_args(argv)
    try:
        return run_acceptance(args) if args.acceptance else run_hardware(args)
    except (AcceptanceError, SchemaError, ProbeFailure, ConfigError, CheckpointError, FileNotFoundError,
            DiskProbeError, RunError) as exc:
        print(f"specoffload-profile: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
