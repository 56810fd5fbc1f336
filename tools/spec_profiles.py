"""Write the spec-sheet hardware presets under profiles/ (source: spec-sheet).

Each figure comes from a vendor sheet or the paper's stated environment; figures a spec sheet
does not give (achieved matmul efficiency, CPU attention speed) are estimated and say so in
`provenance`. A measured profile (specoffload-profile) always wins over these.

    python tools/spec_profiles.py            # rewrites profiles/<name>.yaml
"""
from __future__ import annotations

from pathlib import Path

from specoffload.planner.schema import Curve, HardwareProfile

GB, GiB = 1e9, 2**30
OUT = Path(__file__).resolve().parent.parent / "profiles"


def matmul_curve(peak: float) -> Curve:
    """Achieved fraction of the dense bf16 peak over a GEMM's token count (assumed, not measured)."""
    return Curve(((1, 0.30 * peak), (32, 0.45 * peak), (128, 0.60 * peak), (512, 0.75 * peak), (4096, 0.80 * peak)))


def link_curve(rate: float) -> Curve:
    """Copy rate over transfer size: latency-bound below ~1 MiB, full rate from 256 MiB."""
    return Curve(((65536, 0.25 * rate), (1 << 20, 0.70 * rate), (16 << 20, 0.95 * rate), (256 << 20, rate)))


def preset(name, device, cpu, cores, host, gpu_mem, gpu_bw, peak, pcie, dram_bw, attn_flops, sources, disk):
    """``disk``: (sequential read bytes/s, what drive it assumes) -- an estimate, never a measurement."""
    return HardwareProfile(
        name=name, source="spec-sheet", device_kind="cuda", device_name=device, cpu_name=cpu, cpu_cores=cores,
        host_mem_bytes=0.9 * host, pinned_mem_bytes=0.8 * host,
        gpu_mem_bytes=gpu_mem, gpu_mem_reserve_bytes=1.0 * GiB,
        gpu_matmul_flops_per_s=matmul_curve(peak), gpu_mem_bandwidth_bytes_per_s=0.85 * gpu_bw,
        h2d_pinned_bytes_per_s=link_curve(0.80 * pcie), h2d_pageable_bytes_per_s=link_curve(0.45 * pcie),
        d2h_pinned_bytes_per_s=link_curve(0.82 * pcie), d2h_pageable_bytes_per_s=link_curve(0.40 * pcie),
        cpu_attn_kv_read_bytes_per_s=0.4 * dram_bw, cpu_attn_flops_per_s=attn_flops,
        cpu_attn_overhead_seconds=5e-5, cpu_mem_bandwidth_bytes_per_s=0.7 * dram_bw,
        device_op_overhead_seconds=2e-5, disk_read_bytes_per_s=disk[0],
        provenance={
            "sources": sources,
            "gpu_matmul": "vendor dense bf16 peak x an assumed efficiency curve (30% at 1 token to 80% at 4096); "
                          "memory bandwidth 85% of the vendor figure",
            "links": "PCIe x16 theoretical per direction; pinned H2D 80%, D2H 82%, pageable 40-45%; "
                     "small transfers latency-bound (25% at 64 KiB)",
            "cpu_attention": "estimated, not measured: KV read at 40% of the DRAM channels' bandwidth, arithmetic "
                             "at about 20% of the cores' fp32 FMA peak, 50 us per call",
            "memory": "host_mem_bytes 90% of installed, pinned_mem_bytes 80%; gpu_mem_reserve_bytes 1 GiB for the "
                      "CUDA context and fragmentation (assumed until measured)",
            "disk_read_bytes_per_s": f"estimated, not measured: {disk[1]}, at about 85% of its sequential-read "
                                     "spec; measure the real drive with specoffload-profile --disk DIR",
            "disk_convert_bytes_per_s": "0: not used beside a GPU (a staged layer is copied to the GPU as it is, "
                                        "not converted on the host)",
            "disk_read_compute_seconds_per_byte": "0, not estimated: the host CPU time a disk read takes from the "
                                                  "CPU attention beside it is not charged; measure it with "
                                                  "specoffload-profile --disk DIR",
            "written_by": "tools/spec_profiles.py",
        })


PRESETS = [
    preset("rtx4090-pcie3", "NVIDIA GeForce RTX 4090 24 GB", "Intel Core i9-10980XE (18 cores)", 18, 256 * GB,
           23.5 * GiB, 1008 * GB, 165e12, 15.75 * GB, 94 * GB, 0.6e12,
           "paper environment 1 (RTX 4090, i9-10980XE, 256 GB, PCIe Gen3 x16); NVIDIA Ada whitepaper "
           "(165 TFLOP/s dense bf16, fp32 accumulate; 1008 GB/s); Intel ark (4 x DDR4-2933 = 94 GB/s)",
           (3.0 * GB, "one PCIe Gen3 x4 NVMe drive (3.5 GB/s sequential read on typical spec sheets)")),
    preset("rtx4090-pcie4", "NVIDIA GeForce RTX 4090 24 GB", "AMD EPYC 7542 (32 cores)", 32, 448 * GB,
           23.5 * GiB, 1008 * GB, 165e12, 31.5 * GB, 204.8 * GB, 1.0e12,
           "paper environment 2 (RTX 4090, EPYC 7542, 448 GB, PCIe Gen4 x16); NVIDIA Ada whitepaper; "
           "AMD spec (8 x DDR4-3200 = 204.8 GB/s)",
           (6.0 * GB, "one PCIe Gen4 x4 NVMe drive (7 GB/s sequential read on typical spec sheets)")),
    preset("l4", "NVIDIA L4 24 GB", "Intel Xeon Cascade Lake (24 cores / 48 vCPU)", 24, 192 * GB,
           22.0 * GiB, 300 * GB, 121e12, 31.5 * GB, 140 * GB, 0.7e12,
           "NVIDIA L4 datasheet (121 TFLOP/s dense bf16, 300 GB/s, PCIe Gen4 x16); host as a GCP "
           "g2-standard-48 (192 GB), the setup MoE-Lightning reports on",
           (3.0 * GB, "cloud local NVMe SSD of about 3.5 GB/s sequential read (cloud figures vary by VM size "
                      "and disk count)")),
    preset("t4", "NVIDIA T4 16 GB", "Intel Xeon (16 cores / 32 vCPU)", 16, 208 * GB,
           14.5 * GiB, 320 * GB, 65e12, 15.75 * GB, 120 * GB, 0.5e12,
           "NVIDIA T4 datasheet (65 TFLOP/s fp16, 320 GB/s, PCIe Gen3 x16); host as a GCP n1-highmem-32 "
           "(208 GB), the setup MoE-Lightning reports on",
           (2.0 * GB, "cloud local SSD of about 2.4 GB/s sequential read (cloud figures vary by VM size and "
                      "disk count)")),
    preset("h200-24g", "NVIDIA H200, capped to 24 GB", "16 cores (the lent H200 machine)", 16, 128 * GiB,
           23.5 * GiB, 4800 * GB, 790e12, 63 * GB, 200 * GB, 0.5e12,
           "NVIDIA H200 datasheet (4.8 TB/s, PCIe Gen5 x16); ~790 TFLOP/s bf16 as measured on the lent "
           "machine; GPU memory capped at 24 GB to act as a 24 GB card; host 16 cores, 128 GiB",
           (6.0 * GB, "one PCIe Gen4 x4 NVMe drive (7 GB/s sequential read on typical spec sheets; the lent "
                      "machine's drive is not measured)")),
]

if __name__ == "__main__":
    for p in PRESETS:
        path = OUT / f"{p.name}.yaml"
        p.save(path)
        assert HardwareProfile.load(path) == p
        print("wrote", path)
