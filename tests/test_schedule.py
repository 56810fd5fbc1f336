"""One statement of the schedule (planner/schedule.py): its rules, and the engine and the simulator taking
the same steps for the same plan."""
from __future__ import annotations

import dataclasses

import pytest

from specoffload.planner.schedule import (DRAFT, REFILL, VERIFY, RoundRobin, admit_count, draft_step_layers,
                                          prefill_chunks, schedule_for)
from specoffload.planner.schema import Plan, Prediction, Workload

PRED = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)


def test_admission_rule():
    assert admit_count(free=4, waiting=10, prefill_batch=2, live=True) == 4
    assert admit_count(free=5, waiting=10, prefill_batch=2, live=True) == 4  # whole chunks; 1 row waits
    assert admit_count(free=150, waiting=1000, prefill_batch=128, live=True) == 128
    assert admit_count(free=300, waiting=1000, prefill_batch=128, live=True) == 256
    assert admit_count(free=150, waiting=150, prefill_batch=128, live=True) == 150  # the last prompts
    assert admit_count(free=150, waiting=1000, prefill_batch=128, live=False) == 150  # idle: all it can
    assert admit_count(free=1, waiting=10, prefill_batch=2, live=True) == 0  # less than a chunk, batch busy
    assert admit_count(free=1, waiting=10, prefill_batch=2, live=False) == 1  # an idle batch takes what it can
    assert admit_count(free=3, waiting=1, prefill_batch=2, live=True) == 1  # the last prompts: a short chunk
    assert admit_count(free=0, waiting=5, prefill_batch=2, live=False) == 0
    assert admit_count(free=5, waiting=0, prefill_batch=2, live=False) == 0
    assert prefill_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert prefill_chunks(0, 2) == []
    assert draft_step_layers(32, 4) == 8 and draft_step_layers(4, 8) == 1 and draft_step_layers(4, 0) == 4


class Script:
    """A ScheduleView over scripted batches: verifying a batch finishes its sequences after `rounds`
    verifications; a refill admits up to `size` of the waiting prompts."""

    def __init__(self, batches: int, size: int, prompts: int, rounds: int):
        self.left = [0] * batches
        self.size, self.waiting_n, self.rounds = size, prompts, rounds

    def live(self, g):
        return self.left[g] > 0

    def waiting(self):
        return self.waiting_n > 0

    def take(self, step):
        if step.op == REFILL and not self.live(step.batch):
            n = min(self.size, self.waiting_n)
            self.waiting_n -= n
            self.left[step.batch] = self.rounds if n else 0
        elif step.op == VERIFY:
            assert self.live(step.batch), "verified an idle batch"
            self.left[step.batch] -= 1


def run_script(schedule, view, limit=1000):
    out = []
    for step in schedule.steps(view):
        view.take(step)
        out.append(str(step))
        assert len(out) < limit, "the schedule does not end"
    return out


def test_round_robin_orders():
    serial = run_script(RoundRobin(1, 2), Script(1, size=2, prompts=3, rounds=2))
    assert serial == ["refill 0", "draft 0", "verify 0", "refill 0", "draft 0", "verify 0",  # first wave
                      "refill 0", "draft 0", "verify 0", "refill 0", "draft 0", "verify 0",  # the last prompt
                      "refill 0", "draft 0"]
    offload = run_script(RoundRobin(1, 0), Script(1, size=2, prompts=2, rounds=1))
    assert offload == ["refill 0", "verify 0", "refill 0"]
    inter = run_script(RoundRobin(2, 3), Script(2, size=2, prompts=4, rounds=2))
    # While one batch verifies, the other's draft round (issued after its refill) runs alongside.
    assert inter[:8] == ["refill 0", "draft 0", "refill 1", "draft 1", "verify 0", "refill 0", "draft 0", "verify 1"]
    assert inter.count("verify 0") == 2 and inter.count("verify 1") == 2
    # An idle batch is refilled on its turn when prompts wait; nothing live and nothing waiting ends it.
    late = run_script(RoundRobin(2, 1), Script(2, size=1, prompts=3, rounds=1))
    assert late.count("verify 0") + late.count("verify 1") == 3
    assert isinstance(schedule_for(2, 1), RoundRobin)


def test_sequences_finishing_at_prefill_do_not_stop_the_schedule():
    class AllDoneAtPrefill(Script):
        def take(self, step):
            if step.op == REFILL:
                self.waiting_n -= min(self.size, self.waiting_n)  # admitted and finished at once

    steps = run_script(RoundRobin(2, 1), AllDoneAtPrefill(2, size=2, prompts=9, rounds=1))
    assert VERIFY not in {s.split()[0] for s in steps} and steps.count("refill 0") + steps.count("refill 1") >= 5


# -- the engine and the simulator take the same steps --------------------------------------------------
def make_plan(policy, batch, k, prefill, prompts, gen, acceptance) -> Plan:
    from specoffload.planner.models import load_model_spec

    return Plan(policy=policy, model="tiny-target", model_fingerprint=load_model_spec("tiny-target").fingerprint,
                draft="tiny-draft" if k else "", draft_fingerprint=load_model_spec("tiny-draft").fingerprint if k else "", profile="cpu-2core", profile_fingerprint="",
                workload=Workload(prompt_len_tokens=8, gen_len_tokens=gen, num_prompts=prompts,
                                  acceptance=acceptance, max_prompt_len_tokens=64),
                decode_batch=batch, num_batches=2 if policy == "interleaved" else 1, prefill_batch=prefill,
                draft_sub_batch=1, draft_len=k, micro_batches=1, gpu_attn_layers=0, gpu_ffn_layers=0,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv="gpu", weight_buffers=2, prediction=PRED)


CASES = [  # policy, batch, k, prefill batch, prompts, generated tokens, acceptance (0 or 1: no chance)
    ("interleaved", 2, 2, 1, 7, 5, 1.0),
    ("interleaved", 3, 1, 2, 4, 4, 0.0),
    ("serial-spec", 3, 2, 2, 7, 6, 0.0),
    ("offload-only", 2, 0, 1, 5, 3, 0.0),
    ("serial-spec fused", 3, 2, 1, 7, 6, 1.0),  # fused prefill: refill chunks ride in verifications
    ("offload-only fused", 2, 0, 1, 5, 3, 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0].replace(' ', '-')}-b{c[1]}-k{c[2]}-n{c[4]}" for c in CASES])
def test_engine_and_simulator_take_the_same_steps(case, one_torch_thread):
    from specoffload.planner.sim import simulate
    from specoffload.runtime.engine import Engine, Request
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    policy, batch, k, prefill, n, gen, acc = case
    policy, fused = policy.split()[0], policy.endswith(" fused")
    plan = make_plan(policy, batch, k, prefill, n, gen, acc).replace(fuse_prefill=fused)
    sim = simulate(plan, "cpu-2core")
    assert sim.ok, sim.problems
    target, draft = tiny_pair_paths()
    eng = Engine(plan, target, draft if k else None, device="cpu", synthetic_acceptance=acc if k else None)
    eng.eos = set()  # every sequence runs to its length, as the simulator's do
    done = []
    eng.run([Request(f"r{i}", [1 + i, 2, 3, 4, 5][: 2 + i % 4], gen) for i in range(n)], done.append)
    assert len(done) == n and all(len(f.tokens) == gen for f in done)
    steps = tuple(eng.schedule_log)
    assert steps == sim.schedule_log
    # The run is not trivial: every batch verified, refills after the first fill admitted prompts.
    assert {g for op, g, _ in steps if op == VERIFY} == set(range(plan.num_batches))
    assert sum(m for op, _, m in steps if op == REFILL) == n
    assert (DRAFT in {op for op, *_ in steps}) == bool(k)
    if fused:  # chunks rode in verifications: one sweep of its own at the start, the engine and simulator agree
        assert eng.stats.fused_passes > 0 and eng.stats.prefill_passes == 1
        assert eng.stats.fused_passes == sim.report.fused_passes
    # ... and a different plan's steps differ (the comparison can fail).
    other = simulate(dataclasses.replace(plan, **({"prefill_batch": prefill + 1} if fused else
                                                  {"decode_batch": batch + 1})), "cpu-2core")
    assert other.schedule_log != steps


def test_step_logs_are_bounded(monkeypatch):
    from specoffload.planner import schedule

    monkeypatch.setattr(schedule, "LOG_STEPS", 3)
    log = []
    for i in range(5):
        schedule.log_step(log, VERIFY, 0, i)
    assert log == [(VERIFY, 0, 0), (VERIFY, 0, 1), (VERIFY, 0, 2)]


def test_refills_under_speculation_prefill_whole_chunks():
    """Rows free a few at a time when acceptance is random; refills still prefill whole chunks, so the
    prefill sweeps are the prompts over the chunk size (the closed form's count), not one more short
    chunk per refill."""
    from specoffload.planner.sim import simulate

    plan = make_plan("serial-spec", 40, 3, 8, 200, 12, 0.7)
    sim = simulate(plan, "cpu-2core")
    assert sim.ok, sim.problems
    refills = [m for op, _, m in sim.schedule_log if op == REFILL]
    assert sum(refills) == 200 and len(refills) > 10  # many refills, rows freed at many different times
    assert all(m % 8 == 0 for m in refills)
    assert sim.report.prefill_passes == 200 // 8


def test_a_prefill_batch_above_a_quarter_of_the_batch_does_not_drain_it():
    from specoffload.planner.schedule import refill_rows
    from specoffload.planner.sim import simulate

    assert refill_rows(1000) == 250 and refill_rows(3) == 1
    assert admit_count(free=300, waiting=5000, prefill_batch=2048, live=True, capacity=1000) == 300
    assert admit_count(free=200, waiting=5000, prefill_batch=2048, live=True, capacity=1000) == 0
    assert admit_count(free=200, waiting=5000, prefill_batch=2048, live=True) == 0  # no capacity: no cap
    # A hand-made plan whose prefill batch exceeds its decode batch: refills come while the batch works
    # (before the cap it admitted nothing until the batch had drained).
    plan = make_plan("serial-spec", 40, 3, 64, 200, 12, 0.7)
    sim = simulate(plan, "cpu-2core")
    assert sim.ok, sim.problems
    verifying = set()
    refilled_live = 0
    for op, g, m in sim.schedule_log:
        if op == VERIFY:
            verifying.add(g)
        elif op == REFILL and verifying and m < 40:
            refilled_live += 1
    assert refilled_live > 5


def test_the_planner_gives_speculative_plans_refill_sized_prefill_batches():
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.planner import make_plan as plan_job
    from specoffload.planner.schedule import refill_rows
    from specoffload.planner.schema import load_profile

    wl = Workload(prompt_len_tokens=77, gen_len_tokens=128, num_prompts=20000, acceptance=0.7)
    plan = plan_job(load_profile("h200-24g"), load_model_spec("mixtral-8x7b"),
                    load_model_spec("eagle-mixtral-8x7b"), wl, policy="serial-spec").plan
    assert plan.draft_len > 0
    assert plan.prefill_batch <= refill_rows(plan.decode_batch)
    # The grid itself: a speculative batch of 1539 tries prefill batches up to 384, offload-only all.
    import dataclasses
    from specoffload.planner.planner import Planner, knobs_from_plan

    planner = Planner(load_profile("h200-24g"), load_model_spec("mixtral-8x7b"),
                      load_model_spec("eagle-mixtral-8x7b"), wl)
    knobs = dataclasses.replace(knobs_from_plan(plan), decode_batch=1539)
    assert max(planner.prefill_grid(knobs)) == 256
    assert max(planner.prefill_grid(dataclasses.replace(knobs, draft_len=0, policy="offload-only"))) == 4096


def test_the_closed_form_counts_rows_waiting_for_a_whole_chunk():
    """Refills take whole chunks, so a speculative batch runs about (bp - 1) / 2 rows short; rows of an
    offload-only batch free together and none wait. Checked against the simulated schedule."""
    import dataclasses
    from specoffload.planner.costmodel import CostModel
    from specoffload.planner.planner import knobs_from_plan
    from specoffload.planner.schema import load_profile
    from specoffload.planner.models import load_model_spec
    from specoffload.planner.sim import simulate

    plan = make_plan("serial-spec", 128, 3, 32, 2560, 32, 0.7)
    cm = CostModel(load_profile("cpu-2core"), load_model_spec("tiny-target"), load_model_spec("tiny-draft"),
                   plan.workload)
    knobs = knobs_from_plan(plan)
    with_wait, _ = cm.decode_steps(knobs)
    without, _ = cm.decode_steps(dataclasses.replace(knobs, prefill_batch=1))
    assert with_wait > without * 1.05
    sim = simulate(plan, "cpu-2core")
    assert sim.ok, sim.problems
    verifications = sum(1 for op, *_ in sim.schedule_log if op == VERIFY)
    assert abs(verifications - with_wait) < abs(verifications - without)
    off = dataclasses.replace(knobs, policy="offload-only", draft_len=0)
    assert cm.decode_steps(off) == cm.decode_steps(dataclasses.replace(off, prefill_batch=1))


def test_simulation_progress_without_a_terminal_is_whole_lines(monkeypatch, capsys):
    """Piped to a log, the simulator's progress is a whole line now and then, not a carriage-return
    bar rewritten thousands of times."""
    import dataclasses
    from specoffload.planner.sim import SimOptions, simulate
    from specoffload.planner.sim import simulator

    ticks = iter(range(0, 10**9, 2))  # wall clock: 2 s per reading
    monkeypatch.setattr(simulator.time, "perf_counter", lambda: float(next(ticks)))
    monkeypatch.setattr(simulator, "PROGRESS_LOG_S", 3.0)
    plan = make_plan("serial-spec", 40, 3, 8, 20000, 12, 0.7)  # ~47000 events: checked every 8192
    sim = simulate(plan, "cpu-2core", dataclasses.replace(SimOptions(), progress=True))
    assert sim.ok, sim.problems
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [x for x in err.splitlines() if "simulating:" in x]
    assert 2 <= len(lines) < sim.events // 8192  # every other check: 3 s apart at 2 s per check
    assert all(x.strip().startswith("simulating:") for x in lines)
