"""Link probes: host<->device transfer curves (pinned and pageable), memcpy, memory bandwidth."""
from __future__ import annotations

from typing import Any, Callable

import torch

from specoffload.planner.schema import Curve

from .config import GiB, MiB, ProbeFailure
from .fit import Stats, curve_points
from .timing import Clock, measure, measure_many, points_json



class LinkProbes:
    """The Profiler's link probes (methods of Profiler; they read its device, clock and config)."""

    def _transfer_curve(self, probe: str, make: Callable[[int], Callable[[], Any]]) -> tuple[Curve, str]:
        self._check_forced(probe)
        sizes, skipped, total = [], [], 0
        for size in sorted(self.cfg.transfer_sizes):
            if self._fits(total + 2 * size):
                sizes.append(size)
                total += 2 * size
            else:
                skipped.append(size)
        if not sizes:
            raise ProbeFailure(f"no transfer size fits in available memory ({self.avail_bytes / GiB:.1f} GiB)")
        fns = [make(size) for size in sizes]
        stats = measure_many(fns, self.clock, self.cfg, tick=lambda: self.tick(probe))
        del fns
        rows = [(size, size / st.median, st.spread) for size, st in zip(sizes, stats)]
        note = f"; sizes skipped (over 1/4 of available memory): {skipped}" if skipped else ""
        return Curve(curve_points([(x, y) for x, y, _ in rows])), points_json(rows) + note

    def probe_memcpy(self) -> dict[str, Any]:
        """CPU-only: host-to-host copy rate over size, written to all four transfer curves."""
        def make(size):
            src = torch.ones(size, dtype=torch.uint8)
            dst = torch.empty_like(src)
            return lambda: dst.copy_(src)

        curve, data = self._transfer_curve("memcpy", make)
        self.prov["transfers"] = ("cpu-only: the device is the CPU, so host<->device transfers are host memcpy "
                                  "(torch copy_ between two uint8 host tensors, transfer bytes / time); one curve "
                                  "measured and written to h2d/d2h pinned/pageable alike (the cost model does not "
                                  "charge transfers on a CPU-only machine)")
        self.prov["data.memcpy"] = "[bytes, bytes_per_s, spread]: " + data
        return {f: curve for f in ("h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s",
                                   "d2h_pinned_bytes_per_s", "d2h_pageable_bytes_per_s")}

    def probe_transfer(self, direction: str, pinned: bool) -> dict[str, Any]:
        """CUDA: one direction and host memory kind, over transfer size."""
        figure = f"{direction}_{'pinned' if pinned else 'pageable'}_bytes_per_s"
        probe = figure.replace("_bytes_per_s", "")
        dev = self.device

        def make(size):
            host = torch.ones(size, dtype=torch.uint8, pin_memory=pinned)
            gpu = torch.empty(size, dtype=torch.uint8, device=dev)
            if direction == "h2d":
                return lambda: gpu.copy_(host, non_blocking=True)
            return lambda: host.copy_(gpu, non_blocking=True)

        curve, data = self._transfer_curve(probe, make)
        self.prov[f"data.{probe}"] = "[bytes, bytes_per_s, spread]: " + data
        return {figure: curve}

    def _copy_bandwidth(self, probe: str, device: torch.device, clock: Clock) -> tuple[float, Stats, int]:
        self._check_forced(probe)
        size = self.cfg.bandwidth_bytes
        if device.type == "cpu":
            while size > MiB and not self._fits(2 * size):
                size //= 2
        src = torch.ones(size, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        st = measure(lambda: dst.copy_(src), clock, self.cfg)
        del src, dst
        return 2 * size / st.median, st, size

    def probe_bandwidth(self) -> dict[str, Any]:
        """Device memory bandwidth (and, CPU-only, host memory bandwidth: the same memory)."""
        rate, st, size = self._copy_bandwidth("mem_bandwidth", self.device, self.clock)
        self.tick("memory bandwidth")
        how = (f"STREAM-style copy of a {size / MiB:.0f} MiB buffer on the {self.kind}: (read + write bytes) / "
               f"time; median {st.median * 1e3:.3g} ms, spread {st.spread:.3f}")
        if self.cuda:
            self.prov["gpu_mem_bandwidth_bytes_per_s"] = how
            return {"gpu_mem_bandwidth_bytes_per_s": rate}
        self.prov["gpu_mem_bandwidth_bytes_per_s"] = how + ("; cpu-only: device and host memory are one, "
                                                            "cpu_mem_bandwidth_bytes_per_s is this same measurement. "
                                                            "Raw bytes: the CPU runtime holds fp32 weights, twice the "
                                                            "bf16 bytes the cost model counts")
        return {"gpu_mem_bandwidth_bytes_per_s": rate, "cpu_mem_bandwidth_bytes_per_s": rate}

    def probe_host_bandwidth(self) -> dict[str, Any]:
        rate, st, size = self._copy_bandwidth("host_bandwidth", torch.device("cpu"), self.cpu_clock)
        self.tick("host bandwidth")
        self.prov["cpu_mem_bandwidth_bytes_per_s"] = (
            f"STREAM-style copy of a {size / MiB:.0f} MiB host buffer: (read + write bytes) / time; "
            f"median {st.median * 1e3:.3g} ms, spread {st.spread:.3f}")
        return {"cpu_mem_bandwidth_bytes_per_s": rate}
