"""The simulator against the cost model's closed form in steady state, and where they differ by design.

Steady state: acceptance 1 (every round yields k+1 tokens, so all sequences advance together), no
refill (prompts = sequences in flight), the cost model's average context for every verification
(SimOptions(context="average")), slot time = mean verification of a full batch in the middle of the run.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specoffload.planner.costmodel import Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import SimOptions, simulate
from specoffload.planner.sim.predict import plan_cost_model
from specoffload.planner.sim.scenario import plan_at

MODELS = {"mixtral": ("mixtral-8x7b", "mistral-7b"), "mistral": ("mistral-7b", "llama-3.2-1b")}
PROFILES = ["rtx4090-pcie3", "rtx4090-pcie4", "l4", "t4", "h200-24g"]
SPECS = {name: load_model_spec(name) for pair in MODELS.values() for name in pair}


def closed_form(plan, profile):
    """The closed form's candidates for the slot: {resource or chainN: seconds} (StepTerms.bounds plus the
    serial part; a stream's two bounds as one), the serial part, the slot (their max), and one streamed
    layer's copy seconds."""
    cm, knobs, pl = plan_cost_model(plan, profile)
    terms = cm.slot_terms(knobs)
    slot, _ = cm.slot_seconds(terms, pl)
    cands: dict[str, float] = {}
    for r, f in terms.bounds().items():
        r = r.split(":")[0]
        cands[r] = max(cands.get(r, -math.inf), f.at(pl) + terms.serial_total)
    layer = cm.h2d_seconds(cm.t.attn_bytes_per_layer) + cm.h2d_seconds(
        cm.ffn_streamed_bytes(knobs.decode_batch * (knobs.draft_len + 1)))
    return cands, terms.serial_total, slot, layer


def steady_case(model, profile, policy, b, k, m, mode, sub, attn_gpu, kv_gpu, prompt, h2d_scale=1.0, cpu_scale=1.0):
    target, draft = (SPECS[n] for n in MODELS[model])
    prof = load_profile(profile)
    prof = prof.with_overrides({"h2d_bytes_per_s": prof.h2d_pinned_bytes_per_s.peak * h2d_scale,
                                "cpu_attn_kv_read_bytes_per_s": prof.cpu_attn_kv_read_bytes_per_s * cpu_scale})
    nb = 2 if policy == "interleaved" else 1
    work = Workload(prompt_len_tokens=prompt, gen_len_tokens=16 * (k + 1), num_prompts=nb * b, acceptance=1.0)
    knobs = Knobs(policy, b, b, k, m, mode, sub if mode == "recompute" else b, 2)
    plan = plan_at(prof, target, draft if k else None, work, knobs, {"attn_gpu": attn_gpu, "ffn_gpu": 0.0,
                                                                      "kv_gpu": kv_gpu})
    return plan, prof


@st.composite
def cases(draw):
    policy = draw(st.sampled_from(["offload-only", "serial-spec", "interleaved"]))
    k = 0 if policy == "offload-only" else draw(st.integers(1, 4))
    b = draw(st.sampled_from([4, 16, 64, 256]))
    return dict(model=draw(st.sampled_from(sorted(MODELS))), profile=draw(st.sampled_from(PROFILES)), policy=policy,
                b=b, k=k, m=draw(st.sampled_from([x for x in (1, 2, 4) if x <= b])),
                mode="gpu" if k == 0 else draw(st.sampled_from(["gpu", "host", "recompute"])),
                sub=min(b, draw(st.sampled_from([1, 4, 16]))), attn_gpu=draw(st.sampled_from([0.0, 0.5, 1.0])),
                kv_gpu=draw(st.sampled_from([0.0, 0.5])), prompt=draw(st.sampled_from([128, 512])),
                h2d_scale=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0])),
                cpu_scale=draw(st.sampled_from([0.25, 1.0, 4.0])))


def check_agreement(case):
    """Simulated steady-state slot vs the closed form; returns the relative difference (None: no fit).

    Strict (within 2%) when one bound clearly dominates (by >= 10% over the runner-up) or with one
    micro-batch. Differences by design, each asserted with its own bound:
    - bounds within 10% of each other: the pipeline couples them (a copy waits for a buffer, compute for
      a copy), up to +5%;
    - interleaved with the draft's KV on the host: each draft step is a gpu -> d2h -> cpu -> h2d chain,
      and the holes it leaves on the busy resources are only partly filled by the target (paced by its
      own chain). Measured (52 drawn cases with a fixed seed, plus the cases that first showed it):
      within +0.9% when one resource bound dominates by >= 10% and the layer chain does not bind,
      except one case at +4.4% with the CPU binding by 21%; +9.1% and +9.6% when the layer chain
      binds, +10% with near-balanced bounds. Asserted: +5% in the first case, +12% in the others (a
      simulation slower than the closed form by more is a disagreement to explain, not a tolerance);
    - serial-spec: none now. The closed form credits the next sweep's first weight_buffers layers, which the
      stream copies while the draft runs (StepTerms.bounds, CostModel.serial_overlap); measured over 89
      drawn serial-spec cases (three seeds) where no chain with m > 1 binds: -0.3% .. +1.0%, so the usual
      bounds apply (tests/test_serial_overlap.py has the hand-computed slot and the preset plans);
    - the layer chain with m > 1 micro-batches assumes every layer fills and drains its pipeline; layers
      overlap in the simulation, so there the closed form is an upper bound: measured -6.4% and -11.7%
      (the 52 drawn cases); asserted down to -20% (the measured spread with margin: a bound found by
      measurement, not derived), and never above the usual upper bound.
    """
    plan, prof = steady_case(**case)
    result = simulate(plan, prof, SimOptions(context="average"))
    if not result.ok:  # a hand-built point that does not fit in memory: nothing to compare
        assert result.problems[0].kind == "overflow"
        return None
    sim = result.steady_slot_seconds()
    cands, _, slot, _ = closed_form(plan, prof)
    assert slot == pytest.approx(plan.prediction.slot_seconds, rel=1e-9)
    diff = sim / slot - 1
    ranked = sorted(cands.values(), reverse=True)
    clear = len(ranked) < 2 or ranked[0] >= 1.10 * ranked[1]
    chain_binds = max(v for k, v in cands.items() if k.startswith("chain")) >= ranked[0]
    upper = 0.02 if (clear or plan.micro_batches == 1) else 0.05
    if plan.policy == "interleaved" and plan.draft_kv == "host":
        upper = 0.05 if (clear and not chain_binds) else 0.12
    lower = -0.02
    if chain_binds and plan.micro_batches > 1:
        lower = min(lower, -0.20)
    assert lower <= diff <= upper, (case, sim, slot, cands)
    return diff


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_steady_state_slot_agrees_with_closed_form(case):
    check_agreement(case)


@pytest.mark.parametrize("policy,k,mode,m", [("offload-only", 0, "gpu", 1), ("offload-only", 0, "gpu", 4),
                                             ("interleaved", 3, "gpu", 2), ("interleaved", 2, "recompute", 1),
                                             ("interleaved", 2, "host", 1), ("serial-spec", 2, "gpu", 2)])
def test_steady_state_mixtral_cases(policy, k, mode, m):
    check_agreement(dict(model="mixtral", profile="rtx4090-pcie4", policy=policy, b=64, k=k, m=m, mode=mode, sub=8,
                         attn_gpu=0.5, kv_gpu=0.0, prompt=512))


def test_cpu_only_shared_device_agrees_exactly():
    target = SPECS["mistral-7b"]
    prof = load_profile("rtx4090-pcie4").with_overrides({
        "device_kind": "cpu", "gpu_matmul_flops_per_s": 2e12, "gpu_mem_bandwidth_bytes_per_s": 100e9,
        "gpu_mem_bytes": 400e9, "gpu_mem_reserve_bytes": 0})
    work = Workload(prompt_len_tokens=128, gen_len_tokens=24, num_prompts=32, acceptance=1.0)
    # weight_buffers=1: Plan requires >= 1 (the planner's CPU-only knobs say 0; see the report to the lead).
    plan = plan_at(prof, target, None, work, Knobs("offload-only", 32, 32, 0, 2, "gpu", 32, 1),
                   {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": 0.0})
    result = simulate(plan, prof, SimOptions(context="average"))
    assert result.ok
    rep = result.report
    assert result.steady_slot_seconds() == pytest.approx(plan.prediction.slot_seconds, rel=1e-6)
    # One shared device: gpu and cpu-attention work never overlap, and no copies happen.
    assert rep.busy_fraction["gpu"] + rep.busy_fraction["cpu"] <= 1.0 + 1e-9
    assert rep.busy_fraction["h2d"] == rep.busy_fraction["d2h"] == 0.0
    assert rep.peak_mem_bytes["gpu"] == 0.0 and rep.peak_mem_bytes["host"] > 0


# --- where the simulation differs from the closed form by design (pinned, so a change is noticed) ----
def mixtral_offload(residency="prefix"):
    target = SPECS["mixtral-8x7b"]
    prof = load_profile("rtx4090-pcie4")
    work = Workload(prompt_len_tokens=512, gen_len_tokens=32, num_prompts=2000, acceptance=0.7)
    plan = plan_at(prof, target, None, work, Knobs("offload-only", 2000, 2000, 0, 1, "gpu", 2000, 2),
                   {"attn_gpu": 1 / 32, "ffn_gpu": 6 / 32, "kv_gpu": 0.0})
    return plan, simulate(plan, prof, SimOptions(context="average", residency=residency))


def test_finding_resident_prefix_starves_the_copy_engine():
    """The planner's Mixtral offload-only plan keeps FFN layers 0..5 resident. With two layer buffers
    the copy engine cannot run more than two layers ahead, so it idles while layers 0..5 compute
    (~0.45 s per sweep): the closed form (H2D always busy) is ~15% optimistic. The same number of
    resident layers spread evenly removes most of the gap."""
    plan, prefix = mixtral_offload("prefix")
    _, spread = mixtral_offload("spread")
    closed = plan.prediction.slot_seconds
    assert 1.10 < prefix.steady_slot_seconds() / closed < 1.20
    assert spread.steady_slot_seconds() / closed < 1.03


def test_live_contexts_track_the_average_context():
    """With live contexts the slot grows with the context; its mean over the run is close to the
    average-context slot (the cost model's ctx_avg = prompt + gen/2)."""
    plan, prof = steady_case("mistral", "rtx4090-pcie4", "offload-only", 64, 0, 1, "gpu", 1, 0.0, 0.0, 512,
                             h2d_scale=4.0, cpu_scale=0.25)  # CPU-attention bound: the slot scales with context
    live = simulate(plan, prof, SimOptions(context="live"))
    avg = simulate(plan, prof, SimOptions(context="average"))
    spans = [end - start for _, _, start, end, _ in live.slot_log]
    assert spans[-1] > spans[1] * 1.01  # later verifications read longer contexts
    assert sum(spans[1:]) / len(spans[1:]) == pytest.approx(avg.steady_slot_seconds(), rel=0.03)


def test_fixed_sample_of_one_micro_batch_plans_within_two_percent():
    """A fixed sample (one micro-batch, GPU-KV or no draft): every case within 2% of the closed form."""
    import random

    rng = random.Random(7)
    diffs = []
    for _ in range(12):
        b = rng.choice([4, 16, 64])
        policy = rng.choice(["offload-only", "interleaved"])
        k = 0 if policy == "offload-only" else rng.randint(1, 3)
        case = dict(model=rng.choice(sorted(MODELS)), profile=rng.choice(PROFILES), policy=policy, b=b, k=k,
                    m=1, mode="gpu", sub=1, attn_gpu=rng.choice([0.0, 1.0]), kv_gpu=0.0, prompt=128)
        d = check_agreement(case)
        if d is not None:
            diffs.append(d)
    assert diffs and max(abs(d) for d in diffs) <= 0.02
    assert math.isfinite(sum(diffs))
