"""Disk probe: the sequential read rate of the file system holding a folder (the disk tier's figure).

A test file is written in the folder (random bytes, fsync'd, then dropped from the page cache), or
an existing large file is used, and read start to end by T reader threads in blocks of B bytes
(thread i reads blocks i, i+T, i+2T ...: one sequential stream split the way the disk tier's
readers split a layer), into a destination as large as a staging buffer (``dest_bytes``, default
256 MiB, touched before timing; a small buffer reused per read stays in the CPU cache and, on a
virtual disk whose host copies into guest memory, reads up to 1.5x faster than the disk tier's
staging buffers ever will). The page cache is kept out of the way: O_DIRECT where the file system
allows it, else buffered reads with ``posix_fadvise(DONTNEED)`` on the whole file before each
timed read (then the rate is what the device gives only if the kernel honours the advice; the
mode is stated). Every (block size, threads) point is timed ``repeats`` times; the figure is the
best point's median. A file system backed by memory (tmpfs) is said to be one in the provenance.

API: :func:`measure_disk` (folder) -> :class:`DiskRate`; :func:`check_folder` validates a folder
first (exists, is a folder, writable) with an error naming the fix.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import secrets
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ALIGN = 4096
FULL_BLOCKS = (256 << 10, 1 << 20, 4 << 20, 16 << 20)
FULL_THREADS = (1, 2, 4, 8)
QUICK_BLOCKS = (1 << 20, 4 << 20)
QUICK_THREADS = (1, 4)
PROBE_PREFIX = ".specoffload-disk-probe-"


class DiskProbeError(ValueError):
    """The disk probe cannot run on the folder given; the message names the fix."""


@dataclass(frozen=True)
class DiskRate:
    """What the probe found: the best sequential read rate and the settings that reach it."""

    bytes_per_s: float
    block_bytes: int
    threads: int
    mode: str  # "direct" (O_DIRECT) or "buffered" (fadvise DONTNEED before each read)
    file: str
    file_bytes: int
    fs_type: str
    points: tuple[tuple[int, int, float, float], ...]  # (block, threads, median bytes/s, spread)
    seconds: float
    provenance: dict[str, str] = field(default_factory=dict)


def fs_type(path: Path) -> tuple[str, str]:
    """(file system type, mount point) of the mount holding ``path``, from /proc/mounts ('unknown' elsewhere)."""
    path = Path(os.path.realpath(path))
    best = ("unknown", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                    best = (parts[2], mnt)
    except OSError:
        pass
    return best


def check_folder(folder: str | os.PathLike) -> Path:
    """The folder as a Path, or a :class:`DiskProbeError` saying what is wrong with it."""
    p = Path(folder)
    if not p.exists():
        raise DiskProbeError(f"--disk {folder}: no such folder; give the folder that holds (or will hold) the "
                             "checkpoint, e.g. --disk /nvme/models")
    if not p.is_dir():
        raise DiskProbeError(f"--disk {folder}: not a folder; give the folder that holds the checkpoint "
                             f"(e.g. --disk {p.parent})")
    if not os.access(p, os.W_OK | os.X_OK):
        raise DiskProbeError(f"--disk {folder}: this user cannot write there, and the probe writes a temporary "
                             "test file in the folder; give a writable folder on the same disk, or run as a user "
                             "who may write there")
    return p


def _open_direct(path: Path, want_direct: bool) -> tuple[int, str]:
    if want_direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            return fd, "direct"
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return os.open(path, os.O_RDONLY), "buffered"


def _drop_cache(fd: int, size: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)


def write_test_file(folder: Path, nbytes: int) -> Path:
    """A file of ``nbytes`` random bytes in ``folder``, synced to disk and out of the page cache."""
    path = folder / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    chunk = os.urandom(min(nbytes, 8 << 20))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise DiskProbeError(f"--disk {folder}: cannot create the test file {path.name} ({exc.strerror}); give a "
                             "writable folder on the disk to measure") from None
    try:
        done = 0
        while done < nbytes:
            done += os.write(fd, chunk[:nbytes - done])
        os.fsync(fd)
        _drop_cache(fd, nbytes)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise DiskProbeError(f"--disk {folder}: writing the {nbytes >> 20} MiB test file failed ({exc.strerror}); "
                             "free some space there or pass a smaller --disk-size-mib") from None
    os.close(fd)
    return path


DEST_BYTES = 256 << 20


def read_once(path: Path, block: int, threads: int, direct: bool = True, dest_bytes: int = DEST_BYTES
              ) -> tuple[float, int, str]:
    """(seconds, bytes, mode) of one full sequential read of ``path`` by ``threads`` readers in ``block`` chunks.

    Block k lands at offset (k * block) mod the destination's size, as a staging buffer fills.
    """
    size = path.stat().st_size
    size = size // ALIGN * ALIGN  # O_DIRECT reads whole aligned blocks; the tail (< 4 KiB) is left out
    fd, mode = _open_direct(path, direct)
    try:
        if mode == "buffered":
            _drop_cache(fd, size)
        slots = max(1, min(size, dest_bytes) // block)
        dest = mmap.mmap(-1, slots * block)  # anonymous maps are page-aligned
        for i in range(0, slots * block, mmap.PAGESIZE):
            dest[i] = 0  # first touch outside the timing
        mem_all = memoryview(dest)
        try:
            def worker(i: int) -> int:
                got = 0
                for off in range(i * block, size, threads * block):
                    n = min(block, size - off)
                    d = (off // block) % slots * block
                    r = os.preadv(fd, [mem_all[d:d + n]], off)
                    got += r
                if mode == "buffered":
                    _drop_cache(fd, size)
                return got

            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=threads) as ex:
                total = sum(ex.map(worker, range(threads)))
            dt = time.perf_counter() - t0
        finally:
            mem_all.release()
            dest.close()
    except OSError as exc:
        if mode == "direct" and exc.errno == errno.EINVAL:
            os.close(fd)
            return read_once(path, block, threads, direct=False)
        raise
    os.close(fd)
    return dt, total, mode


def measure_disk(folder: str | os.PathLike = ".", *, file: str | os.PathLike | None = None,
                 file_bytes: int = 1 << 30, blocks=FULL_BLOCKS, threads=FULL_THREADS, repeats: int = 3,
                 direct: bool = True, quick: bool = False) -> DiskRate:
    """Measure the folder's disk; with ``file`` (an existing large file there) nothing is written.

    ``quick``: a 64 MiB file, 2 block sizes x 2 thread counts, 2 repeats (unless given explicitly).
    """
    if quick:
        blocks, threads, repeats = QUICK_BLOCKS, QUICK_THREADS, 2
        file_bytes = min(file_bytes, 64 << 20)
    t_start = time.perf_counter()
    created = None
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise DiskProbeError(f"--disk-file {file}: no such file; give an existing large file on the disk "
                                 "(a checkpoint shard is ideal) or leave it out to write a test file")
        folder = path.parent
    else:
        folder = check_folder(folder)
        if file_bytes < ALIGN:
            raise DiskProbeError(f"test file size {file_bytes} bytes is below {ALIGN}; give at least 1 MiB")
        path = created = write_test_file(folder, file_bytes)
    try:
        size = path.stat().st_size // ALIGN * ALIGN
        if size < ALIGN:
            raise DiskProbeError(f"{path}: {path.stat().st_size} bytes is too small to time; use a file of at "
                                 "least 64 MiB")
        fs, mnt = fs_type(path)
        points, modes = [], set()
        read_once(path, max(blocks), max(threads), direct)  # warm-up: opens, first-touch of buffers
        for b in blocks:
            for t in threads:
                rates = []
                for _ in range(repeats):
                    dt, got, mode = read_once(path, b, t, direct)
                    modes.add(mode)
                    rates.append(got / dt)
                med = statistics.median(rates)
                spread = (max(rates) - min(rates)) / med if med else 0.0
                points.append((b, t, med, spread))
    finally:
        if created is not None:
            created.unlink(missing_ok=True)
    best = max(points, key=lambda p: p[2])
    mode = modes.pop() if len(modes) == 1 else "mixed"
    seconds = time.perf_counter() - t_start
    cache = ("O_DIRECT (page cache bypassed)" if mode == "direct" else
             "buffered reads with posix_fadvise(DONTNEED) on the whole file before and after each read "
             "(the file system refused O_DIRECT)")
    memfs = fs in ("tmpfs", "ramfs")
    prov = {
        "disk_read_bytes_per_s": (
            f"sequential read of {'the existing file ' + str(path) if created is None else 'a fresh test file'} "
            f"({size / 2**20:.0f} MiB) in {folder} on {fs} mounted at {mnt or '?'} into a "
            f"{min(size, DEST_BYTES) >> 20} MiB destination (as a staging buffer); {cache}; best of "
            f"{len(points)} (block, threads) points, each the median of {repeats} full reads; best at block "
            f"{best[0] >> 10} KiB x {best[1]} thread(s), spread {best[3]:.3f}"
            + ("; NOTE: this file system lives in memory, so this is a memory rate, not a disk's" if memfs else "")),
        "data.disk": "[block_bytes, threads, bytes_per_s, spread]: "
                     + "[" + ",".join(f"[{b},{t},{r:.4g},{s:.3g}]" for b, t, r, s in points) + "]",
    }
    return DiskRate(best[2], best[0], best[1], mode, str(path), size, fs, tuple(points), seconds, prov)


@dataclass(frozen=True)
class LayerReadRate:
    """What the engine's own reader gets: one layer-sized read at a time, as the disk tier issues them."""

    bytes_per_s: float  # layer payload bytes / median seconds per read
    layer_bytes: int  # payload bytes per read (tensor bytes, as the sweep counts them)
    seconds_per_read: float  # median
    min_seconds_per_read: float
    reads: int
    threads: int
    block_bytes: int
    mode: str  # the reader's mode over the files read: direct | buffered | mixed
    source: str
    samples: tuple[float, ...] = ()


def _layer_index(source: Path, layer_bytes: int | None):
    """(CheckpointIndex, layer ids) for ``source``: a safetensors checkpoint folder (its decoder layers, as
    the engine reads them) or any file (consecutive aligned extents of ``layer_bytes`` as one-tensor layers)."""
    from ..disk import CheckpointIndex, FileStamp, TensorEntry, _up

    if source.is_dir():
        index = CheckpointIndex.open(source)
        layers = list(range(index.n_layers))
        if not layers:
            raise DiskProbeError(f"{source}: the checkpoint has no decoder layers (model.layers.N.*) to read")
        return index, layers
    if not source.is_file():
        raise DiskProbeError(f"{source}: no such file or folder; give a checkpoint folder or a large file on the disk")
    if not layer_bytes or layer_bytes < 1:
        raise DiskProbeError(f"{source}: a plain file needs layer_bytes (the bytes one layer read moves), e.g. "
                             "the target's per-layer weight bytes")
    size = source.stat().st_size
    stride = _up(layer_bytes)
    n = size // stride
    if n < 2:
        raise DiskProbeError(f"{source}: {size} bytes hold fewer than 2 extents of {layer_bytes} bytes; use a file "
                             f"of at least {2 * stride} bytes")
    tensors = {f"model.layers.{i}.probe": TensorEntry(f"model.layers.{i}.probe", source, "U8", (layer_bytes,),
                                                      i * stride, layer_bytes) for i in range(n)}
    return CheckpointIndex(source.parent, tensors, {source: FileStamp.of(source)}), list(range(n))


def measure_layer_reads(source: str | os.PathLike, layer_bytes: int | None = None, *, reads: int = 32,
                        threads: int | None = None, block_bytes: int | None = None,
                        direct: bool | None = None) -> LayerReadRate:
    """Time the disk tier's reads as the engine makes them: its :class:`~specoffload.runtime.disk.DiskReader`
    (same threads, block size and O_DIRECT choice as runtime/engine/disk_stream.py, unless given),
    ``read_layer`` one layer at a time into an aligned staging buffer (``alloc_staging``), layers in
    sweep order, round robin. ``source``: a checkpoint folder (its own layers, nothing written) or a
    large file (extents of ``layer_bytes``). Unlike :func:`measure_disk`'s long sequential stream,
    each read pays the per-request cost once and runs at the queue depth one layer gives
    (ceil(layer / block) blocks over the reader threads; one block is read in the calling thread). The first
    read of each layer is untimed.
    """
    from ..disk import DEFAULT_BLOCK, READ_THREADS, DiskReader, alloc_staging

    if reads < 1:
        raise DiskProbeError(f"reads must be >= 1, found {reads}")
    index, layers = _layer_index(Path(source), layer_bytes)
    threads = READ_THREADS if threads is None else threads
    block_bytes = DEFAULT_BLOCK if block_bytes is None else block_bytes
    with DiskReader(index, threads=threads, direct=direct, block_bytes=block_bytes) as reader:
        staging = alloc_staging(max(reader.layer_staging_bytes(j) for j in layers), pin=False)
        for j in layers:  # untimed: opens the files, first touch of the buffer
            reader.read_layer(j, staging)
        reader.reset_counters()
        samples = []
        for i in range(reads):
            j = layers[i % len(layers)]
            t0 = time.perf_counter()
            reader.read_layer(j, staging)
            samples.append(time.perf_counter() - t0)
        payload = reader.payload_bytes / reads
        mode = reader.mode
    med = statistics.median(samples)
    return LayerReadRate(payload / med, int(round(payload)), med, min(samples), reads, threads, block_bytes, mode,
                         str(source), tuple(samples))


def check_checkpoint(model_dir: str | os.PathLike):
    """(ModelArgs, CheckpointIndex) of a safetensors checkpoint folder with decoder layers, or a DiskProbeError
    naming the fix (checked before any probe runs)."""
    from ..config import load_args
    from ..disk import CheckpointIndex
    from ..loader import CheckpointError

    source = Path(model_dir)
    if not source.is_dir():
        raise DiskProbeError(f"--disk-checkpoint {source}: not a checkpoint folder; give the folder of the model the "
                             "disk tier reads (its config.json and safetensors files)")
    try:
        args = load_args(source)
        index = CheckpointIndex.open(source)
    except (CheckpointError, ValueError) as exc:  # not a readable safetensors checkpoint
        raise DiskProbeError(f"--disk-checkpoint {source}: {exc}") from None
    if not index.n_layers:
        raise DiskProbeError(f"--disk-checkpoint {source}: the checkpoint has no decoder layers (model.layers.N.*)")
    return args, index


@dataclass(frozen=True)
class DiskCpuCosts:
    """The disk tier's CPU costs as the engine pays them (profile fields disk_convert_bytes_per_s and
    disk_read_compute_seconds_per_byte), measured on a checkpoint's own layers."""

    convert_bytes_per_s: float  # on-disk layer bytes / median seconds of DiskLayers.take's conversion
    convert_seconds: float  # median per layer
    read_compute_seconds_per_byte: float  # median (compute with a read beside it - alone) / layer bytes, >= 0
    compute_seconds: float  # median of one timed compute alone (several layer computes)
    slowdown_seconds: float  # median of the per-pair differences (may be < 0 in noise; the figure is clamped)
    layer_bytes: int
    pairs: int
    mode: str
    source: str
    provenance: dict[str, str] = field(default_factory=dict)


def measure_disk_cpu_costs(model_dir: str | os.PathLike, *, pairs: int = 60,
                           tokens: int = 128, dtype=None) -> DiskCpuCosts:
    """Time the disk tier's CPU work in the engine's own code on a checkpoint (``model_dir``, e.g. the target's):

    * a read in flight: a layer's compute (the engine's qkv, output projection and FFN / routed experts for
      ``tokens`` tokens, repeated to last about four layer reads; attention itself is left out, it needs a KV
      cache) is timed alone and with a layer read (:class:`~specoffload.runtime.engine.disk_stream.DiskLayers`:
      the engine's reader and prefetcher) started beside it, in ``pairs`` pairs of alternating order; the
      figure is the median per-pair slowdown / the bytes one read moves (clamped at 0).
    * conversion: after each compute with a read beside it, ``DiskLayers.take`` converts the layer read to
      ``dtype`` (default fp32, the CPU engine's), as the engine does when the compute reaches the layer (its
      caches holding the compute's data, not the layer); the figure is layer bytes / the median time.
    Torch's threads are what the caller set (the engine's setting)."""
    import torch

    from ..engine.disk_stream import DiskLayers
    from ..layers import attn_out, moe_experts, qkv, rope_cos_sin, rope_inv_freq, route, rms_norm, swiglu

    if pairs < 1 or tokens < 1:
        raise DiskProbeError(f"pairs and tokens must be >= 1, found {pairs}, {tokens}")
    dtype = dtype or torch.float32
    source = Path(model_dir)
    args, _ = check_checkpoint(source)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    layers = list(range(args.n_layers))
    disk = DiskLayers(source, args, layers)
    try:
        n = len(layers)
        for j in layers:  # untimed: opens the files, first touch of the buffers and destinations
            disk.ahead(j, n)
            disk.take(j, dtype)
        layer_bytes = max(disk.layer_bytes.values())
        # the compute: layer 0's weights, converted once and kept (as a resident layer would be)
        disk.ahead(0, n)
        w = disk.take(0, dtype)
        w = type(w)({k: t.clone() for k, t in w.attn.items()}, {k: t.clone() for k, t in w.ffn.items()},
                    [{k: t.clone() for k, t in e.items()} for e in w.experts])
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, 1, args.dim, generator=gen, dtype=dtype)
        cos_sin = rope_cos_sin(rope_inv_freq(args), torch.zeros(tokens, 1, dtype=torch.long), dtype)

        def layer() -> None:
            q, _, _ = qkv(args, w.attn, x, cos_sin)
            h = x + attn_out(w.attn, q)
            hn = rms_norm(h, w.ffn["norm"], args.norm_eps).reshape(tokens, args.dim)
            if args.is_moe:
                moe_experts(w.experts, hn, route(args, w.ffn, hn))
            else:
                swiglu(w.ffn, hn)

        def timed(reps: int) -> float:
            t0 = time.perf_counter()
            for _ in range(reps):
                layer()
            return time.perf_counter() - t0

        timed(3)
        one = statistics.median(timed(1) for _ in range(9))
        read = []
        for i in range(5):  # the read alone, as the prefetcher makes it
            j = layers[i % n]
            t0 = time.perf_counter()
            disk.ahead(j, n)
            disk.prefetcher.wait(j)
            read.append(time.perf_counter() - t0)
            disk.release(j)
        reps = max(1, math.ceil(4 * statistics.median(read) / max(one, 1e-6)))
        alone, beside, diffs, conv = [], [], [], []
        for i in range(pairs):
            j = layers[i % n]

            def with_read() -> float:
                disk.ahead(j, n)  # the read starts in the prefetcher's thread
                dt = timed(reps)
                disk.prefetcher.wait(j)
                before = disk.convert_seconds  # then converted, as the engine does when it reaches the layer
                lw = disk.take(j, dtype)
                conv.append(disk.convert_seconds - before)
                del lw
                return dt

            if i % 2:
                b = with_read()
                a = timed(reps)
            else:
                a = timed(reps)
                b = with_read()
            alone.append(a)
            beside.append(b)
            diffs.append(b - a)
        slow = statistics.median(diffs)
        conv_med = statistics.median(conv)
        mode = disk.mode
    finally:
        disk.close()
    per_byte = max(0.0, slow) / layer_bytes
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    what = (f"{source} ({n} layers of {layer_bytes / 2**20:.2f} MiB, read {mode}, engine reader and prefetcher)")
    where = (f"; {torch.get_num_threads()} torch thread(s), load average (1 min) {load0:.2f} before, {load1:.2f} "
             f"after, on {os.cpu_count()} CPUs")
    prov = {
        "disk_convert_bytes_per_s": (
            f"measured: DiskLayers.take converting layers of {what} to {str(dtype).replace('torch.', '')} "
            f"after the compute their read ran beside (below), as the engine does, median of {len(conv)}: "
            f"{conv_med * 1e3:.3f} ms per layer (quartiles {_quantile(conv, 0.25) * 1e3:.3f}, "
            f"{_quantile(conv, 0.75) * 1e3:.3f}){where}"),
        "disk_read_compute_seconds_per_byte": (
            f"measured: {reps} layer computes of {tokens} tokens (qkv, output projection, FFN / routed experts; "
            f"attention left out) timed alone ({statistics.median(alone) * 1e3:.2f} ms median) and with one layer "
            f"read of {what} started beside them ({statistics.median(beside) * 1e3:.2f} ms), {pairs} pairs "
            f"in alternating order; median per-pair slowdown {slow * 1e3:.3f} ms (quartiles "
            f"{_quantile(diffs, 0.25) * 1e3:.3f}, {_quantile(diffs, 0.75) * 1e3:.3f}) / {layer_bytes} bytes"
            + ("; the median slowdown was negative (noise), charged as 0" if slow < 0 else "") + where),
    }
    return DiskCpuCosts(layer_bytes / conv_med if conv_med > 0 else 0.0, conv_med, per_byte,
                        statistics.median(alone), slow, layer_bytes, pairs, mode, str(source), prov)


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]
