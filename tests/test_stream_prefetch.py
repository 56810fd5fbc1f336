"""The weight stream runs ahead as far as its buffers allow, in the runtime and in the simulator alike.

The runtime's LayerStreamer fills every free weight buffer with the next streamed layer in sweep order,
wrapping into the next pass; the simulator's weight stream does the same. So when a verification ends,
both hold the next pass's first `weight_buffers` streamed layers, copied while a serial draft round runs
(the credit `CostModel.serial_overlap` gives the closed form). These tests look at the streamer's state
(which layers hold buffers), not at timings.
"""
from __future__ import annotations

import pytest
import torch

from specoffload.planner.costmodel import Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile, resident_layers
from specoffload.planner.sim.scenario import plan_at
from specoffload.planner.sim.simulator import SimOptions, Simulation
from specoffload.runtime.engine import LayerStreamer, Streams, Timeline
from specoffload.runtime.layers import LayerWeights, ModelWeights


def fake_weights(layers: int) -> ModelWeights:
    """Tiny tensors in the layout the streamer walks (it only moves them)."""
    def layer():
        return LayerWeights({"wq": torch.zeros(2, 2)}, {"w_up": torch.zeros(2, 2)}, [])
    return ModelWeights(torch.zeros(4, 2), torch.zeros(2), torch.zeros(4, 2), [layer() for _ in range(layers)])


def make_streamer(layers: int, attn_res: set[int], ffn_res: set[int], buffers: int) -> LayerStreamer:
    return LayerStreamer(fake_weights(layers), [j in attn_res for j in range(layers)],
                         [j in ffn_res for j in range(layers)], torch.device("cpu"), buffers,
                         Streams(torch.device("cpu")), Timeline(enabled=False))


def run_pass(s: LayerStreamer, seen: list[list[int]] | None = None) -> None:
    """The order Target.forward follows: fill, then per layer get, fill, compute, release, fill."""
    s.fill()
    for j in range(s.n):
        s.get(j)
        s.fill()
        if seen is not None:
            seen.append(s.issued())
        s.release(j)
        s.fill()


@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_streamer_fills_every_free_buffer_and_runs_into_the_next_pass(buffers):
    L = 8
    attn_res = ffn_res = {2, 5}  # two layers wholly resident: streamed are 0, 1, 3, 4, 6, 7
    s = make_streamer(L, attn_res, ffn_res, buffers)
    order = [0, 1, 3, 4, 6, 7]
    assert s.order == order
    s.fill()
    assert s.issued() == order[:buffers]  # before the first pass: the first layers, one per buffer
    seen: list[list[int]] = []
    run_pass(s, seen)
    # While layer j computes, j and the next streamed layers hold every buffer (wrapping into the next pass).
    for j, held in zip(range(L), seen):
        if j in order:
            i = order.index(j)
            assert held == [order[(i + d) % len(order)] for d in range(buffers)], (j, held)
    # After the pass (the serial draft round runs now): the next pass's first `buffers` layers are copied.
    assert s.issued() == order[:buffers]
    assert s.max_ahead == buffers
    run_pass(s)
    assert s.issued() == order[:buffers]


def test_streamer_with_more_buffers_than_streamed_layers():
    s = make_streamer(4, {0, 1, 2}, {0, 1, 2}, 3)  # only layer 3 streamed, three buffers
    run_pass(s)
    assert s.issued() == [3] and len(s.free) == 2  # one copy ahead: the next pass's only streamed layer
    run_pass(s)
    assert s.issued() == [3]


def test_streamer_restarts_the_sweep_when_a_pass_is_cut_short():
    s = make_streamer(4, set(), set(), 2)
    s.fill()
    s.get(0)
    s.release(0)  # a pass that ended after layer 0 (an error), then a new pass from layer 0
    lw = s.get(0)
    assert lw.attn["wq"].shape == (2, 2)
    assert s.issued()[0] == 0 and len(s.issued()) <= 2
    s.fill()
    assert s.issued() == [0, 1]


class _Recording(Simulation):
    """The simulation, recording which copies hold buffers whenever a verification ends."""

    def _verify_done(self, p, now):
        self.held_at_end.append(sorted(self.issued))
        super()._verify_done(p, now)


@pytest.mark.parametrize("attn,ffn,buffers_expected", [(0.0, 0.0, 2), (0.25, 0.25, 2), (0.5, 0.0, 2)])
def test_simulator_and_streamer_hold_the_same_layers_across_the_draft_round(attn, ffn, buffers_expected):
    """Serial-spec, Mistral-7B on rtx4090-pcie4: at the end of each verification the simulated stream holds
    the next pass's first weight_buffers streamed layers, and the runtime's streamer the same layers."""
    prof = load_profile("rtx4090-pcie4")
    target, draft = load_model_spec("mistral-7b"), load_model_spec("llama-3.2-1b")
    work = Workload(prompt_len_tokens=64, gen_len_tokens=12, num_prompts=8, acceptance=1.0)
    plan = plan_at(prof, target, draft, work, Knobs("serial-spec", 8, 8, 2, 1, "gpu", 8, 2),
                   {"attn_gpu": attn, "ffn_gpu": ffn, "kv_gpu": 0.0})
    sim = _Recording(plan, prof, SimOptions(context="average"))
    sim.held_at_end = []
    result = sim.run()
    assert result.ok
    L = target.num_layers
    attn_res = resident_layers(plan.gpu_attn_layers, L)
    ffn_res = resident_layers(plan.gpu_ffn_layers, L)
    streamer = make_streamer(L, attn_res, ffn_res, plan.weight_buffers)
    run_pass(streamer)  # the prefill sweep
    ends = sim.held_at_end[:-1]  # the last verification ends the job: nothing ahead of it
    assert len(ends) >= 3
    for i, held in enumerate(ends):
        run_pass(streamer)
        nxt = {n for n, _ in held}
        assert len(nxt) == 1  # one pass ahead: the next one
        layers = [j for _, j in held]
        assert len(layers) == buffers_expected == plan.weight_buffers
        assert layers == streamer.issued() == streamer.order[:plan.weight_buffers], (i, held)
