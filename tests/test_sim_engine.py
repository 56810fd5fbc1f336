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
from specoffload.planner.sim.engine import DONE, Engine, Event, MemoryPool, SimulationError, Task
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


def test_simulated_time_is_monotone_and_completions_are_exact():
    """Tasks with mixed durations and dependencies on three resources: completions are seen in time
    order, each at max(its predecessors' ends, its resource free) + its duration, worked out here."""
    eng = Engine()
    res = [eng.resource(n) for n in ("gpu", "h2d", "d2h")]
    rng = np.random.default_rng(5)
    seen, tasks, ends = [], [], []
    for i in range(60):
        r = int(rng.integers(0, 3))
        dur = float(rng.choice([0.5, 1.0, 1.25, 3.0]))
        preds = [int(x) for x in rng.choice(i, size=min(i, 2), replace=False)] if i else []
        t = Task(f"t{i}", "gpu", res[r], dur, priority=i, on_done=lambda now, i=i: seen.append((now, i)))
        for p in preds:
            eng.depend(tasks[p], t)
        tasks.append(t)
        ends.append((r, dur, preds))
    for t in tasks:
        eng.arm(t)
    eng.run()
    times = [now for now, _ in seen]
    assert len(seen) == 60 and times == sorted(times)
    # Replay: a resource serves ready tasks by priority (= index here), so in index order per resource
    # once ready; check each completion against its predecessors and its own duration.
    done = dict((i, now) for now, i in seen)
    for i, (r, dur, preds) in enumerate(ends):
        assert done[i] >= max([done[p] for p in preds], default=0.0) + dur - 1e-12


def test_the_event_loop_refuses_to_go_back_in_time():
    eng = Engine()
    res = eng.resource("gpu")
    eng.arm(Task("a", "gpu", res, 1.0))
    eng.run()
    eng._heap.append(Event(0.5, eng.seq(), DONE, 0, 99))  # an event stamped before the current time
    with pytest.raises(SimulationError, match="went backwards"):
        eng.run()


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
    # At full occupancy (every part, every slot's KV at full length) the layout is the cost model's peak.
    nb, b, g = plan.num_batches, plan.decode_batch, plan.gpu_kv_sequences
    for pool in POOLS:
        full = (sum(a.nbytes for a in layout.static if a.pool == pool)
                + nb * (b - g) * layout.kv_per_sequence.get(pool, 0.0) + nb * g * layout.kv_per_gpu_sequence.get(pool, 0.0))
        assert full == pytest.approx(layout.predicted_peak[pool], rel=1e-9, abs=1.0)
        assert layout.predicted_peak[pool] == pytest.approx(plan.prediction.peak_mem_bytes[pool], rel=1e-9, abs=1.0)
    # Over a run the use stays at or below that peak, and rises above what lives for the whole run.
    result = simulate(plan, prof)
    rep = result.report
    for pool in POOLS:
        static = sum(a.nbytes for a in layout.static if a.pool == pool and a.kind == "static")
        assert rep.peak_mem_bytes[pool] <= layout.predicted_peak[pool] * (1 + 1e-9) + 1.0
        if layout.kv_per_sequence.get(pool) or any(a.pool == pool and a.kind != "static" for a in layout.static):
            assert rep.peak_mem_bytes[pool] > static
        assert len(rep.mem_over_time[pool]) == 20 and max(rep.mem_over_time[pool]) == pytest.approx(
            rep.peak_mem_bytes[pool])
        assert 0.0 <= rep.peak_mem_seconds[pool] <= rep.total_seconds


def _run_sim(plan, prof, **opt):
    sim = Simulation(plan, prof, SimOptions(**opt))
    return sim, sim.run()


def test_kv_grows_as_sequences_generate_and_is_freed_at_finish():
    plan, prof = small_plan("offload-only", b=8, k=0, prompts=24, gen=20, prefill=8)
    sim, result = _run_sim(plan, prof)
    assert result.ok
    host = sim.pools["host"]
    static = sum(a.nbytes for a in sim.layout.static if a.pool == "host" and a.kind == "static")
    per_token = sim.layout.kv_per_sequence["host"] / sim.cm.ctx_max
    # Each verification keeps one token per live sequence: the use climbs in steps of 8 tokens' KV.
    uses = [u for _, u in host.history]
    steps = np.diff(uses)
    assert np.sum(np.isclose(steps, 8 * per_token, rtol=1e-9)) >= 10
    # The peak: 8 sequences, prompt + all 20 tokens (the last kept token is freed with its sequence).
    assert host.peak == pytest.approx(static + 8 * (128 + 20) * per_token, rel=1e-9)
    # Freed at finish and refill: use drops three times (three waves of 8), and nothing is left at the end.
    assert np.sum(steps < -per_token) >= 3
    assert host.used == pytest.approx(static, rel=1e-12)
    times = [t for t, _ in host.history]
    assert times == sorted(times) and times[-1] <= result.report.total_seconds


def test_weight_buffers_are_taken_per_copy_and_released():
    plan, prof = small_plan("serial-spec", b=8, k=2, prompts=8, gen=6, attn=0.5)
    sim, result = _run_sim(plan, prof)
    assert result.ok
    layout = sim.layout
    gpu_static = sum(a.nbytes for a in layout.static if a.pool == "gpu" and a.kind == "static")
    buffers = next(a.nbytes for a in layout.static if a.kind == "buffers")
    gpu = sim.pools["gpu"]
    # At the end only the copies the stream prefetched for a sweep that never came still hold buffers.
    assert gpu.used == pytest.approx(gpu_static + sum(sim.buffer_taken.values()), rel=1e-12)
    assert gpu_static < gpu.peak <= gpu_static + buffers * (1 + 1e-12) + 1  # never more than the buffers hold
    ups = sum(1 for (_, a), (_, b_) in zip(gpu.history, gpu.history[1:]) if b_ > a)
    downs = sum(1 for (_, a), (_, b_) in zip(gpu.history, gpu.history[1:]) if b_ < a)
    streamed = sum(sim.attn_streamed) + sum(sim.ffn_streamed) > 0
    assert streamed and ups >= sim.L and downs >= sim.L


def test_kv_overflow_is_reported_when_it_happens():
    plan, prof = small_plan("offload-only", b=16, k=0, prompts=16, gen=40)
    cm, knobs, pl = plan_cost_model(plan, prof)
    layout = memory_layout(cm, knobs, pl, plan)
    static = sum(a.nbytes for a in layout.static if a.pool == "host" and a.kind == "static")
    per_token = layout.kv_per_sequence["host"] / cm.ctx_max
    # Room for the prompts and 20 generated tokens of each of the 16 sequences, not 40.
    small = prof.with_overrides({"host_mem_bytes": static + 16 * (128 + 20.5) * per_token})
    result = simulate(plan, small)
    assert not result.ok and result.overflow.pool == "host"
    assert result.overflow.time > 0 and "KV caches: tokens kept by a verification" in result.overflow.task
    assert result.report.generated_tokens >= 16 * 20
    assert result.problems[0].message.startswith(f"host memory overflows at t={result.overflow.time:.3f} s")


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
