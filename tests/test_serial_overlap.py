"""Serial-spec: the weight stream runs on through the draft round, and the closed form credits it.

The decode step is max(StepTerms.bounds) + serial part. For the copy engine the bounds are busy + own
use of the serial part (the stream alone) and busy - (copies of the next sweep's first weight_buffers
layers - the window's non-serial part), so a serial draft round hides under the copies it overlaps.
"""
from __future__ import annotations

import pytest

from specoffload.planner.costmodel import CostModel, Knobs, Linear, StepTerms
from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import make_plan
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import SimOptions, simulate
from specoffload.planner.sim.predict import plan_cost_model
from specoffload.planner.sim.scenario import plan_at

ALL_STREAMED_KV_GPU = {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 1.0, "disk": 0.0}


def terms(gpu=2.0, h2d=10.0, ahead=1.2, own=0.25, serial=1.5, host=0.5):
    busy = {"gpu": Linear.of(gpu), "cpu": Linear.of(3.0), "h2d": Linear.of(h2d), "d2h": Linear.of(1.0)}
    return StepTerms(busy, (Linear.of(4.0),), serial, 10.0, False, host, {"h2d": (own, Linear.of(ahead))})


def step(t: StepTerms) -> tuple[float, str]:
    cm = CostModel.__new__(CostModel)  # step_seconds reads only the terms
    return cm.step_seconds(t, ALL_STREAMED_KV_GPU)


def test_bounds_by_hand():
    # serial part 1.5 + 0.5 = 2; copies: 10 s busy, 1.2 s of the next sweep fit in the buffers.
    b = {r: f.at(ALL_STREAMED_KV_GPU) for r, f in terms().bounds().items()}
    assert b == pytest.approx({"gpu": 2.0, "cpu": 3.0, "h2d": 8.25, "h2d:serial": 8.8, "d2h": 1.0, "chain0": 4.0})
    assert step(terms()) == (pytest.approx(10.8), "h2d")  # 10 + (2 - 1.2): the stream idles 0.8 s
    assert step(terms(ahead=3.0)) == (pytest.approx(10.25), "h2d")  # the round hides: busy + own use
    assert step(terms(ahead=0.0)) == (pytest.approx(12.0), "h2d")  # nothing buffered: all of it on top
    assert step(terms(gpu=9.5)) == (pytest.approx(11.5), "gpu")  # the GPU waits for the round regardless
    no_overlap = StepTerms(terms().busy, (Linear.of(4.0),), 1.5, 10.0, False, 0.5)
    assert step(no_overlap) == (pytest.approx(12.0), "h2d")  # interleaved / offload-only: nothing credited


def test_serial_spec_slot_on_a_hand_computable_profile():
    """Mistral-7B, every layer streamed, all KV on the GPU (no attention copies), H2D a flat 10 GB/s: the
    copies take L x layer bytes / 1e10, and the draft round hides behind two layers' copies less the
    window's two layers of GPU work and the LM head."""
    prof = load_profile("rtx4090-pcie4").with_overrides({"h2d_bytes_per_s": 1e10})
    t, d = load_model_spec("mistral-7b"), load_model_spec("llama-3.2-1b")
    b, k = 16, 3
    work = Workload(prompt_len_tokens=128, gen_len_tokens=64, num_prompts=b, acceptance=0.7)
    cm = CostModel(prof, t, d, work)
    knobs = Knobs("serial-spec", b, b, k, 1, "gpu", b, 2)
    st = cm.step_terms(knobs)
    L, layer = t.num_layers, t.attn_bytes_per_layer + t.ffn_bytes_per_layer
    h2d = st.busy["h2d"].at(ALL_STREAMED_KV_GPU)
    assert h2d == pytest.approx(L * layer / 1e10, rel=1e-12)
    serial = sum(cm.draft_round(knobs, b).values()) + cm.host_pass_seconds(b)
    assert st.serial_total == pytest.approx(serial, rel=1e-12)
    gpu = st.busy["gpu"].at(ALL_STREAMED_KV_GPU)
    lm = cm.lm_head_seconds(t, b * (k + 1))
    window = lm + 2 * (gpu - lm) / L  # the last layer, the LM head, the next pass's first layer
    own, ahead = st.serial_overlap["h2d"]
    assert own == 0.0 and ahead.at(ALL_STREAMED_KV_GPU) == pytest.approx(2 * layer / 1e10 - window, rel=1e-12)
    slot, binding = cm.step_seconds(st, ALL_STREAMED_KV_GPU)
    assert binding == "h2d" and h2d > gpu + serial  # the copies bind
    assert slot == pytest.approx(h2d + max(0.0, serial + window - 2 * layer / 1e10), rel=1e-12)
    assert slot < h2d + serial  # less than the whole round on top of the copies


def test_interleaved_and_offload_only_get_no_credit():
    prof = load_profile("rtx4090-pcie4")
    t, d = load_model_spec("mistral-7b"), load_model_spec("llama-3.2-1b")
    cm = CostModel(prof, t, d, Workload(prompt_len_tokens=128, gen_len_tokens=64, num_prompts=64, acceptance=0.7))
    for policy, k in (("interleaved", 3), ("offload-only", 0)):
        st = cm.step_terms(Knobs(policy, 32, 32, k, 1, "gpu", 32, 2))
        assert st.serial_overlap == {} and st.serial_seconds == 0.0
        assert set(st.bounds()) == set(st.busy) | {f"chain{i}" for i in range(len(st.chain))}


def test_mixtral_eagle_serial_plan_steady_slot_matches_the_simulation():
    """The rtx4090-pcie3 eagle plan's knobs (serial-spec, b=1448, 16 micro-batches, draft KV on the GPU) at
    k=4, at two batches' worth of prompts: the copies bind and the draft round hides under the next sweep's
    first two layers; the simulated steady verification is within 0.5% of the closed form. (At k=5, with
    the round's first step charged at its padded width, the layer chain binds instead.) Before the credit
    the closed form put the whole round on top."""
    prof = load_profile("rtx4090-pcie3")
    t, d = load_model_spec("mixtral-8x7b"), load_model_spec("eagle-mixtral-8x7b")
    work = Workload(prompt_len_tokens=512, gen_len_tokens=128, num_prompts=2 * 1448, acceptance=0.7)
    plan = plan_at(prof, t, d, work, Knobs("serial-spec", 1448, 128, 4, 16, "gpu", 1448, 2),
                   {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 5 / 1448})
    cm, knobs, pl = plan_cost_model(plan, prof)
    st = cm.step_terms(knobs)
    assert plan.prediction.binding == "h2d"
    assert plan.prediction.slot_seconds < st.busy["h2d"].at(pl) + st.serial_total
    sim = simulate(plan, prof, SimOptions(context="average")).steady_slot_seconds()
    assert sim == pytest.approx(plan.prediction.slot_seconds, rel=0.005)


# Preset plans as the planner chooses them (serial-spec forced), whole jobs: the steady verification
# against the closed form. Measured (20000 x 512 -> 128, acceptance 0.7): eagle +0.00% (rtx4090-pcie3),
# +1.58% (l4, 3 layers on disk), +1.37% (rtx4090-pcie4, draft KV on the host); mistral-7b draft +0.75%,
# +0.79%, +1.21% (draft KV on the host, the draft's own copies share the engine). Asserted: -1% .. +2.5%.
@pytest.mark.slow
@pytest.mark.parametrize("profile", ["rtx4090-pcie3", "l4", "rtx4090-pcie4"])
@pytest.mark.parametrize("draft", ["eagle-mixtral-8x7b", "mistral-7b"])
def test_preset_serial_spec_plans_agree_with_the_simulation(profile, draft):
    prof = load_profile(profile)
    work = Workload(prompt_len_tokens=512, gen_len_tokens=128, num_prompts=20000, acceptance=0.7)
    # Unfused: the plain verification's serial overlap is what this checks (fused passes are tests/test_sim_fused.py's)
    plan = make_plan(prof, load_model_spec("mixtral-8x7b"), load_model_spec(draft), work, policy="serial-spec",
                     fixed={"fuse_prefill": False}).plan
    assert plan.policy == "serial-spec"
    sim = simulate(plan, prof, SimOptions()).steady_slot_seconds()
    assert -0.01 <= sim / plan.prediction.slot_seconds - 1 <= 0.025
