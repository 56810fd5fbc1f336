"""The disk tier's read path for a background thread: one-block reads in the calling thread (no reader pool),
bytes only in the prefetcher's thread, views made by the waiter once per (layer, buffer)."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from specoffload.runtime.disk import ALIGN, CheckpointIndex, DiskReader, Prefetcher, alloc_staging
from specoffload.runtime.tiny_pair import tiny_pair_paths

TARGET = tiny_pair_paths()[0]
REF = load_file(TARGET / "model.safetensors")


class _NoPool:
    """A reader pool that must not be used."""

    def submit(self, *a, **k):
        raise AssertionError("the reader pool was used for a one-block read")

    def shutdown(self, wait=True):
        pass


def _equal(views, layer_names):
    assert sorted(views) == sorted(layer_names)
    for name, t in views.items():
        assert t.dtype == REF[name].dtype and torch.equal(t, REF[name]), name


def test_one_block_reads_stay_in_the_calling_thread():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx, threads=4) as reader:
        names = idx.layer_names(0)
        assert reader.staging_bytes(names) <= reader.block_bytes and reader.inline(names)
        pool, reader._pool = reader._pool, _NoPool()
        try:
            buf = alloc_staging(reader.layer_staging_bytes(0), pin=False)
            _equal(reader.read_layer(0, buf), names)
        finally:
            reader._pool = pool
        assert reader.layer_payload_bytes[0] == idx.layer_bytes(0)
    with DiskReader(idx, threads=1, block_bytes=ALIGN) as reader:  # many blocks, one thread: in order, inline
        assert reader.inline(names)
        reader._pool = _NoPool()
        _equal(reader.read_layer(0, alloc_staging(reader.layer_staging_bytes(0), pin=False)), names)


def test_many_blocks_go_to_the_pool():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx, threads=3, block_bytes=ALIGN) as reader:
        names = idx.layer_names(1)
        assert not reader.inline(names)
        used = []
        submit = reader._pool.submit
        reader._pool.submit = lambda *a, **k: used.append(1) or submit(*a, **k)
        _equal(reader.read_layer(1, alloc_staging(reader.layer_staging_bytes(1), pin=False)), names)
        assert len(used) == -(-reader.layer_staging_bytes(1) // ALIGN)


def test_fill_then_views_equals_read():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx) as reader:
        buf = alloc_staging(reader.layer_staging_bytes(2), pin=False)
        assert reader.fill_layer(2, buf) is None  # bytes only
        assert reader.layer_payload_bytes[2] == idx.layer_bytes(2) and reader.layer_disk_bytes[2] >= idx.layer_bytes(2)
        views = reader.layer_views(2, buf)
        _equal(views, idx.layer_names(2))
        base, end = buf.data_ptr(), buf.data_ptr() + buf.numel()
        assert reader.layer_aliases(2)
        assert all(base <= t.data_ptr() and t.data_ptr() + t.nbytes <= end for t in views.values())


def test_prefetcher_reads_in_its_thread_and_makes_views_in_the_waiters_once():
    idx = CheckpointIndex.open(TARGET)
    n = idx.n_layers
    with DiskReader(idx, threads=2) as reader:
        fill_threads, view_threads, check_threads = set(), set(), set()
        fill, views, check = reader.fill_layer, reader.layer_views, idx.check_files
        reader.fill_layer = lambda j, b, c=True: fill_threads.add(threading.get_ident()) or fill(j, b, c)
        reader.layer_views = lambda j, b: view_threads.add(threading.get_ident()) or views(j, b)
        idx.check_files = lambda files=None: check_threads.add(threading.get_ident()) or check(files)
        pf = Prefetcher(reader, range(n), depth=2, pin=False)
        sweeps = 3
        for _ in range(sweeps):
            for j in range(n):
                pf.start(j)
                got = pf.wait(j)
                _equal(got, idx.layer_names(j))
                got.clear()  # the caller's dict is its own: the cached views survive
                pf.release(j)
        # the prefetcher's thread only reads: views and file checks happen in the waiting thread
        assert view_threads == check_threads == {threading.get_ident()}
        assert fill_threads and threading.get_ident() not in fill_threads
        # views made at most once per (layer, buffer), not once per read
        assert pf.views_made <= n * pf.depth < sweeps * n
        assert reader.payload_bytes == sweeps * sum(idx.layer_bytes(j) for j in range(n))
        pf.close()


@pytest.mark.parametrize("how", ["mtime", "truncated", "deleted"])
def test_prefetcher_reports_a_changed_file_from_wait(tmp_path, how):
    import os
    import shutil

    from specoffload.runtime.disk import CheckpointChanged

    d = tmp_path / "t"
    shutil.copytree(TARGET, d)
    idx = CheckpointIndex.open(d)
    with DiskReader(idx) as reader:
        pf = Prefetcher(reader, range(idx.n_layers), depth=2, pin=False)
        pf.wait(0)
        pf.release(0)
        f = d / "model.safetensors"
        st = f.stat()
        if how == "mtime":
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif how == "truncated":
            os.truncate(f, st.st_size // 2)
        else:
            f.unlink()
        pf.start(idx.n_layers - 1)
        with pytest.raises(CheckpointChanged, match="disappeared" if how == "deleted" else "changed during the run"):
            pf.wait(idx.n_layers - 1)
        pf.close()
