"""The disk tier's reader: a layer's tensors straight from a checkpoint's safetensors files.

Scope: Hugging Face folders in safetensors format, single-file (``model.safetensors``) or sharded
(``model.safetensors.index.json`` + shards). Nothing is converted or copied: each file's header is
parsed here (8-byte little-endian header length, then a JSON header whose ``data_offsets`` are
relative to the end of the header), and a layer's bytes are read from their place in the file into
a caller-provided staging buffer (a pinned uint8 tensor beside a GPU, a plain one on the CPU). The
tensors handed back are views into that buffer, in their on-disk dtype.

Reads go through a pool of reader threads in blocks (a read of a single block is made in the calling
thread: no pool hop). Where the file system allows it, files are
opened with ``O_DIRECT`` (page cache bypassed; offsets, lengths and buffer addresses aligned to
:data:`ALIGN`), otherwise buffered reads followed by ``posix_fadvise(DONTNEED)`` on what was read,
so the page cache does not grow the process's footprint. :attr:`DiskReader.modes` says which mode
each file got.

Every file is stamped (size, mtime, inode) when the checkpoint is opened and checked when it is first
opened for reading and after each read: a file that changes, is truncated or disappears mid-run raises
:class:`CheckpointChanged` naming it.

API (what the engine and the planner's disk tier plug into):

* :meth:`CheckpointIndex.open` (folder) -> index of every tensor: file, dtype, shape, byte range;
  :meth:`CheckpointIndex.layer_names` / :meth:`CheckpointIndex.layer_bytes` per decoder layer.
* :class:`DiskReader` (index, threads, direct) with :meth:`DiskReader.staging_bytes` (buffer size a
  set of tensors needs), :func:`alloc_staging` (pinned where CUDA exists) and
  :meth:`DiskReader.read_layer` / :meth:`DiskReader.read_tensors` -> {HF name: tensor view}; the same in
  two halves: :meth:`DiskReader.fill_layer` (bytes only, for a background thread) and
  :meth:`DiskReader.layer_views` (the views, in the thread that uses them).
  Counters: :attr:`DiskReader.layer_payload_bytes` (tensor bytes per layer, as the headers say),
  :attr:`DiskReader.layer_disk_bytes` (bytes really read, alignment included).
* :class:`Prefetcher`: ``start(layer)`` / ``wait(layer)`` / ``release(layer)`` over a small ring
  of staging buffers, so reads run a layer or two ahead of compute.
"""
from __future__ import annotations

import errno
import json
import os
import re
import struct
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from .loader import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: O_DIRECT alignment of file offsets, lengths and buffer addresses (covers 512 B and 4 KiB sectors)
ALIGN = 4096
DEFAULT_BLOCK = 4 << 20
#: reader threads the engine's disk tier uses (runtime/engine/disk_stream.py); the profiler's layer-read
#: probe (runtime/profiler/disk.py, measure_layer_reads) reads with the same DiskReader settings
READ_THREADS = 4
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class DiskTierError(CheckpointError):
    """The disk tier cannot read a checkpoint; the message names the file and the fix."""


class CheckpointChanged(DiskTierError):
    """A checkpoint file changed, was truncated or disappeared while a run was reading it."""


def _up(x: int, a: int = ALIGN) -> int:
    return -(-x // a) * a


def _down(x: int, a: int = ALIGN) -> int:
    return x // a * a


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content for the run: size, modification time, inode."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> "FileStamp":
        st = os.stat(path)
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    def check(self) -> None:
        """Raise :class:`CheckpointChanged` if the file at ``path`` is no longer this file."""
        try:
            now = FileStamp.of(self.path)
        except FileNotFoundError:
            raise CheckpointChanged(
                f"checkpoint file {self.path} disappeared during the run; the disk tier reads weights from "
                "the checkpoint in place each sweep, so it must stay where it was until the run ends; "
                "restore it and resume the run (finished outputs are kept)") from None
        diffs = [f"{what} {a} -> {b}" for what, a, b in (
            ("size", self.size, now.size), ("mtime_ns", self.mtime_ns, now.mtime_ns),
            ("inode", self.inode, now.inode), ("device", self.device, now.device)) if a != b]
        if diffs:
            raise CheckpointChanged(
                f"checkpoint file {self.path} changed during the run ({', '.join(diffs)}); the disk tier reads "
                "weights from the checkpoint in place each sweep, so it must not be rewritten while a run uses "
                "it; restore the original file and resume the run (finished outputs are kept)")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a checkpoint: absolute byte range [offset, offset + nbytes) of ``file``."""

    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> tuple[dict, int, int]:
    """(JSON header, absolute offset where tensor data begins, file size) of one safetensors file.

    Parsed here, not by the safetensors library: the offsets are what the reader seeks to. Every
    tensor's byte range is checked to lie inside the file (a truncated file is an error naming it).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DiskTierError(f"checkpoint file {path} does not exist; check the folder (and its "
                            f"{INDEX_FILE}, which names the shards)") from None
    try:
        fadvise = hasattr(os, "posix_fadvise")
        if fadvise:  # no readahead: the header's pages alone are read, then dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise DiskTierError(f"{path}: {size} bytes, too short to be a safetensors file (no 8-byte header "
                                "length); re-download or re-save the checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise DiskTierError(f"{path}: header length {n} does not fit in the file ({size} bytes); the file is "
                                "truncated or not safetensors; re-download or re-save the checkpoint")
        raw = b""
        while len(raw) < n:
            chunk = os.pread(fd, n - len(raw), 8 + len(raw))
            if not chunk:
                break
            raw += chunk
        if fadvise:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DiskTierError(f"{path}: the safetensors header is not valid JSON ({exc}); the file is damaged; "
                            "re-download or re-save the checkpoint") from None
    data_start = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype, shape = meta["dtype"], tuple(int(s) for s in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise DiskTierError(f"{path}: tensor {name!r} has a malformed header entry {meta!r}; the file is "
                                "damaged; re-download or re-save the checkpoint") from None
        if dtype not in ITEMSIZE:
            raise DiskTierError(f"{path}: tensor {name!r} has dtype {dtype}, which the disk tier does not read "
                                f"(known: {', '.join(ITEMSIZE)})")
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end or end - begin != numel * ITEMSIZE[dtype]:
            raise DiskTierError(f"{path}: tensor {name!r} spans bytes [{begin}, {end}) but its shape {list(shape)} "
                                f"in {dtype} needs {numel * ITEMSIZE[dtype]}; the file is damaged")
        if data_start + end > size:
            raise DiskTierError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has only "
                                f"{size} bytes: the file is truncated (an interrupted download or copy?); "
                                "re-download it")
    return header, data_start, size


@dataclass
class CheckpointIndex:
    """Every tensor of a checkpoint folder with its file and byte range, and each file's stamp."""

    folder: Path
    tensors: dict[str, TensorEntry]
    stamps: dict[Path, FileStamp]

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "CheckpointIndex":
        folder = Path(folder)
        if not folder.is_dir():
            raise DiskTierError(f"checkpoint folder {folder} does not exist or is not a folder")
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = sorted({str(v) for v in weight_map.values()})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise DiskTierError(f"{index}: not a valid safetensors index (needs a 'weight_map' of tensor -> "
                                    f"file; {exc!r})") from None
        elif (folder / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise DiskTierError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}; the disk tier reads "
                                "safetensors checkpoints only")
        tensors: dict[str, TensorEntry] = {}
        stamps: dict[Path, FileStamp] = {}
        for fname in files:
            path = folder / fname
            stamp = FileStamp.of(path) if path.is_file() else None
            header, start, _ = read_header(path)
            stamps[path] = stamp
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index decides which shard holds a name
                if name in tensors:
                    raise DiskTierError(f"tensor {name!r} appears in both {tensors[name].file} and {path}")
                b, e = meta["data_offsets"]
                tensors[name] = TensorEntry(name, path, meta["dtype"], tuple(meta["shape"]), start + int(b),
                                            int(e) - int(b))
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(tensors))
            if lost:
                raise DiskTierError(f"{index} lists {len(lost)} tensor(s) its shards do not hold, e.g. "
                                    f"{', '.join(lost[:4])}; the index and shards do not match")
        return cls(folder, tensors, stamps)

    def check_files(self, files: Iterable[Path] | None = None) -> None:
        """Raise :class:`CheckpointChanged` if any (or the given) checkpoint file changed or disappeared."""
        for f in (self.stamps if files is None else files):
            self.stamps[f].check()

    @property
    def n_layers(self) -> int:
        layers = [self.layer_of(n) for n in self.tensors]
        return 1 + max((x for x in layers if x is not None), default=-1)

    @staticmethod
    def layer_of(name: str) -> int | None:
        """Decoder layer of an HF tensor name (``model.layers.N.``), None for embeddings, final norm, head."""
        m = _LAYER.match(name)
        return int(m.group(1)) if m else None

    def layer_names(self, layer: int) -> list[str]:
        names = [n for n in self.tensors if self.layer_of(n) == layer]
        if not names:
            raise DiskTierError(f"{self.folder}: no tensors for layer {layer} (the checkpoint has "
                                f"{self.n_layers} layers)")
        return names

    def layer_bytes(self, layer: int) -> int:
        """Tensor bytes of one decoder layer as the headers state them (what a sweep reads per layer)."""
        return sum(self.tensors[n].nbytes for n in self.layer_names(layer))


@dataclass(frozen=True)
class _Extent:
    """A run of tensors that are adjacent in one file, read as one aligned range into a staging slot."""

    file: Path
    start: int  # aligned file offset
    end: int  # aligned end (may pass the end of the file)
    slot: int  # aligned offset in the staging buffer
    members: tuple[TensorEntry, ...]


def alloc_staging(nbytes: int, pin: bool | None = None) -> torch.Tensor:
    """A uint8 staging buffer of ``nbytes`` whose address is :data:`ALIGN`-aligned (O_DIRECT needs it).

    Page-locked when ``pin`` (default: when CUDA is available), so copies to the GPU can be async.
    """
    if pin is None:
        pin = torch.cuda.is_available()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=bool(pin))
    shift = (-raw.data_ptr()) % ALIGN
    return raw[shift:shift + nbytes]


def _mem(buf: torch.Tensor) -> memoryview:
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous() or buf.device.type != "cpu":
        raise ValueError("staging buffer must be a contiguous 1-D uint8 tensor in host memory (see alloc_staging)")
    return memoryview(buf.numpy()).cast("B")


class DiskReader:
    """Reads sets of tensors (a layer) from a :class:`CheckpointIndex` into staging buffers.

    ``direct``: True demands O_DIRECT (error where the file system refuses it), False forces buffered
    reads + fadvise(DONTNEED), None (default) tries O_DIRECT per file and falls back.
    ``threads``: reader threads; ``block_bytes``: bytes per read call (a multiple of :data:`ALIGN`).
    """

    def __init__(self, index: CheckpointIndex, threads: int = READ_THREADS, direct: bool | None = None,
                 block_bytes: int = DEFAULT_BLOCK):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, found {threads}")
        if block_bytes < ALIGN or block_bytes % ALIGN:
            raise ValueError(f"block_bytes must be a positive multiple of {ALIGN}, found {block_bytes}")
        self.index, self.threads, self.block_bytes, self.direct = index, threads, block_bytes, direct
        self.modes: dict[Path, str] = {}  # file -> "direct" | "buffered"
        self.layer_payload_bytes: Counter[int] = Counter()  # layer -> tensor bytes read (header sizes), cumulative
        self.layer_disk_bytes: Counter[int] = Counter()  # layer -> bytes read from disk, alignment included
        self.payload_bytes = 0
        self.disk_bytes = 0
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="disk-reader")
        self._plans: dict[tuple[str, ...], tuple[list[_Extent], int]] = {}

    @property
    def mode(self) -> str:
        """'direct', 'buffered', or 'mixed' over the files opened so far ('unopened' before any read)."""
        kinds = set(self.modes.values())
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "unopened")

    # -- layout ---------------------------------------------------------------------------------

    def _plan(self, names: Iterable[str]) -> tuple[list[_Extent], int]:
        key = tuple(sorted(names))
        if key in self._plans:
            return self._plans[key]
        try:
            entries = sorted((self.index.tensors[n] for n in key), key=lambda e: (str(e.file), e.offset))
        except KeyError as exc:
            raise DiskTierError(f"{self.index.folder}: no tensor named {exc.args[0]!r} in the checkpoint") from None
        groups: list[list[TensorEntry]] = []
        for e in entries:
            g = groups[-1] if groups else None
            if g and g[-1].file == e.file and e.offset - (g[-1].offset + g[-1].nbytes) == 0:
                g.append(e)
            else:
                groups.append([e])
        extents, slot = [], 0
        for g in groups:
            start, end = _down(g[0].offset), _up(g[-1].offset + g[-1].nbytes)
            extents.append(_Extent(g[0].file, start, end, slot, tuple(g)))
            slot += end - start
        self._plans[key] = (extents, slot)
        return extents, slot

    def staging_bytes(self, names: Iterable[str]) -> int:
        """Size of the staging buffer :meth:`read_tensors` needs for these tensors (alignment included)."""
        return self._plan(names)[1]

    def layer_staging_bytes(self, layer: int) -> int:
        return self.staging_bytes(self.index.layer_names(layer))

    # -- files ----------------------------------------------------------------------------------

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path in self._fds:
                return self._fds[path]
            fd, mode = None, "buffered"
            if self.direct is not False and hasattr(os, "O_DIRECT"):
                try:
                    fd, mode = os.open(path, os.O_RDONLY | os.O_DIRECT), "direct"
                except OSError as exc:
                    if exc.errno == errno.ENOENT:
                        self.index.stamps[path].check()
                    if self.direct:
                        raise DiskTierError(f"{path}: the file system refuses O_DIRECT ({exc.strerror}); run with "
                                            "direct=None or False for buffered reads") from None
            elif self.direct:
                raise DiskTierError("O_DIRECT does not exist on this platform; use direct=None or False")
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    self.index.stamps[path].check()
                    raise
            st = os.fstat(fd)
            stamp = self.index.stamps[path]
            if (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) != (stamp.inode, stamp.device, stamp.size,
                                                                      stamp.mtime_ns):
                os.close(fd)
                stamp.check()
                raise CheckpointChanged(f"checkpoint file {path} changed since the checkpoint was opened; "
                                        "restore it and resume the run")
            if mode == "buffered" and hasattr(os, "posix_fadvise"):
                # no readahead: it would cache pages past the blocks read (and dropped) here
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[path] = fd
            self.modes[path] = mode
            return fd

    def _fallback_buffered(self, path: Path) -> int:
        """The file system accepted O_DIRECT at open but refused the read: reopen buffered."""
        with self._lock:
            old = self._fds.pop(path, None)
            if old is not None:
                os.close(old)
            fd = os.open(path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            self._fds[path] = fd
            self.modes[path] = "buffered"
            return fd

    # -- reads ----------------------------------------------------------------------------------

    def _read_block(self, path: Path, mem: memoryview, file_off: int, length: int) -> int:
        """pread [file_off, file_off + length) into mem[:length]; returns bytes read (short only at EOF)."""
        fd = self._fd(path)
        done = 0
        while done < length:
            try:
                n = os.preadv(fd, [mem[done:length]], file_off + done)
            except OSError as exc:
                if exc.errno == errno.EINVAL and self.modes.get(path) == "direct" and not self.direct:
                    fd = self._fallback_buffered(path)
                    continue
                raise DiskTierError(f"{path}: read at byte {file_off + done} failed ({exc.strerror})") from None
            if n == 0:
                break
            done += n
        if self.modes.get(path) == "buffered" and done and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, file_off, done, os.POSIX_FADV_DONTNEED)
        return done

    def _check_staging(self, need: int, staging: torch.Tensor) -> memoryview:
        if staging.numel() < need:
            raise ValueError(f"staging buffer holds {staging.numel()} bytes; these tensors need {need} "
                             "(DiskReader.staging_bytes)")
        mem = _mem(staging)
        if staging.data_ptr() % ALIGN:
            raise ValueError(f"staging buffer address must be {ALIGN}-aligned for O_DIRECT; allocate it with "
                             "alloc_staging")
        return mem

    def inline(self, names: Iterable[str]) -> bool:
        """Whether :meth:`fill_tensors` reads these tensors in the calling thread (one block in all, or one
        reader thread) rather than through the reader pool.

        A background read costs the compute beside it each time its thread takes the GIL (on a busy core,
        a wait of tens of microseconds per hand-off); a hop to the pool and back adds hand-offs and buys
        no parallelism when there is a single block to read."""
        return self._inline(self._blocks(self._plan(names)[0]))

    def _blocks(self, extents) -> list:
        """(extent index, extent, file offset, length) of each read call :meth:`fill_tensors` makes."""
        return [(i, ext, off, min(self.block_bytes, ext.end - off)) for i, ext in enumerate(extents)
                for off in range(ext.start, ext.end, self.block_bytes)]

    def _inline(self, blocks: list) -> bool:
        return len(blocks) <= 1 or self.threads == 1

    def fill_tensors(self, names: Iterable[str], staging: torch.Tensor, layer: int | None = None,
                     check: bool = True) -> None:
        """Read the named tensors' bytes into ``staging`` (no tensors made: :meth:`views` makes them).

        The I/O half of :meth:`read_tensors`, for a background thread: it takes the GIL as few times as
        it can (one ``preadv`` per block, one file check, counters). Files are checked against their stamps
        after the read; a short read (truncated file) raises :class:`CheckpointChanged`. ``check=False``
        leaves the file check to the caller (:meth:`check_tensors`, in the thread that uses the bytes,
        before it looks at this read's error: the :class:`Prefetcher` does so)."""
        names = list(names)
        extents, need = self._plan(names)
        mem = self._check_staging(need, staging)
        files = sorted({e.file for e in extents})
        # The files are checked once, after the read (whatever it raised): a file replaced, rewritten,
        # truncated or deleted before or during the read fails that check, and a file opened here for the
        # first time is checked at open (_fd). A check before the read too would cost one more GIL hand-off.
        got = [0] * len(extents)  # bytes read per extent
        first_error = None
        blocks = self._blocks(extents)
        if self._inline(blocks):  # in this thread: no pool hop, no per-block futures
            for i, ext, off, length in blocks:
                lo = ext.slot + off - ext.start
                try:
                    got[i] += self._read_block(ext.file, mem[lo:lo + length], off, length)
                except Exception as exc:  # noqa: BLE001 - re-raised after the file checks below
                    first_error = exc
                    break
        else:
            jobs: list[tuple[int, Future]] = []
            for i, ext, off, length in blocks:
                lo = ext.slot + off - ext.start
                jobs.append((i, self._pool.submit(self._read_block, ext.file, mem[lo:lo + length], off, length)))
            for i, fut in jobs:
                try:
                    got[i] += fut.result()
                except Exception as exc:  # noqa: BLE001 - re-raised after every block finished
                    first_error = first_error or exc
        if check:
            self.index.check_files(files)
        for f in files:  # readahead may have cached pages past the ranges dropped per block
            if self.modes.get(f) == "buffered" and hasattr(os, "posix_fadvise") and f in self._fds:
                os.posix_fadvise(self._fds[f], 0, 0, os.POSIX_FADV_DONTNEED)
        if first_error is not None:
            raise first_error
        payload = disk = 0
        for ext, n_read in zip(extents, got):
            last = ext.members[-1]
            if ext.start + n_read < last.offset + last.nbytes:
                raise CheckpointChanged(f"checkpoint file {ext.file} ended before tensor {last.name!r}: the file "
                                        "was truncated during the run; restore it and resume the run")
            disk += n_read
            payload += sum(e.nbytes for e in ext.members)
        with self._lock:
            self.payload_bytes += payload
            self.disk_bytes += disk
            if layer is not None:
                self.layer_payload_bytes[layer] += payload
                self.layer_disk_bytes[layer] += disk

    def aliases(self, names: Iterable[str]) -> bool:
        """Whether every tensor's :meth:`views` view aliases the staging buffer (none copied out for an odd
        offset), so views made once for a buffer stay valid for every later read of the same tensors into it."""
        extents, _ = self._plan(names)
        return all((ext.slot + e.offset - ext.start) % ITEMSIZE[e.dtype] == 0 for ext in extents
                   for e in ext.members)

    def views(self, names: Iterable[str], staging: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: view into ``staging``, on-disk dtype and shape} of tensors :meth:`fill_tensors` read there
        (a tensor at an odd offset in its file is copied out rather than aliased)."""
        extents, need = self._plan(list(names))
        self._check_staging(need, staging)
        out: dict[str, torch.Tensor] = {}
        for ext in extents:
            for e in ext.members:
                lo = ext.slot + e.offset - ext.start
                raw = staging[lo:lo + e.nbytes]
                if lo % ITEMSIZE[e.dtype]:  # an odd offset inside the file: copy out rather than alias
                    raw = raw.clone()
                out[e.name] = raw.view(DTYPES[e.dtype]).view(e.shape)
        return out

    def read_tensors(self, names: Iterable[str], staging: torch.Tensor, layer: int | None = None
                     ) -> dict[str, torch.Tensor]:
        """Read the named tensors into ``staging``; {name: view into staging, on-disk dtype and shape}.

        The views alias the buffer: they are valid until the buffer is reused. Files are checked
        against their stamps after the read. (:meth:`fill_tensors` then :meth:`views`.)
        """
        names = list(names)
        self.fill_tensors(names, staging, layer=layer)
        return self.views(names, staging)

    def read_layer(self, layer: int, staging: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every tensor of decoder layer ``layer`` (HF names) as views into ``staging``."""
        return self.read_tensors(self.index.layer_names(layer), staging, layer=layer)

    def fill_layer(self, layer: int, staging: torch.Tensor, check: bool = True) -> None:
        """:meth:`fill_tensors` for every tensor of decoder layer ``layer`` (what the prefetcher's thread runs)."""
        self.fill_tensors(self.index.layer_names(layer), staging, layer=layer, check=check)

    def check_tensors(self, names: Iterable[str]) -> None:
        """Raise :class:`CheckpointChanged` if a file holding these tensors changed since it was stamped."""
        self.index.check_files(sorted({e.file for e in self._plan(list(names))[0]}))

    def check_layer(self, layer: int) -> None:
        self.check_tensors(self.index.layer_names(layer))

    def layer_views(self, layer: int, staging: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.views(self.index.layer_names(layer), staging)

    def layer_aliases(self, layer: int) -> bool:
        return self.aliases(self.index.layer_names(layer))

    def reset_counters(self) -> None:
        with self._lock:
            self.layer_payload_bytes.clear()
            self.layer_disk_bytes.clear()
            self.payload_bytes = self.disk_bytes = 0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "DiskReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Prefetcher:
    """Keeps reads of layers ahead of compute over a ring of ``depth`` staging buffers.

    ``start(layer)`` begins reading a layer into a free buffer (in the background);
    ``wait(layer)`` blocks until it is read and returns {name: tensor view}; ``release(layer)``
    hands its buffer back once the caller is done with the views (e.g. its GPU copy completed).
    ``depth`` 2 reads one layer ahead while one is used; 3 reads two ahead.

    The background thread only moves bytes (:meth:`DiskReader.fill_layer`: a layer of one block is
    read in that thread itself, with no hop to the reader pool); the files are checked against their
    stamps and the tensor views made in the thread that calls ``wait`` (views once per (layer, buffer),
    reused after), since each system or small torch call in a background thread is a GIL hand-off
    that stalls the compute beside it.
    """

    def __init__(self, reader: DiskReader, layers: Iterable[int], depth: int = 2, pin: bool | None = None):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, found {depth}")
        self.reader = reader
        size = max(reader.layer_staging_bytes(l) for l in layers)
        self._free = [(slot, alloc_staging(size, pin)) for slot in range(depth)]
        self._busy: dict[int, tuple[int, torch.Tensor, Future]] = {}  # layer -> (slot, buffer, read)
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, slot) -> views, reused
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-prefetch")
        self.depth = depth
        self.views_made = 0  # view sets made (at most layers x depth where every tensor aliases its buffer)

    @property
    def free_buffers(self) -> int:
        return len(self._free)

    @property
    def staging_bytes(self) -> int:
        """Bytes of all the ring's staging buffers."""
        return sum(b.numel() for _, b in self._free) + sum(b.numel() for _, b, _ in self._busy.values())

    def started(self, layer: int) -> bool:
        return layer in self._busy

    def done(self, layer: int) -> bool:
        """Whether the read of a started layer has finished (successfully or not)."""
        return layer in self._busy and self._busy[layer][2].done()

    def start(self, layer: int) -> None:
        if layer in self._busy:
            return
        if not self._free:
            raise RuntimeError(f"no free staging buffer for layer {layer}: all {self.depth} hold layers "
                               f"{sorted(self._busy)}; release one first")
        slot, buf = self._free.pop()
        self._busy[layer] = (slot, buf, self._exec.submit(self.reader.fill_layer, layer, buf, False))

    def buffer(self, layer: int) -> torch.Tensor:
        """The staging buffer a started layer is read into (its tensors are views into it)."""
        return self._busy[layer][1]

    def wait(self, layer: int) -> dict[str, torch.Tensor]:
        if layer not in self._busy:
            self.start(layer)
        slot, buf, fut = self._busy[layer]
        fut.exception()  # the read finished (an error it raised comes after the file check)
        self.reader.check_layer(layer)
        fut.result()
        views = self._views.get((layer, slot))
        if views is None:
            views = self.reader.layer_views(layer, buf)
            self.views_made += 1
            if self.reader.layer_aliases(layer):
                self._views[(layer, slot)] = views
        return dict(views)

    def release(self, layer: int) -> None:
        slot, buf, fut = self._busy.pop(layer)
        fut.exception()  # let the read finish before the buffer is reused
        self._free.append((slot, buf))

    def close(self) -> None:
        for layer in list(self._busy):
            self.release(layer)
        self._views.clear()
        self._exec.shutdown(wait=True)
