"""Feature drafts in the planner: presets, sizes, the draft KV modes searched, refusal of a foreign head."""
from __future__ import annotations

import pytest

from specoffload.planner.costmodel import CostModel, Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import make_plan
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.strict import SchemaError

W = Workload(prompt_len_tokens=512, gen_len_tokens=128, num_prompts=2000, acceptance=0.7)


@pytest.mark.parametrize("name,published", [("eagle-mixtral-8x7b", 0.28e9), ("eagle-llama-3-70b", 0.99e9)])
def test_eagle_presets_match_published_head_sizes(name, published):
    spec = load_model_spec(name)
    assert spec.feature_draft and spec.num_layers == 1 and spec.num_experts == 0
    assert abs(spec.total_params - published) / published < 0.03
    # The embedding and LM head are the target's: not the head's bytes.
    assert spec.embed_params == 0 and spec.lm_head_params == 0
    assert spec.kv_bytes_per_token == 2 * spec.num_kv_heads * spec.head_dim * 2


def test_fingerprints_of_ordinary_models_are_unchanged_by_the_feature_flag():
    from specoffload.planner.schema import fingerprint

    spec = load_model_spec("mistral-7b")
    import dataclasses

    old = fingerprint({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                       if f.name not in ("name", "source", "feature_draft", "dtype_bytes")})  # later fields
    assert spec.fingerprint == old


def test_plan_with_eagle_head_never_recomputes_and_beats_offload_only():
    res = make_plan(load_profile("rtx4090-pcie3"), load_model_spec("mixtral-8x7b"),
                    load_model_spec("eagle-mixtral-8x7b"), W)
    plan = res.plan
    assert plan.draft == "eagle-mixtral-8x7b" and plan.draft_kv in ("gpu", "host")
    assert plan.policy != "offload-only"
    # --explain's note on the head: the first step's packed width (the mean kept per row) and its attention's
    # padded width beside the round's cost.
    cm = CostModel(load_profile("rtx4090-pcie3"), load_model_spec("mixtral-8x7b"),
                   load_model_spec("eagle-mixtral-8x7b"), W)
    note = next(n for n in plan.notes if n.startswith("feature draft"))
    k, b = plan.draft_len, plan.decode_batch
    assert f"over {cm.feature_kept_mean(k):.2f} kept positions per row, packed" in note
    assert f"attention padded to {cm.feature_catch_up(k, b):.2f}" in note
    assert cm.feature_catch_up(k, b) > cm.feature_kept_mean(k)


def test_feature_draft_costs_less_than_a_full_draft_model_per_round():
    prof = load_profile("l4")
    t = load_model_spec("mixtral-8x7b")
    k = Knobs("interleaved", 256, 2, 4, 1, "gpu", 1, 2)
    head = CostModel(prof, t, load_model_spec("eagle-mixtral-8x7b"), W).draft_round(k, 256)
    full = CostModel(prof, t, load_model_spec("mistral-7b"), W).draft_round(k, 256)
    assert sum(head.values()) < sum(full.values()) / 4
    mem_head = CostModel(prof, t, load_model_spec("eagle-mixtral-8x7b"), W).memory_terms(k)["gpu"]
    mem_full = CostModel(prof, t, load_model_spec("mistral-7b"), W).memory_terms(k)["gpu"]
    assert mem_head.const < mem_full.const


def test_head_for_another_target_is_refused_naming_both():
    with pytest.raises(SchemaError, match=r"hidden size 8192 \(the target's is 4096\).*vocabulary 128256"):
        make_plan(load_profile("l4"), load_model_spec("mixtral-8x7b"), load_model_spec("eagle-llama-3-70b"), W)


def test_recompute_pinned_for_a_feature_draft_is_refused():
    with pytest.raises(SchemaError, match="recompute"):
        make_plan(load_profile("l4"), load_model_spec("mixtral-8x7b"), load_model_spec("eagle-mixtral-8x7b"), W,
                  fixed={"draft_kv": "recompute"})


def test_tiny_eagle_is_a_feature_draft_for_the_tiny_target():
    spec = load_model_spec("tiny-eagle")
    t = load_model_spec("tiny-target")
    assert spec.feature_draft and spec.hidden_size == t.hidden_size and spec.vocab_size == t.vocab_size
    make_plan(load_profile("cpu-2core"), t, spec, Workload(prompt_len_tokens=24, gen_len_tokens=16, num_prompts=8,
                                                           acceptance=0.5))


def test_speculators_config_is_read_as_a_feature_draft(tmp_path):
    import json

    cfg = {"speculators_model_type": "eagle", "architectures": ["EagleSpeculator"],
           "transformer_layer_config": {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
                                        "intermediate_size": 14336, "vocab_size": 32000, "num_hidden_layers": 1,
                                        "model_type": "llama"},
           "speculators_config": {"verifier": {"architectures": ["MixtralForCausalLM"]}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec = load_model_spec(str(tmp_path))
    assert spec.feature_draft and spec.family == "mixtral" and spec.num_experts == 0
