"""The disk tier: the planner's disk share, the simulator's disk stage, plan.yaml, the engine and the run CLI."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from specoffload.planner.costmodel import DISK_STAGING_BUFFERS, CostModel, Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import PlanInfeasible, Planner, make_plan
from specoffload.planner.schema import Plan, Workload, disk_layer_ids, load_profile, resident_layers
from specoffload.planner.sim.simulator import SimOptions, simulate
from specoffload.planner.strict import SchemaError

MiB = 2**20
GiB = 2**30
TINY_W = Workload(prompt_len_tokens=8, gen_len_tokens=8, num_prompts=4, max_prompt_len_tokens=32)
SLOW_DISK = 1e6  # bytes/s: slow enough that the disk binds whatever else the tiny model does


def cpu_profile(rate: float = SLOW_DISK):
    return load_profile("cpu-2core").with_overrides({"disk_read_bytes_per_s": rate})


def tiny():
    return load_model_spec("tiny-target"), load_model_spec("tiny-draft")


FIXED = {"decode_batch": 2, "micro_batches": 1, "prefill_batch": 2}


def knobs_of(plan: Plan) -> Knobs:
    return Knobs(plan.policy, plan.decode_batch, plan.prefill_batch, plan.draft_len, plan.micro_batches,
                 plan.draft_kv, plan.draft_sub_batch, plan.weight_buffers)


def host_need_without_disk(profile, limit: float = 0.0) -> tuple[CostModel, float]:
    t, _ = tiny()
    cm = CostModel(profile, t, None, TINY_W, limit)
    knobs = Knobs("offload-only", 2, 2, 0, 1, "gpu", 1, 0)
    return cm, cm.memory_at(knobs, {"attn_gpu": 1, "ffn_gpu": 1, "kv_gpu": 0, "disk": 0})["host"]


# --- the LP ---------------------------------------------------------------------------------------

def test_no_disk_share_when_the_model_fits():
    t, _ = tiny()
    res = make_plan(cpu_profile(), t, None, TINY_W, policy="offload-only", fixed=FIXED)
    assert res.plan.disk_layers == 0 and res.plan.prediction.disk_bytes_per_sweep == 0
    assert "disk" not in res.plan.prediction.busy_seconds_per_slot
    # GPU machine with room for the weights: none either
    res = make_plan(load_profile("rtx4090-pcie4"), load_model_spec("mixtral-8x7b"), None,
                    Workload(prompt_len_tokens=512, gen_len_tokens=32, num_prompts=64))
    assert res.plan.disk_layers == 0


def test_disk_share_is_the_fewest_layers_that_fit_when_the_disk_binds():
    """Host limit = the plan's need less half a layer (in the compute dtype): with a slow disk every layer on
    disk costs time, so the LP takes the fewest that fit: ceil((0.5 layer + staging) / layer)."""
    profile = cpu_profile()
    cm, need = host_need_without_disk(profile)
    layer_mem = cm.disk_layer_bytes * cm.weight_read_factor  # what a layer on disk frees (fp32 on the CPU)
    staging = cm.disk_staging_bytes()
    assert staging == pytest.approx(DISK_STAGING_BUFFERS * cm.disk_layer_bytes + layer_mem)
    limit = need - 0.5 * layer_mem
    # staging: 2 buffers of a bf16 layer + 1 fp32 converted layer = 2 fp32 layers: ceil(0.5 + 2) = 3
    expect = math.ceil((need + staging - limit) / layer_mem)
    assert expect == 3
    t, _ = tiny()
    res = make_plan(profile, t, None, TINY_W, policy="offload-only", fixed=FIXED, host_mem_limit_bytes=limit)
    plan, pr = res.plan, res.plan.prediction
    assert plan.disk_layers == expect and plan.host_mem_limit_bytes == limit
    assert pr.peak_mem_bytes["host"] <= limit and pr.capacity_bytes["host"] == limit
    # the disk binds; a sweep reads the disk layers once: hand-computed
    assert pr.binding == "disk"
    read = expect * cm.disk_layer_bytes / SLOW_DISK
    assert pr.busy_seconds_per_slot["disk"] == pytest.approx(read, rel=1e-9)
    assert pr.disk_bytes_per_sweep == expect * cm.disk_layer_bytes
    host = cm.host_pass_seconds(plan.decode_batch)
    assert pr.slot_seconds == pytest.approx(read + host, rel=1e-9)
    assert any(n.startswith("disk tier: 3 of 4 layers") for n in plan.notes)


def test_disk_share_on_a_gpu_machine_streams_disk_layers_in_both_parts():
    """Mixtral-8x7B on an RTX 4090 with host memory capped just below its streamed weights: a few layers on
    disk, each streamed in both parts (resident in neither), host memory within the cap."""
    t = load_model_spec("mixtral-8x7b")
    w = Workload(prompt_len_tokens=256, gen_len_tokens=32, num_prompts=32)
    profile = load_profile("rtx4090-pcie4")
    free = make_plan(profile, t, None, w, policy="offload-only").plan
    assert free.disk_layers == 0
    limit = free.prediction.peak_mem_bytes["host"] - 2 * GiB
    res = make_plan(profile, t, None, w, policy="offload-only", host_mem_limit_bytes=limit)
    p = res.plan
    assert p.disk_layers >= 1 and p.disk_layers + max(p.gpu_attn_layers, p.gpu_ffn_layers) <= t.num_layers
    assert p.prediction.peak_mem_bytes["host"] <= limit * (1 + 1e-9)
    assert p.prediction.peak_mem_bytes["pinned"] <= limit * (1 + 1e-9)
    assert p.prediction.throughput_tokens_per_s <= free.prediction.throughput_tokens_per_s * (1 + 1e-9)
    assert "disk" in p.prediction.busy_seconds_per_slot
    ids = disk_layer_ids(p.disk_layers, t.num_layers, resident_layers(p.gpu_attn_layers, t.num_layers)
                         | resident_layers(p.gpu_ffn_layers, t.num_layers))
    assert len(ids) == p.disk_layers


def test_infeasible_even_with_the_disk_is_a_clear_error():
    profile = cpu_profile()
    cm, need = host_need_without_disk(profile)
    t, _ = tiny()
    limit = 0.3 * need  # below KV + staging + what is never on disk
    with pytest.raises(PlanInfeasible) as e:
        make_plan(profile, t, None, TINY_W, policy="offload-only", fixed=FIXED, host_mem_limit_bytes=limit)
    msg = str(e.value)
    assert "host memory" in msg and "read from disk" in msg and "--host-mem-limit" in msg and "MiB" in msg


def test_no_disk_rate_means_no_disk_share():
    t, _ = tiny()
    profile = load_profile("cpu-2core")
    assert profile.disk_read_bytes_per_s == 0
    _, need = host_need_without_disk(cpu_profile())
    with pytest.raises(PlanInfeasible, match="states no disk read rate"):
        make_plan(profile, t, None, TINY_W, policy="offload-only", fixed=FIXED, host_mem_limit_bytes=0.9 * need)


def test_plan_cli_host_mem_limit_and_explain_name_the_disk(tmp_path, capsys):
    from specoffload.planner.cli import main as plan_main

    prof = tmp_path / "p.yaml"
    cpu_profile().save(prof)
    _, need = host_need_without_disk(cpu_profile())
    out = tmp_path / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--profile", str(prof), "--prompt-len", "8", "--max-prompt-len",
                      "32", "--gen-len", "8", "--num-prompts", "4", "--policy", "offload-only", "--batch", "2",
                      "--micro-batches", "1", "--host-mem-limit", str(0.9 * need / GiB), "--explain",
                      "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "read from disk every sweep" in text and "the disk is the binding resource" in text
    assert Plan.load(out).disk_layers > 0
    assert plan_main(["--model", "tiny-target", "--profile", str(prof), "--prompt-len", "8", "--gen-len", "8",
                      "--num-prompts", "4", "--host-mem-limit", "0"]) == 2
    assert "--host-mem-limit must be a positive number" in capsys.readouterr().err


def test_planner_stays_torch_free_with_the_disk_tier():
    code = ("import sys; import specoffload.planner.planner, specoffload.planner.sim.simulator; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- plan.yaml --------------------------------------------------------------------------------------

def disk_plan(limit_fraction: float = 0.9, rate: float = SLOW_DISK, policy="offload-only", fixed=FIXED) -> Plan:
    t, d = tiny()
    _, need = host_need_without_disk(cpu_profile(rate))
    return make_plan(cpu_profile(rate), t, d if policy != "offload-only" else None, TINY_W, policy=policy,
                     fixed=fixed, host_mem_limit_bytes=limit_fraction * need).plan


def test_plan_yaml_round_trip_with_disk_share(tmp_path):
    plan = disk_plan()
    assert plan.disk_layers > 0
    path = tmp_path / "plan.yaml"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan and back.disk_layers == plan.disk_layers
    assert back.prediction.disk_bytes_per_sweep == plan.prediction.disk_bytes_per_sweep
    data = yaml.safe_load(path.read_text())
    # a plan written before the disk tier (no such keys) still loads, with no disk share
    for key in ("disk_layers", "host_mem_limit_bytes"):
        data.pop(key)
    data["prediction"].pop("disk_bytes_per_sweep")
    path.write_text(yaml.safe_dump(data))
    old = Plan.load(path)
    assert old.disk_layers == 0 and old.host_mem_limit_bytes == 0
    # bad values: a clear error naming the key
    for key, value, words in (("disk_layers", -1, "disk_layers must be an integer >= 0"),
                              ("disk_layers", "two", "disk_layers"),
                              ("host_mem_limit_bytes", -5.0, "host_mem_limit_bytes must be >= 0")):
        bad = dict(data, **{key: value})
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(SchemaError, match=words):
            Plan.load(path)


# --- the simulator --------------------------------------------------------------------------------

def test_simulator_charges_the_disk_stage():
    """With a slow disk, reads run back to back: the job takes (sweeps x disk layers x read time), where a
    sweep is each verification and each prefill chunk, and the disk is busy all along."""
    plan = disk_plan()
    res = simulate(plan, cpu_profile(), SimOptions(trace=True))
    assert res.ok, res.problems
    cm = CostModel(cpu_profile(), tiny()[0], None, TINY_W)
    read = cm.disk_layer_bytes / SLOW_DISK
    sweeps = len(res.step_log) + len(res.prefill_log)
    expect = sweeps * plan.disk_layers * read
    rep = res.report
    assert rep.total_seconds == pytest.approx(expect, rel=0.01)
    assert rep.busy_fraction["disk"] == pytest.approx(1.0, rel=0.01)
    # the closed form agrees (it charges the same reads)
    assert rep.total_seconds == pytest.approx(plan.prediction.total_seconds, rel=0.05)
    # the trace shows the reads on the disk track; staging memory in the host pool stays under the cap
    events = res.trace.to_json()["traceEvents"]
    assert any(e.get("name", "").startswith("disk read L") for e in events)
    assert rep.peak_mem_bytes["host"] <= plan.host_mem_limit_bytes * (1 + 1e-9)


def test_simulate_set_disk_rate_what_if(tmp_path):
    plan = disk_plan()
    path = tmp_path / "plan.yaml"
    plan.save(path)
    prof = tmp_path / "p.yaml"
    cpu_profile().save(prof)
    times = []
    for rate in (SLOW_DISK, 2 * SLOW_DISK):
        rep = tmp_path / f"r{int(rate)}.yaml"
        proc = subprocess.run([sys.executable, "-m", "specoffload.planner.sim.cli", str(path), "--profile", str(prof),
                               "--set", f"disk_read_bytes_per_s={rate}", "--report", str(rep), "--quiet"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        times.append(yaml.safe_load(rep.read_text())["total_seconds"])
    assert times[1] == pytest.approx(times[0] / 2, rel=0.02)  # a second drive halves a disk-bound job
    # the same plan without a disk rate cannot be simulated: a clear error
    proc = subprocess.run([sys.executable, "-m", "specoffload.planner.sim.cli", str(path), "--profile", str(prof),
                           "--set", "disk_read_bytes_per_s=0"], capture_output=True, text=True)
    assert proc.returncode == 2 and "states no disk_read_bytes_per_s" in proc.stderr and "Traceback" not in proc.stderr


def test_simulator_gpu_plan_with_disk_layers_matches_the_closed_form():
    t = load_model_spec("mixtral-8x7b")
    w = Workload(prompt_len_tokens=256, gen_len_tokens=16, num_prompts=32)
    profile = load_profile("rtx4090-pcie4")
    free = make_plan(profile, t, None, w, policy="offload-only").plan
    plan = make_plan(profile, t, None, w, policy="offload-only",
                     host_mem_limit_bytes=free.prediction.peak_mem_bytes["host"] - 4 * GiB).plan
    assert plan.disk_layers > 0
    res = simulate(plan, profile)
    assert res.ok, res.problems
    assert res.report.throughput_tokens_per_s == pytest.approx(plan.prediction.throughput_tokens_per_s, rel=0.1)
    assert res.report.busy_fraction["disk"] > 0


# --- the engine and the run CLI ---------------------------------------------------------------------

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self", "for i in range(10):\n"]


def spec_disk_plan() -> Plan:
    """A speculative plan for the tiny pair with host memory capped half a layer below its need."""
    t, d = tiny()
    fixed = {**FIXED, "draft_len": 2}
    free = make_plan(cpu_profile(), t, d, TINY_W, policy="serial-spec", fixed=fixed).plan
    cm = CostModel(cpu_profile(), t, d, TINY_W)
    limit = free.prediction.peak_mem_bytes["host"] - 0.5 * cm.disk_layer_bytes * cm.weight_read_factor
    plan = make_plan(cpu_profile(), t, d, TINY_W, policy="serial-spec", fixed=fixed, host_mem_limit_bytes=limit).plan
    assert free.disk_layers == 0 and plan.disk_layers > 0 and plan.policy == "serial-spec"
    return plan


def run_engine(plan: Plan, prompts, max_tokens: int = 8):
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    target, draft = tiny_pair_paths()
    eng = Engine(plan, target, draft, device="cpu")
    got = {}
    stats = eng.run([Request(str(i), p, max_tokens) for i, p in enumerate(prompts)],
                    lambda f: got.__setitem__(f.request.id, f.tokens))
    return eng, stats, got


def test_engine_with_disk_layers_is_exact_and_reads_what_the_plan_says():
    from specoffload.runtime.disk import CheckpointIndex
    from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(t).ids for t in TEXTS]
    plan = spec_disk_plan()
    eng, stats, got = run_engine(plan, prompts)
    _, _, ref = run_engine(plan.replace(disk_layers=0, host_mem_limit_bytes=0.0), prompts)
    assert got == ref  # token for token
    assert eng.target.disk is not None and len(eng.target.disk.layers) == plan.disk_layers
    # the disk layers are not in memory: placeholders only; the staging buffers are counted
    for j in eng.target.disk.layers:
        assert eng.target.w.layers[j].attn["wq"].device.type == "meta"
    index = CheckpointIndex.open(tiny_pair_paths()[0])
    per_sweep = sum(index.layer_bytes(j) for j in eng.target.disk.layers)
    assert per_sweep == plan.prediction.disk_bytes_per_sweep  # the headers' bytes = the plan's figure
    assert stats.sweeps == stats.slots + stats.prefill_passes > 0
    assert stats.disk_bytes_per_sweep == per_sweep
    assert stats.disk_used_bytes <= stats.disk_read_bytes <= stats.disk_used_bytes + 2 * max(
        index.layer_bytes(j) for j in eng.target.disk.layers)  # reads ahead for a pass that never ran
    eng.target.disk.close()


@pytest.fixture()
def tiny_copy(tmp_path):
    """A copy of the tiny target (the run reads it in place, and the test changes it)."""
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    dst = tmp_path / "target"
    shutil.copytree(tiny_pair_paths()[0], dst)
    return dst


@pytest.mark.parametrize("how", ["changes", "disappears"])
def test_run_cli_checkpoint_changing_mid_run_is_a_clear_error_and_keeps_outputs(tmp_path, tiny_copy, capsys,
                                                                                 monkeypatch, how):
    from specoffload.runtime import outputs
    from specoffload.runtime.run_cli import main as run_main
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    plan = spec_disk_plan().replace(decode_batch=1, prefill_batch=1)
    path = tmp_path / "plan.yaml"
    plan.save(path)
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t, "max_tokens": 6}) + "\n"
                               for i, t in enumerate(TEXTS)))
    out = tmp_path / "out.jsonl"
    ckpt = tiny_copy / "model.safetensors"
    real_write = outputs.OutputFile.write

    def write_then_break(self, obj):  # after the first finished sequence, the checkpoint changes / goes
        real_write(self, obj)
        if self.written == 1:
            if how == "changes":
                with ckpt.open("r+b") as fh:
                    fh.seek(-1, os.SEEK_END)
                    fh.write(b"\x01")
                os.utime(ckpt, ns=(1, 1))
            else:
                ckpt.rename(ckpt.with_suffix(".moved"))

    monkeypatch.setattr(outputs.OutputFile, "write", write_then_break)
    rc = run_main([str(path), "--prompts", str(prompts), "--output", str(out), "--target", str(tiny_copy),
                   "--draft", str(tiny_pair_paths()[1]), "--no-simulate", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("specoffload-run: error:")]
    assert len(line) == 1 and str(ckpt) in line[0]
    assert ("changed during the run" if how == "changes" else "disappeared during the run") in line[0]
    assert "1 finished sequences are kept" in line[0]
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == 1 and kept[0]["id"] in {f"p{i}" for i in range(4)}


def test_planner_with_a_disk_share_matches_exhaustive_grid_search():
    """The LP (whole layers, a 0/1 staging variable) against every placement on the grid, disk axis included."""
    from specoffload.planner.gridsearch import grid_search

    t, d = tiny()
    w = Workload(prompt_len_tokens=8, gen_len_tokens=8, num_prompts=6, max_prompt_len_tokens=32, acceptance=0.8)
    profile = cpu_profile(2e8)
    free = make_plan(profile, t, d, w, max_draft_len=2).plan
    for frac in (0.95, 0.8):
        limit = frac * free.prediction.peak_mem_bytes["host"]
        planned = Planner(profile, t, d, w, max_draft_len=2, host_mem_limit_bytes=limit).plan()
        grid = grid_search(Planner(profile, t, d, w, max_draft_len=2, host_mem_limit_bytes=limit))
        assert grid is not None and grid.placement["disk"] > 0
        got = planned.plan.prediction.throughput_tokens_per_s
        assert grid.throughput * (1 - 3e-3) <= got <= grid.throughput * (1 + 1e-9)


def test_a_plan_with_more_disk_layers_than_the_model_can_take_is_refused():
    from specoffload.runtime.engine import Engine, EngineError
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    plan = disk_plan().replace(disk_layers=9)
    with pytest.raises(SchemaError, match="reads 9 layers from disk but only 4 of 4"):
        simulate(plan, cpu_profile())
    with pytest.raises(EngineError, match="reads 9 layers from disk but only 4 of 4 layers are fully streamed"):
        Engine(plan, tiny_pair_paths()[0], None, device="cpu")
    # a GPU plan's disk layers must be streamed in both parts
    gpu = plan.replace(target_attention="cpu", gpu_attn_layers=4, gpu_ffn_layers=0, disk_layers=1, weight_buffers=2)
    with pytest.raises(SchemaError, match="only 0 of 4 layers"):
        simulate(gpu, load_profile("t4").with_overrides({"disk_read_bytes_per_s": 1e9}))


def test_disk_layers_fit_among_layers_resident_in_neither_part():
    """Whatever the LP picks on a GPU machine, the plan's disk layers exist: layers streamed in both parts."""
    t = load_model_spec("mixtral-8x7b")
    profile = load_profile("rtx4090-pcie4")
    for n_prompts, cut in ((8, 30), (64, 60), (256, 90)):
        w = Workload(prompt_len_tokens=256, gen_len_tokens=16, num_prompts=n_prompts)
        free = make_plan(profile, t, None, w, policy="offload-only").plan
        p = make_plan(profile, t, None, w, policy="offload-only",
                      host_mem_limit_bytes=free.prediction.peak_mem_bytes["host"] * cut / 100).plan
        resident = resident_layers(p.gpu_attn_layers, t.num_layers) | resident_layers(p.gpu_ffn_layers, t.num_layers)
        assert len(disk_layer_ids(p.disk_layers, t.num_layers, resident)) == p.disk_layers
