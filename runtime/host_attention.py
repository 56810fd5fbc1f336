"""Host attention: the target's attention on the CPU over the ragged host KV cache, at memory bandwidth.

Scope: one call for decode (one new query per row) and verification (k+1 new queries per row, causal
among themselves), reading the cache as it lies: head-major ``[slots, Hkv, max_len, Dh]`` (see
runtime/kv_cache.py), each row only up to its own length, no padding to the longest row and no
gather or copy of K/V (rows are addressed through an index). The G query heads that share a kv head
read its K/V once; accumulation and softmax are fp32 (online softmax, so no score matrix is built);
caches may be fp32, bf16 or fp16.

Two implementations, same contract:

- ``kernel``: runtime/csrc/host_attention.cpp, built on first use with torch.utils.cpp_extension
  (g++ and ninja) and cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, by default
  under the user's cache directory; never the source tree). Compiled for the CPU it runs on
  (``-march=native``; the build's name carries digests of the CPU's feature flags and of the source,
  so a shared cache directory never hands one CPU's or one source's build to another). AVX-512 when
  the CPU has it, portable loops otherwise. Threads: torch's intra-op pool (``torch.set_num_threads``); the build
  passes ``-fopenmp`` (torch's ``at::parallel_for`` is inline OpenMP: without it every item ran on the calling
  thread whatever the thread count; ``parallel_threads`` in the module checks it, and a compiler without OpenMP
  gets a one-thread build that :func:`backend_note` names). Work items are (row, kv head, 512-key chunk), taken longest first, so long rows split across threads even when
  there are fewer rows than threads. A query's result does not depend on the batch, on the number
  of new queries or on the thread count. Per tile of 32 keys (AVX-512): the tile's K is transposed
  once in L1 (keys into lanes), then the query rows of a kv head (G heads x the new queries) run in
  register-blocked groups of up to 12 rows x 32 keys, so each K vector loaded serves every row of the
  group and each row's scores come out as two vectors (no horizontal sums); one online-softmax step
  per row and tile; P.V keeps 6 rows x 64 head-dim columns of accumulators in registers for the
  whole tile (the softmax rescale fused into their load), each V vector read once per group; the next
  tile's K/V lines are prefetched a few at a time across the tile's work (the hardware prefetchers stop
  at every 4 KiB page). With a bf16 cache on a CPU with AVX-512 BF16 the scores take bf16 pairs
  straight from the cache against the queries rounded to bf16 (KVCache.attend hands them over in the
  cache dtype anyway; products are exact in fp32), and P.V runs bf16 dot products too: each softmax weight
  rounded to bf16 (nearest even) and paired along the keys with V of keys 2j and 2j+1 interleaved per
  column in registers, fp32 accumulation, the denominator from the fp32 weights. That costs at most
  2^-8 * sum_j p_j |v_j| / sum_j p_j per output element (bf16's unit roundoff times the weighted |V|, at most
  about half a bf16 ulp of the largest value), the bound the tests hold it to. fp32 and fp16 caches (and a
  bf16 head dim that is not a multiple of 32) keep P.V in fp32, within 1e-5. ``peak_gflops`` in the same module measures
  the core's fp32 FMA and bf16 dot-product throughput (tools/bench_cpu_attention.py prints the path's
  fraction of it), and ``read_sum`` is the bench's read-only baseline (a streaming sum, each byte read once).
- ``torch``: the grouped matmul (the G query heads folded into the query axis against one K/V),
  over rows grouped by length so no row is padded past the next multiple of 64 keys; fp32 math
  (bf16/fp16 K/V are upcast per group, a copy this path pays for exactness). Used where the kernel cannot be built (said once, with the reason), or when
  ``SPECOFFLOAD_HOST_ATTN=torch`` (tests cover both).

Semantics (both): query t of row b sees key j iff j < kv_len[b], j <= q_pos[b, t] and, with a
sliding window W, j > q_pos[b, t] - W. A query that sees no key gets 0.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

ENV_IMPL = "SPECOFFLOAD_HOST_ATTN"  # "kernel" (default: the kernel when it builds) or "torch"
_SRC = Path(__file__).parent / "csrc" / "host_attention.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_tag() -> str:
    """A short digest of this CPU's model and feature flags (the build is -march=native)."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        import platform
        text = platform.processor() + platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _build(extra_flags: tuple[str, ...] = ()):
    """Build (or load the cached build of) the kernel; ``extra_flags`` (e.g. ``-mno-avx512f`` to build
    the portable loops on an AVX-512 machine, as a test does) go into the build's name too."""
    from torch.utils import cpp_extension

    # The source's digest in the name too: checkouts with different kernel sources sharing one extension
    # directory then never rebuild over each other's builds.
    src_tag = hashlib.sha1(_SRC.read_bytes()).hexdigest()[:8]
    name = f"specoffload_host_attn_{_cpu_tag()}_{src_tag}"
    if extra_flags:
        name += "_" + hashlib.sha1(" ".join(extra_flags).encode()).hexdigest()[:6]
    flags = ["-O3", "-march=native", "-fno-math-errno", *extra_flags]
    # -fopenmp: torch's at::parallel_for is inline OpenMP in the headers; compiled without it, every
    # parallel_for in the kernel runs its whole range on the calling thread (one thread, whatever
    # torch.set_num_threads says). The extension then uses the libgomp torch has already loaded (same soname).
    try:
        return cpp_extension.load(name=name + "_omp", sources=[str(_SRC)], extra_cflags=[*flags, "-fopenmp"],
                                  extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a compiler without OpenMP: the kernel still builds, on one thread (backend_note says so)
        _state["omp_why"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:200]
    return cpp_extension.load(name=name, sources=[str(_SRC)], extra_cflags=flags, verbose=False)


def kernel_module():
    """The compiled kernel module, or None (with the reason in :func:`backend_note`) when it cannot be built."""
    with _lock:
        if "mod" not in _state:
            try:
                _state["mod"] = _build()
                _state["why"] = ""
            except Exception as e:  # no compiler, no ninja, a failed build: fall back, say so once
                _state["mod"] = None
                first = str(e).strip().splitlines()
                _state["why"] = f"{type(e).__name__}: {first[0] if first else ''}"[:300]
                warnings.warn("host attention: the C++ kernel could not be built (" + str(_state["why"]) +
                              "); using the pure-torch grouped matmul, which reads KV well below memory "
                              "bandwidth. Install g++ and ninja to get the kernel.", RuntimeWarning, stacklevel=3)
        return _state["mod"]


def backend(impl: str | None = None) -> str:
    """The implementation a call will use: "kernel" or "torch" (``impl``, else the environment, else the kernel)."""
    choice = (impl or os.environ.get(ENV_IMPL) or "kernel").strip().lower()
    if choice not in ("kernel", "torch"):
        raise ValueError(f"{ENV_IMPL}={choice!r}: expected 'kernel' or 'torch'")
    if choice == "kernel" and kernel_module() is None:
        return "torch"
    return choice


def backend_note(impl: str | None = None) -> str:
    """One line for provenance and reports: which path runs and, for the kernel, its instruction set."""
    b = backend(impl)
    if b == "kernel":
        mod = kernel_module()
        why = _state.get("omp_why")
        threads = "OpenMP threads" if mod.has_openmp() else "one thread: built without OpenMP" + (f" ({why})" if why else "")
        return "kernel (C++, " + ("AVX-512" if mod.has_avx512() else "portable loops") + f", -march=native, {threads})"
    why = _state.get("why") or f"forced by {ENV_IMPL}=torch" if b == "torch" else ""
    return f"torch grouped matmul ({why or 'requested'})"


def host_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_len: Tensor,
                   sliding_window: int | None = None, rows: Tensor | None = None, impl: str | None = None,
                   out_dtype: torch.dtype | None = None) -> Tensor:
    """Attention of new queries over a ragged head-major KV history, on the CPU.

    q [B, T, H, Dh]; k, v [N, Hkv, L, Dh] (a whole cache or a view; last dim contiguous); row b reads
    k[rows[b]] (default rows = arange(B)); q_pos [B, T] absolute query positions; kv_len [B] keys
    written per row (cached + new). -> o [B, T, H, Dh] in ``out_dtype`` (default q's dtype).
    """
    B, T, H, Dh = q.shape
    out_dtype = out_dtype or q.dtype
    if k.shape != v.shape or k.dim() != 4 or k.shape[3] != Dh or H % k.shape[1]:
        raise ValueError(f"host attention: q {tuple(q.shape)} does not fit k/v {tuple(k.shape)} / {tuple(v.shape)}")
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"host attention supports fp32, bf16 and fp16 caches, not {k.dtype}")
    rows = torch.arange(B) if rows is None else rows.to("cpu", torch.long)
    q_pos, kv_len = q_pos.to("cpu", torch.long), kv_len.to("cpu", torch.long)
    q32 = q.to("cpu", torch.float32).contiguous()
    if backend(impl) == "kernel":
        window = int(sliding_window) if sliding_window else 0
        o = kernel_module().host_attention(q32, k, v, rows, q_pos.contiguous(), kv_len.contiguous(), window)
    else:
        o = grouped_attention(q32, k, v, q_pos, kv_len, sliding_window, rows)
    return o.to(out_dtype)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_len: Tensor,
                      sliding_window: int | None, rows: Tensor, bucket: int = 64) -> Tensor:
    """The pure-torch path: rows grouped by length (rounded up to ``bucket`` keys); per group the G query
    heads sharing a kv head are folded into the query axis and hit the group's K/V with one matmul, all
    in fp32 (bf16/fp16 K/V are upcast per group).  q fp32 [B, T, H, Dh] -> fp32."""
    B, T, H, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(Dh)
    out = torch.zeros(B, T, H, Dh, dtype=torch.float32)
    need = torch.minimum(kv_len, q_pos.max(dim=1).values + 1).clamp(min=0, max=L) if T else kv_len.clamp(0, L)
    width = ((need + bucket - 1) // bucket * bucket).clamp(max=L)
    for w in torch.unique(width).tolist():
        if w == 0:
            continue
        sel = (width == w).nonzero().flatten()
        src = rows[sel]
        s0 = int(src[0])
        contiguous = bool(torch.equal(src, torch.arange(s0, s0 + len(src))))
        kk = k[s0:s0 + len(src), :, :w] if contiguous else k[src, :, :w]  # [b, Hkv, w, Dh]
        vv = v[s0:s0 + len(src), :, :w] if contiguous else v[src, :, :w]
        b = len(sel)
        qg = (q[sel] * scale).view(b, T, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(b, Hkv, G * T, Dh)
        kk, vv = kk.float(), vv.float()  # fp32 math (a copy for bf16/fp16 caches: the price of this path)
        scores = torch.matmul(qg, kk.transpose(2, 3))  # [b, Hkv, G*T, w]
        j = torch.arange(w)
        p_ = q_pos[sel][:, :, None]
        vis = (j[None, None, :] <= p_) & (j[None, None, :] < kv_len[sel][:, None, None])
        if sliding_window:
            vis &= j[None, None, :] > p_ - sliding_window
        vis = vis[:, None, None].expand(b, Hkv, G, T, w).reshape(b, Hkv, G * T, w)
        scores = scores.masked_fill(~vis, float("-inf"))
        m = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        p = torch.exp(scores - m)
        denom = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vv) / torch.where(denom > 0, denom, torch.ones_like(denom))
        out[sel] = o.view(b, Hkv, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(b, T, H, Dh)
    return out


# ----------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------

def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Attention threads: the usable cores less one for the driving thread, at least 1."""
    return max(1, usable_cores() - 1)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (what the kernel and the torch path use) and return the count.

    ``threads`` None picks :func:`default_threads`. More threads than usable cores is refused with a
    clear error: on a machine whose cores are busy, oversubscribed threads wait on each other at every
    barrier and a run slows by an order of magnitude without saying why.
    """
    n = default_threads() if threads is None else int(threads)
    cores = usable_cores()
    if n < 1:
        raise ValueError(f"--threads {n}: need at least 1")
    if n > cores:
        raise ValueError(f"--threads {n}: this process may use only {cores} CPU(s) (its affinity mask); "
                         f"more threads than cores stall each other. Use --threads {cores} or fewer.")
    if n > 1:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
        if load > cores - n + 0.5 and torch.get_num_threads() != n:
            warnings.warn(f"{n} threads on {cores} usable CPU(s) with load average {load:.1f}: other work holds the "
                          "cores, and threads that wait on each other can make attention many times slower. "
                          "Use --threads 1 if the run is slow.", RuntimeWarning, stacklevel=2)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def clamp_threads() -> int:
    """Keep torch's thread count, lowered to the usable cores if above them; return it."""
    n = torch.get_num_threads()
    if n > usable_cores():
        n = usable_cores()
        torch.set_num_threads(n)
    return n
