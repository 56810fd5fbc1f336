"""The fused prefill in the simulator (Plan.fuse_prefill): a refill's chunk rides in the next verification's
weight sweep. Same knobs fused and not: totals, token counts, sweep counts, the schedule's steps, the
order of the chunk's tasks inside the pass, memory, and a CPU-only profile."""
from __future__ import annotations

import dataclasses
import math

import pytest

from specoffload.planner.costmodel import Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.schedule import DRAFT, REFILL, VERIFY
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.strict import to_plain
from specoffload.planner.sim import SimOptions, Simulation, simulate
from specoffload.planner.sim import fused_pass
from specoffload.planner.sim.memory import fused_extra_bytes, working_sets
from specoffload.planner.sim.predict import plan_cost_model
from specoffload.planner.sim.report import Report, format_report
from specoffload.planner.sim.scenario import plan_at

GPU_PROFILE = load_profile("rtx4090-pcie3")
MIXTRAL, EAGLE = load_model_spec("mixtral-8x7b"), load_model_spec("eagle-mixtral-8x7b")
BP = 64  # prefill chunk


def fused(plan):
    return dataclasses.replace(plan, fuse_prefill=True)


def room(plan, profile=GPU_PROFILE):
    """The profile with the device memory a fused pass needs beyond what the plan counts (0 once counted)."""
    cm, knobs, placement = plan_cost_model(fused(plan), profile)
    extra = fused_extra_bytes(cm, knobs, placement, plan.prefill_batch)
    return profile.with_overrides({"gpu_mem_bytes": profile.gpu_mem_bytes + extra}, source="test"), extra


def runs(draft, gen: int, prompts: int, knobs: Knobs):
    """A 512-token job of `prompts` prompts -> `gen` tokens at these knobs, every layer streamed: (plan, profile
    with room for the fused pass, that room, the unfused simulation, the fused one)."""
    work = Workload(prompt_len_tokens=512, gen_len_tokens=gen, num_prompts=prompts, acceptance=0.7)
    plan = plan_at(GPU_PROFILE, MIXTRAL, draft, work, knobs, {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    prof, extra = room(plan)
    return plan, prof, extra, simulate(plan, prof), simulate(fused(plan), prof)


@pytest.fixture(scope="module")
def spec_runs():
    """Mixtral + EAGLE head, serial-spec, host KV, 1024 prompts through a batch of 384: the batch never drains."""
    return runs(EAGLE, 48, 1024, Knobs("serial-spec", 384, BP, 4, 4, "gpu", 1, 2))


@pytest.fixture(scope="module")
def offload_runs():
    plan, prof, _, plain, fz = runs(None, 24, 768, Knobs("offload-only", 256, BP, 0, 2, "gpu", 1, 2))
    return plan, prof, plain, fz


def refills(res):
    return [n for op, _, n in res.schedule_log if op == REFILL and n]


def verify_counts(res):
    return [n for op, _, n in res.schedule_log if op == VERIFY]


def pass_seconds(res):
    """(fused verifications, plain verifications, stand-alone prefill sweeps): the time of each, by pass."""
    fz = {i for i, _ in res.fused_log}
    fused_s = [e - s for i, _, s, e, _ in res.step_log if i in fz]
    plain = [e - s for i, _, s, e, _ in res.step_log if i not in fz]
    return fused_s, plain, [e - s for _, _, s, e, _ in res.prefill_log]


def test_working_sets_are_the_cost_models():
    """The two working sets memory.py sizes are the ones the cost model holds the larger of."""
    work = Workload(prompt_len_tokens=512, gen_len_tokens=32, num_prompts=1000, acceptance=0.7)
    for knobs in (Knobs("offload-only", 256, 64, 0, 2), Knobs("offload-only", 1000, 4, 0, 8),
                  Knobs("offload-only", 32, 128, 0, 1)):
        cm, *_ = plan_cost_model(plan_at(GPU_PROFILE, MIXTRAL, None, work, knobs,
                                         {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0}), GPU_PROFILE)
        t = cm.t
        gpu = cm.memory_terms(knobs)["gpu"].at({"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0, "disk": 0.0})
        decode, prefill = working_sets(cm, knobs)
        held = gpu - t.outer_bytes - knobs.weight_buffers * (t.attn_bytes_per_layer + t.ffn_bytes_per_layer)
        assert held == pytest.approx(max(decode, prefill), rel=1e-12)
        # A smaller chunk needs no more; the fused pass needs both at once, less what a plan counts for it.
        assert working_sets(cm, knobs, 1)[1] <= prefill
        plain_extra = fused_extra_bytes(cm, knobs, {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0}, knobs.prefill_batch)
        assert plain_extra == pytest.approx(min(decode, prefill))


def test_fused_beats_unfused_at_the_same_knobs(spec_runs):
    plan, _, _, plain, fz = spec_runs
    assert plain.ok and fz.ok, [p.message for p in plain.problems + fz.problems]
    a, b = plain.report, fz.report
    want = plan.workload.num_prompts * plan.workload.gen_len_tokens
    assert a.generated_tokens == b.generated_tokens == want
    assert a.sequences == b.sequences == plan.workload.num_prompts
    assert b.total_seconds < a.total_seconds
    # The batch never drains: one stand-alone sweep (the start), every later chunk in a verification's sweep.
    chunks = math.ceil(plan.workload.num_prompts / BP)
    assert a.prefill_passes == chunks and a.fused_passes == 0
    assert b.prefill_passes == 1 and b.fused_passes == chunks - 1 == len(fz.fused_log)
    assert refills(fz) == [BP] * chunks and sum(n for _, n in fz.fused_log) == plan.workload.num_prompts - BP
    # prefill_seconds counts the stand-alone sweep only; the fused passes are verifications (decode time).
    assert b.prefill_seconds == pytest.approx(fz.prefill_log[0][3] - fz.prefill_log[0][2])
    assert b.prefill_seconds + b.decode_seconds == pytest.approx(b.total_seconds)
    assert b.slots == len(fz.step_log) and a.slots == len(plain.step_log)
    assert "fused prefill: " in format_report(b) and "fused prefill" not in format_report(a)


def test_a_fused_pass_costs_less_than_its_verification_and_a_sweep(spec_runs):
    _, _, _, plain, fz = spec_runs
    fused_s, plain_s, _ = pass_seconds(fz)
    _, _, sweeps = pass_seconds(plain)
    verify, sweep = sorted(plain_s)[len(plain_s) // 2], sorted(sweeps)[len(sweeps) // 2]
    assert min(fused_s) > verify  # the chunk's GPU work is not free
    assert max(fused_s) < verify + sweep  # ... but its weight sweep is


def test_fused_schedule_steps(spec_runs):
    """The chunk is verified and drafted only after the pass that prefilled it: REFILL logs the admitted
    prompts, DRAFT and VERIFY the live sequences (the steps the engine logs)."""
    _, _, _, _, fz = spec_runs
    log = [(op, n) for op, _, n in fz.schedule_log]
    assert log[:9] == [(REFILL, BP), (DRAFT, BP), (VERIFY, BP),
                       (REFILL, BP), (DRAFT, BP), (VERIFY, BP),  # the second chunk rides in this verification
                       (REFILL, BP), (DRAFT, 2 * BP), (VERIFY, 2 * BP)]
    # Live never exceeds the batch, and the ramp adds one chunk per verification until the batch is full.
    counts = verify_counts(fz)
    assert max(counts) <= 384
    assert counts[1:6] == [BP, 2 * BP, 3 * BP, 4 * BP, 5 * BP]


def test_offload_only_fused_ramps_up_and_finishes_staggered(offload_runs):
    plan, _, plain, fz = offload_runs
    assert plain.ok and fz.ok, [p.message for p in plain.problems + fz.problems]
    G, N = plan.workload.gen_len_tokens, plan.workload.num_prompts
    assert plain.report.generated_tokens == fz.report.generated_tokens == N * G
    assert fz.report.prefill_passes == 1 and fz.report.fused_passes == N // BP - 1
    log = [(op, n) for op, _, n in fz.schedule_log]
    # Offload-only: no draft steps; the ramp admits one chunk per verification, each joins after it.
    assert all(op in (REFILL, VERIFY) for op, _ in log)
    counts = verify_counts(fz)
    assert counts[:5] == [BP, BP, 2 * BP, 3 * BP, 4 * BP]
    # Later refills are deferred: every refill but the first admits a chunk while the batch is live.
    assert sum(1 for op, n in log[1:] if op == REFILL and n) == fz.report.fused_passes
    # Sequences finish chunk by chunk: a chunk joined after verification i finishes G - 1 verifications later.
    fin_plain, fin_fused = finishes(plan, prof_of(offload_runs)), finishes(fused(plan), prof_of(offload_runs))
    assert sum(fin_plain) == sum(fin_fused) == N
    assert sum(1 for f in fin_plain if f) == math.ceil(N / plan.decode_batch)  # a wave at a time
    staggered = [i for i, f in enumerate(fin_fused) if f]
    assert len(staggered) >= N // BP - 1 and all(fin_fused[i] <= BP for i in staggered)
    assert staggered[0] == G - 2  # the first chunk: its first token from the prefill, then G - 1 verifications


def prof_of(runs):
    return runs[1]


class _Finishes(Simulation):
    def _verify_done(self, p, now):
        before = self.finished
        super()._verify_done(p, now)
        self.finish_log.append(self.finished - before)


def finishes(plan, prof):
    """Sequences finished at each verification."""
    sim = _Finishes(plan, prof)
    sim.finish_log = []
    assert sim.run().ok
    return sim.finish_log


def test_the_chunk_runs_on_its_own_stream_below_the_verification(spec_runs):
    """Per layer, on the GPU: the chunk's layer starts once the first micro-batch's qkv is issued and after the
    chunk's previous layer (its stream's order); the verification's FFN does not wait for it (somewhere the
    verification's work runs while the chunk's layer is still unfinished); the chunk's LM head and the draft's
    prefill after the verification's LM head."""
    plan, prof, *_ = spec_runs
    res = simulate(fused(plan), prof, SimOptions(trace=True, trace_slots=8))
    assert res.ok
    pass_n = res.fused_log[0][0]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in res.trace.events
                 if e.get("ph") == "X" and e.get("args", {}).get("pass") == pass_n and e["tid"] == 1)
    names = [n for *_, n in gpu]
    assert any(n.startswith("prefill") for n in names) and any(n.startswith("draft prefill") for n in names)
    overtaken = False
    prev_end = 0.0
    for j in range(plan.workload and 32):
        qkv = next(e for s, e, n in gpu if n.startswith(f"qkv L{j} ") and "mb0" in n)
        ffn = next(s for s, e, n in gpu if n.startswith(f"ffn L{j} ") and "mb0" in n)
        chunk = [(s, e) for s, e, n in gpu if n.startswith(f"prefill L{j} ")]
        assert chunk and min(s for s, _ in chunk) >= max(qkv, prev_end) - 1e-6
        prev_end = max(e for _, e in chunk)
        overtaken |= ffn < prev_end - 1e-6
    assert overtaken
    lm = [s for s, e, n in gpu if n.startswith("lm_head")]
    draft = next(s for s, e, n in gpu if n.startswith("draft prefill"))
    assert len(lm) == 2 and draft >= max(lm)


def test_memory_fits_when_the_plan_counts_the_chunk(spec_runs):
    plan, prof, extra, plain, fz = spec_runs
    assert plain.ok and fz.ok
    cm, knobs, placement = plan_cost_model(fused(plan), prof)
    peak = cm.memory_at(knobs, placement)
    assert fz.report.peak_mem_bytes["gpu"] <= peak["gpu"] + extra + 1.0
    assert fz.report.peak_mem_bytes["gpu"] <= prof.gpu_mem_bytes - prof.gpu_mem_reserve_bytes


def test_a_fused_pass_that_does_not_fit_overflows_naming_the_part(spec_runs, monkeypatch):
    plan, prof, *_ = spec_runs
    monkeypatch.setattr(fused_pass, "fused_extra_bytes", lambda *a: 2.0**40)
    res = simulate(fused(plan), prof)
    assert not res.ok and res.overflow is not None and res.overflow.pool == "gpu"
    (problem,) = res.problems
    assert problem.kind == "overflow" and "fused pass working set" in problem.message
    assert f"prefill chunk of {BP} prompts" in problem.message
    # It happens at the first fused pass, after the start's stand-alone sweep.
    assert res.overflow.time >= res.prefill_log[0][3] > 0


def test_report_keeps_fused_passes_and_older_reports_load(spec_runs, tmp_path):
    rep = spec_runs[4].report
    rep.save(tmp_path / "r.yaml")
    assert Report.load(tmp_path / "r.yaml").fused_passes == rep.fused_passes > 0
    data = to_plain(rep)
    del data["fused_passes"]  # a report written before the field
    assert Report.from_dict(data, "old.yaml").fused_passes == 0


@pytest.mark.parametrize("policy", ["serial-spec", "offload-only"])
def test_cpu_only_fused(policy):
    prof = load_profile("cpu-2core")
    work = Workload(prompt_len_tokens=64, gen_len_tokens=16, num_prompts=96, acceptance=0.7)
    k = 2 if policy == "serial-spec" else 0
    knobs = Knobs(policy, 32, 8, k, 1, "gpu", 1, 0)
    plan = plan_at(prof, load_model_spec("tiny-target"), load_model_spec("tiny-draft") if k else None, work,
                   knobs, {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    plain, fz = simulate(plan, prof), simulate(fused(plan), prof)
    assert plain.ok and fz.ok, [p.message for p in plain.problems + fz.problems]
    assert plain.report.generated_tokens == fz.report.generated_tokens == 96 * 16
    assert fz.report.prefill_passes == 1 and fz.report.fused_passes == 96 // 8 - 1
    assert fz.report.peak_mem_bytes["host"] <= fz.report.capacity_bytes["host"]
    # One device: per layer the chunk's work after the verification's, the next layer after the chunk's.
    res = simulate(fused(plan), prof, SimOptions(trace=True, trace_slots=6))
    n = res.fused_log[0][0]
    dev = sorted((e["ts"], e["name"]) for e in res.trace.events
                 if e.get("ph") == "X" and e.get("args", {}).get("pass") == n and e["tid"] == 1)
    names = [nm for _, nm in dev]
    first_prefill = names.index(next(nm for nm in names if nm.startswith("prefill L0 ")))
    assert all(not nm.startswith("qkv L1 ") for nm in names[:first_prefill])
    assert any(nm.startswith("ffn L0 ") for nm in names[:first_prefill])
