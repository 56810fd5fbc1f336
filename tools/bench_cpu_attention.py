"""Host attention against this machine's own limits, side by side in one run (a benchmark, not a test).

    python tools/bench_cpu_attention.py            # the full grid (several minutes)
    python tools/bench_cpu_attention.py --quick    # a few points (under a minute)
    python tools/bench_cpu_attention.py --focus    # host vs grouped vs copy, interleaved, ratios only,
                                                   # the host path against this core's measured peak,
                                                   # and copy / read / host thread scaling at Q=1 (bf16)
    python tools/bench_cpu_attention.py --focus --min-s 0.05 --rounds 5 --queries 1,5,9   # the README table
    python tools/bench_cpu_attention.py --scaling  # thread scaling only: copy, read, host at Q=1 (bf16),
                                                   # contexts 512, 4096 x batches 32, 256 x uniform / ragged

For each (KV dtype, Q new queries per row, context, batch, ragged or uniform lengths, threads) it times:

- copy: a plain ``dst.copy_(src)`` of as many bytes as the attention call reads (the memory's rate),
- sdpa: ``layers.attention(impl="sdpa")`` over the cache view padded to the longest row (the old default),
- grouped: ``layers.attention(impl="grouped")``, the grouped matmul, likewise padded,
- host: ``host_attention`` (the engine's path now) over the whole cache, rows by index, each to its length,

The thread-scaling tables (--scaling, and the end of --focus) add a read-only baseline: ``read_sum`` in the
kernel module, an AVX-512 sum that reads each byte once as a stream (the rate at which that many threads can
read memory: a ceiling for a path that reads the KV once, where the copy also writes), at threads 1, 2, 4, ...,
all usable cores, and print the host path's GB/s as a fraction of both baselines and each one's speed-up.

The grid prints GB/s of KV actually needed (the sum of each row's keys x Hkv x Dh x 2 (K and V) x element
size; padded paths read more and are charged only this), the fraction of the copy's rate, and GFLOP/s
at Q > 1 (4 * Q * keys * H * Dh per row). Shapes are Mixtral's attention (32 query / 8 kv heads,
head dim 128). Each call reads a different layer's KV from a pool larger than the CPU caches, as in
the engine. On a shared machine the absolute numbers move with the load; the ratios against the copy
measured in the same run are what to compare.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from specoffload.runtime.host_attention import backend, backend_note, host_attention, kernel_module, usable_cores  # noqa: E402
from specoffload.runtime.layers import attention  # noqa: E402

H, HKV, DH = 32, 8, 128
POOL_BYTES = 256 * 2**20


def timeit(fn, min_s: float, reps: int) -> float:
    fn()
    samples = []
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_s:
                break
        samples.append(dt / n)
    samples.sort()
    return samples[len(samples) // 2]


def fresh_dst(src: torch.Tensor) -> torch.Tensor:
    """The copy's destination with every page already written. torch.empty maps pages lazily: a copy into a
    never-touched chunk pays a page fault per 4 KiB (a few GB/s instead of the memory's rate), and the copy
    baseline cycles over up to four chunks after a warm-up call that touches only the first, so with few
    samples per point most of them would time page faults, not memory (this made the bf16 uniform copy read
    ~2.5 GB/s against ~18 for ragged in --quick)."""
    dst = torch.empty_like(src)
    dst.copy_(src)
    return dst


def copy_pool(chunk: int, n: int, dtype, g: torch.Generator):
    """(src, copy): a source of ``n`` slices of ``chunk`` elements and the plain-copy baseline, which copies the
    next slice per call (cycling, so each call moves bytes not in cache) into a fresh_dst destination."""
    src = torch.empty(chunk * n, dtype=dtype).normal_(generator=g)
    dst = fresh_dst(src)
    it = itertools.cycle(range(n))

    def copy():
        i = next(it)
        dst[i * chunk:(i + 1) * chunk].copy_(src[i * chunk:(i + 1) * chunk])

    return src, copy


def lengths_for(batch: int, ctx: int, ragged: bool, g: torch.Generator) -> torch.Tensor:
    if not ragged or batch == 1:
        return torch.full((batch,), ctx, dtype=torch.long)
    # Mean ctx, spread uniformly over [ctx/4, 7ctx/4].
    return (ctx * (0.25 + 1.5 * torch.rand(batch, generator=g))).round().long().clamp(min=1)


def run_point(dtype, Q, ctx, batch, ragged, threads, impls, args, g):
    torch.set_num_threads(threads)
    lens = lengths_for(batch, ctx, ragged, g)
    L = int(lens.max())
    esize = torch.empty((), dtype=dtype).element_size()
    per_layer = batch * HKV * L * DH
    n_layers = max(1, POOL_BYTES // (2 * per_layer * esize))
    k = torch.full((n_layers, batch, HKV, L, DH), 0.01, dtype=dtype)
    v = torch.full((n_layers, batch, HKV, L, DH), 0.01, dtype=dtype)
    k.normal_(generator=g)
    v.normal_(generator=g)
    q = torch.randn(batch, Q, H, DH, generator=g)
    q_pos = (lens - Q).clamp(min=0)[:, None] + torch.arange(Q)[None, :]
    need_bytes = float(lens.sum()) * HKV * DH * 2 * esize
    flops = 4.0 * Q * float(lens.sum()) * H * DH
    _, copy = copy_pool(int(need_bytes) // esize, max(1, min(n_layers, 4)), dtype, g)
    it = itertools.cycle(range(n_layers))
    out = {"copy": timeit(copy, args.min_s, args.reps)}
    qd = q.to(dtype)
    for name in impls:
        if name == "host":
            fn = lambda: host_attention(q, k[next(it)], v[next(it)], q_pos, lens, out_dtype=dtype)  # noqa: E731
        else:
            fn = lambda n=name: attention(qd, k[next(it)], v[next(it)], q_pos, lens, impl=n)  # noqa: E731
        out[name] = timeit(fn, args.min_s, args.reps)
    return need_bytes, flops, out


def measured_peaks() -> dict[str, float]:
    """One core's measured compute peak in GFLOP/s (the kernel's throughput loops): 'fma' (fp32 512-bit FMAs),
    'dpbf16' (bf16 pair dot products, 0 without AVX-512 BF16), and per cache dtype the roofline of the host
    kernel's instruction mix: fp32 = fma; bf16 = dpbf16 (scores and P.V both run bf16 dot products; a CPU without
    them runs bf16 at the fma rate). Empty where the kernel is not built."""
    if backend() != "kernel":
        return {}
    mod = kernel_module()
    fma, dp = mod.peak_gflops("fma", 0.5), mod.peak_gflops("dpbf16", 0.5)
    if fma <= 0:
        return {}
    bf16 = dp if dp > 0 else fma
    return {"fma": fma, "dpbf16": dp, "fp32": fma, "bf16": bf16}


def default_scaling_threads(cores: int) -> list[int]:
    """1, 2, 4, 8, ... below the usable cores, then all of them less one (the engine's default) and all."""
    ts = {1, max(1, cores - 1), cores}
    t = 2
    while t < cores:
        ts.add(t)
        t *= 2
    return sorted(ts)


def _scaling_point(ctx: int, batch: int, ragged: bool, g: torch.Generator, base_bytes: int, pool_bytes: int):
    """One Q = 1 bf16 point of the thread-scaling table: callables for copy, read and host, the KV bytes the host
    path reads per call and the bytes each baseline call moves. The cache is [layers, batch, Hkv, longest, Dh] as the
    engine lays it out; only each row's own keys are ever written (torch.empty leaves the rest unmapped), so a
    ragged batch costs memory for its actual keys only. Each call reads another layer while the pool of layers
    allows (at least ``pool_bytes``, beyond the CPU caches). The baselines stream min(the host path's bytes,
    ``base_bytes``) per call from a pool of at least two such chunks (and ``pool_bytes``)."""
    lens = lengths_for(batch, ctx, ragged, g)
    L = int(lens.max())
    dtype = torch.bfloat16
    need = float(lens.sum()) * HKV * DH * 2 * 2
    n_layers = max(1, int(pool_bytes // need))
    k = torch.empty((n_layers, batch, HKV, L, DH), dtype=dtype)
    v = torch.empty((n_layers, batch, HKV, L, DH), dtype=dtype)
    tile = torch.empty(HKV * min(L, 1024) * DH, dtype=dtype).normal_(generator=g).view(HKV, -1, DH)
    for x in (k, v):
        for layer in range(n_layers):
            for b, n in enumerate(lens.tolist()):
                for j in range(0, n, tile.shape[1]):
                    w = min(tile.shape[1], n - j)
                    x[layer, b, :, j:j + w].copy_(tile[:, :w])
    q = torch.randn(batch, 1, H, DH, generator=g).to(dtype)
    q_pos = (lens - 1)[:, None]
    chunk = int(min(need, base_bytes)) // 2 // 64 * 64
    n_src = max(2, -(-pool_bytes // (2 * chunk)))
    src, copy = copy_pool(chunk, n_src, dtype, g)
    it, it_r = itertools.cycle(range(n_layers)), itertools.cycle(range(n_src))
    mod = kernel_module() if backend() == "kernel" else None

    def read():
        i = next(it_r)
        x = src[i * chunk:(i + 1) * chunk]
        if mod is not None:
            mod.read_sum(x)
        else:
            x.sum(dtype=torch.float32)

    def host():
        i = next(it)
        host_attention(q, k[i], v[i], q_pos, lens, out_dtype=dtype)

    return {"copy": copy, "read": read, "host": host}, need, chunk * 2.0


def scaling_table(threads: list[int], contexts: list[int], batches: list[int], rounds: int = 3, min_s: float = 0.05,
                  raggedness: tuple[bool, ...] = (False, True), base_bytes: int = 256 * 2**20,
                  max_bytes: float = 8 * 2**30, say=print, pool_bytes: int = POOL_BYTES,
                  budget_s: float | None = None, stat: str = "median") -> list[dict]:
    """Thread scaling at Q = 1, bf16, Mixtral heads: for each (context, batch, uniform / ragged rows), the copy, the
    read-only baseline and the host path, each thread count in turn, interleaved over ``rounds`` (medians). Prints
    (through ``say``) one table per point and returns one dict per (point, threads) with the GB/s of each. A point
    whose KV would exceed ``max_bytes``, or that would start after ``budget_s`` seconds, is skipped (said so).
    ``stat`` "best" takes each rate's best round instead of the median (a machine shared with other work only
    ever slows a round down)."""
    t_start = time.perf_counter()
    before = torch.get_num_threads()
    cores = usable_cores()
    dropped = [t for t in threads if not 1 <= t <= cores]
    threads = [t for t in threads if 1 <= t <= cores] or [1]
    if dropped:
        say(f"threads {','.join(map(str, dropped))} left out: this process may use {cores} CPU(s)")
    read_note = "kernel read_sum (AVX-512 stream)" if backend() == "kernel" else "torch.sum (no kernel here)"
    say(f"thread scaling: bf16 KV, Q=1, Mixtral heads {H}/{HKV} x {DH}; {backend_note()}; read baseline: {read_note}; "
        f"{cores} usable CPU(s), threads {','.join(map(str, threads))}; load average {os.getloadavg()[0]:.1f}; "
        f"{'medians' if stat == 'median' else 'best'} of {rounds} interleaved rounds")
    say("GB/s: copy and read of the bytes they move (up to "
        f"{base_bytes / 2**20:.0f} MiB per call), host of the KV it needs; x = speed-up over {threads[0]} thread(s)")
    out = []
    g = torch.Generator().manual_seed(1)
    med = (lambda xs: sorted(xs)[len(xs) // 2]) if stat == "median" else max
    try:
        for ctx in contexts:
            for batch in batches:
                for ragged in raggedness:
                    rows = "ragged" if ragged else "uniform"
                    est = batch * ctx * HKV * DH * 2 * 2  # bytes of K and V (ragged rows average ctx)
                    if budget_s is not None and time.perf_counter() - t_start > budget_s:
                        say(f"ctx {ctx} batch {batch} {rows}: skipped (past the {budget_s:.0f} s budget)")
                        continue
                    if est > max_bytes:
                        say(f"ctx {ctx} batch {batch} {rows}: skipped ({est / 2**30:.1f} GiB of KV > "
                            f"{max_bytes / 2**30:.1f} GiB)")
                        continue
                    fns, need, moved = _scaling_point(ctx, batch, ragged, g, base_bytes, pool_bytes)
                    rate = {(n, t): [] for n in fns for t in threads}
                    for _ in range(rounds):
                        for t in threads:
                            torch.set_num_threads(t)
                            for n, f in fns.items():
                                nbytes = need if n == "host" else moved
                                rate[(n, t)].append(nbytes / timeit(f, min_s, 1) / 1e9)
                    say(f"ctx {ctx}, batch {batch}, {rows} rows: {need / 2**20:.0f} MiB of KV per call "
                        f"(load average {os.getloadavg()[0]:.1f})")
                    say(f"{'threads':>7} | {'copy':>6} {'x':>5} | {'read':>6} {'x':>5} | {'host':>6} {'x':>5} | "
                        f"{'host/copy':>9} | {'host/read':>9}")
                    base = {n: med(rate[(n, threads[0])]) for n in fns}
                    for t in threads:
                        m = {n: med(rate[(n, t)]) for n in fns}
                        say(f"{t:>7} | {m['copy']:6.1f} {m['copy'] / base['copy']:4.2f}x | {m['read']:6.1f} "
                            f"{m['read'] / base['read']:4.2f}x | {m['host']:6.1f} {m['host'] / base['host']:4.2f}x | "
                            f"{m['host'] / m['copy']:9.2f} | {m['host'] / m['read']:9.2f}")
                        out.append({"ctx": ctx, "batch": batch, "rows": rows, "threads": t, **m})
                    del fns
    finally:
        torch.set_num_threads(before)
    return out


def thread_stats(args) -> None:
    """Where a host call's time goes per thread count: the kernel built with -DSPECOFFLOAD_THREAD_STATS, one
    --scaling-contexts x --scaling-batches point per table (bf16, Q=1), medians over about a second of calls of
    each worker's items and finish time, the serial parts (item list, merge of chunked rows, everything outside
    the kernel's run: the Python wrapper, checks, allocation)."""
    import statistics

    from specoffload.runtime import host_attention as ha

    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    if backend() != "kernel":
        print("--thread-stats needs the C++ kernel: " + backend_note())
        return
    mod = ha._build(("-DSPECOFFLOAD_THREAD_STATS",))
    threads = ints(args.scaling_threads) if args.scaling_threads else default_scaling_threads(usable_cores())
    before, kept = torch.get_num_threads(), ha._state.get("mod")
    ha._state["mod"] = mod
    g = torch.Generator().manual_seed(1)
    try:
        for ctx in ints(args.scaling_contexts):
            for batch in ints(args.scaling_batches):
                for ragged in (False, True):
                    fns, need, _ = _scaling_point(ctx, batch, ragged, g, 2**20, POOL_BYTES)
                    host = fns["host"]
                    print(f"ctx {ctx}, batch {batch}, {'ragged' if ragged else 'uniform'} rows (load average "
                          f"{os.getloadavg()[0]:.1f}); medians, us:")
                    for t in threads:
                        torch.set_num_threads(t)
                        host()
                        rec, t0 = [], time.perf_counter()
                        while time.perf_counter() - t0 < 1.0 or len(rec) < 3:
                            t1 = time.perf_counter()
                            host()
                            rec.append((time.perf_counter() - t1, *mod.thread_stats()))
                        med = statistics.median
                        call = med(r[0] for r in rec)
                        done = med(r[2] for r in rec)
                        merged = med((r[3] or r[2]) for r in rec)
                        items = [med(r[1][w][0] for r in rec) for w in range(len(rec[0][1]))]
                        starts = [med(r[1][w][1] for r in rec) for w in range(len(rec[0][1]))]
                        ends = [med(r[1][w][2] for r in rec) for w in range(len(rec[0][1]))]
                        print(f"  {t:>3} threads: {need / call / 1e9:5.1f} GB/s, call {1e6 * call:7.0f}: item list "
                              f"{1e6 * min(starts):5.0f}, workers {1e6 * (max(ends) - min(starts)):7.0f} (first done "
                              f"{1e6 * (max(ends) - min(ends)):4.0f} before the last), merge {1e6 * (merged - done):5.0f}, "
                              f"outside {1e6 * (call - merged):5.0f}; items per worker "
                              f"{', '.join(f'{x:.0f}' for x in items)}")
                    del fns
    finally:
        torch.set_num_threads(before)
        ha._state["mod"] = kept


def thread_scaling(args) -> None:
    """--focus's (and --scaling's) thread-scaling tables: copy, read-only baseline and host path at Q = 1 (bf16)."""
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    threads = ints(args.scaling_threads) if args.scaling_threads else default_scaling_threads(usable_cores())
    if args.focus and not args.scaling:
        contexts, batches = [args.focus_ctx], [args.focus_batch]
    else:
        contexts, batches = ints(args.scaling_contexts), ints(args.scaling_batches)
    scaling_table(threads, contexts, batches, rounds=args.rounds, min_s=args.min_s, stat=args.scaling_stat)


def focus(args) -> int:
    """Q = --queries at context --focus-ctx, batch --focus-batch, one thread, fp32 and bf16, uniform and ragged:
    copy, grouped and host timed in turn (interleaved) ``--rounds`` times; the medians of the per-round
    ratios are printed, so load from other processes hits all three alike. Then the host path's GFLOP/s
    as a fraction of this core's measured peak, and thread scaling at Q = 1 (bf16)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    peaks = measured_peaks()
    print(f"host attention path: {backend_note()}; one thread; context {args.focus_ctx}, batch {args.focus_batch}; "
          f"load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} interleaved rounds")
    if peaks:
        print(f"measured peak of one core: fp32 FMA {peaks['fma']:.0f} GFLOP/s, bf16 dot products {peaks['dpbf16']:.0f} "
              f"GFLOP/s; 'of peak' = host GF / the roofline of the kernel's mix (fp32 {peaks['fp32']:.0f}, "
              f"bf16 {peaks['bf16']:.0f}: scores and P.V as bf16 dot products)")
    print(f"{'dtype':5} {'Q':>2} {'rows':7} | {'host/grouped':>12} | {'host/copy':>9} | {'grouped/copy':>12} | "
          f"{'host GF':>7} | {'of peak':>7}")
    for dname in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        for Q in ints(args.queries):
            for ragged in (False, True):
                fns = make_fns(dtype, Q, args.focus_ctx, args.focus_batch, ragged, g)
                nbytes, flops = fns.pop("_bytes"), fns.pop("_flops")
                r_hg, r_hc, r_gc, gfs = [], [], [], []
                for _ in range(args.rounds):
                    t = {n: timeit(f, args.min_s, 1) for n, f in fns.items()}
                    r_hg.append(t["grouped"] / t["host"])
                    r_hc.append(t["copy"] / t["host"])
                    r_gc.append(t["copy"] / t["grouped"])
                    gfs.append(flops / t["host"] / 1e9)
                med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
                frac = f"{med(gfs) / peaks[dname]:7.2f}" if peaks else f"{'n/a':>7}"
                print(f"{dname:5} {Q:>2} {'ragged' if ragged else 'uniform':7} | {med(r_hg):12.2f} | {med(r_hc):9.2f} | "
                      f"{med(r_gc):12.2f} | {med(gfs):7.1f} | {frac}", flush=True)
    if not args.no_scaling:
        thread_scaling(args)
    return 0


def make_fns(dtype, Q, ctx, batch, ragged, g):
    """Callables for copy, grouped and host over one point's data (each call reads another layer's KV)."""
    lens = lengths_for(batch, ctx, ragged, g)
    L = int(lens.max())
    esize = torch.empty((), dtype=dtype).element_size()
    n_layers = max(1, POOL_BYTES // (2 * batch * HKV * L * DH * esize))
    k = torch.empty((n_layers, batch, HKV, L, DH), dtype=dtype).normal_(generator=g)
    v = torch.empty((n_layers, batch, HKV, L, DH), dtype=dtype).normal_(generator=g)
    q = torch.randn(batch, Q, H, DH, generator=g)
    q_pos = (lens - Q).clamp(min=0)[:, None] + torch.arange(Q)[None, :]
    need_bytes = float(lens.sum()) * HKV * DH * 2 * esize
    _, copy = copy_pool(int(need_bytes) // esize, max(1, min(n_layers, 4)), dtype, g)
    it = itertools.cycle(range(n_layers))
    qd = q.to(dtype)
    return {"copy": copy,
            "grouped": lambda: attention(qd, k[next(it)], v[next(it)], q_pos, lens, impl="grouped"),
            "host": lambda: host_attention(qd, k[next(it)], v[next(it)], q_pos, lens, out_dtype=dtype),
            "_bytes": need_bytes, "_flops": 4.0 * Q * float(lens.sum()) * H * DH}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="examples: python tools/bench_cpu_attention.py --focus --queries 1,5\n"
                                        "          python tools/bench_cpu_attention.py --scaling --scaling-threads 1,2,4",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few points only")
    ap.add_argument("--min-s", type=float, default=0.02, help="each sample averages calls over this long")
    ap.add_argument("--reps", type=int, default=5, help="samples per measurement (median)")
    ap.add_argument("--impls", default="sdpa,grouped,host")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--queries", default="1,2,5,9")
    ap.add_argument("--contexts", default="128,512,1024,4096")
    ap.add_argument("--batches", default="1,8,32,256")
    ap.add_argument("--threads", default=None, help="thread counts (default: 1 and all usable cores)")
    ap.add_argument("--focus", action="store_true",
                    help="Q = --queries at one context and batch, one thread: interleaved ratios host/grouped, host/copy")
    ap.add_argument("--rounds", type=int, default=7, help="--focus: interleaved rounds (median)")
    ap.add_argument("--focus-ctx", type=int, default=512)
    ap.add_argument("--focus-batch", type=int, default=32)
    ap.add_argument("--no-scaling", action="store_true", help="--focus: skip the thread-scaling table")
    ap.add_argument("--scaling", action="store_true",
                    help="only the thread-scaling tables (copy, read-only baseline, host path; Q=1, bf16) over "
                         "--scaling-contexts x --scaling-batches x uniform / ragged rows")
    ap.add_argument("--scaling-threads", default=None,
                    help="thread counts for the scaling tables (default: 1, 2, 4, ... below the usable cores, "
                         "all less one, all)")
    ap.add_argument("--scaling-contexts", default="512,4096")
    ap.add_argument("--scaling-stat", choices=("median", "best"), default="median",
                    help="each rate's median over --rounds, or its best round (on a machine shared with other work)")
    ap.add_argument("--scaling-batches", default="32,256")
    ap.add_argument("--thread-stats", action="store_true",
                    help="per thread count, where a host call's time goes (a diagnostic build of the kernel): "
                         "items per worker, the workers' spread, item list, merge, the Python wrapper")
    args = ap.parse_args(argv)
    for flag in ("scaling_threads", "scaling_contexts", "scaling_batches"):
        text = getattr(args, flag)
        if text is not None and not all(x.strip().isdigit() and int(x) > 0 for x in text.split(",")):
            ap.error(f"--{flag.replace('_', '-')} {text!r}: expected positive integers separated by commas, e.g. 1,2,4")
    if args.thread_stats:
        thread_stats(args)
        return 0
    if args.scaling:
        thread_scaling(args)
        return 0
    if args.focus:
        return focus(args)
    cores = usable_cores()
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731
    all_threads = ints(args.threads) if args.threads else sorted({1, cores})
    dtypes = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes.split(",") if d]
    if args.quick:
        grid = [(d, Q, 512, 32, r, t) for d in (torch.float32, torch.bfloat16) for Q in (1, 5) for r in (False, True)
                for t in (1,)]
        grid += [(torch.bfloat16, 1, 512, 32, False, cores)] if cores > 1 else []
    else:
        grid = []
        for d, Q, ctx, batch, r, t in itertools.product(dtypes, ints(args.queries), ints(args.contexts),
                                                        ints(args.batches), (False, True), all_threads):
            if batch * ctx > 64 * 1024 or (batch == 1 and r):
                continue
            grid.append((d, Q, ctx, batch, r, t))
    impls = [s for s in args.impls.split(",") if s]
    print(f"host attention path: {backend_note()}; {cores} usable CPU(s); Mixtral heads {H}/{HKV} x {DH}; "
          f"load average {os.getloadavg()[0]:.1f}")
    peaks = measured_peaks()
    if peaks:
        print(f"measured peak of one core: fp32 FMA {peaks['fma']:.0f} GFLOP/s, bf16 dot products {peaks['dpbf16']:.0f} "
              f"GFLOP/s (the host kernel's roofline: fp32 {peaks['fp32']:.0f}, bf16 {peaks['bf16']:.0f} per core)")
    print("GB/s of KV needed (sum of row lengths); (x.xx) = fraction of the copy's rate; GF = GFLOP/s of the host path")
    head = f"{'dtype':5} {'Q':>2} {'ctx':>5} {'B':>4} {'rows':7} {'thr':>3} | {'copy':>6} |"
    head += "".join(f" {n:>13} |" for n in impls) + f" {'host/grouped':>12} | {'GF':>6}"
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    for dtype, Q, ctx, batch, ragged, threads in grid:
        nbytes, flops, t = run_point(dtype, Q, ctx, batch, ragged, threads, impls, args, g)
        copy_bw = nbytes / t["copy"] / 1e9
        row = (f"{'bf16' if dtype == torch.bfloat16 else 'fp32':5} {Q:>2} {ctx:>5} {batch:>4} "
               f"{'ragged' if ragged else 'uniform':7} {threads:>3} | {copy_bw:6.1f} |")
        for n in impls:
            bw = nbytes / t[n] / 1e9
            row += f" {bw:6.1f} ({bw / copy_bw:4.2f}) |"
        ratio = t["grouped"] / t["host"] if "grouped" in t and "host" in t else math.nan
        gf = flops / t["host"] / 1e9 if "host" in t else math.nan
        row += f" {ratio:12.2f} | {gf:6.1f}"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
