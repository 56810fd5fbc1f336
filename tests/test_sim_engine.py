"""The simulator's event core and job model: resources, preemption, memory, determinism, refill, checks."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from specoffload.planner.costmodel import Knobs, expected_tokens
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import SimOptions, Simulation, simulate
from specoffload.planner.sim.engine import DONE, Engine, Event, MemoryPool, Task
from specoffload.planner.sim.memory import POOLS, memory_layout
from specoffload.planner.sim.predict import plan_cost_model
from specoffload.planner.sim.scenario import plan_at

MIXTRAL, MISTRAL, LLAMA1B = (load_model_spec(n) for n in ("mixtral-8x7b", "mistral-7b", "llama-3.2-1b"))


def small_plan(policy="interleaved", b=16, k=2, m=2, mode="gpu", prompts=None, gen=24, acceptance=0.7,
               prefill=16, profile="rtx4090-pcie4", attn=0.5, ffn=0.0, kv=0.0):
    prof = load_profile(profile)
    nb = 2 if policy == "interleaved" else 1
    work = Workload(prompt_len_tokens=128, gen_len_tokens=gen, num_prompts=prompts or nb * b, acceptance=acceptance)
    knobs = Knobs(policy, b, prefill, k, m, mode, 4 if mode == "recompute" else b, 2)
    return plan_at(prof, MISTRAL, LLAMA1B if k else None, work, knobs,
                   {"attn_gpu": attn, "ffn_gpu": ffn, "kv_gpu": kv}), prof


# --- the event core ------------------------------------------------------------------------------
def test_events_are_immutable_records():
    ev = Event(1.0, 0, DONE, 0, 1)
    with pytest.raises(AttributeError):
        ev.time = 2.0


def test_priority_and_preemption_at_quantum_boundaries():
    eng = Engine()
    res = eng.resource("h2d")
    done = {}

    def mark(name):
        return lambda now: done.__setitem__(name, now)

    # A 10 s bulk copy cut every 1 s; at t=2.5 an urgent 0.5 s transfer arrives.
    bulk = Task("bulk", "h2d", res, 10.0, priority=5, quantum=1.0, on_done=mark("bulk"))
    eng.arm(bulk)
    urgent = Task("urgent", "h2d", res, 0.5, priority=0, on_done=mark("urgent"))
    gate = Task("gate", "h2d", eng.resource("gpu"), 2.5, on_done=mark("gate"))
    eng.depend(gate, urgent)
    eng.arm(urgent)
    eng.arm(gate)
    assert not eng.run()  # runs out of events (no stop flag)
    assert done["gate"] == pytest.approx(2.5)
    assert done["urgent"] == pytest.approx(3.5)  # waited for the boundary at 3.0, not for the whole copy
    assert done["bulk"] == pytest.approx(10.5)  # resumed: total service unchanged
    assert res.busy_until(100.0)["h2d"] == pytest.approx(10.5)


def test_non_preemptible_task_runs_to_completion_then_priority_order():
    eng = Engine()
    res = eng.resource("gpu")
    order = []
    first = Task("first", "gpu", res, 1.0, priority=9, on_done=lambda now: order.append(("first", now)))
    eng.arm(first)
    for name, prio in (("low", 5), ("high", 1)):
        eng.arm(Task(name, "gpu", res, 1.0, priority=prio, on_done=lambda now, n=name: order.append((n, now))))
    eng.run()
    assert order == [("first", 1.0), ("high", 2.0), ("low", 3.0)]


def test_memory_pool_records_the_first_overflow():
    pool = MemoryPool("gpu", 10.0)
    assert pool.alloc(6.0, 0.0, "a") is None
    over = pool.alloc(6.0, 1.5, "b")
    assert over is not None and over.task == "b" and over.time == 1.5 and over.excess_bytes == pytest.approx(2.0)
    pool.free(6.0, 2.0)
    assert pool.peak == 12.0 and pool.used == 6.0


# --- memory -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,k,mode,kv", [("offload-only", 0, "gpu", 0.0), ("interleaved", 2, "host", 0.25),
                                              ("serial-spec", 3, "gpu", 0.5), ("interleaved", 2, "recompute", 0.0)])
def test_memory_layout_adds_up_to_the_cost_model(policy, k, mode, kv):
    plan, prof = small_plan(policy, k=k, mode=mode, kv=kv)
    cm, knobs, pl = plan_cost_model(plan, prof)
    layout = memory_layout(cm, knobs, pl, plan)
    assert not layout.residual_error
    result = simulate(plan, prof)
    for pool in POOLS:  # every slot's KV is allocated at setup: the simulated peak is the cost model's
        assert result.report.peak_mem_bytes[pool] == pytest.approx(layout.predicted_peak[pool], rel=1e-9, abs=1.0)
        assert result.report.peak_mem_bytes[pool] == pytest.approx(plan.prediction.peak_mem_bytes[pool], rel=1e-9,
                                                                   abs=1.0)


def test_overflow_names_pool_time_task_and_amount():
    prof = load_profile("rtx4090-pcie4")
    work = Workload(prompt_len_tokens=512, gen_len_tokens=128, num_prompts=2000, acceptance=0.7)
    plan = plan_at(prof, MIXTRAL, MISTRAL, work, Knobs("interleaved", 861, 2000, 2, 1, "host", 861, 2),
                   {"attn_gpu": 18 / 32, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    assert simulate(plan, prof).ok
    bad = plan.replace(gpu_ffn_layers=32)
    result = simulate(bad, prof)
    assert not result.ok
    problem = result.problems[0]
    assert problem.kind == "overflow"
    assert result.overflow.pool == "gpu" and result.overflow.time == 0.0
    assert "resident FFN weights (32 layers)" in result.overflow.task
    msg = problem.message
    assert msg.startswith("gpu memory overflows at t=0.000 s in task 'setup: resident FFN weights (32 layers)'")
    over_gib = result.overflow.excess_bytes / 2**30
    assert f"over by {over_gib:.2f} GiB" in msg and over_gib > 60


def test_host_overflow_from_kv_names_the_kv_caches():
    plan, prof = small_plan("offload-only", b=16, k=0)
    cm, knobs, pl = plan_cost_model(plan, prof)
    layout = memory_layout(cm, knobs, pl, plan)
    weights = sum(a.nbytes for a in layout.static if a.pool == "host")
    kv = layout.kv_per_sequence["host"] * plan.sequences_in_flight
    small = prof.with_overrides({"host_mem_bytes": weights + kv / 2})  # room for half the KV caches
    result = simulate(plan, small)
    assert not result.ok and result.overflow.pool == "host"
    assert result.overflow.task == "setup: KV caches of 16 of 16 slots at full length"
    assert result.overflow.excess_bytes == pytest.approx(kv / 2)


# --- the job ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy,k", [("offload-only", 0), ("serial-spec", 3), ("interleaved", 2)])
def test_every_sequence_finishes_exactly_at_its_length_with_refill(policy, k):
    plan, prof = small_plan(policy, b=8, k=k, prompts=53, gen=20, prefill=4)
    result = simulate(plan, prof, SimOptions(seed=3))
    rep = result.report
    assert result.ok
    assert rep.sequences == 53 and rep.generated_tokens == 53 * 20
    assert rep.prefill_passes >= 53 // (8 * plan.num_batches)
    assert rep.prefill_seconds + rep.decode_seconds == pytest.approx(rep.total_seconds)
    assert rep.throughput_tokens_per_s == pytest.approx(53 * 20 / rep.total_seconds)


def test_refill_runs_right_after_the_batch_verification():
    """As in the runtime's loop: after batch X verifies, X's refill prefill runs, then the other batch
    verifies (while X drafts for its survivors and newcomers)."""
    plan, prof = small_plan("interleaved", b=8, k=2, prompts=60, gen=16, prefill=4, acceptance=0.5)
    result = simulate(plan, prof, SimOptions(seed=1))
    verify = {p: b for p, b, *_ in result.slot_log}
    refills = [(p, b) for p, b, *_ in result.prefill_log if p > min(verify)]
    assert refills
    for p, batch in refills:
        before = max(q for q in verify if q < p)
        assert verify[before] == batch
        later = [verify[q] for q in sorted(verify) if q > p]
        if later and (1 - batch) in later:
            assert later[0] == 1 - batch


def test_acceptance_statistics_match_the_workload():
    plan, prof = small_plan("serial-spec", b=64, k=4, gen=400, acceptance=0.6, m=1)
    rep = simulate(plan, prof, SimOptions(seed=5)).report
    acc = rep.acceptance
    assert acc.draft_len == 4 and len(acc.per_position) == 4
    assert all(abs(a - 0.6) < 0.03 for a in acc.per_position)
    assert acc.tokens_per_round == pytest.approx(expected_tokens((0.6,) * 4), rel=0.02)
    assert acc.useful_tokens_per_round <= acc.tokens_per_round


def test_per_position_acceptance_vector():
    prof = load_profile("rtx4090-pcie4")
    vec = (0.9, 0.7, 0.4)
    work = Workload(prompt_len_tokens=128, gen_len_tokens=300, num_prompts=64, acceptance=vec)
    plan = plan_at(prof, MISTRAL, LLAMA1B, work, Knobs("serial-spec", 64, 64, 3, 1, "gpu", 64, 2),
                   {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    acc = simulate(plan, prof, SimOptions(seed=2)).report.acceptance
    assert acc.per_position == pytest.approx(vec, abs=0.04)


def test_seeded_runs_are_deterministic():
    plan, prof = small_plan("interleaved", k=3, prompts=70)
    a = simulate(plan, prof, SimOptions(seed=11)).report
    b = simulate(plan, prof, SimOptions(seed=11)).report
    c = simulate(plan, prof, SimOptions(seed=12)).report
    assert a.total_seconds == b.total_seconds and a.acceptance == b.acceptance
    assert (a.total_seconds, a.acceptance.rounds) != (c.total_seconds, c.acceptance.rounds)


def test_deadlock_is_detected_and_explained():
    plan, prof = small_plan("offload-only", k=0, attn=0.0)

    class NeverReleases(Simulation):  # a runtime bug: buffers are never given back
        def _release_buffer(self, n, j):
            pass

    result = NeverReleases(plan, prof).run()
    assert not result.ok and result.problems[0].kind == "deadlock"
    msg = result.problems[0].message
    assert "no event pending" in msg and "0 of 2 buffer slots free" in msg


def test_sequence_that_cannot_fit_the_context_never_finishes():
    prof = load_profile("rtx4090-pcie4")
    work = Workload(prompt_len_tokens=32000, gen_len_tokens=1000, num_prompts=2, acceptance=0.7)
    plan = plan_at(prof, MISTRAL, None, work, Knobs("offload-only", 2, 2, 0, 1, "gpu", 2, 2),
                   {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    result = simulate(plan, prof)
    assert not result.ok and result.problems[0].kind == "unfinished"
    assert "32768" in result.problems[0].message


def test_trace_tracks_and_cap(tmp_path):
    plan, prof = small_plan("interleaved", k=2, mode="host", prompts=40)
    result = simulate(plan, prof, SimOptions(trace=True, trace_slots=3))
    path = tmp_path / "t.json"
    result.trace.write(path)
    import json

    data = json.loads(path.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert {"gpu", "h2d", "d2h", "cpu-attn"} <= names
    slices = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert slices and max(e["args"]["pass"] for e in slices) < 3
    assert any(e["name"].startswith("qkv L0 mb0 B0") for e in slices)
    assert any(e["ph"] == "C" and e["name"].startswith("mem gpu") for e in data["traceEvents"])
    assert "first 3 of" in " ".join(data["otherData"]["notes"])


def test_planner_package_never_imports_torch():
    code = ("import sys, specoffload.planner.sim, specoffload.planner.sim.cli, specoffload.planner.sim.sweep;"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_live_batch_sizes_shrink_in_the_tail():
    plan, prof = small_plan("serial-spec", b=32, k=3, gen=40, acceptance=0.6, m=1)
    result = simulate(plan, prof, SimOptions(seed=4))
    live = [n for *_, n in result.slot_log]
    assert live[0] == 32 and live[-1] < 32 and np.all(np.diff(live) <= 0)
    spans = [end - start for _, _, start, end, _ in result.slot_log]
    assert spans[-1] < max(spans)  # fewer sequences: cheaper attention in the tail
