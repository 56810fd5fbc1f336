"""The disk tier's CPU costs: the flat conversion of staged layers, the profile fields that measure what the
conversion and a read in flight cost, and the cost model's and the simulator's charge for them."""
from __future__ import annotations

import math

import pytest
import torch
import yaml

from specoffload.planner.costmodel import CostModel, Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import make_plan
from specoffload.planner.schema import HardwareProfile, Workload, load_profile
from specoffload.planner.sim.simulator import SimOptions, simulate
from specoffload.planner.strict import SchemaError
from specoffload.planner.trace_names import SPAN_DISK_CONVERT, SPAN_DISK_READ, SPAN_DISK_READ_CPU
from specoffload.runtime.config import load_args
from specoffload.runtime.engine.disk_stream import DestPool, DiskLayers, FlatLayout
from specoffload.runtime.layers import LayerWeights
from specoffload.runtime.tiny_pair import tiny_pair_paths

TINY_W = Workload(prompt_len_tokens=8, gen_len_tokens=8, num_prompts=4, max_prompt_len_tokens=32)
NEW = ("disk_convert_bytes_per_s", "disk_read_compute_seconds_per_byte")


def per_tensor(lw: LayerWeights, dtype) -> LayerWeights:
    """The conversion as it was: one copy per tensor."""
    def conv(d):
        return {k: t.to(dtype=dtype, copy=True) for k, t in d.items()}
    return LayerWeights(conv(lw.attn), conv(lw.ffn), [conv(e) for e in lw.experts])


def flat(lw: LayerWeights) -> list[tuple[str, torch.Tensor]]:
    return [(f"{i}.{k}", t) for i, d in enumerate([lw.attn, lw.ffn, *lw.experts]) for k, t in d.items()]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture()
def target_disk():
    t_dir = tiny_pair_paths()[0]
    disk = DiskLayers(t_dir, load_args(t_dir), [0, 1, 2, 3])
    yield disk
    disk.close()


# --- the flat conversion --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "on-disk-dtype"])
def test_flat_conversion_is_bitwise_the_per_tensor_one(target_disk, dtype):
    disk = target_disk
    for j in disk.layers:
        disk.ahead(j, 4)
        ref = per_tensor(disk.wait(j), dtype)
        disk.release(j)
        disk.ahead(j, 4)
        got = disk.take(j, dtype)
        assert not disk.prefetcher.started(j)  # the staging buffer went back
        pairs = list(zip(flat(ref), flat(got)))
        assert len(pairs) == 31 and [a[0] for a, _ in pairs] == [b[0] for _, b in pairs]
        for (name, a), (_, b) in pairs:
            assert b.dtype == dtype and b.shape == a.shape and b.is_contiguous(), name
            assert torch.equal(bits(a), bits(b)), name
        # one destination for the whole layer: every weight is a view into the same storage
        assert len({t.untyped_storage().data_ptr() for _, t in flat(got)}) == 1


def test_a_tiny_target_layer_is_one_run_one_copy(target_disk, monkeypatch):
    """The checkpoint stores a layer's tensors together: the layout is one run, converted with one copy_."""
    disk = target_disk
    disk.ahead(0, 4)
    raw = disk.prefetcher.wait(0)
    lay = FlatLayout.of(raw, disk.prefetcher.buffer(0))
    assert len(lay.runs) == 1 and not lay.loose
    assert lay.runs[0][1] == lay.numel == disk.layer_bytes[0] // 2 and lay.runs[0][2] == torch.bfloat16
    calls = []
    real = torch.Tensor.copy_

    def counting(self, src, *a, **k):
        calls.append((self.numel(), src.dtype))
        return real(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", counting)
    disk.take(0, torch.float32)
    assert calls == [(lay.numel, torch.bfloat16)]


def test_layout_with_two_dtypes_a_gap_and_a_loose_tensor():
    """Synthetic staging: fp16 and fp32 runs, a gap between them, and a tensor outside the buffer (as the
    reader's copy-out of an odd offset): two runs and one loose tensor, values exact."""
    staging = torch.zeros(4096, dtype=torch.uint8)
    a = staging[0:64].view(torch.float16).view(4, 8)
    b = staging[64:96].view(torch.float16).view(16)
    c = staging[256:320].view(torch.float32).view(2, 8)
    loose = torch.arange(6, dtype=torch.bfloat16).view(2, 3)
    a.copy_(torch.randn(4, 8).half())
    b.copy_(torch.randn(16).half())
    c.copy_(torch.randn(2, 8))
    tensors = {"a": a, "c": c, "b": b, "loose": loose}
    lay = FlatLayout.of(tensors, staging)
    assert [(r[0], r[1], r[2]) for r in lay.runs] == [(0, 48, torch.float16), (256, 16, torch.float32)]
    assert [n for n, _ in lay.loose] == ["loose"] and lay.numel == 48 + 16 + 6
    out = lay.convert(tensors, staging, torch.empty(lay.numel, dtype=torch.float32))
    for k, t in tensors.items():
        assert out[k].shape == t.shape and torch.equal(out[k], t.float()), k


def test_destinations_are_reused_only_when_no_weight_of_theirs_is_alive(target_disk):
    """As the engine uses it (a layer's weights dropped before the next is taken) one destination serves
    every conversion; a layer still held is never overwritten (a fresh one is allocated instead)."""
    disk = target_disk
    for i in range(12):
        j = i % 4
        disk.ahead(j, 4)
        lw = disk.take(j, torch.float32)
        lw = None  # noqa: F841 - dropped, as the engine's compute loop does after releasing the layer
    assert disk.dests.allocated == 1
    held = []
    for j in range(4):  # every layer held: none may share a destination with a live one
        disk.ahead(j, 4)
        held.append(disk.take(j, torch.float32))
    ptrs = [flat(h)[0][1].untyped_storage().data_ptr() for h in held]
    assert len(set(ptrs)) == 4
    disk.ahead(0, 4)
    ref = per_tensor(disk.wait(0), torch.float32)
    disk.release(0)
    for (_, a), (_, b) in zip(flat(ref), flat(held[0])):  # still layer 0's values after three more takes
        assert torch.equal(a, b)


def test_engine_outputs_with_flat_conversion_equal_the_in_memory_run():
    """Greedy outputs with every target layer read from disk and converted flat equal the run without it."""
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.tiny_pair import tiny_pair_tokenizer

    t, d = load_model_spec("tiny-target"), load_model_spec("tiny-draft")
    profile = load_profile("cpu-2core").with_overrides({"disk_read_bytes_per_s": 1e9})
    free = make_plan(profile, t, d, TINY_W, policy="serial-spec", fixed={"decode_batch": 4, "prefill_batch": 4}).plan
    plan = free.replace(disk_layers=4, host_mem_limit_bytes=0.0)
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(x).ids for x in ("the disk tier", "reads layers", "from the checkpoint", "each pass")]
    t_dir, d_dir = tiny_pair_paths()
    outs = {}
    for name, p in (("disk", plan), ("memory", plan.replace(disk_layers=0))):
        eng = Engine(p, t_dir, d_dir, device="cpu")
        done = []
        eng.run([Request(str(i), x, 8) for i, x in enumerate(prompts)], done.append)
        outs[name] = {f.request.id: list(f.tokens) for f in done}
        if eng.target.disk is not None:
            # one converted layer at a time, in one reused destination (the cost model's staging count)
            assert eng.target.disk.converted_bytes > 0 and eng.target.disk.dests.allocated == 1
            eng.target.disk.close()
    assert outs["disk"] == outs["memory"] and len(outs["disk"]) == 4


# --- the profile fields ---------------------------------------------------------------------------

def test_new_profile_fields_round_trip_and_old_profiles_load(tmp_path):
    base = load_profile("cpu-2core")
    assert base.disk_convert_bytes_per_s > 0 and base.disk_read_compute_seconds_per_byte > 0
    for name in NEW:
        assert base.provenance[name].startswith("measured:"), name
    p = base.with_overrides({"disk_convert_bytes_per_s": 5e9, "disk_read_compute_seconds_per_byte": 4e-10})
    p.save(tmp_path / "p.yaml")
    assert HardwareProfile.load(tmp_path / "p.yaml") == p
    # a profile written before the fields: they load as 0 (not measured)
    data = yaml.safe_load((tmp_path / "p.yaml").read_text())
    for name in NEW:
        del data[name]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    old = HardwareProfile.load(tmp_path / "old.yaml")
    assert old.disk_convert_bytes_per_s == 0.0 and old.disk_read_compute_seconds_per_byte == 0.0


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_bad_values_are_clear_errors(tmp_path, name, bad):
    with pytest.raises((SchemaError, ValueError), match=name):
        load_profile("cpu-2core").with_overrides({name: bad})
    data = yaml.safe_load(_dump(tmp_path))
    data[name] = "fast"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises((SchemaError, ValueError), match=name):
        HardwareProfile.load(tmp_path / "bad.yaml")


def _dump(tmp_path) -> str:
    load_profile("cpu-2core").save(tmp_path / "good.yaml")
    return (tmp_path / "good.yaml").read_text()


def test_spec_presets_state_the_new_fields_as_zero_with_a_note():
    from pathlib import Path

    presets = [p for f in sorted((Path(__file__).resolve().parent.parent / "profiles").glob("*.yaml"))
               if (p := HardwareProfile.load(f)).source == "spec-sheet"]
    assert presets
    for p in presets:
        for name in NEW:
            assert getattr(p, name) == 0.0 and p.provenance[name].startswith("0"), (p.name, name)


# --- the cost model and the simulator charge them ---------------------------------------------------

def cpu_cm(**fields) -> CostModel:
    p = load_profile("cpu-2core").with_overrides({"disk_read_bytes_per_s": 1e9, **fields})
    return CostModel(p, load_model_spec("tiny-target"), None, TINY_W)


def at(disk: float, gpu: float = 1.0) -> dict[str, float]:
    return {"attn_gpu": gpu, "ffn_gpu": gpu, "kv_gpu": 0.0, "disk": disk}


def test_cost_model_charges_the_measured_conversion_and_reads_in_flight():
    L = load_model_spec("tiny-target").num_layers
    knobs = Knobs("offload-only", 2, 2, 0, 1, "gpu", 1, 0)
    none = cpu_cm(disk_convert_bytes_per_s=0.0, disk_read_compute_seconds_per_byte=0.0)
    conv = cpu_cm(disk_convert_bytes_per_s=2e9, disk_read_compute_seconds_per_byte=0.0)
    both = cpu_cm(disk_convert_bytes_per_s=2e9, disk_read_compute_seconds_per_byte=5e-10)
    nbytes = none.disk_layer_bytes
    # unmeasured: the memory-bandwidth estimate, as before
    assert none.disk_convert_seconds() == pytest.approx(nbytes * (1 + none.weight_read_factor) / none._gpu_bw)
    assert conv.disk_convert_seconds() == pytest.approx(nbytes / 2e9)
    assert both.disk_read_compute_seconds() == pytest.approx(nbytes * 5e-10) and none.disk_read_compute_seconds() == 0
    for cm, per_layer in ((conv, nbytes / 2e9), (both, nbytes / 2e9 + nbytes * 5e-10)):
        step = cm.step_terms(knobs).busy["gpu"]
        pre = cm.prefill_terms(knobs)["gpu"]
        base_step, base_pre = none.step_terms(knobs).busy["gpu"], none.prefill_terms(knobs)["gpu"]
        extra = L * (per_layer - none.disk_convert_seconds())
        assert step.at(at(1.0)) - base_step.at(at(1.0)) == pytest.approx(extra)
        assert pre.at(at(0.5)) - base_pre.at(at(0.5)) == pytest.approx(0.5 * extra)
        assert step.at(at(0.0)) == pytest.approx(base_step.at(at(0.0)))  # nothing without disk layers


def test_beside_a_gpu_reads_in_flight_are_charged_to_the_cpu_and_nothing_is_converted():
    p = load_profile("rtx4090-pcie3").with_overrides({"disk_read_compute_seconds_per_byte": 1e-9,
                                                      "disk_convert_bytes_per_s": 1e9})
    cm = CostModel(p, load_model_spec("mixtral-8x7b"), None, TINY_W)
    terms = cm.disk_cpu_terms()
    assert set(terms) == {"cpu"} and cm.disk_convert_seconds() == 0.0
    L = cm.t.num_layers
    assert terms["cpu"].at(at(1.0, 0.0)) == pytest.approx(L * cm.disk_layer_bytes * 1e-9)
    knobs = Knobs("offload-only", 8, 8, 0, 1, "cpu", 1, 2)
    zero = CostModel(p.with_overrides({"disk_read_compute_seconds_per_byte": 0.0}), cm.t, None, TINY_W)
    diff = cm.step_terms(knobs).busy["cpu"].at(at(0.5, 0.0)) - zero.step_terms(knobs).busy["cpu"].at(at(0.5, 0.0))
    assert diff == pytest.approx(0.5 * L * cm.disk_layer_bytes * 1e-9)


def disk_plan(profile):
    t = load_model_spec("tiny-target")
    free = make_plan(profile, t, None, TINY_W, policy="offload-only",
                     fixed={"decode_batch": 2, "micro_batches": 1, "prefill_batch": 2}).plan
    return free.replace(disk_layers=2)


def test_simulator_charges_the_same_terms_as_the_cost_model():
    """Each read puts `disk read cpu` (the cost model's disk_read_compute_seconds) and `disk convert`
    (disk_convert_seconds) on the CPU-only machine's device, one of each per read; without the term, none."""
    fields = {"disk_convert_bytes_per_s": 2e9, "disk_read_compute_seconds_per_byte": 5e-10}
    runs = {}
    for name, over in (("both", fields), ("no-read-cpu", {**fields, "disk_read_compute_seconds_per_byte": 0.0})):
        p = load_profile("cpu-2core").with_overrides({"disk_read_bytes_per_s": 1e9, **over})
        res = simulate(disk_plan(p), p, SimOptions(trace=True, trace_slots=10**6))  # every pass traced
        assert res.ok, res.problems
        ev = [e for e in res.trace.to_json()["traceEvents"] if e.get("ph") == "X"]
        runs[name] = (res, ev, CostModel(p, load_model_spec("tiny-target"), None, TINY_W))
    res, ev, cm = runs["both"]

    def spans(events, kind):
        return [e for e in events if e["name"].startswith(kind + " L")]

    reads, cpu, conv = (spans(ev, k) for k in (SPAN_DISK_READ, SPAN_DISK_READ_CPU, SPAN_DISK_CONVERT))
    n = len(reads)
    assert n >= (len(res.step_log) + len(res.prefill_log)) * 2 and len(cpu) == len(conv) == n
    assert sum(e["dur"] for e in cpu) * 1e-6 == pytest.approx(n * cm.disk_read_compute_seconds(), rel=1e-6)
    assert sum(e["dur"] for e in conv) * 1e-6 == pytest.approx(n * cm.disk_convert_seconds(), rel=1e-6)
    assert {e["tid"] for e in cpu} == {e["tid"] for e in conv}  # the device's track, as the conversion
    res0, ev0, _ = runs["no-read-cpu"]
    assert not spans(ev0, SPAN_DISK_READ_CPU) and len(spans(ev0, SPAN_DISK_CONVERT)) > 0
    assert res.report.throughput_tokens_per_s < res0.report.throughput_tokens_per_s


# --- the probe ------------------------------------------------------------------------------------

def test_cpu_cost_probe_on_the_tiny_target_has_the_right_shape():
    from specoffload.runtime.profiler.disk import DiskProbeError, measure_disk_cpu_costs

    r = measure_disk_cpu_costs(tiny_pair_paths()[0], pairs=4, tokens=8)
    assert r.convert_bytes_per_s > 0 and r.convert_seconds > 0 and r.read_compute_seconds_per_byte >= 0
    assert r.layer_bytes == 1657344 and r.pairs == 4 and r.mode in ("direct", "buffered")
    assert set(r.provenance) == set(NEW) and all(v.startswith("measured:") for v in r.provenance.values())
    assert "load average" in r.provenance[NEW[1]]
    with pytest.raises(DiskProbeError, match="pairs"):
        measure_disk_cpu_costs(tiny_pair_paths()[0], pairs=0)


def test_a_storage_count_that_does_not_count_views_disables_reuse(monkeypatch):
    """Where torch's private storage use count does not rise with a live view (another torch, another meaning),
    the pool never reuses a destination: a held layer's weights are not overwritten by the next conversion."""
    monkeypatch.setattr(torch._C, "_storage_Use_Count", lambda cdata: 1, raising=False)
    pool = DestPool()
    a = pool.get(8, torch.float32)
    view = a[:4]
    view.fill_(1.0)
    b = pool.get(8, torch.float32)
    assert b.data_ptr() != a.data_ptr() and pool.allocated == 2
    assert torch.equal(view, torch.ones(4))


def test_the_storage_count_reuses_a_destination_once_its_views_die():
    pool = DestPool()
    a = pool.get(8, torch.float32)
    view = a[2:6]
    assert pool.get(8, torch.float32).data_ptr() != a.data_ptr()  # a view of `a` is alive
    del view
    assert pool.get(8, torch.float32).data_ptr() == a.data_ptr() and pool.allocated == 2


def test_a_failing_cpu_cost_probe_keeps_the_measured_read_rate(tmp_path, capsys, monkeypatch):
    """specoffload-profile --disk: the CPU-cost probe failing (a checkpoint changed under it) after the read rate
    was measured keeps that rate and the other probes' work, with a warning, instead of ending the run."""
    from specoffload.runtime.disk import CheckpointChanged
    from specoffload.runtime.profile_cli import main as profile_main
    from specoffload.runtime.profiler import disk as disk_probe
    from specoffload.runtime.profiler import probes

    base = load_profile("cpu-2core")
    monkeypatch.setattr(probes, "run_profile",
                        lambda cfg, device, name, progress, threads: probes.ProfileResult(profile=base))

    def changed(*a, **k):
        raise CheckpointChanged("checkpoint file x.safetensors changed during the run; restore it and resume")

    monkeypatch.setattr(disk_probe, "measure_disk_cpu_costs", changed)
    out = tmp_path / "m.yaml"
    args = ["--quick", "--device", "cpu", "--no-progress", "-o", str(out), "--disk", str(tmp_path),
            "--disk-size-mib", "1"]
    assert profile_main(args) == 0
    assert "CPU-cost probe failed" in capsys.readouterr().err
    p = HardwareProfile.load(out)
    assert p.disk_read_bytes_per_s > 0 and p.disk_convert_bytes_per_s == 0.0
    assert p.disk_read_compute_seconds_per_byte == 0.0
