"""specoffload-profile --ray: every node of a Ray cluster profiled on itself, one profile per kind of node.

    specoffload-profile --ray HEAD_IP:6379 --quick -o cluster/
    specoffload-profile --ray local --quick -o cluster/

First a cheap task on every live node reports its hardware (GPU model and count, CPU model and cores,
host memory to the GiB); nodes with the same hardware are one kind, named for it (`h200x8`,
`cpu-16c-amd-epyc-9454`), and each kind's file (-o FOLDER/KIND.yaml) must not exist yet. Then one
profiling task per node, pinned to it (node affinity, not soft) and asking for all of the node's CPUs
and GPUs so that Ray runs nothing else there meanwhile, runs the same probes as on one machine
(--quick, --model, --threads, --device, --kv-dtype, --disk: the folder must exist on every node).
Each kind's profile holds, per figure, the median over its nodes (memory and cores: the smallest),
with the nodes and their figures in its provenance. Printed at the end: the `specoffload-plan
--cluster` argument for these files (one engine per GPU, one per CPU-only node) and, where the
cluster has several kinds, the node label each node needs (`ray start ... --labels
specoffload-profile=KIND`) for `specoffload-run --ray` to give it its kind's plan.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from .cluster import LABEL, _import_ray, connect


# ----------------------------------------------------------------------------------------------
# On each node
# ----------------------------------------------------------------------------------------------

def node_hardware(device: str = "auto") -> dict:
    """What makes two nodes the same kind: the compute device's model and count, CPU model, cores, host memory."""
    import torch

    from .profiler.machine import cpu_name, meminfo

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    mem = meminfo().get("MemTotal") or os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"device_kind": "cuda" if gpus else "cpu", "gpu": torch.cuda.get_device_name(0) if gpus else "",
            "gpus": gpus, "cpu": cpu_name(), "cores": os.cpu_count() or 1, "host_mem_gib": round(mem / 2**30),
            "host": socket.gethostname()}


def profile_node(args) -> dict:
    """The default profiler a node's task runs: the single-machine probes, warnings collected, nothing written."""
    from .profile_cli import measure_here

    warnings: list[str] = []
    result = measure_here(args, "node", progress=False, warn=warnings.append, quiet_disk=True)
    return {"profile": result.profile, "failed": dict(result.failed), "warnings": warnings + result.warnings,
            "seconds": result.seconds}


def _node_task(profiler: Callable, args, addr: str) -> dict:
    """Runs on one node: its hardware, then `profiler(args)`. Never raises: a failure comes back as its message."""
    t0 = time.perf_counter()
    out = {"addr": addr, "host": socket.gethostname()}
    try:
        out["hardware"] = node_hardware(args.device)
        out.update(profiler(args))
    except Exception as exc:  # noqa: BLE001 - reported with the node's name, the other nodes' results kept
        text = (str(exc).splitlines() or [""])[0]
        ours = type(exc).__module__.startswith("specoffload")  # our errors are sentences already
        out["error"] = text if ours and text else f"{type(exc).__name__}: {text}"
    out.setdefault("seconds", time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------------------------
# Kinds of node, their names and their merged profiles
# ----------------------------------------------------------------------------------------------

def hardware_key(hw: dict) -> tuple:
    return (hw["device_kind"], hw["gpu"], hw["gpus"], hw["cpu"], hw["cores"], hw["host_mem_gib"])


def _slug(text: str, limit: int = 24) -> str:
    text = re.sub(r"\((r|tm)\)|\bnvidia\b|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:limit].strip("-") or "unknown"


def kind_names(hardware: list[dict]) -> list[str]:
    """A file-name- and Ray-label-safe name per distinct hardware (same order), unique among them."""
    names = []
    for hw in hardware:
        if hw["device_kind"] == "cuda":
            base = _slug(hw["gpu"]) + (f"x{hw['gpus']}" if hw["gpus"] > 1 else "")
        else:
            base = f"cpu-{hw['cores']}c-{_slug(hw['cpu'])}"
        names.append(base)
    dup = {n for n in names if names.count(n) > 1}
    for i, hw in enumerate(hardware):  # same model, different memory or CPU: say what differs
        if names[i] in dup:
            names[i] += (f"-{hw['host_mem_gib']}g" if hw["device_kind"] == "cpu"
                         else f"-{hw['cores']}c-{hw['host_mem_gib']}g")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


_FLOOR = ("host_mem_bytes", "pinned_mem_bytes", "gpu_mem_bytes", "cpu_cores")  # capacity: the smallest node's
_CEIL = ("gpu_mem_reserve_bytes",)


def merge_profiles(profiles: list, name: str, nodes: list[str]):
    """One profile for nodes of the same hardware: per figure the median over them (curves point by point where
    every node measured the same sizes, else the first node's curve), capacities the smallest."""
    from specoffload.planner.schema import Curve, HardwareProfile

    first = profiles[0]
    if len(profiles) == 1:
        prov = {**first.provenance, "cluster.nodes": nodes[0]}
        return dataclasses.replace(first, name=name, provenance=prov)
    changes: dict = {}
    for f in dataclasses.fields(HardwareProfile):
        vals = [getattr(p, f.name) for p in profiles]
        v0 = next((v for v in vals if v is not None), None)  # a figure one node could not measure: the others'
        if f.name in _FLOOR:
            changes[f.name] = min(vals)
        elif f.name in _CEIL:
            changes[f.name] = max(vals)
        elif isinstance(v0, Curve):
            curves = [v for v in vals if v is not None]
            xs = [tuple(x for x, _ in c.points) for c in curves]
            if all(x == xs[0] for x in xs):
                changes[f.name] = Curve(tuple((x, statistics.median(c.points[i][1] for c in curves))
                                              for i, x in enumerate(xs[0])))
        elif isinstance(v0, float):
            changes[f.name] = statistics.median(v for v in vals if v is not None)
    missing = tuple(m for m in first.missing if changes.get(m, getattr(first, m)) is None)
    prov = dict(first.provenance)
    prov["host"] = ", ".join(p.provenance.get("host", "?") for p in profiles)
    prov["cluster.nodes"] = ", ".join(nodes)
    prov["cluster.merge"] = (f"{len(profiles)} nodes of the same hardware, each profiled on itself; every figure is "
                             "the median over them (curves point by point), memory and cores the smallest node's; "
                             "the data.* entries are the first node's")
    for node, p in zip(nodes, profiles):
        prov[f"cluster.node.{node}"] = _headline(p)
    return dataclasses.replace(first, name=name, provenance=prov, missing=missing, **changes)


def _headline(p) -> str:
    def at_top(c):
        return f"{c.points[-1][1]:.4g}" if c is not None else "missing"

    return (f"matmul {at_top(p.gpu_matmul_flops_per_s)} flop/s, h2d pinned {at_top(p.h2d_pinned_bytes_per_s)} B/s, "
            f"CPU attention KV read {p.cpu_attn_kv_read_bytes_per_s or 0:.4g} B/s, host memory "
            f"{p.host_mem_bytes / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def gather_profiles(args, profiler: Callable = profile_node) -> int:
    """specoffload-profile --ray: profile every node, write a profile per kind, print the --cluster argument.
    `profiler(args) -> {"profile", "failed", "warnings", "seconds"}` runs on each node (tests give a cheap one)."""
    from specoffload.planner.strict import SchemaError

    from .run_cli import RunError

    if args.name:
        raise SchemaError("--name names one profile; with --ray each kind of node is named for its hardware")
    out_dir = Path(args.output or ".")
    if out_dir.exists() and not out_dir.is_dir():
        raise SchemaError(f"-o {out_dir}: with --ray, -o is a folder (one profile per kind of node goes there), and "
                          "this is a file; give a folder")
    if args.disk is not None and args.disk_file:
        raise SchemaError("--disk-file names one machine's file; with --ray give --disk DIR (a folder every node has)")
    ray = _import_ray()
    started = connect(ray, args.ray, workers=os.cpu_count() or 1, threads=1)
    try:
        return _gather(ray, args, profiler, out_dir, RunError)
    finally:
        if started:
            ray.shutdown()


def _gather(ray, args, profiler, out_dir: Path, RunError) -> int:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not nodes:
        raise RunError(f"--ray {args.ray}: the cluster has no live node")
    task = ray.remote(_node_task)
    pin = [NodeAffinitySchedulingStrategy(n["NodeID"], soft=False) for n in nodes]
    addrs = [n.get("NodeManagerAddress", "?") for n in nodes]
    if len(set(addrs)) < len(addrs):  # several nodes on one machine (a test cluster): tell them apart
        addrs = [f"{a}/{n['NodeID'][:8]}" for a, n in zip(addrs, nodes)]
    labels = [(n.get("Labels") or {}).get(LABEL, "") for n in nodes]

    # Round 1 (cheap, no resources asked): each node's hardware, hence the kinds and the files to write.
    hw_refs = [task.options(num_cpus=0, scheduling_strategy=s).remote(_hardware_only, args, a) for s, a in zip(pin, addrs)]
    hws = ray.get(hw_refs)
    bad = [h for h in hws if "error" in h]
    if bad:
        raise RunError(f"node {bad[0]['addr']} ({bad[0]['host']}): cannot read its hardware: {bad[0]['error']}")
    keys = [hardware_key(h["hardware"]) for h in hws]
    distinct = list(dict.fromkeys(keys))
    names = dict(zip(distinct, kind_names([hws[keys.index(k)]["hardware"] for k in distinct])))
    paths = {k: out_dir / f"{names[k]}.yaml" for k in distinct}
    taken = [str(p) for p in paths.values() if p.exists()]
    if taken:
        raise RunError(f"{', '.join(taken)} already exist(s); nothing was profiled. Move them away or give another "
                       "folder with -o")
    print(f"specoffload-profile: {len(nodes)} node(s), {len(distinct)} kind(s): "
          + "; ".join(f"{names[k]} ({keys.count(k)})" for k in distinct)
          + f"; profiling each node on itself ({'quick' if args.quick else 'full'} mode)", file=sys.stderr)

    # Round 2: the profiler on every node, with the whole node to itself.
    refs = {}
    for n, s, a in zip(nodes, pin, addrs):
        res = n.get("Resources", {})
        refs[task.options(num_cpus=float(res.get("CPU", 0)), num_gpus=float(res.get("GPU", 0)),
                          scheduling_strategy=s, max_retries=0).remote(profiler, args, a)] = a
    results: dict[str, dict] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        a = refs[ready[0]]
        try:
            r = ray.get(ready[0])
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.RayTaskError) as exc:
            why = [x for x in str(exc).splitlines() if x.strip()]
            r = {"addr": a, "host": "?", "error": f"the task was lost ({type(exc).__name__}"
                                                  + (f": {why[-1].strip()[:300]}" if why else "") + ")"}
        results[a] = r
        for w in r.get("warnings", []):
            print(f"specoffload-profile: warning: node {a}: {w}", file=sys.stderr)
        if "error" in r:
            print(f"specoffload-profile: error: node {a} ({r['host']}): {r['error']}", file=sys.stderr)
        else:
            print(f"specoffload-profile: node {a} ({r['host']}) profiled in {r['seconds']:.1f} s"
                  + (f"; {len(r['failed'])} probe(s) failed: {', '.join(r['failed'])}" if r.get("failed") else ""),
                  file=sys.stderr)

    # One file per kind; the --cluster argument and the labels.
    out_dir.mkdir(parents=True, exist_ok=True)
    cluster_items, label_lines, failed_kinds = [], [], []
    for k in distinct:
        members = [a for a, kk in zip(addrs, keys) if kk == k]
        ok = [a for a in members if "error" not in results[a]]
        if not ok:
            failed_kinds.append(names[k])
            continue
        prof = merge_profiles([results[a]["profile"] for a in ok], names[k], ok)
        prof.save(paths[k])
        hw = hws[keys.index(k)]["hardware"]
        engines = hw["gpus"] if hw["device_kind"] == "cuda" and hw["gpus"] > 1 else 1
        cluster_items.append(f"{paths[k]}:{len(members)}" + (f"x{engines}" if engines > 1 else ""))
        lost = f" ({len(members) - len(ok)} of its nodes failed; the figures are the others')" if len(ok) < len(members) else ""
        print(f"wrote {paths[k]}: {names[k]}, {len(members)} node(s){lost}: {_describe(hw)}")
        unlabelled = [a for a, lab in zip(addrs, labels) if a in members and lab != names[k]]
        if len(distinct) > 1 and unlabelled:
            label_lines.append(f"  {', '.join(unlabelled)}: ray start ... --labels {LABEL}={names[k]}")
    if cluster_items:
        print("plan the job with:\n  specoffload-plan --model MODEL [--draft DRAFT] --cluster " + ",".join(cluster_items)
              + " --prompt-len N --gen-len N --num-prompts N -o plan.yaml")
        if label_lines:
            print(f"and give each node its kind's label (specoffload-run --ray runs the plan for a node's "
                  f"{LABEL} label, the first plan on unlabelled nodes):")
            print("\n".join(label_lines))
    if failed_kinds:
        print(f"specoffload-profile: error: no profile for {', '.join(failed_kinds)}: every node of that kind failed "
              "(see above)", file=sys.stderr)
    n_failed = sum(1 for r in results.values() if "error" in r)
    return 2 if n_failed else 0


def _hardware_only(args) -> dict:
    return {}


def _describe(hw: dict) -> str:
    dev = f"{hw['gpus']} x {hw['gpu']}, " if hw["device_kind"] == "cuda" else ""
    return f"{dev}{hw['cpu']}, {hw['cores']} cores, {hw['host_mem_gib']} GiB host memory"
