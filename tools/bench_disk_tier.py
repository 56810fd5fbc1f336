"""Benchmark: the disk tier, planned (big models on spec-sheet presets) and measured (the tiny pair here).

    python tools/bench_disk_tier.py                      # both parts; writes bench/results/disk_tier.{json,md}
    python tools/bench_disk_tier.py --planned-only       # the planner's figures only (seconds)
    python tools/bench_disk_tier.py --profile profiles/cpu-2core.yaml --reps 5

Planned (no hardware needed; the presets' disk figures are estimates, stated as such in them):
  - Mixtral-8x22B on rtx4090-pcie3 (24 GB card, 256 GB host of which the preset pins 190.7 GiB), whose
    weights (261 GiB) exceed GPU + host memory: the planner reads some layers from disk every sweep.
    Against the same workload planned with unlimited host memory (a hypothetical in-memory run), as the
    paper compares its disk run (29% of in-memory speed). Offload-only, and speculative with a draft
    that fits beside two streamed 8x22B layers in 22.5 GiB (Mistral-7B does not: 13.5 GiB of weights +
    2 x 4.7 GiB of weight buffers; a 1.1 B Mistral-architecture draft sharing the tokenizer, a
    hypothetical shape, at an assumed acceptance).
  - Llama-3-70B (+ Llama-3.2-1B draft) on l4 with --host-mem-limit 128, against unlimited host memory.
Measured (this machine, CPU only): the tiny pair planned with a host limit that puts target layers on
disk, run by the engine (each pass reads them from the checkpoint, O_DIRECT where allowed), against
the simulator's prediction for the same plan on a profile with this disk's measured read rate; and
the same plan without the disk tier, as a control. The machine is shared and noisy: one untimed
warm-up, then --reps timed runs in rotating order, median reported with its spread.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "runtime" / "assets" / "demo_prompts.jsonl"
OUT = ROOT / "bench" / "results"
GiB = 2**30
PAPER_FRACTION = 0.29  # the paper: Mixtral-8x22B from disk at 29% of its in-memory speed (its environment 1)

# A 1.1 B Mistral-architecture draft with Mixtral's tokenizer (32000): a shape, not a released checkpoint.
SMALL_DRAFT = {"architectures": ["MistralForCausalLM"], "hidden_size": 2048, "num_attention_heads": 16,
               "num_key_value_heads": 8, "num_hidden_layers": 16, "intermediate_size": 5632, "vocab_size": 32000,
               "max_position_embeddings": 32768, "tie_word_embeddings": False}


def planned() -> list[dict]:
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.planner import PlanInfeasible, make_plan
    from specoffload.planner.schema import Workload, load_profile

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-disk-")) / "draft-1.1b"
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(SMALL_DRAFT))
    small = load_model_spec(str(tmp))
    cases = [
        ("mixtral-8x22b", None, "rtx4090-pcie3", 0.0, "offload-only"),
        ("mixtral-8x22b", "mistral-7b", "rtx4090-pcie3", 0.0, "specoffload"),
        ("mixtral-8x22b", small, "rtx4090-pcie3", 0.0, "specoffload"),
        ("llama-3-70b", "llama-3.2-1b", "l4", 128.0, "specoffload"),
        ("llama-3-70b", None, "l4", 128.0, "offload-only"),
    ]
    w = Workload(prompt_len_tokens=512, gen_len_tokens=128, num_prompts=1000, acceptance=0.7)
    for target, draft, prof_name, limit, policy in cases:
        t = load_model_spec(target)
        d = load_model_spec(draft) if isinstance(draft, str) else draft
        profile = load_profile(prof_name)
        in_memory = profile.with_overrides({"host_mem_bytes": 1e13, "pinned_mem_bytes": 1e13})
        row = {"target": target, "draft": (d.name + (" (hypothetical 1.1B shape)" if d is small else "")) if d else "",
               "profile": prof_name, "disk_read_bytes_per_s": profile.disk_read_bytes_per_s,
               "disk_figure": profile.provenance.get("disk_read_bytes_per_s", ""), "host_mem_limit_gib": limit,
               "workload": "1000 prompts x 512 tokens -> 128, acceptance 0.7 (assumed)", "requested_policy": policy}
        try:
            t0 = time.perf_counter()
            res = make_plan(profile, t, d, w, policy=policy, host_mem_limit_bytes=limit * GiB)
            row["plan_seconds"] = time.perf_counter() - t0
            p, pr = res.plan, res.plan.prediction
            row.update(policy=p.policy, decode_batch=p.decode_batch, num_batches=p.num_batches, draft_len=p.draft_len,
                       disk_layers=p.disk_layers, layers=t.num_layers,
                       disk_gib_per_sweep=pr.disk_bytes_per_sweep / GiB, binding=pr.binding,
                       tok_s=pr.throughput_tokens_per_s, decode_tok_s=pr.decode_tokens_per_s,
                       host_peak_gib=pr.peak_mem_bytes["host"] / GiB,
                       slot_busy={k: round(v, 4) for k, v in pr.busy_seconds_per_slot.items()},
                       notes=[n for n in p.notes if n.startswith(("disk tier", "declined"))])
        except PlanInfeasible as exc:
            row.update(policy="infeasible", error=str(exc))
            rows.append(row)
            continue
        ref = make_plan(in_memory, t, d, w, policy=policy).plan
        row.update(in_memory_tok_s=ref.prediction.throughput_tokens_per_s, in_memory_policy=ref.policy,
                   in_memory_decode_batch=ref.decode_batch, in_memory_draft_len=ref.draft_len,
                   in_memory_disk_layers=ref.disk_layers,
                   fraction_of_in_memory=row["tok_s"] / ref.prediction.throughput_tokens_per_s)
        rows.append(row)
    return rows


def measured(profile_ref: str | None, reps: int, gen_len: int, threads: int) -> dict:
    import torch

    from specoffload.planner.costmodel import CostModel
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.planner import make_plan
    from specoffload.planner.schema import load_profile
    from specoffload.planner.sim import simulate
    from specoffload.planner.trace_names import TRACK_DISK
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.profiler.acceptance import measure_workload
    from specoffload.runtime.profiler.disk import measure_disk, measure_disk_cpu_costs, measure_layer_reads
    from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

    torch.set_num_threads(threads)
    t_dir, d_dir = tiny_pair_paths()
    target, draft = load_model_spec("tiny-target"), load_model_spec("tiny-draft")
    if profile_ref:
        base = load_profile(profile_ref)
    else:
        from specoffload.runtime.profiler.probes import ProfileConfig, run_profile

        print("profiling this machine (quick mode) ...", flush=True)
        base = run_profile(ProfileConfig.quick(model=target), device="cpu", name="bench-measured", progress=False,
                           threads=threads, warn=lambda m: print(f"profile: {m}")).profile
    print("measuring the disk holding the checkpoint ...", flush=True)
    rate = measure_disk(t_dir.parent, quick=True)
    profile = base.with_overrides({"disk_read_bytes_per_s": rate.bytes_per_s})
    tok = tiny_pair_tokenizer()
    texts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()]
    prompts = [tok.encode(x).ids for x in texts]
    workload = measure_workload("tiny-target", "tiny-draft", PROMPTS, k=6, max_new_tokens=gen_len, sample=16,
                                progress=False).workload
    free = make_plan(profile, target, draft, workload, policy="serial-spec").plan
    cm = CostModel(profile, target, draft, workload)
    # host memory capped 1.5 layers (in the compute dtype) below the plan's need: some layers go to disk
    limit = free.prediction.peak_mem_bytes["host"] - 1.5 * cm.disk_layer_bytes * cm.weight_read_factor
    plan = make_plan(profile, target, draft, workload, policy="serial-spec", host_mem_limit_bytes=limit).plan
    control = plan.replace(disk_layers=0, host_mem_limit_bytes=0.0)
    runs = {"disk tier": plan, "same plan, no disk tier": control}
    requests = [Request(str(i), p, gen_len) for i, p in enumerate(prompts)]
    engines = {name: Engine(p, t_dir, d_dir, device="cpu") for name, p in runs.items()}

    def timed(name: str) -> tuple[float, dict]:
        eng = engines[name]
        eng.stats = type(eng.stats)()
        disk = eng.target.disk
        busy0, read0 = eng.timeline.busy.get(TRACK_DISK, 0.0), disk.reader.payload_bytes if disk else 0
        conv0 = (disk.convert_seconds, disk.converted_bytes) if disk else (0.0, 0)
        done = []
        t0 = time.perf_counter()
        stats = eng.run(requests, done.append)
        wall = time.perf_counter() - t0
        info = {"disk_bytes_per_sweep": stats.disk_bytes_per_sweep, "sweeps": stats.sweeps,
                "disk_read_bytes": stats.disk_read_bytes}
        if disk is not None:  # the engine's own reads: seconds per layer read, as its disk track timed them
            n_reads = (disk.reader.payload_bytes - read0) / cm.disk_layer_bytes
            info["engine_read_s"] = (eng.timeline.busy.get(TRACK_DISK, 0.0) - busy0) / max(n_reads, 1.0)
            n_conv = (disk.converted_bytes - conv0[1]) / cm.disk_layer_bytes
            info["engine_convert_s"] = (disk.convert_seconds - conv0[0]) / max(n_conv, 1.0)
        return sum(len(f.tokens) for f in done) / wall, info

    def layer_probe() -> float:
        """The engine's reader on the checkpoint's own layers, just before a timed run (the disk's rate
        varies from minute to minute on a shared machine)."""
        r = measure_layer_reads(t_dir, reads=16)
        probes.append(r.bytes_per_s)
        return r.bytes_per_s

    load_before = os.getloadavg()[0]
    # the disk tier's CPU costs measured now, beside the runs (the profile's figures are from another hour)
    cpu_now = measure_disk_cpu_costs(t_dir)
    probes: list[float] = []
    timed("disk tier")  # warm-up
    samples = {n: [] for n in runs}
    extra, engine_reads, engine_converts = {}, [], []
    names = list(runs)
    for rep in range(reps):
        for name in names[rep % 2:] + names[:rep % 2]:
            if name == "disk tier":
                layer_probe()
            tps, info = timed(name)
            samples[name].append(tps)
            extra[name] = info
            if "engine_read_s" in info:
                engine_reads.append(info["engine_read_s"])
                engine_converts.append(info["engine_convert_s"])
    layer_rate = statistics.median(probes)
    # the simulation with each figure: the sequential probe's (what `specoffload-profile --disk` writes) and
    # the engine reader's layer reads (measure_layer_reads) taken beside the runs
    # and with the disk tier's CPU terms: the profile's figures (the main column), the ones measured beside
    # these runs, and none (the model before those terms)
    sims = {name: simulate(p, profile).report for name, p in runs.items()}
    layer_profile = base.with_overrides({"disk_read_bytes_per_s": layer_rate})
    sims_layer = {name: simulate(p, layer_profile).report for name, p in runs.items()}
    now_profile = profile.with_overrides({"disk_convert_bytes_per_s": cpu_now.convert_bytes_per_s,
                                          "disk_read_compute_seconds_per_byte": cpu_now.read_compute_seconds_per_byte})
    sims_now = {name: simulate(p, now_profile).report for name, p in runs.items()}
    bare = profile.with_overrides({"disk_convert_bytes_per_s": 0.0, "disk_read_compute_seconds_per_byte": 0.0})
    sims_bare = {name: simulate(p, bare).report for name, p in runs.items()}
    out = {"profile": base.name, "disk_read_bytes_per_s": rate.bytes_per_s, "disk_mode": rate.mode,
           "layer_read_bytes_per_s": layer_rate, "layer_read_probes": probes,
           "layer_read_s": cm.disk_layer_bytes / layer_rate,
           "engine_read_s": statistics.median(engine_reads) if engine_reads else None,
           "engine_convert_s": statistics.median(engine_converts) if engine_converts else None,
           "cpu_costs": {"profile": {"disk_convert_bytes_per_s": base.disk_convert_bytes_per_s,
                                     "disk_read_compute_seconds_per_byte": base.disk_read_compute_seconds_per_byte,
                                     "convert_s": cm.disk_convert_seconds(),
                                     "read_compute_s": cm.disk_read_compute_seconds()},
                         "now": {"disk_convert_bytes_per_s": cpu_now.convert_bytes_per_s,
                                 "disk_read_compute_seconds_per_byte": cpu_now.read_compute_seconds_per_byte,
                                 "convert_s": cpu_now.convert_seconds, "read_slowdown_s": cpu_now.slowdown_seconds}},
           "disk_threads": rate.threads, "disk_block_bytes": rate.block_bytes, "fs_type": rate.fs_type,
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "torch_threads": threads, "gen_len": gen_len, "prompts": len(prompts), "reps": reps,
           "acceptance": [round(a, 3) for a in workload.acceptance], "host_mem_limit_bytes": limit,
           "plan": {"policy": plan.policy, "decode_batch": plan.decode_batch, "draft_len": plan.draft_len,
                    "disk_layers": plan.disk_layers, "disk_bytes_per_sweep": plan.prediction.disk_bytes_per_sweep,
                    "predicted_tok_s": plan.prediction.throughput_tokens_per_s},
           "runs": {}}
    for name in runs:
        xs = sorted(samples[name])
        med = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
        sim = sims[name].throughput_tokens_per_s
        sim_l = sims_layer[name].throughput_tokens_per_s
        out["runs"][name] = {"measured_tok_s": med, "spread": (xs[-1] - xs[0]) / med, "samples": xs,
                             "best_tok_s": xs[-1], "best_sim_error": (sim - xs[-1]) / xs[-1],
                             "simulated_tok_s": sim, "sim_error": (sim - med) / med,
                             "simulated_layer_tok_s": sim_l, "layer_sim_error": (sim_l - med) / med,
                             "layer_best_sim_error": (sim_l - xs[-1]) / xs[-1],
                             "simulated_now_tok_s": sims_now[name].throughput_tokens_per_s,
                             "now_sim_error": (sims_now[name].throughput_tokens_per_s - med) / med,
                             "now_best_sim_error": (sims_now[name].throughput_tokens_per_s - xs[-1]) / xs[-1],
                             "simulated_bare_tok_s": sims_bare[name].throughput_tokens_per_s,
                             "bare_sim_error": (sims_bare[name].throughput_tokens_per_s - med) / med,
                             "simulated_busy_fraction": sims[name].busy_fraction, **extra[name]}
    for eng in engines.values():
        if eng.target.disk is not None:
            eng.target.disk.close()
    return out


def markdown(plans: list[dict], meas: dict | None) -> str:
    lines = ["# Disk tier benchmark", "", "## Planned (spec-sheet presets; disk figures are estimates)", "",
             "| target + draft | profile | host limit | plan | layers on disk | GiB/sweep | binding | tok/s | "
             "in-memory tok/s | fraction |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in plans:
        who = r["target"] + (f" + {r['draft']}" if r["draft"] else "")
        lim = f"{r['host_mem_limit_gib']:g} GiB" if r["host_mem_limit_gib"] else "profile's"
        if r["policy"] == "infeasible":
            lines.append(f"| {who} | {r['profile']} | {lim} | no plan fits | | | | | | |")
            continue
        plan = f"{r['policy']} b={r['decode_batch']}x{r['num_batches']} k={r['draft_len']}"
        lines.append(f"| {who} | {r['profile']} | {lim} | {plan} | {r['disk_layers']}/{r['layers']} | "
                     f"{r['disk_gib_per_sweep']:.1f} | {r['binding']} | {r['tok_s']:.2f} | {r['in_memory_tok_s']:.2f} "
                     f"| {100 * r['fraction_of_in_memory']:.0f}% |")
    lines += ["", f"The paper's figure: {100 * PAPER_FRACTION:.0f}% of in-memory speed for Mixtral-8x22B from disk.",
              ""]
    for r in plans:
        if r["policy"] == "infeasible":
            lines.append(f"- {r['target']} + {r['draft']} on {r['profile']}: {r['error']}")
    if meas:
        lines += ["", "## Measured on this machine (tiny pair, CPU, shared and noisy)", "",
                  f"Disk: {meas['disk_read_bytes_per_s'] / 1e9:.2f} GB/s ({meas['disk_mode']}, {meas['disk_threads']} "
                  f"threads, {meas['fs_type']}); plan: {meas['plan']['policy']} b={meas['plan']['decode_batch']} "
                  f"k={meas['plan']['draft_len']}, {meas['plan']['disk_layers']} of 4 layers on disk "
                  f"({meas['plan']['disk_bytes_per_sweep'] / 2**20:.2f} MiB per sweep); {meas['prompts']} prompts -> "
                  f"{meas['gen_len']} tokens, {meas['torch_threads']} torch thread(s), median of {meas['reps']}.", "",
                  f"Profile: {meas['profile']}. Load average (1 min) {meas['load_average'][0]:.2f} before the runs, "
                  f"{meas['load_average'][1]:.2f} after, on {os.cpu_count()} CPUs.", "",
                  f"Layer reads by the engine's reader (measure_layer_reads on the checkpoint, before each disk-tier "
                  f"run): median {meas['layer_read_bytes_per_s'] / 1e9:.2f} GB/s = {1e3 * meas['layer_read_s']:.2f} ms "
                  f"per layer (per run: {', '.join(f'{x / 1e9:.2f}' for x in meas['layer_read_probes'])} GB/s); "
                  f"the sequential probe's figure gives {1e3 * meas['layer_read_s'] * meas['layer_read_bytes_per_s'] / meas['disk_read_bytes_per_s']:.2f} ms; "
                  + (f"inside the engine (its disk track): {1e3 * meas['engine_read_s']:.2f} ms per layer."
                     if meas.get("engine_read_s") else ""), "",
                  _cpu_line(meas), "",
                  "| run | measured tok/s (median) | spread | best | simulated tok/s (profile's CPU figures) | sim error "
                  "vs median | vs best | simulated (CPU figures measured beside the runs) | vs median | vs best | "
                  "simulated (layer-read disk figure) | vs median | simulated (no CPU terms) | vs median "
                  "| MiB read per sweep (plan: "
                  f"{meas['plan']['disk_bytes_per_sweep'] / 2**20:.2f}) | simulated disk busy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in meas["runs"].items():
            lines.append(f"| {name} | {r['measured_tok_s']:.1f} | {100 * r['spread']:.0f}% | {r['best_tok_s']:.1f} | "
                         f"{r['simulated_tok_s']:.1f} | {100 * r['sim_error']:+.1f}% | {100 * r['best_sim_error']:+.1f}% | "
                         f"{r['simulated_now_tok_s']:.1f} | {100 * r['now_sim_error']:+.1f}% | "
                         f"{100 * r['now_best_sim_error']:+.1f}% | "
                         f"{r['simulated_layer_tok_s']:.1f} | {100 * r['layer_sim_error']:+.1f}% | "
                         f"{r['simulated_bare_tok_s']:.1f} | {100 * r['bare_sim_error']:+.1f}% | "
                         f"{r['disk_bytes_per_sweep'] / 2**20:.2f} | "
                         f"{100 * r['simulated_busy_fraction'].get('disk', 0.0):.0f}% |")
    return "\n".join(lines) + "\n"


def _cpu_line(meas: dict) -> str:
    c = meas.get("cpu_costs")
    if not c:
        return ""
    p, now = c["profile"], c["now"]
    eng = meas.get("engine_convert_s")
    layer = meas["plan"]["disk_bytes_per_sweep"] / max(1, meas["plan"]["disk_layers"]) / 2**20
    return (f"Disk tier CPU costs per layer ({layer:.2f} MiB): conversion {1e3 * p['convert_s']:.3f} ms by the profile "
            f"({p['disk_convert_bytes_per_s'] / 1e9:.2f} GB/s), {1e3 * now['convert_s']:.3f} ms measured beside the runs"
            + (f", {1e3 * eng:.3f} ms inside the engine" if eng else "")
            + f"; compute taken by a read in flight {1e3 * p['read_compute_s']:.3f} ms by the profile "
            f"({1e9 * p['disk_read_compute_seconds_per_byte']:.3g} ns/B), {1e3 * now['read_slowdown_s']:.3f} ms "
            f"measured beside the runs ({1e9 * now['disk_read_compute_seconds_per_byte']:.3g} ns/B).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--planned-only", action="store_true")
    ap.add_argument("--profile", default=None, help="profile of this machine (default: quick-profile it first)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    plans = planned()
    meas = None if args.planned_only else measured(args.profile, args.reps, args.gen_len, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "disk_tier.json").write_text(json.dumps({"planned": plans, "measured": meas}, indent=1, default=str))
    md = markdown(plans, meas)
    (out / "disk_tier.md").write_text(md)
    print(md)
    print(f"wrote {out / 'disk_tier.json'} and {out / 'disk_tier.md'}")


if __name__ == "__main__":
    main()
