"""Device probes: host memory, matmul rate, per-op fixed cost, device memory (what the allocator gives)."""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from specoffload.planner.schema import Curve

from .config import GiB, MiB, ProbeFailure
from .fit import curve_points, sig
from .machine import cpu_cores, cpu_name, host_memory
from .timing import clone_layer, cold_copies, measure_many, points_json



class DeviceProbes:
    """The Profiler's device probes (methods of Profiler; they read its device, clock and config)."""

    def probe_host_memory(self) -> dict[str, Any]:
        self._check_forced("host_memory")
        avail, total, how = host_memory()
        if avail <= 0 or total <= 0:
            raise ProbeFailure(f"{how} reported {avail} bytes available of {total}")
        self.avail_bytes = avail
        margin = max(self.cfg.cpu_mem_margin_min_bytes, int(self.cfg.cpu_mem_margin_fraction * total))
        margin = min(margin, avail // 2)
        usable = avail - margin
        out = {"host_mem_bytes": float(usable), "cpu_cores": cpu_cores(), "cpu_name": cpu_name()}
        self.prov["host_mem_bytes"] = (
            f"{how} = {avail / GiB:.2f} GiB at profiling time (MemTotal {total / GiB:.2f} GiB) minus a stated "
            f"margin of max({self.cfg.cpu_mem_margin_min_bytes / GiB:g} GiB, "
            f"{self.cfg.cpu_mem_margin_fraction:.0%} of MemTotal) = {margin / GiB:.2f} GiB for the OS and other "
            "processes")
        self.prov["cpu_cores"] = "CPUs this process may run on (os.sched_getaffinity; logical CPUs)"
        if self.cuda:
            out["pinned_mem_bytes"] = float(self.cfg.pinned_fraction * usable)
            self.prov["pinned_mem_bytes"] = (f"stated: {self.cfg.pinned_fraction:.0%} of host_mem_bytes (page-locking "
                                             "is bounded by physical memory; the rest stays pageable for the OS)")
        else:
            out["pinned_mem_bytes"] = float(usable)
            out["gpu_mem_bytes"] = float(avail)
            out["gpu_mem_reserve_bytes"] = float(margin)
            self.prov["pinned_mem_bytes"] = "cpu-only: no page-locking; equal to host_mem_bytes"
            self.prov["gpu_mem_bytes"] = ("cpu-only: the device is the CPU; its memory is the host's MemAvailable "
                                          "(the cost model then plans against host_mem_bytes only)")
            self.prov["gpu_mem_reserve_bytes"] = "cpu-only: the stated host margin above (not measured)"
        self.tick("host memory")
        return out

    def fallback_host_memory(self, reason: str) -> dict[str, Any]:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        usable = 0.5 * total
        self.prov["host_mem_bytes"] = f"fallback after probe failure ({reason}): half of physical memory"
        out = {"host_mem_bytes": float(usable), "pinned_mem_bytes": float(0.5 * usable), "cpu_cores": cpu_cores(),
               "cpu_name": cpu_name()}
        if not self.cuda:
            out.update(gpu_mem_bytes=float(usable), gpu_mem_reserve_bytes=float(0.05 * usable))
        return out

    def probe_matmul(self) -> dict[str, Any]:
        self._check_forced("matmul")
        spec = self.spec
        d, f = spec.hidden_size, spec.intermediate_size
        dtype = torch.bfloat16 if self.cuda else torch.float32
        g = torch.Generator(device="cpu").manual_seed(0)
        w0 = (torch.randn(f, d, generator=g) * d ** -0.5).to(self.device, dtype)
        ws = cold_copies(lambda i: w0 if i == 0 else w0.clone(), w0.nbytes, self.device)
        if self.cuda:  # what the allocator caches beyond live tensors while GEMMs run: part of the reserve
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        tokens = [n for n in self.cfg.matmul_tokens if self.cuda or n <= self.cfg.cpu_matmul_max_tokens]
        xs = [torch.randn(n, d, generator=g).to(self.device, dtype) for n in tokens]
        stats = measure_many([(lambda x=x: F.linear(x, next(ws))) for x in xs], self.clock, self.cfg,
                             tick=lambda: self.tick("matmul"))
        rows = [(n, 2.0 * n * d * f / st.median, st.spread) for n, st in zip(tokens, stats)]
        pts = [(n, r) for n, r, _ in rows]
        if self.cuda:
            self._gpu_overhead_seen = max(self._gpu_overhead_seen, torch.cuda.max_memory_reserved(self.device)
                                          - torch.cuda.max_memory_allocated(self.device))
        del w0, ws
        self.prov["gpu_matmul_flops_per_s"] = (
            f"achieved rate of F.linear(x[tokens, {d}], W[{f}, {d}]) ({spec.name} FFN shape"
            f"{'' if self.cuda else ', weights rotated over copies so each call reads them from memory'}) in "
            f"{'bf16' if self.cuda else 'fp32 (what the runtime computes in on the CPU)'}: 2*tokens*{d}*{f} / "
            "median time; at few tokens this is memory-bound and includes the weight read")
        self.prov["data.matmul"] = "[tokens, flops_per_s, spread]: " + points_json(rows)
        return {"gpu_matmul_flops_per_s": Curve(curve_points(pts))}

    def probe_op_overhead(self) -> dict[str, Any]:
        from specoffload.runtime.config import ModelArgs
        from specoffload.runtime.layers import attn_out, ffn, init_random_weights, qkv, rope_cos_sin, rope_inv_freq

        self._check_forced("device_op_overhead")
        dim, heads, kv_heads, dh, ffn_dim = self.cfg.op_overhead_shape
        args = ModelArgs(family="mistral", vocab_size=32, dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                         head_dim=dh, ffn_dim=ffn_dim, norm_eps=1e-5, rope_theta=10000.0)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        one = init_random_weights(args, seed=0).layers[0].to(self.device, dtype)
        layer_bytes = sum(t.nbytes for d in (one.attn, one.ffn) for t in d.values())
        layers = cold_copies(lambda i: one if i == 0 else clone_layer(one), layer_bytes, self.device)
        x = torch.randn(1, 1, dim).to(self.device, dtype)
        cos_sin = rope_cos_sin(rope_inv_freq(args, self.device), torch.zeros(1, 1, dtype=torch.long), dtype)

        def front():
            return qkv(args, next(layers).attn, x, cos_sin)

        q = front()[0]

        def back():
            lw = next(layers)
            h = x + attn_out(lw.attn, q)
            return h + ffn(args, lw.ffn, h)

        st_front = self.measure(front)
        st_back = self.measure(back)
        st_all = self.measure(lambda: (front(), back()))
        # MoE: a fixed cost per expert a forward invokes (gather, three projections, scatter-add): time the
        # runtime's own MoE FFN at a tiny size with 2 experts used (1 token) and with all 8 used.
        margs = ModelArgs(family="mixtral", vocab_size=32, dim=dim, n_layers=1, n_heads=heads, n_kv_heads=kv_heads,
                          head_dim=dh, ffn_dim=ffn_dim, norm_eps=1e-5, rope_theta=10000.0, n_experts=8, top_k=2)
        mw = init_random_weights(margs, seed=0).layers[0].to(self.device, dtype)
        moe_bytes = sum(t.nbytes for d in [mw.ffn, *mw.experts] for t in d.values())
        moes = cold_copies(lambda i: mw if i == 0 else clone_layer(mw), moe_bytes, self.device)
        x_all = torch.randn(1, 64, dim).to(self.device, dtype)  # 64 tokens: every expert is routed some

        def moe(xx):
            m = next(moes)
            return ffn(margs, m.ffn, xx, m.experts)

        st_two = self.measure(lambda: moe(x))
        st_eight = self.measure(lambda: moe(x_all))
        per_expert = max(0.0, (st_eight.median - st_two.median) / 6)
        self.tick("op overhead")
        self.prov["device_expert_overhead_seconds"] = (
            f"the runtime's MoE FFN at a tiny size (dim {dim}, expert FFN {ffn_dim}, 8 experts top-2): 1 token "
            f"(2 experts) {st_two.median * 1e6:.1f} us, 64 tokens (8 experts) {st_eight.median * 1e6:.1f} us; "
            f"per extra expert (difference / 6)")
        self.prov["device_op_overhead_seconds"] = (
            f"one decoder layer's device ops (norm, q/k/v projections, RoPE | output projection, norm, SwiGLU FFN) "
            f"on the {self.kind} at a tiny size (dim {dim}, {heads}/{kv_heads} heads x {dh}, FFN {ffn_dim}, 1 token, "
            f"{'bf16' if self.cuda else 'fp32'}), where the time is all fixed cost: per layer per forward "
            f"{st_all.median * 1e6:.1f} us (spread {st_all.spread:.3f}); of which qkv half "
            f"{st_front.median * 1e6:.1f} us, output+FFN half {st_back.median * 1e6:.1f} us")
        return {"device_op_overhead_seconds": sig(st_all.median), "device_expert_overhead_seconds": sig(per_expert)}

    def fallback_op_overhead(self, reason: str) -> dict[str, Any]:
        self.prov["device_op_overhead_seconds"] = f"0: the device_op_overhead probe failed ({reason})"
        return {"device_op_overhead_seconds": 0.0, "device_expert_overhead_seconds": 0.0}

    def probe_gpu_memory(self) -> dict[str, Any]:
        """CUDA: what the caching allocator really hands out, in chunks until it refuses; then freed."""
        self._check_forced("gpu_memory")
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        free0, total = torch.cuda.mem_get_info(dev)
        held = torch.cuda.memory_reserved(dev)
        chunks, chunk, got = [], self.cfg.gpu_alloc_chunk_bytes, 0
        try:
            while chunk >= self.cfg.gpu_alloc_min_chunk_bytes:
                try:
                    chunks.append(torch.empty(chunk, dtype=torch.uint8, device=dev))
                    got += chunk
                except torch.cuda.OutOfMemoryError:
                    chunk //= 2
        finally:
            chunks.clear()
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
        self.tick("gpu memory")
        gpu_mem = got + held
        if gpu_mem <= 0:
            raise ProbeFailure("the allocator gave no memory at all")
        # Reserve: fragmentation/caching overhead seen while the probes ran, plus the granularity we
        # could not resolve, plus whatever free memory the driver had that the allocator could not use.
        unusable = max(0, free0 - got)
        reserve = self._gpu_overhead_seen + self.cfg.gpu_alloc_min_chunk_bytes + unusable
        reserve = min(reserve, gpu_mem // 2)
        self.prov["gpu_mem_bytes"] = (
            f"allocated in chunks ({self.cfg.gpu_alloc_chunk_bytes // MiB} MiB halving to "
            f"{self.cfg.gpu_alloc_min_chunk_bytes // MiB} MiB) until the allocator refused: {got / GiB:.2f} GiB, plus "
            f"{held / GiB:.2f} GiB already held; device total {total / GiB:.2f} GiB (the difference is the CUDA "
            "context and the driver's)")
        self.prov["gpu_mem_reserve_bytes"] = (
            f"measured: allocator fragmentation/workspace peak during the probes {self._gpu_overhead_seen / MiB:.0f} "
            f"MiB + chunk granularity {self.cfg.gpu_alloc_min_chunk_bytes // MiB} MiB + free memory the allocator "
            f"could not use {unusable / MiB:.0f} MiB")
        return {"gpu_mem_bytes": float(gpu_mem), "gpu_mem_reserve_bytes": float(reserve)}

    def fallback_gpu_memory(self, reason: str) -> dict[str, Any]:
        free, total = torch.cuda.mem_get_info(self.device)
        self.prov["gpu_mem_bytes"] = f"fallback after probe failure ({reason}): cudaMemGetInfo free memory"
        self.prov["gpu_mem_reserve_bytes"] = "fallback: 5% of device memory (not measured)"
        return {"gpu_mem_bytes": float(free), "gpu_mem_reserve_bytes": float(0.05 * total)}
