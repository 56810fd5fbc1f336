"""The CPU-attention probe: the runtime's host attention over a grid of shapes, fitted by fit.fit_attention."""
from __future__ import annotations

import itertools
import json
from typing import Any

import torch

from specoffload.planner.models import ModelSpec

from .config import GiB, KV_DTYPES, MiB, ProbeFailure
from .fit import AttentionPoint, fit_attention, sig
from .machine import llc_text
from .timing import measure_many, points_json



# The runtime's CPU attention: the one place the profiler calls it.
def attention_call(cache, layer, slots, q, k_new, v_new):
    """One layer's decode/verify attention exactly as the engine runs it on the host: write the new
    keys/values into the KV cache, then attend the queries over each slot's history
    (``KVCache.attend`` -> ``host_attention``). Change this when the engine's call changes."""
    return cache.attend(layer, slots, q, k_new, v_new)


def attention_workload(spec: ModelSpec, batch: int, query: int, context: float) -> tuple[float, float]:
    """(kv_bytes, flops) of one call in the cost model's accounting (bf16 KV, 4*q*ctx*q_dim FLOPs); `context`
    is the mean over the rows (host attention reads each row to its own length)."""
    return (batch * context * spec.kv_bytes_per_token_per_layer, batch * spec.attention_flops(query, context))


class AttentionProbe:
    """The Profiler's CPU-attention probe (methods of Profiler)."""

    def attention_grid(self) -> list[tuple[int, int, int]]:
        c = self.cfg
        return [(b, q, ctx) for b in c.attn_batches for q in c.attn_queries for ctx in c.attn_contexts
                if b * ctx <= c.attn_max_kv_tokens and q <= ctx]

    def attention_kv_dtype(self) -> torch.dtype:
        """The dtype the engine stores host KV in here: bf16 beside a GPU, fp32 on a CPU-only machine
        (``attn_kv_dtype`` in the config forces one)."""
        forced = self.cfg.attn_kv_dtype
        if forced:
            if forced not in KV_DTYPES:
                raise ProbeFailure(f"attn_kv_dtype {forced!r}: expected one of {', '.join(KV_DTYPES)}")
            return KV_DTYPES[forced]
        return torch.bfloat16 if self.cuda else torch.float32

    def probe_cpu_attention(self) -> dict[str, Any]:
        from specoffload.runtime.host_attention import backend_note
        from specoffload.runtime.kv_cache import KVCache

        self._check_forced("cpu_attention")
        spec = self.spec
        H, Hkv, Dh = spec.num_heads, spec.num_kv_heads, spec.head_dim
        dtype = self.attention_kv_dtype()
        esize = torch.empty((), dtype=dtype).element_size()
        g = torch.Generator().manual_seed(0)
        grid = self.attention_grid()
        if not grid:
            raise ProbeFailure("the attention grid is empty (check attn_* sizes)")
        # Ragged rows, as the engine's batches are: a point of mean context `ctx` over `batch` rows has lengths
        # spread evenly from ctx/2 to 3ctx/2 (one row: ctx), and the engine reads each row only to its length.
        def lengths_of(batch: int, q_len: int, ctx: int) -> list[int]:
            if batch == 1:
                return [ctx]
            return [max(q_len, round(ctx * (0.5 + i / (batch - 1)))) for i in range(batch)]

        # Cold caches, as in the engine (each call reads a different layer's KV, far more than the CPU caches
        # hold): every point's cache is carved out of one pool of at least attn_rotate_bytes, and successive
        # calls of a point rotate over as many layers as fit in it. All points are measured together.
        largest = max(b * Hkv * max(lengths_of(b, q, ctx)) * Dh for b, q, ctx in grid)  # elements of K of a layer
        pool_bytes = self.cfg.attn_rotate_bytes
        while pool_bytes > MiB and not self._fits(pool_bytes):
            pool_bytes //= 2
        half = max(pool_bytes // (2 * esize), largest)  # elements of each of the K and V pools
        if not self._fits(2 * esize * half):
            raise ProbeFailure(f"the largest attention point needs {2 * esize * half / GiB:.2f} GiB of KV; only "
                               f"{self.avail_bytes / GiB:.2f} GiB available")
        pool_k = torch.full((half,), 0.01, dtype=dtype)
        pool_v = torch.full((half,), 0.01, dtype=dtype)
        fns, layers_used, means = [], [], []
        for batch, q_len, ctx in grid:
            lens = lengths_of(batch, q_len, ctx)
            max_len = max(lens)
            shape = (batch, Hkv, max_len, Dh)
            per_layer = batch * Hkv * max_len * Dh
            n_layers = max(1, half // per_layer)
            cache = KVCache(0, batch, max_len, Hkv, Dh, dtype=dtype, device="cpu")
            cache.k = [pool_k[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(n_layers)]
            cache.v = [pool_v[i * per_layer:(i + 1) * per_layer].view(shape) for i in range(n_layers)]
            cache.lengths[:] = torch.tensor(lens) - q_len  # the new tokens bring each row to its length
            q = torch.randn(batch, q_len, H, Dh, generator=g)
            k_new = torch.randn(batch, q_len, Hkv, Dh, generator=g)
            v_new = torch.randn(batch, q_len, Hkv, Dh, generator=g)
            layer = itertools.cycle(range(n_layers))
            fns.append(lambda c=cache, it=layer, s=list(range(batch)), q=q, k=k_new, v=v_new:
                       attention_call(c, next(it), s, q, k, v))
            layers_used.append(n_layers)
            means.append(sum(lens) / batch)
        stats = measure_many(fns, self.cpu_clock, self.cfg, tick=lambda: self.tick("attention"))
        del fns, pool_k, pool_v
        points = []
        for (batch, q_len, ctx), mean, st in zip(grid, means, stats):
            kv_bytes, flops = attention_workload(spec, batch, q_len, mean)
            points.append(AttentionPoint(batch, q_len, mean, kv_bytes, flops, st.median, st.spread))
        fit = fit_attention(points)
        self.attention_fit = fit
        model_esize = spec.kv_bytes_per_token_per_layer / (2 * spec.kv_dim)
        dname = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
        self.prov["cpu_attention.path"] = backend_note()
        self.prov["cpu_attention.kv_dtype"] = (
            f"{dname} ({'forced' if self.cfg.attn_kv_dtype else 'what the engine stores host KV in here: bf16 beside a GPU, fp32 on a CPU-only machine'})")
        self.prov["cpu_attention"] = (
            f"the runtime's host attention (KVCache.attend -> runtime/host_attention.py: {backend_note()}; {dname} "
            f"host KV cache; {torch.get_num_threads()} thread(s); {H} query / {Hkv} kv heads x {Dh}, {spec.name}) "
            f"timed over {len(points)} (batch, query, context) points with ragged rows (lengths spread evenly from "
            f"context/2 to 3*context/2; each row read to its own length), cold: successive calls rotate over the "
            f"layers of a {2 * esize * half // MiB} MiB KV pool (1 to {max(layers_used)} layers per point; CPU "
            f"last-level cache {llc_text()}); fitted time = overhead + batch*(seq_overhead + query*row_overhead) + "
            "sum over rows of its keys*kv_bytes_per_token_per_layer / kv_read_bytes_per_s + "
            "batch*attention_flops(query, mean context) / flops_per_s by nonnegative least squares on relative "
            f"error. KV bytes are in the cost model's accounting ({model_esize:g} bytes/element); the engine reads "
            f"{esize} bytes/element here, so the actual read rate is {esize / model_esize:g}x kv_read_bytes_per_s; "
            "FLOPs 4*query*context*q_dim")
        self.prov["fit.cpu_attention"] = json.dumps({
            "overhead_seconds": sig(fit.overhead_seconds), "kv_read_bytes_per_s": sig(fit.kv_read_bytes_per_s),
            "actual_kv_read_bytes_per_s": sig(fit.kv_read_bytes_per_s * esize / model_esize),
            "flops_per_s": sig(fit.flops_per_s), "seq_seconds": sig(fit.seq_seconds), "row_seconds": sig(fit.row_seconds),
            "rel_rms_residual": sig(fit.rel_rms_residual, 3),
            "rel_max_residual": sig(fit.rel_max_residual, 3), "bounded": list(fit.bounded)}, separators=(",", ":"))
        self.prov["data.cpu_attention"] = "[batch, query, mean context, seconds, spread, fit_rel_residual]: " + \
            points_json((p.batch, p.query, p.context, p.seconds, p.spread, r) for p, r in zip(points, fit.residuals))
        out = {"cpu_attn_kv_read_bytes_per_s": sig(fit.kv_read_bytes_per_s),
               "cpu_attn_flops_per_s": sig(fit.flops_per_s),
               "cpu_attn_overhead_seconds": sig(fit.overhead_seconds),
               "cpu_attn_seq_overhead_seconds": sig(fit.seq_seconds),
               "cpu_attn_row_overhead_seconds": sig(fit.row_seconds)}
        for b in fit.bounded:
            self._warn(f"cpu_attention: the fit could not see {b} (its term fitted to zero); written as the bound "
                       "at which it stays under 1% of every measured time")
        return out

    def fallback_cpu_attention(self, reason: str) -> dict[str, Any]:
        self.prov["cpu_attn_overhead_seconds"] = f"0: the cpu_attention probe failed ({reason})"
        return {"cpu_attn_overhead_seconds": 0.0}
