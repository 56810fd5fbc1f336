"""Benchmark: the disk probe's read rate against `dd ... iflag=direct` on the same file, in one run.

    python tools/bench_disk.py                    # a 1 GiB test file in the current folder
    python tools/bench_disk.py --dir /nvme --size-mib 4096 --repeats 5
    python tools/bench_disk.py --file /nvme/models/x/model-00001-of-00019.safetensors

Per repeat, in turn on the same file, with the page cache dropped before each (as root:
``echo 1 > /proc/sys/vm/drop_caches``; otherwise posix_fadvise(DONTNEED) on the file, and the
report says which):

1. ``dd if=FILE of=/dev/null bs=4M iflag=direct`` -- the machine's own yardstick;
2. the profiler's probe at dd's settings (4 MiB blocks, 1 thread);
3. the profiler's full search over block sizes and reader threads (what ``specoffload-profile
   --disk`` writes);
4. (on the test file it writes, which is a valid safetensors file of 16 one-tensor "layers") the
   disk tier's own reader, ``DiskReader.read_layer`` layer after layer into one staging buffer.

It prints the medians and the ratios probe / dd. The test file (if one is written) is deleted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

from specoffload.runtime.disk import CheckpointIndex, DiskReader, alloc_staging
from specoffload.runtime.profiler.disk import (FULL_BLOCKS, FULL_THREADS, PROBE_PREFIX, QUICK_BLOCKS,
                                               QUICK_THREADS, check_folder, fs_type, measure_disk)

LAYERS = 16


def write_checkpoint(folder: Path, nbytes: int) -> Path:
    """A safetensors file (``model.safetensors`` in a fresh subfolder) of LAYERS U8 tensors of random bytes."""
    d = folder / f"{PROBE_PREFIX}{os.getpid()}"
    d.mkdir()
    per = nbytes // LAYERS // 4096 * 4096
    header = {f"model.layers.{i}.w": {"dtype": "U8", "shape": [per], "data_offsets": [i * per, (i + 1) * per]}
              for i in range(LAYERS)}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 4096)  # data begins on a 4 KiB boundary, as O_DIRECT prefers
    path = d / "model.safetensors"
    chunk = os.urandom(8 << 20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left = per * LAYERS
        while left:
            left -= f.write(chunk[:min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    return path


def read_with_reader(path: Path, threads: int, block: int) -> tuple[float, str]:
    """(bytes/s, mode) of DiskReader reading every layer of the checkpoint at ``path``'s folder once."""
    idx = CheckpointIndex.open(path.parent)
    with DiskReader(idx, threads=threads, block_bytes=block) as reader:
        buf = alloc_staging(max(reader.layer_staging_bytes(i) for i in range(idx.n_layers)), pin=False)
        buf.fill_(0)  # first touch outside the timing
        t0 = time.perf_counter()
        for i in range(idx.n_layers):
            reader.read_layer(i, buf)
        dt = time.perf_counter() - t0
        assert reader.payload_bytes == sum(idx.layer_bytes(i) for i in range(idx.n_layers))
        return reader.payload_bytes / dt, reader.mode


def drop_cache(path: Path) -> str:
    """Drop the page cache for ``path``: the whole cache as root where allowed, else fadvise on the file."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def run_dd(path: Path) -> float:
    """bytes/s of `dd if=path of=/dev/null bs=4M iflag=direct`, from its own byte count and our clock."""
    t0 = time.perf_counter()
    p = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True,
                       text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"dd failed on {path}: {p.stderr.strip()}")
    m = re.search(r"^(\d+) bytes", p.stderr, re.M)
    m_t = re.search(r"copied, ([\d.,]+) s", p.stderr)
    nbytes = int(m.group(1)) if m else path.stat().st_size
    secs = float(m_t.group(1).replace(",", ".")) if m_t else dt  # dd's own time excludes process start
    return nbytes / secs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=".", help="folder on the disk to measure (default: current folder)")
    ap.add_argument("--file", default=None, help="an existing large file to read instead of writing one")
    ap.add_argument("--size-mib", type=int, default=1024, help="test file size in MiB (default 1024)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (dd, probe at dd's settings, probe search)")
    ap.add_argument("--quick", action="store_true", help="the probe's quick grid (2 blocks x 2 thread counts)")
    ap.add_argument("--json", default=None, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    if shutil.which("dd") is None:
        raise SystemExit("dd is not installed; this benchmark compares against it")
    created = None
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise SystemExit(f"--file {path}: no such file")
    else:
        path = created = write_checkpoint(check_folder(args.dir), args.size_mib << 20)
    blocks, threads = (QUICK_BLOCKS, QUICK_THREADS) if args.quick else (FULL_BLOCKS, FULL_THREADS)
    dd, same, best, how, modes, best_at, rd = [], [], [], set(), set(), [], []
    try:
        for _ in range(args.repeats):
            how.add(drop_cache(path))
            dd.append(run_dd(path))
            how.add(drop_cache(path))
            r = measure_disk(file=path, blocks=(4 << 20,), threads=(1,), repeats=1)
            same.append(r.bytes_per_s)
            modes.add(r.mode)
            how.add(drop_cache(path))
            r = measure_disk(file=path, blocks=blocks, threads=threads, repeats=1)
            best.append(r.bytes_per_s)
            best_at.append((r.block_bytes, r.threads))
            modes.add(r.mode)
            if created is not None:
                how.add(drop_cache(path))
                rate, mode = read_with_reader(path, r.threads, max(r.block_bytes, 1 << 20))
                rd.append(rate)
                modes.add(mode)
    finally:
        if created is not None:
            created.unlink(missing_ok=True)
            created.parent.rmdir()
    fs, mnt = fs_type(path)
    med = {k: statistics.median(v) for k, v in (("dd", dd), ("probe_4M_1t", same), ("probe_best", best),
                                                  ("reader", rd)) if v}
    res = {"file_bytes": (path.stat().st_size if created is None else args.size_mib << 20), "fs": fs, "mount": mnt,
           "cache_drop": sorted(how), "probe_modes": sorted(modes), "repeats": args.repeats,
           "dd_bytes_per_s": dd, "probe_4M_1t_bytes_per_s": same, "probe_best_bytes_per_s": best,
           "probe_best_at": best_at, "medians": med,
           "ratio_probe_4M_1t_over_dd": med["probe_4M_1t"] / med["dd"],
           "ratio_probe_best_over_dd": med["probe_best"] / med["dd"], "reader_bytes_per_s": rd}
    if rd:
        res["ratio_reader_over_probe_best"] = med["reader"] / med["probe_best"]
    print(f"file {res['file_bytes'] >> 20} MiB on {fs} ({mnt}); cache dropped by {', '.join(sorted(how))}; "
          f"probe mode {', '.join(sorted(modes))}; {args.repeats} rounds")
    print(f"{'':28s}{'median GB/s':>12s}   per round")
    for label, key, vals in (("dd bs=4M iflag=direct", "dd", dd), ("probe 4 MiB x 1 thread", "probe_4M_1t", same),
                             ("probe best of grid", "probe_best", best),
                             ("DiskReader, best's threads", "reader", rd)):
        if not vals:
            continue
        print(f"{label:28s}{med[key] / 1e9:12.3f}   " + " ".join(f"{v / 1e9:.3f}" for v in vals))
    print(f"ratio probe(4M,1t)/dd = {res['ratio_probe_4M_1t_over_dd']:.3f}; "
          f"probe(best)/dd = {res['ratio_probe_best_over_dd']:.3f}; best at (block, threads) {best_at}"
          + (f"; reader/probe(best) = {res['ratio_reader_over_probe_best']:.3f}" if rd else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
