"""Where the disk tier's time goes in the engine (tiny pair, CPU): the bench's plan run in variants.

    python tools/diag_disk_tier.py                         # disk,pertensor,noconvert,memory; 3 timed reps
    python tools/diag_disk_tier.py --variants disk,noconvert,memory
    python tools/diag_disk_tier.py --variants disk,memory --reps 5

Each variant runs the same plan as tools/bench_disk_tier.py (serial-spec, all 4 target layers on disk)
with the engine's trace on, interleaved rep by rep, and prints tok/s, the median in-engine layer read
(its disk track), the time the compute waited for a read (DiskLayers.wait), the time spent converting
staged layers to fp32, target and draft pass time, process CPU time, and whether the output equals the
in-memory run's token for token. Variants:

  disk       the engine as it is (flat conversion: one copy per layer into a pooled destination)
  pertensor  staged layers converted tensor by tensor into fresh tensors (the conversion before the flat one)
  ram        reads served from a copy of the file in memory (same threads, same staging, no disk I/O)
  inline     reads done in the calling thread when needed (no reader or prefetch threads, no overlap)
  noconvert  each staged layer converted once and the result reused (reads kept): the reads' share
  memory     the same plan without the disk tier (the bench's control)

The variants patch engine internals for the measurement only; nothing here changes the engine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import Future
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "runtime" / "assets" / "demo_prompts.jsonl"


class _Immediate:
    """An executor that runs each job in the caller's thread."""

    def submit(self, fn, *a):
        f: Future = Future()
        try:
            f.set_result(fn(*a))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
            f.set_exception(exc)
        return f

    def shutdown(self, wait: bool = True) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="disk,pertensor,noconvert,memory")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", default=str(ROOT / "profiles" / "cpu-2core.yaml"))
    ap.add_argument("--disk-rate", type=float, default=1.3e9, help="disk figure the plan is made with (B/s)")
    args = ap.parse_args()
    known = ("disk", "ram", "inline", "pertensor", "noconvert", "memory")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in known]
    if bad:
        raise SystemExit(f"error: unknown variant(s) {', '.join(bad)}; choose from {', '.join(known)}")

    from specoffload.planner.costmodel import CostModel
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.planner import make_plan
    from specoffload.planner.schema import load_profile
    from specoffload.planner.trace_names import TRACK_DISK
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.layers import LayerWeights
    from specoffload.runtime.profiler.acceptance import measure_workload
    from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

    torch.set_num_threads(1)
    t_dir, d_dir = tiny_pair_paths()
    target, draft = load_model_spec("tiny-target"), load_model_spec("tiny-draft")
    profile = load_profile(args.profile).with_overrides({"disk_read_bytes_per_s": args.disk_rate})
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(json.loads(x)["prompt"]).ids for x in PROMPTS.read_text().splitlines()]
    workload = measure_workload("tiny-target", "tiny-draft", PROMPTS, k=6, max_new_tokens=32, sample=16,
                                progress=False).workload
    free = make_plan(profile, target, draft, workload, policy="serial-spec").plan
    cm = CostModel(profile, target, draft, workload)
    limit = free.prediction.peak_mem_bytes["host"] - 1.5 * cm.disk_layer_bytes * cm.weight_read_factor
    plan = make_plan(profile, target, draft, workload, policy="serial-spec", host_mem_limit_bytes=limit).plan
    requests = [Request(str(i), p, 32) for i, p in enumerate(prompts)]
    print(f"plan: {plan.policy} b={plan.decode_batch} k={plan.draft_len}, {plan.disk_layers} layers on disk")

    conv_s = [0.0]

    def per_tensor(dl, j, dtype):
        """The conversion as it was before the flat one: a fresh tensor per weight, one copy each."""
        src = dl.wait(j)
        t0 = time.perf_counter()
        out = LayerWeights(*({k: t.to(dtype=dtype, copy=True) for k, t in d.items()} for d in (src.attn, src.ffn)),
                           [{k: t.to(dtype=dtype, copy=True) for k, t in e.items()} for e in src.experts])
        conv_s[0] += time.perf_counter() - t0
        dl.release(j)
        return out

    cached: dict = {}

    def cached_take(dl, j, dtype, take):
        """Each staged layer converted once and reused (the read still made each pass)."""
        if j not in cached:
            cached[j] = take(j, dtype)
        else:
            dl.prefetcher.wait(j)
            dl.release(j)
        return cached[j]

    engines, waits = {}, {}
    for v in variants:
        eng = Engine(plan.replace(disk_layers=0, host_mem_limit_bytes=0.0) if v == "memory" else plan, t_dir, d_dir,
                     device="cpu", trace=True)
        dl = eng.target.disk
        waits[v] = [0.0]
        if dl is not None:
            if v == "ram":
                data: dict = {}

                def read_block(path, mem, off, length, data=data):
                    if path not in data:
                        data[path] = Path(path).read_bytes()
                    b = data[path][off:off + length]
                    mem[:len(b)] = b
                    return len(b)

                dl.reader._read_block = read_block
            if v == "inline":
                dl.prefetcher._exec = _Immediate()
                dl.reader._pool = _Immediate()
            wait = dl.prefetcher.wait

            def timed_wait(j, wait=wait, acc=waits[v]):
                t0 = time.perf_counter()
                out = wait(j)
                acc[0] += time.perf_counter() - t0
                return out

            dl.prefetcher.wait = timed_wait
            if v == "pertensor":
                dl.take = lambda j, dtype, dl=dl: per_tensor(dl, j, dtype)
            if v == "noconvert":
                dl.take = lambda j, dtype, dl=dl, take=dl.take: cached_take(dl, j, dtype, take)
        engines[v] = eng

    rows = {v: [] for v in variants}
    tokens = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for rep in range(args.reps + 1):  # rep 0: warm-up (and the outputs compared)
        for v in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            eng = engines[v]
            eng.timeline.spans.clear()
            eng.timeline.passes.clear()
            conv_s[0] = waits[v][0] = 0.0
            conv0 = eng.target.disk.convert_seconds if eng.target.disk is not None else 0.0
            eng.stats = type(eng.stats)()
            done = []
            c0, t0 = os.times(), time.perf_counter()
            eng.run(requests, done.append)
            wall, c1 = time.perf_counter() - t0, os.times()
            if rep == 0:
                tokens[v] = sorted((f.request.id, tuple(f.tokens)) for f in done)
                continue
            reads = [e - s for track, _, s, e in eng.timeline.spans if track == TRACK_DISK]
            rows[v].append({"tok_s": sum(len(f.tokens) for f in done) / wall, "wall": wall,
                            "read": statistics.median(reads) if reads else 0.0, "n_reads": len(reads),
                            "wait": waits[v][0],
                            "convert": conv_s[0] + ((eng.target.disk.convert_seconds - conv0)
                                                    if eng.target.disk is not None else 0.0),
                            "target": sum(p.end - p.start for p in eng.timeline.passes if p.model == "target"),
                            "draft": sum(p.end - p.start for p in eng.timeline.passes if p.model != "target"),
                            "cpu": (c1.user - c0.user) + (c1.system - c0.system)})
    ref = tokens.get("memory")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| variant | tok/s | wall ms | read ms/layer | reads | wait ms | convert ms | target passes ms | "
          "draft passes ms | CPU s | output = memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        m = {k: statistics.median(r[k] for r in rows[v]) for k in rows[v][0]}
        same = "-" if ref is None else ("yes" if tokens[v] == ref else "NO")
        print(f"| {v} | {m['tok_s']:.0f} | {1e3 * m['wall']:.0f} | {1e3 * m['read']:.2f} | {m['n_reads']:.0f} | "
              f"{1e3 * m['wait']:.1f} | {1e3 * m['convert']:.1f} | {1e3 * m['target']:.0f} | {1e3 * m['draft']:.0f} | "
              f"{m['cpu']:.2f} | {same} |")
    for eng in engines.values():
        if eng.target.disk is not None:
            eng.target.disk.close()


if __name__ == "__main__":
    main()
