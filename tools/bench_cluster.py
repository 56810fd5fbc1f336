"""One process against two Ray engines on the same prompts (the tiny pair, on this machine's CPU).

    python tools/bench_cluster.py [--prompts 128] [--gen-len 32] [--shard-size N] [--reps 3]

Runs `specoffload-run` three ways, each a fresh process as a user would start it, on the same plan and
prompts (the bundled demo prompts, repeated with new ids):
  - one process, one torch thread;
  - one process, two torch threads (the same cores the cluster gets);
  - `--ray local --ray-workers 2 --threads 1`: a local Ray cluster, two engine actors of one thread each.
Prints for each: the whole command's wall time, its start-up (wall minus the time generating: imports,
checkpoint loading, and for Ray the cluster, the actors and the prompt check), the time generating,
throughput over the time generating, and the ratio against two single-thread engines' worth of work
(2 x the one-thread process: what two cores can give). For the cluster: the engines' busy time, and the
overhead Ray and the driver add per prompt: (engines x run time - their busy time) / prompts, the time
an engine waits on dispatch, results and the tail of the last shard. The machine is shared and noisy:
runs rotate in order, each is repeated --reps times, the median is reported with its spread.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "runtime" / "assets" / "demo_prompts.jsonl"


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=None, help="default: the plan's sequences in flight")
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.prompts < 1 or args.gen_len < 1 or args.reps < 1:
        ap.error("--prompts, --gen-len and --reps must be >= 1")
    bindir = Path(sys.executable).parent
    texts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prompts = d / "in.jsonl"
        with prompts.open("w") as fh:
            for i in range(args.prompts):
                fh.write(json.dumps({"id": f"q{i}", "prompt": texts[i % len(texts)], "max_tokens": args.gen_len}) + "\n")
        plan = d / "plan.yaml"
        run([str(bindir / "specoffload-plan"), "--model", "tiny-target", "--draft", "tiny-draft", "--profile",
             args.profile, *workload(texts, args), "-o", str(plan)])
        p = yaml.safe_load(plan.read_text())
        print(f"plan: {p['policy']}, batch {p['decode_batch']}x{p['num_batches']}, k={p['draft_len']}; "
              f"{args.prompts} prompts x {args.gen_len} tokens")
        base = [str(bindir / "specoffload-run"), str(plan), "--prompts", str(prompts), "--quiet", "--no-simulate"]
        shard = ["--shard-size", str(args.shard_size)] if args.shard_size else []
        ways = {"one process, 1 thread": ["--threads", "1"], "one process, 2 threads": ["--threads", "2"],
                "Ray, 2 engines x 1 thread": ["--threads", "1", "--ray", "local", "--ray-workers", "2", *shard]}
        got: dict[str, list[dict]] = {k: [] for k in ways}
        for rep in range(args.reps):
            names = list(ways)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                out, report = d / f"out{rep}-{len(got[name])}-{name[:3]}.jsonl", d / "report.yaml"
                wall = run(base + ["--output", str(out), "--report", str(report)] + ways[name])
                r = yaml.safe_load(report.read_text())
                if r.get("kind") == "cluster":
                    busy = sum(e["busy_seconds"] for e in r["per_engine"])
                    got[name].append({"wall": wall, "run": r["run_seconds"], "tokens": r["generated_tokens"],
                                      "overhead": (r["engines"] * r["run_seconds"] - busy) / args.prompts,
                                      "busy": busy, "ray_startup": r["startup_seconds"]})
                else:
                    got[name].append({"wall": wall, "run": r["total_seconds"], "tokens": r["generated_tokens"]})
                out.unlink()
    med = {}
    print(f"\n{'run':28s} {'wall s':>8s} {'start-up s':>10s} {'generating s':>12s} {'tok/s':>8s} {'spread':>7s} "
          f"{'vs 2x1 thread':>13s}")
    for name, rs in got.items():
        tps = [x["tokens"] / x["run"] for x in rs]
        m = {"wall": statistics.median(x["wall"] for x in rs), "run": statistics.median(x["run"] for x in rs),
             "tps": statistics.median(tps), "spread": (max(tps) - min(tps)) / statistics.median(tps)}
        med[name] = m
    ideal = 2 * med["one process, 1 thread"]["tps"]
    for name, m in med.items():
        print(f"{name:28s} {m['wall']:8.2f} {m['wall'] - m['run']:10.2f} {m['run']:12.2f} {m['tps']:8.1f} "
              f"{m['spread']:6.0%} {m['tps'] / ideal:12.2f}x")
    rs = got["Ray, 2 engines x 1 thread"]
    print(f"\nRay: cluster start-up and engine load {statistics.median(x['ray_startup'] for x in rs):.2f} s of the start-up; "
          f"engines busy {statistics.median(x['busy'] for x in rs):.2f} s of 2 x "
          f"{statistics.median(x['run'] for x in rs):.2f} s; overhead per prompt "
          f"{1e3 * statistics.median(x['overhead'] for x in rs):.2f} ms (dispatch, results, the last shard's tail)")


def workload(texts: list[str], args) -> list[str]:
    """The job's lengths from the prompts' real token counts (so the plan's KV cache fits every prompt)."""
    from specoffload.runtime.tiny_pair import tiny_pair_tokenizer

    tok = tiny_pair_tokenizer()
    lens = [len(tok.encode(t).ids) for t in texts]
    return ["--prompt-len", str(round(sum(lens) / len(lens))), "--max-prompt-len", str(max(lens)),
            "--gen-len", str(args.gen_len), "--num-prompts", str(args.prompts)]


if __name__ == "__main__":
    main()
