"""tools/gpu_check.py's planning, simulation and reporting on the CPU, with the h200-24g preset's numbers
and the shapes and job the GPU run uses (the engine part runs in the slow end-to-end smoke test)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def setup(gc, tmp_path_factory):
    """The GPU run's defaults: a 4-layer Mixtral-8x7B target, a full Mistral-7B draft, 256 prompts 128 -> 32."""
    root = tmp_path_factory.mktemp("gpu_check")
    dirs = []
    for name, cfg in (("target", dict(gc.MIXTRAL, num_hidden_layers=4)), ("draft", dict(gc.MISTRAL, num_hidden_layers=32))):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        dirs.append(d)
    target, draft = load_model_spec(str(dirs[0])), load_model_spec(str(dirs[1]))
    work = Workload(prompt_len_tokens=128, gen_len_tokens=32, num_prompts=256, acceptance=0.7,
                    acceptance_source="synthetic (timing mode)")
    said = []
    plans = gc.plans_for(load_profile("h200-24g"), target, draft, work, said.append)
    return plans, said, target


def test_every_policy_plans_on_the_h200_24g_preset(setup):
    plans, said, _ = setup
    assert not said, said  # nothing was refused
    assert set(plans) == {"specoffload", "offload-only", "serial-spec", "interleaved", "offload-only-fused"}
    assert plans["serial-spec"].policy == "serial-spec" and plans["interleaved"].policy == "interleaved"
    fused = plans["offload-only-fused"]  # refills ride in verifications: the batch is a quarter of the job
    assert fused.fuse_prefill and fused.decode_batch == 64 and fused.prediction.fused_passes > 0


def test_offload_only_streams_every_layer(setup):
    plans, _, target = setup
    plan = plans["offload-only"]
    assert plan.policy == "offload-only" and plan.draft_len == 0
    assert plan.gpu_attn_layers == 0 and plan.gpu_ffn_layers == 0  # every layer's weights cross PCIe each pass
    assert plan.prediction.busy_seconds_per_slot["h2d"] > 0
    assert simulate(plan, load_profile("h200-24g")).ok


def test_result_lines_are_never_empty(gc, setup):
    plans, _, _ = setup
    prof = load_profile("h200-24g")
    for policy, plan in plans.items():
        sim = simulate(plan, prof)
        assert sim.ok, (policy, sim.problems)
        line = gc.result_line(policy, plan, sim.report.throughput_tokens_per_s, 100.0, 8192, 81.92)
        assert line.startswith(f"{policy} -> {plan.policy} b=") and "measured 100.0 tok/s" in line
        assert "simulated" in line and "planned" in line
        bound = plan.prediction.physical_bound_tokens_per_s
        assert ("% of the physical bound" in line) == (bound > 0)
        # An unbounded plan (bound written as 0) still prints its whole line.
        unbounded = dataclasses.replace(plan, prediction=dataclasses.replace(plan.prediction,
                                                                             physical_bound_tokens_per_s=0.0))
        line0 = gc.result_line(policy, unbounded, sim.report.throughput_tokens_per_s, 100.0, 8192, 81.92)
        assert line0.startswith(f"{policy} -> ") and line0.endswith("no finite physical bound")


def test_the_eagle_row_plans_an_eagle_shaped_head_on_the_h200_24g_preset(gc, setup, tmp_path):
    """The GPU run's "eagle" row: a head written at the published Mixtral-8x7B EAGLE head's shapes over the
    run's target (tools/gpu_check.py writes it with random weights), planned, simulated and reported."""
    from specoffload.planner.models import PRESETS, from_hf_config
    from specoffload.runtime.config import args_from_hf_config
    from specoffload.runtime.feature_draft import head_config

    _, _, target = setup
    targs = args_from_hf_config(dict(gc.MIXTRAL, num_hidden_layers=4))
    cfg = head_config(targs, "eagle", n_kv_heads=targs.n_heads, ffn_dim=targs.ffn_dim)  # as gpu_check writes it
    edir = tmp_path / "ckpt-eagle"  # its config (the weights, 0.28 B random parameters, are the GPU run's)
    edir.mkdir()
    (edir / "config.json").write_text(json.dumps({**cfg, "feature_draft": True}))
    head = load_model_spec(str(edir))
    preset = from_hf_config(PRESETS["eagle-mixtral-8x7b"], "eagle-mixtral-8x7b")
    shape = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size")
    assert {f: getattr(head, f) for f in shape} == {f: getattr(preset, f) for f in shape}
    assert head.feature_draft and head.num_experts <= 1
    work = Workload(prompt_len_tokens=128, gen_len_tokens=32, num_prompts=256, acceptance=0.7,
                    acceptance_source="synthetic (timing mode)")
    said = []
    draft = from_hf_config(dict(gc.MISTRAL, num_hidden_layers=32), "draft")
    plans = gc.plans_for(load_profile("h200-24g"), target, draft, work, said.append, eagle=head)
    assert "eagle" in plans and not [s for s in said if s.startswith("eagle")], said
    plan = plans["eagle"]
    # A speculative plan with the head, even where the planner's own pick would be offload-only: the head runs.
    assert plan.draft == str(edir) and plan.draft_len >= 1 and plan.policy in ("serial-spec", "interleaved")
    sim = simulate(plan, load_profile("h200-24g"))
    assert sim.ok, sim.problems
    line = gc.result_line("eagle", plan, sim.report.throughput_tokens_per_s, 100.0, 8192, 81.92)
    assert line.startswith(f"eagle -> {plan.policy} b=")


def test_the_attention_scaling_step_writes_its_tables(gc, tmp_path):
    """The step that measures host attention thread scaling on the GPU machine's CPU: one table per point with a
    line per thread count (copy, read-only baseline and host path, each GB/s positive), written to
    attention_scaling.txt and passed to the run's log. A small point and pool here (the GPU run: contexts 512 and
    4096 x batches 32 and 256, threads 1, 2, 4, 8 and all cores less one)."""
    logged = []
    rows = gc.attention_scaling(tmp_path, logged.append, tiny=True, contexts=[64], batches=[3], threads=[1, 2],
                                pool_bytes=2**20)
    from specoffload.runtime.host_attention import usable_cores

    threads = [t for t in (1, 2) if t <= usable_cores()]
    assert [(r["ctx"], r["batch"], r["rows"], r["threads"]) for r in rows] == \
        [(64, 3, rows_, t) for rows_ in ("uniform", "ragged") for t in threads]
    assert all(r[n] > 0 for r in rows for n in ("copy", "read", "host"))
    text = (tmp_path / "attention_scaling.txt").read_text()
    assert text.splitlines() == logged
    assert text.startswith("thread scaling: bf16 KV, Q=1") and "read baseline:" in text
    assert "ctx 64, batch 3, uniform rows" in text and "ctx 64, batch 3, ragged rows" in text
    assert sum(1 for line in logged if "|" in line and line.split("|")[0].strip().isdigit()) == len(rows)
    summary = gc.scaling_summary(rows)
    assert len(summary) == 2 and summary[0].startswith("host attention scaling (CPU, bf16, Q=1) ctx 64 batch 3 uniform: ")
    assert all(f"-> {threads[-1]} threads copy" in line and "of the read" in line for line in summary)
    two = [dict(r, threads=t, copy=c, read=rd, host=h) for r, t, c, rd, h in
           zip(rows[:1] * 2, (1, 4), (10.0, 20.0), (20.0, 50.0), (10.0, 30.0))]
    assert gc.scaling_summary(two) == [
        "host attention scaling (CPU, bf16, Q=1) ctx 64 batch 3 uniform: 1 -> 4 threads copy 2.00x, read 2.50x, "
        "host 3.00x; at 4 host 30.0 GB/s = 1.50 of the copy, 0.60 of the read"]
    # A budget already spent skips every point and says so.
    logged.clear()
    assert gc.attention_scaling(tmp_path, logged.append, contexts=[64], batches=[3], threads=[1], budget_s=-1.0,
                                pool_bytes=2**20) == []
    assert sum("skipped (past the" in line for line in logged) == 2
