"""The disk tier's reader and probe: exact bytes from safetensors files, counters, changed files, the CLI."""
from __future__ import annotations

import json
import os
import shutil

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specoffload.planner.schema import HardwareProfile
from specoffload.planner.strict import SchemaError
from specoffload.runtime.disk import (ALIGN, CheckpointChanged, CheckpointIndex, DiskReader, DiskTierError,
                                      Prefetcher, alloc_staging, read_header)
from specoffload.runtime.profile_cli import main as profile_main
from specoffload.runtime.profiler.disk import PROBE_PREFIX, DiskProbeError, check_folder, measure_disk
from specoffload.runtime.tiny_pair import tiny_pair_paths
from specoffload.profiles import __file__ as _profiles_init

TARGET = tiny_pair_paths()[0]
REF = load_file(TARGET / "model.safetensors")
PROFILES = Path(_profiles_init).parent


def _direct_supported(path) -> bool:
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = alloc_staging(ALIGN, pin=False)
        os.preadv(fd, [memoryview(buf.numpy())], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _copy(tmp_path):
    dst = tmp_path / "target"
    shutil.copytree(TARGET, dst)
    return dst


def _read_all(reader: DiskReader) -> dict[str, torch.Tensor]:
    idx, got = reader.index, {}
    for layer in range(idx.n_layers):
        buf = alloc_staging(reader.layer_staging_bytes(layer))
        got.update({k: v.clone() for k, v in reader.read_layer(layer, buf).items()})
    rest = [n for n in idx.tensors if idx.layer_of(n) is None]
    buf = alloc_staging(reader.staging_bytes(rest))
    got.update({k: v.clone() for k, v in reader.read_tensors(rest, buf).items()})
    return got


def _assert_identical(got, ref):
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        assert torch.equal(got[name].view(torch.uint8) if t.dtype != torch.bool else got[name],
                           t.view(torch.uint8) if t.dtype != torch.bool else t), name


@pytest.mark.parametrize("direct", [None, False], ids=["direct-if-possible", "buffered"])
def test_every_tensor_bit_identical(direct):
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx, threads=3, direct=direct, block_bytes=2 * ALIGN) as reader:
        _assert_identical(_read_all(reader), REF)
        want = "buffered" if direct is False or not _direct_supported(TARGET / "model.safetensors") else "direct"
        assert reader.mode == want


def test_byte_counters_equal_header_sizes():
    idx = CheckpointIndex.open(TARGET)
    header, _, _ = read_header(TARGET / "model.safetensors")
    with DiskReader(idx, threads=2) as reader:
        for sweep in (1, 2):
            for layer in range(idx.n_layers):
                reader.read_layer(layer, alloc_staging(reader.layer_staging_bytes(layer)))
        for layer in range(idx.n_layers):
            names = [n for n in header if n.startswith(f"model.layers.{layer}.")]
            from_header = sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in names)
            assert from_header == sum(REF[n].numel() * REF[n].element_size() for n in names) > 0
            assert idx.layer_bytes(layer) == from_header
            assert reader.layer_payload_bytes[layer] == 2 * from_header
            # disk bytes: the same ranges rounded out to the alignment (a layer's tensors are adjacent)
            assert 2 * from_header <= reader.layer_disk_bytes[layer] <= 2 * (from_header + 2 * ALIGN)
        assert reader.payload_bytes == 2 * sum(idx.layer_bytes(l) for l in range(idx.n_layers))
        reader.reset_counters()
        assert reader.payload_bytes == 0 and not reader.layer_payload_bytes


def test_sharded_index(tmp_path):
    names = sorted(REF)
    shards = [names[i::3] for i in range(3)]  # interleaved: every layer spans several files
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({n: REF[n] for n in part}, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    idx = CheckpointIndex.open(tmp_path)
    assert len(idx.stamps) == 3 and len({idx.tensors[n].file for n in idx.layer_names(0)}) == 3
    for direct in (None, False):
        with DiskReader(idx, threads=4, direct=direct) as reader:
            _assert_identical(_read_all(reader), REF)
            assert len(reader.modes) == 3
            for layer in range(idx.n_layers):
                names = idx.layer_names(layer)
                assert reader.layer_payload_bytes[layer] == idx.layer_bytes(layer)
                # each tensor of the layer is its own extent here (neighbours in a shard belong to others)
                assert idx.layer_bytes(layer) <= reader.layer_disk_bytes[layer] <= (idx.layer_bytes(layer)
                                                                                   + 2 * ALIGN * len(names))


def test_sharded_index_naming_a_missing_shard(tmp_path):
    save_file({"a": torch.zeros(4)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(DiskTierError, match="s2.safetensors does not exist"):
        CheckpointIndex.open(tmp_path)


def test_truncated_file_is_a_clear_error(tmp_path):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 100)
    with pytest.raises(DiskTierError, match=r"model\.safetensors.*truncated"):
        CheckpointIndex.open(d)
    os.truncate(f, 5)
    with pytest.raises(DiskTierError, match="too short"):
        CheckpointIndex.open(d)


@pytest.mark.parametrize("block", [4 << 20, ALIGN], ids=["one-block-inline", "blocks-in-the-pool"])
@pytest.mark.parametrize("how", ["mtime", "rewritten", "truncated", "deleted", "replaced"])
def test_changed_or_deleted_file_mid_run(tmp_path, how, block):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    idx = CheckpointIndex.open(d)
    with DiskReader(idx, threads=2, block_bytes=block) as reader:
        assert reader.inline(idx.layer_names(1)) == (block == 4 << 20)
        reader.read_layer(0, alloc_staging(reader.layer_staging_bytes(0)))
        st = f.stat()
        if how == "mtime":
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif how == "rewritten":
            with open(f, "ab") as fh:
                fh.write(b"\0")
        elif how == "truncated":
            os.truncate(f, st.st_size // 2)
        elif how == "deleted":
            f.unlink()
        else:
            tmp = d / "new"
            shutil.copy(TARGET / "model.safetensors", tmp)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, f)
        match = "disappeared" if how == "deleted" else "changed during the run"
        with pytest.raises(CheckpointChanged, match=match) as err:
            reader.read_layer(1, alloc_staging(reader.layer_staging_bytes(1)))
        assert str(f) in str(err.value) and "resume" in str(err.value)


def test_prefetcher_keeps_layers_ahead():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx, threads=2) as reader:
        layers = list(range(idx.n_layers))
        pf = Prefetcher(reader, layers, depth=2, pin=False)
        pf.start(0)
        pf.start(1)
        with pytest.raises(RuntimeError, match="no free staging buffer"):
            pf.start(2)
        for layer in layers:
            views = pf.wait(layer)
            for name, t in views.items():
                assert torch.equal(t, REF[name]), name
            pf.release(layer)
            if layer + 2 < len(layers):
                pf.start(layer + 2)
        pf.close()
        assert reader.payload_bytes == sum(idx.layer_bytes(l) for l in layers)


def test_staging_buffer_checks():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx) as reader:
        need = reader.layer_staging_bytes(0)
        with pytest.raises(ValueError, match="need"):
            reader.read_layer(0, alloc_staging(need - ALIGN))
        with pytest.raises(ValueError, match="aligned"):
            reader.read_layer(0, alloc_staging(need + 8)[8:])
        with pytest.raises(DiskTierError, match="layer 99"):
            reader.layer_staging_bytes(99)


# ---- the probe, the profile field, the CLI --------------------------------------------------------

def test_profile_field_round_trips(tmp_path):
    old = HardwareProfile.load(tiny_profile := (PROFILES / "cpu-2core.yaml"))
    assert old.disk_read_bytes_per_s == 0.0  # an old file without the field still loads strictly
    p = old.with_overrides({"disk_read_bytes_per_s": 3.5e9})
    p.save(tmp_path / "p.yaml")
    assert HardwareProfile.load(tmp_path / "p.yaml") == p and p.disk_read_bytes_per_s == 3.5e9
    with pytest.raises(SchemaError, match="disk_read_bytes_per_s must be >= 0"):
        old.with_overrides({"disk_read_bytes_per_s": -1})
    assert tiny_profile.is_file()


def test_spec_presets_state_an_estimated_disk_rate():
    for f in sorted(PROFILES.glob("*.yaml")):
        p = HardwareProfile.load(f)
        if p.source == "spec-sheet":
            assert p.disk_read_bytes_per_s > 1e9, f
            assert "estimated" in p.provenance["disk_read_bytes_per_s"], f


def test_measure_disk_on_a_tmp_dir(tmp_path):
    r = measure_disk(tmp_path, file_bytes=1 << 20, blocks=(256 << 10,), threads=(1, 2), repeats=1)
    assert r.bytes_per_s > 0 and r.mode in ("direct", "buffered") and len(r.points) == 2
    assert r.threads in (1, 2) and r.block_bytes == 256 << 10 and r.file_bytes == 1 << 20
    assert list(tmp_path.iterdir()) == []  # the test file is gone
    # an existing file: read, not written
    existing = tmp_path / "big"
    existing.write_bytes(os.urandom(1 << 20))
    r = measure_disk(file=existing, blocks=(1 << 20,), threads=(1,), repeats=1)
    assert r.file == str(existing) and list(tmp_path.iterdir()) == [existing]


def test_cli_disk_only_writes_into_a_profile(tmp_path, capsys):
    prof = tmp_path / "m.yaml"
    shutil.copy(PROFILES / "cpu-2core.yaml", prof)
    before = HardwareProfile.load(prof)
    rc = profile_main(["--disk", str(tmp_path), "--disk-only", "--quick", "--disk-size-mib", "1", "-o", str(prof)])
    assert rc == 0
    after = HardwareProfile.load(prof)
    assert after.disk_read_bytes_per_s > 0
    assert "O_DIRECT" in after.provenance["disk_read_bytes_per_s"] or "fadvise" in after.provenance[
        "disk_read_bytes_per_s"]
    # and the disk tier's CPU costs, timed on the tiny target in the engine's own code
    assert after.disk_convert_bytes_per_s > 0 and after.disk_read_compute_seconds_per_byte >= 0
    assert after.provenance["disk_convert_bytes_per_s"].startswith("measured:")
    assert after.provenance["disk_read_compute_seconds_per_byte"].startswith("measured:")
    import dataclasses
    assert dataclasses.replace(after, disk_read_bytes_per_s=0.0, provenance=before.provenance,
                               disk_convert_bytes_per_s=before.disk_convert_bytes_per_s,
                               disk_read_compute_seconds_per_byte=before.disk_read_compute_seconds_per_byte) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(PROBE_PREFIX)]
    # an existing file: read in place, nothing written beside it
    big = tmp_path / "shard.safetensors"
    big.write_bytes(os.urandom(1 << 20))
    assert profile_main(["--disk-file", str(big), "--disk-only", "--quick", "-o", str(prof)]) == 0
    assert str(big) in HardwareProfile.load(prof).provenance["disk_read_bytes_per_s"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "shard.safetensors"]
    assert profile_main(["--disk-file", str(tmp_path / "nope"), "--disk-only"]) == 2
    assert "no such file" in capsys.readouterr().err
    # without -o: printed
    assert profile_main(["--disk", str(tmp_path), "--disk-only", "--quick", "--disk-size-mib", "1"]) == 0
    printed = capsys.readouterr().out
    assert "disk_read_bytes_per_s:" in printed and "disk_convert_bytes_per_s:" in printed
    # a --disk-checkpoint that is not a checkpoint: refused before any probe, nothing written
    assert profile_main(["--disk", str(tmp_path), "--disk-only", "--quick", "--disk-checkpoint", str(tmp_path),
                         "-o", str(prof)]) == 2
    assert "--disk-checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yaml", "shard.safetensors"]


def test_cli_refuses_bad_folders(tmp_path, capsys, monkeypatch):
    assert profile_main(["--disk", str(tmp_path / "nope"), "--disk-only"]) == 2
    assert "no such folder" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert profile_main(["--disk", str(f), "--disk-only"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert profile_main(["--disk", str(tmp_path), "--disk-only", "-o", str(tmp_path / "none.yaml")]) == 2
    assert "no such profile" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.geteuid() != 0:  # root writes anywhere; then the access check is exercised below instead
            assert profile_main(["--disk", str(ro), "--disk-only"]) == 2
            assert "cannot write" in capsys.readouterr().err
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(ro) else real_access(p, m))
        with pytest.raises(DiskProbeError, match="cannot write there"):
            check_folder(ro)
        assert profile_main(["--disk", str(ro), "--disk-only"]) == 2
        assert "cannot write" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


@pytest.mark.gpu
def test_pinned_staging_to_gpu_is_exact():
    idx = CheckpointIndex.open(TARGET)
    with DiskReader(idx, threads=2) as reader:
        pf = Prefetcher(reader, range(idx.n_layers), depth=2)  # pinned where CUDA exists
        assert all(b.is_pinned() for b in pf._free)
        for layer in range(idx.n_layers):
            views = pf.wait(layer)
            on_gpu = {n: t.to("cuda", non_blocking=True) for n, t in views.items()}
            torch.cuda.synchronize()
            pf.release(layer)
            if layer + 1 < idx.n_layers:
                pf.start(layer + 1)
            for n, t in on_gpu.items():
                assert torch.equal(t.cpu(), REF[n]), n
        pf.close()


def test_cli_hardware_profile_with_disk(tmp_path, capsys, monkeypatch):
    """--disk beside the other probes (stubbed here: they have their own tests) adds the figure; a failing
    disk probe keeps the rest of the profile."""
    from specoffload.runtime.profiler import disk as disk_probe
    from specoffload.runtime.profiler import probes

    base = HardwareProfile.load(PROFILES / "cpu-2core.yaml")
    monkeypatch.setattr(probes, "run_profile",
                        lambda cfg, device, name, progress, threads: probes.ProfileResult(profile=base))
    out = tmp_path / "m.yaml"
    args = ["--quick", "--device", "cpu", "--no-progress", "-o", str(out), "--disk", str(tmp_path),
            "--disk-size-mib", "1"]
    assert profile_main(args) == 0
    p = HardwareProfile.load(out)
    assert p.disk_read_bytes_per_s > 0 and "disk sequential read" in capsys.readouterr().out
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.yaml"]

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk_probe, "measure_disk", boom)
    assert profile_main(args) == 0
    assert "disk probe failed" in capsys.readouterr().err
    p = HardwareProfile.load(out)
    assert p.disk_read_bytes_per_s == 0.0 and "not measured" in p.provenance["disk_read_bytes_per_s"]
    assert profile_main(args[:-4] + ["--disk", str(tmp_path / "nope")]) == 2  # refused before the probes
    assert "no such folder" in capsys.readouterr().err


def _resident_pages(path) -> int | None:
    """Pages of ``path`` in the page cache (mincore over a private map), None where that cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        pages = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        rc = mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        del anchor
        return None if rc != 0 else sum(v & 1 for v in vec)
    finally:
        mm.close()


@pytest.mark.parametrize("direct", [None, False], ids=["direct-if-possible", "buffered"])
def test_reads_leave_no_page_cache_behind(tmp_path, direct):
    d = _copy(tmp_path)
    f = d / "model.safetensors"
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = _resident_pages(f)
    if before is None or before > 2:
        pytest.skip("this kernel does not report or drop the file's page cache (mincore / fadvise)")
    idx = CheckpointIndex.open(d)  # reads the header, buffered, and drops it
    assert _resident_pages(f) == 0
    with DiskReader(idx, threads=2, direct=direct) as reader:
        _read_all(reader)
        assert reader.payload_bytes == sum(t.numel() * t.element_size() for t in REF.values())
    assert _resident_pages(f) == 0  # 6.6 MB read, nothing of it cached


# --- the layer-read probe reads as the engine does -----------------------------------------------

def _spy_readers(monkeypatch):
    """Record the settings of every DiskReader made, and the layers each reads, in order."""
    from specoffload.runtime import disk as disk_mod

    made, reads = [], []
    orig_init, orig_read = disk_mod.DiskReader.__init__, disk_mod.DiskReader.read_layer

    def init(self, index, *a, **kw):
        orig_init(self, index, *a, **kw)
        made.append((self.threads, self.block_bytes, self.direct))

    def read_layer(self, layer, staging):
        reads.append(layer)
        return orig_read(self, layer, staging)

    monkeypatch.setattr(disk_mod.DiskReader, "__init__", init)
    monkeypatch.setattr(disk_mod.DiskReader, "read_layer", read_layer)
    return made, reads


def test_layer_probe_uses_the_engines_reader_settings(monkeypatch):
    from specoffload.runtime.config import load_args
    from specoffload.runtime.disk import DEFAULT_BLOCK, READ_THREADS
    from specoffload.runtime.engine.disk_stream import DiskLayers
    from specoffload.runtime.profiler.disk import measure_layer_reads

    made, reads = _spy_readers(monkeypatch)
    dl = DiskLayers(TARGET, load_args(TARGET), [0, 1], pin=False)
    dl.close()
    r = measure_layer_reads(TARGET, reads=6)
    assert len(made) == 2 and made[0] == made[1] == (READ_THREADS, DEFAULT_BLOCK, None)
    assert (r.threads, r.block_bytes) == (READ_THREADS, DEFAULT_BLOCK)
    idx = CheckpointIndex.open(TARGET)
    n = idx.n_layers
    # every layer once untimed, then `reads` layer reads round robin in sweep order
    assert reads == list(range(n)) + [i % n for i in range(6)]
    assert r.layer_bytes == idx.layer_bytes(0) and r.reads == 6 and len(r.samples) == 6
    assert r.bytes_per_s == pytest.approx(r.layer_bytes / r.seconds_per_read)
    assert 0 < r.min_seconds_per_read <= r.seconds_per_read and r.mode in ("direct", "buffered")


def test_layer_probe_on_a_plain_file_reads_exact_extents(tmp_path, monkeypatch):
    from specoffload.runtime.profiler.disk import measure_layer_reads

    data = os.urandom(5 * ALIGN * 3 + 100)
    f = tmp_path / "blob"
    f.write_bytes(data)
    made, reads = _spy_readers(monkeypatch)
    r = measure_layer_reads(f, layer_bytes=3 * ALIGN - 10, reads=7, threads=2, block_bytes=ALIGN)
    assert made == [(2, ALIGN, None)]
    assert reads == [0, 1, 2, 3, 4] + [i % 5 for i in range(7)]  # 5 aligned extents of 3 pages fit
    assert r.layer_bytes == 3 * ALIGN - 10 and r.threads == 2 and r.block_bytes == ALIGN
    assert f.read_bytes() == data  # read only


def test_layer_probe_errors(tmp_path):
    from specoffload.runtime.profiler.disk import measure_layer_reads

    f = tmp_path / "small"
    f.write_bytes(b"x" * ALIGN)
    with pytest.raises(DiskProbeError, match="layer_bytes"):
        measure_layer_reads(f)
    with pytest.raises(DiskProbeError, match="fewer than 2 extents"):
        measure_layer_reads(f, layer_bytes=ALIGN)
    with pytest.raises(DiskProbeError, match="no such file"):
        measure_layer_reads(tmp_path / "missing", layer_bytes=ALIGN)
    with pytest.raises(DiskProbeError, match="reads must be"):
        measure_layer_reads(TARGET, reads=0)
