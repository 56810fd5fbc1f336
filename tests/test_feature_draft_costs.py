"""The feature draft's cost formula against the engine's shapes, without timing: the FLOPs and bytes each
draft step is charged, the packed width of its first step's linear parts and the padded width of its attention."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from specoffload.planner.durations import Durations
from specoffload.planner.knobs import Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.runtime.engine import Engine, Request
from specoffload.runtime.feature_draft import FeatureHead
from specoffload.runtime.model import Transformer
from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_paths

from test_feature_draft import make_plan

W = Workload(prompt_len_tokens=20, gen_len_tokens=32, num_prompts=64, acceptance=0.7)


def durations(workload: Workload = W) -> Durations:
    return Durations(load_profile("cpu-2core"), load_model_spec("tiny-target"), load_model_spec("tiny-eagle"), workload)


def recorded_matmuls(du: Durations, monkeypatch) -> list[tuple[float, float, float]]:
    """Every (flops, tokens, weight bytes) the formulas hand to the roofline; each is charged its FLOPs as
    its seconds, and everything else (fixed costs, logit scan, attention, bookkeeping) nothing: a round's
    seconds are then the FLOPs it is charged."""
    calls: list[tuple[float, float, float]] = []

    def spy(self, flops, tokens, weight_bytes):
        calls.append((flops, tokens, weight_bytes))
        return flops

    monkeypatch.setattr(Durations, "matmul_seconds", spy)
    monkeypatch.setattr(Durations, "layer_fixed_seconds", lambda self, tokens: 0.0)
    monkeypatch.setattr(Durations, "cpu_attention_seconds", lambda self, *a: 0.0)
    monkeypatch.setattr(Durations, "draft_host_seconds", lambda self, *a: 0.0)
    du.hw = dataclasses.replace(du.hw, device_logit_element_seconds=0.0, device_op_overhead_seconds=0.0)
    return calls


def test_tiny_eagle_spec_counts_the_loaded_heads_shapes():
    """The planner's per-token FLOPs and bytes of the head equal the tensors the engine multiplies by."""
    t_dir, _ = tiny_pair_paths()
    target = Transformer.from_pretrained(t_dir)
    head = FeatureHead.load(tiny_eagle_path(), target.args, target.weights.embed, target.weights.lm_head)
    spec = load_model_spec("tiny-eagle")
    matrices = sum(t.numel() for t in head.w.values() if t.dim() == 2)  # fc, q/k/v/o, gate/up/down
    bias = head.w["fc.b"].numel() if "fc.b" in head.w else 0
    assert spec.linear_flops_per_token_per_layer == 2.0 * (matrices + bias)
    # Each step's logits come from the target's LM head over the whole vocabulary.
    assert spec.lm_head_flops_per_token == 2.0 * head.lm_head.numel()
    # Bytes: the same tensors, but for one norm vector the spec counts for every layer (an input norm this
    # head, like the published EAGLE heads, does not have).
    assert spec.num_layers == 1 and 0 <= spec.layer_params - sum(t.numel() for t in head.w.values()) <= spec.hidden_size


def test_each_draft_step_is_charged_the_full_vocabulary_lm_head(monkeypatch):
    du = durations()
    d = du.d
    calls = recorded_matmuls(du, monkeypatch)
    s = 64
    du.draft_step_seconds(s)
    lm = [c for c in calls if c[0] == s * d.lm_head_flops_per_token]
    assert len(lm) == 1 and lm[0][2] == d.b(d.vocab_size * d.hidden_size)
    lin = [c for c in calls if c[0] == s * d.linear_flops_per_token_per_layer]
    assert len(lin) == 1 and lin[0][1] == s
    # A round of k steps: k LM heads over the batch's rows (the first step's catch-up pairs feed the layer
    # only: the logits are read at each row's last pair), the layer over k - 1 single pairs and the first step's
    # packed pairs: the mean kept per row, not the longest row's.
    k = 4
    gpu = du.draft_round(Knobs("serial-spec", s, 1, k, 1, "gpu", 1, 2), s)["gpu"]
    first = du.feature_kept_mean(k)
    assert first == pytest.approx(du.rounds(k).expected_tokens) and first < du.feature_catch_up(k, s) - 2
    assert gpu == pytest.approx(k * s * d.lm_head_flops_per_token
                                + (k - 1 + first) * s * d.linear_flops_per_token_per_layer)
    # The LM head is most of a tiny head's step: 2 x 4096 x 128 per row against the layer's per-pair FLOPs.
    assert d.lm_head_flops_per_token > d.linear_flops_per_token_per_layer


def test_catch_up_is_the_expected_longest_row():
    du = durations()
    k = 4
    # One row: the mean kept positions, E[a + 1] = E[tokens per round].
    assert du.feature_catch_up(k, 1) == pytest.approx(du.rounds(k).expected_tokens)
    widths = [du.feature_catch_up(k, b) for b in (1, 2, 4, 16, 64, 1024)]
    assert all(a < b for a, b in zip(widths, widths[1:]))
    assert widths[-1] == pytest.approx(k + 1, abs=1e-6)
    # Against sampling the same model: rows accept position j with the workload's conditional acceptance.
    rng = np.random.default_rng(0)
    b, n = 8, 20000
    kept = (rng.random((n, b, k)) < 0.7).cumprod(axis=2).sum(axis=2) + 1
    assert du.feature_catch_up(k, b) == pytest.approx(kept.max(axis=1).mean(), rel=0.01)
    assert du.feature_catch_up(0, b) == 1.0


def test_pack_probability_and_first_step_attention_width(monkeypatch):
    du = durations()
    k = 4
    # The step packs unless every row kept the same count: never for one row, almost always for many.
    assert du.feature_pack_probability(k, 1) == 0.0 and du.feature_pack_probability(0, 64) == 0.0
    rng = np.random.default_rng(1)
    b, n = 3, 20000
    kept = (rng.random((n, b, k)) < 0.7).cumprod(axis=2).sum(axis=2) + 1
    ragged = (kept != kept[:, :1]).any(axis=1).mean()
    assert du.feature_pack_probability(k, b) == pytest.approx(ragged, abs=0.01)
    assert du.feature_pack_probability(k, 64) == pytest.approx(1.0, abs=1e-9)
    # The first step's attention runs on the padded layout: charged at the longest row's width, the k - 1
    # later steps at one query row each.
    d = du.d
    recorded_matmuls(du, monkeypatch)  # a round's seconds: its FLOPs, plus the attention below
    queries = []

    def attention(self, spec, batch, query, ctx):
        queries.append(query)
        return 1e12 * query

    monkeypatch.setattr(Durations, "cpu_attention_seconds", attention)
    s = 64
    gpu = du.draft_round(Knobs("serial-spec", s, 1, k, 1, "gpu", 1, 2), s)["gpu"]
    padded = du.feature_catch_up(k, s)
    assert sorted(queries) == pytest.approx([1.0, padded])
    flops = (k * s * d.lm_head_flops_per_token
             + (k - 1 + du.feature_kept_mean(k)) * s * d.linear_flops_per_token_per_layer)
    assert gpu - flops == pytest.approx(1e12 * d.num_layers * (k - 1 + padded))


def test_engine_packs_the_first_step_to_the_charged_width():
    """The engine's traced first draft steps (synthetic acceptance 0.7, one wave of 4 rows) compute as many pairs
    per row as the cost model charges their linear parts: the mean row's kept positions, not the longest row's."""
    t_dir, _ = tiny_pair_paths()
    k, b, gen = 3, 4, 96
    plan = dataclasses.replace(make_plan("serial-spec", b, k, "gpu", prefill=b, gen=gen), num_batches=1)
    eng = Engine(plan, t_dir, tiny_eagle_path(), trace=True, synthetic_acceptance=0.7)
    prompts = [[0, 40 + i, 50 + i, 60 + i] for i in range(b)]
    eng.run([Request(str(i), p, gen, ignore_eos=True) for i, p in enumerate(prompts)], lambda f: None)
    steps = [r for r in eng.timeline.passes if r.model == "draft" and not r.prefill]
    # Rounds of k steps each; the first round follows the prefill (one pending pair per row): skip it.
    firsts = [r.query for i, r in enumerate(steps) if i % k == 0 and r.batch == b][1:]
    assert len(steps) % k == 0 and len(firsts) > 15
    assert all(r.query == 1 for i, r in enumerate(steps) if i % k)  # later steps: one pair per row
    du = durations(Workload(prompt_len_tokens=4, gen_len_tokens=gen, num_prompts=b, acceptance=0.7))
    charged, padded = du.feature_kept_mean(k), du.feature_catch_up(k, b)
    measured = float(np.mean(firsts))
    print(f"first-step width: engine {measured:.2f}, charged {charged:.2f}, longest row {padded:.2f}")
    assert abs(measured - charged) < 0.3 < abs(measured - padded)
