"""Planning one job for a cluster: a plan per kind of node, the prompts split by predicted speed.

    specoffload-plan --model mixtral-8x7b --cluster rtx4090-pcie4:16 --prompt-len 512 --gen-len 128 \\
        --num-prompts 10000000 -o plan.yaml
    specoffload-plan ... --cluster rtx4090-pcie4:12,l4:4x2 -o plan.yaml   # 12 one-GPU nodes, 4 two-GPU L4 nodes

`--cluster` lists PROFILE:NODES[xENGINES] (ENGINES per node: one per GPU, default 1). Engines on one node
share its host: each is planned on its share of the profile (host and pinned memory, CPU cores and the
CPU's attention and memory rates divided by the engines on the node; each GPU keeps its own PCIe link),
so N engines hold N copies of the host weights within the node's memory. The job's prompts are dealt to
the engines in proportion to each kind's predicted throughput (planned, then re-planned with its share,
twice), so every kind is predicted to finish at about the same time. One plan per kind is written
(`plan.yaml` for one kind; `plan.<profile>.yaml` for several); the job's prediction is printed: the
cluster's throughput, the time to the last engine's finish, and what binds each kind of node.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .planner import PlanResult, make_plan
from .schema import HardwareProfile, Workload, load_profile
from .strict import SchemaError

SHARED_RATES = ("cpu_attn_kv_read_bytes_per_s", "cpu_attn_flops_per_s", "cpu_mem_bandwidth_bytes_per_s")


@dataclass
class NodeKind:
    profile_ref: str
    nodes: int
    engines_per_node: int
    profile: HardwareProfile | None = None
    result: PlanResult | None = None
    prompts_per_engine: int = 0

    @property
    def engines(self) -> int:
        return self.nodes * self.engines_per_node


def parse_cluster(spec: str) -> list[NodeKind]:
    """'rtx4090-pcie4:16,l4:4x2' -> node kinds; a bad item is a SchemaError naming it and the form."""
    kinds = []
    for item in (x.strip() for x in spec.split(",")):
        ref, sep, count = item.rpartition(":")
        nodes, _, per = count.partition("x")
        try:
            n, k = int(nodes), int(per or 1)
        except ValueError:
            n = k = 0
        if not sep or not ref or n < 1 or k < 1:
            raise SchemaError(f"--cluster item {item!r}: expected PROFILE:NODES or PROFILE:NODESxENGINES "
                              "(e.g. rtx4090-pcie4:16 or l4:4x2), counts >= 1")
        kinds.append(NodeKind(ref, n, k))
    return kinds


def engine_share(profile: HardwareProfile, engines: int) -> HardwareProfile:
    """One engine's share of a node that runs `engines` of them."""
    if engines == 1:
        return profile
    changes = {f: getattr(profile, f) / engines for f in SHARED_RATES if getattr(profile, f) is not None}
    prov = dict(profile.provenance)
    prov["engine_share"] = (f"1/{engines} of the node's host and pinned memory, CPU cores and CPU rates "
                            f"({', '.join(SHARED_RATES)}), for {engines} engines on one node")
    return dataclasses.replace(profile, name=f"{profile.name}/{engines}", host_mem_bytes=profile.host_mem_bytes / engines,
                               pinned_mem_bytes=profile.pinned_mem_bytes / engines,
                               cpu_cores=max(1, profile.cpu_cores // engines), provenance=prov, **changes)


def plan_cluster(kinds: list[NodeKind], target, draft, workload: Workload, **plan_kw) -> list[NodeKind]:
    """Plan each kind on its share of the prompts; re-split by predicted throughput; plan again."""
    total = workload.num_prompts
    engines = sum(k.engines for k in kinds)
    if total < engines:
        raise SchemaError(f"{total} prompts for {engines} engines: fewer prompts than engines")
    for k in kinds:
        k.profile = engine_share(load_profile(k.profile_ref), k.engines_per_node)
    shares = [total * k.engines / engines / k.engines for k in kinds]  # prompts per engine
    for _ in range(3):
        for k, share in zip(kinds, shares):
            k.prompts_per_engine = max(1, math.ceil(share))
            k.result = make_plan(k.profile, target, draft, dataclasses.replace(workload, num_prompts=k.prompts_per_engine),
                                 **plan_kw)
        speed = [k.result.plan.prediction.throughput_tokens_per_s for k in kinds]
        if len(kinds) == 1:
            break
        cluster = sum(k.engines * s for k, s in zip(kinds, speed))
        shares = [total * s / cluster for s in speed]
    return kinds


def cluster_summary(kinds: list[NodeKind], workload: Workload) -> str:
    total_engines = sum(k.engines for k in kinds)
    job_seconds = max(k.result.plan.prediction.total_seconds for k in kinds)
    tokens = workload.num_prompts * workload.gen_len_tokens
    lines = [f"cluster: {sum(k.nodes for k in kinds)} nodes, {total_engines} engines; {workload.num_prompts} prompts x "
             f"{workload.prompt_len_tokens} tokens -> {workload.gen_len_tokens} generated"]
    for k in kinds:
        p = k.result.plan
        pr = p.prediction
        busy = ", ".join(f"{r} {100 * s / pr.slot_seconds:.0f}%" for r, s in pr.busy_seconds_per_slot.items())
        lines.append(f"  {k.profile_ref}: {k.nodes} nodes x {k.engines_per_node} engines, {k.prompts_per_engine} prompts "
                     f"per engine; {p.policy}, batch {p.decode_batch}x{p.num_batches}, k={p.draft_len}; "
                     f"{pr.throughput_tokens_per_s:.1f} tok/s per engine, {k.engines * pr.throughput_tokens_per_s:.1f} "
                     f"for the kind; done in {pr.total_seconds / 3600:.2f} h (prefill {pr.prefill_seconds / 3600:.2f} h); "
                     f"binding: {pr.binding} (busy per slot: {busy}); host memory "
                     f"{pr.peak_mem_bytes['host'] / 2**30:.1f} of {pr.capacity_bytes['host'] / 2**30:.1f} GiB per engine")
    lines.append(f"predicted job: {tokens / job_seconds:.1f} tok/s for the cluster, {job_seconds / 3600:.2f} h to the "
                 f"last engine's finish ({tokens} tokens); a prediction of the cost model, per engine, with the "
                 "cluster's own costs (dispatch, results, the driver's writes) not in it")
    return "\n".join(lines)


def plan_paths(kinds: list[NodeKind], output: str) -> list[Path]:
    out = Path(output)
    if len(kinds) == 1:
        return [out]
    names = [k.result.plan.profile.replace("/", "-") for k in kinds]
    if len(set(names)) < len(names):
        raise SchemaError("--cluster lists the same profile twice; give each kind of node once")
    return [out.with_name(f"{out.stem}.{n}{out.suffix}") for n in names]
