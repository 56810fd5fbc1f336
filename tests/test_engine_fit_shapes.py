"""The engine_layers probe fits its per-layer fixed costs on a narrow model of the reference's kind.

At a reference's own widths a layer is milliseconds of matmuls, and the matmul curve (measured at one FFN
shape) predicts other shapes only to some 10%: an error that is as constant in the token count as a fixed
cost, which the fit then books as fixed cost (707 us per layer where the hot-loop micro-benchmark saw 84 us;
the cost model then predicted the tiny pair 21-28% too slow). These tests pin the probe's shapes and check,
on synthetic data with known coefficients and such a rate error, that the fixed cost is recovered at the
probe's shapes (and is not at the reference's own).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from specoffload.planner.costmodel import CostModel
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.runtime.profiler.fit import fit_excess
from specoffload.runtime.profiler.probes import ProfileConfig, engine_fit_shapes, engine_probe_shapes


@pytest.mark.parametrize("model", ["mixtral-8x7b", "mixtral-8x22b", "llama-3-70b", "mistral-7b"])
def test_probe_model_is_the_reference_kind_at_narrow_widths(model):
    cfg = ProfileConfig.full()
    spec = load_model_spec(model)
    got = engine_fit_shapes(spec, cfg.op_overhead_shape)
    dim, heads, kv, dh, ffn = cfg.op_overhead_shape
    assert (got.hidden_size, got.num_heads, got.num_kv_heads, got.head_dim, got.intermediate_size) == \
        (dim, heads, kv, dh, ffn)
    assert (got.family, got.num_experts, got.experts_per_token) == \
        (spec.family, spec.num_experts, spec.experts_per_token)
    # Narrow enough that the probe never needs the budget's scaling, and many layers fit it.
    vocab = min(spec.vocab_size, 8192)
    assert engine_probe_shapes(got, vocab, ProfileConfig.quick().engine_max_bytes) == (got, 1)


def test_narrow_references_run_as_they_are():
    for name in ("tiny-target", "tiny-draft"):
        spec = load_model_spec(name)
        assert engine_fit_shapes(spec, None) is spec
    small = ProfileConfig.tiny().spec  # already at the narrow widths
    assert engine_fit_shapes(small, ProfileConfig.tiny().op_overhead_shape) is small
    assert ProfileConfig.full().engine_narrow and ProfileConfig.quick().engine_narrow


def _fitted_fixed_cost(spec, true_op: float, true_tok: float, rate_error: float) -> float:
    """Synthetic engine_layers layer rows for `spec` over the full mode's grid: what the profile's rates
    predict, off by +-rate_error (alternating, as a curve measured at another shape is off), plus known
    fixed costs; the probe's fit (fit_excess with its columns) returns the per-layer constant."""
    profile = load_profile("cpu-2core")
    zero = dataclasses.replace(profile, device_op_overhead_seconds=0.0, device_op_token_seconds=0.0,
                               device_expert_overhead_seconds=0.0)
    ref = dataclasses.replace(spec, num_layers=1, vocab_size=min(spec.vocab_size, 8192))
    cm = CostModel(zero, ref, None, Workload(16, 24, 1))
    cfg = ProfileConfig.full()
    seconds, known, cols = [], [], []
    for i, tokens in enumerate(sorted({b * (k + 1) for b in cfg.engine_batches for k in cfg.engine_draft_lens})):
        k = cm.qkv_seconds(ref, tokens) + cm.ffn_seconds(ref, tokens)
        seconds.append(k * (1.0 + (rate_error if i % 2 else -rate_error)) + true_op + tokens * true_tok)
        known.append(k)
        cols.append([1.0, tokens, ref.expected_experts(tokens) if ref.num_experts else 0.0])
    return fit_excess(seconds, known, cols).coef[0]


@pytest.mark.parametrize("model", ["mixtral-8x7b", "llama-3-70b"])
def test_fixed_cost_is_recovered_at_the_probe_shapes_despite_the_curves_error(model):
    cfg = ProfileConfig.full()
    spec = load_model_spec(model)
    true_op, true_tok = 150e-6, 1.5e-6
    # Exact rates: the fit recovers the constant at any width.
    narrow = engine_fit_shapes(spec, cfg.op_overhead_shape)
    assert _fitted_fixed_cost(narrow, true_op, true_tok, 0.0) == pytest.approx(true_op, rel=1e-6)
    # The curve 10% off at the shapes run: at the probe's narrow widths the constant stays within 25%.
    assert _fitted_fixed_cost(narrow, true_op, true_tok, 0.10) == pytest.approx(true_op, rel=0.25)
    # At the reference's own widths (scaled to the budget, as the probe ran before) the same error swamps it.
    vocab = min(spec.vocab_size, 8192)
    wide, _ = engine_probe_shapes(spec, vocab, cfg.engine_max_bytes)
    off = _fitted_fixed_cost(wide, true_op, true_tok, 0.10)
    assert off != pytest.approx(true_op, rel=0.5)


def test_the_probe_runs_the_narrow_model_and_says_so():
    """probe_engine_layers on a reference wider than the narrow widths (test sizes: seconds): the engine runs
    the narrow model of the reference's kind, and provenance names both."""
    import torch

    from specoffload.planner.models import ModelSpec
    from specoffload.runtime.profiler.probes import Profiler

    wide = ModelSpec(name="wide-moe", family="mixtral", num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=2,
                     head_dim=32, intermediate_size=512, num_experts=4, experts_per_token=2, vocab_size=128,
                     tie_word_embeddings=False, max_position_embeddings=512)
    cfg = ProfileConfig.tiny(model=wide)
    pr = Profiler(cfg, "cpu", name="t", progress=False, warn=lambda m: None)
    base = load_profile("cpu-2core")
    pr.fig = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)
              if f.name not in ("provenance", "missing", "name", "source")}
    with torch.inference_mode():
        out = pr.probe_engine_layers()
    prov = pr.prov["engine_layers"]
    assert "wide-moe's kind" in prov
    assert "narrow widths (hidden 64, 4 query / 2 KV heads of 16, FFN 128, 4 experts top-2)" in prov
    assert all(np.isfinite(v) and 0.0 <= v < 1.0 for v in out.values())
