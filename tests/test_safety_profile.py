"""specoffload-profile --quick on a CPU-only machine: the in-engine probe runs on shapes that fit its budget."""
from __future__ import annotations

import pytest

from specoffload.planner.models import load_model_spec
from specoffload.runtime.profiler.probes import ProfileConfig, engine_probe_shapes


@pytest.mark.parametrize("model", ["mixtral-8x7b", "mixtral-8x22b", "llama-3-70b", "mistral-7b", "llama-3.2-1b"])
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_engine_probe_shapes_fit_the_budget(model, mode):
    cfg = getattr(ProfileConfig, mode)()
    spec = load_model_spec(model)
    vocab = min(spec.vocab_size, 8192)
    got, scale = engine_probe_shapes(spec, vocab, cfg.engine_max_bytes)
    assert 4.0 * (got.layer_params + 2 * vocab * got.hidden_size) <= cfg.engine_max_bytes
    # The same kind of model, narrower: experts, top-k, head size and family kept; widths divided by `scale`.
    assert (got.family, got.num_experts, got.experts_per_token, got.head_dim) == \
        (spec.family, spec.num_experts, spec.experts_per_token, spec.head_dim)
    assert got.num_heads % got.num_kv_heads == 0 and scale & (scale - 1) == 0
    assert got.hidden_size == max(spec.hidden_size // scale, 64)
    if scale > 1:  # the smallest power of two that fits
        bigger, _ = engine_probe_shapes(spec, vocab, 4.0 * (got.layer_params + 2 * vocab * got.hidden_size) - 1)
        assert bigger.hidden_size < got.hidden_size


def test_a_spec_that_fits_is_run_unchanged():
    spec = load_model_spec("tiny-target")
    assert engine_probe_shapes(spec, 1024, 512 * 2**20) == (spec, 1)


def test_quick_mode_engine_grid_can_be_fitted():
    c = ProfileConfig.quick()
    runs = len(c.engine_batches) * len(c.engine_draft_lens) * c.engine_reps
    assert runs >= 7 and any(c.engine_draft_lens)  # what probe_engine_layers needs for its 6 terms
    assert len({b * (k + 1) for b in c.engine_batches for k in c.engine_draft_lens}) >= 4
