"""Checkpoint loading: the name map on real-checkpoint names, sharding, placement, and clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from specoffload.runtime.config import ConfigError, args_from_hf_config, load_args  # noqa: E402
from specoffload.runtime.loader import CheckpointError, hf_name_map, load_model, stream_tensors  # noqa: E402
from specoffload.runtime.layers import weight_shapes  # noqa: E402


def _tiny_mixtral(tmp_path, **save_kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True, **save_kw)
    return model


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    _tiny_mixtral(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_save_pretrained_writes_real_mixtral_names_and_we_map_all_of_them(mixtral_dir):
    on_disk = set(load_file(mixtral_dir / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in on_disk
    assert "model.layers.0.block_sparse_moe.gate.weight" in on_disk
    args = load_args(mixtral_dir)
    assert set(hf_name_map(args)) == on_disk
    assert set(hf_name_map(args).values()) == set(weight_shapes(args))


def test_placement_callback_sees_canonical_names_and_dtype_converts(mixtral_dir, tmp_path):
    # Store the checkpoint in bf16 (as we ship), ask for fp32 compute.
    d = _copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    save_file({n: t.to(torch.bfloat16) for n, t in sd.items()}, d / "model.safetensors", metadata={"format": "pt"})
    asked = []

    def placement(name):
        asked.append(name)
        return "pinned" if ".experts." in name else "cpu"

    args, w = load_model(d, placement=placement)
    assert sorted(asked) == sorted(weight_shapes(args))
    assert w.layers[1].experts[3]["w_down"].dtype == torch.float32
    torch.testing.assert_close(w.layers[1].experts[3]["w_down"],
                               sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"].to(torch.bfloat16).float())


def test_per_tensor_dtype(mixtral_dir):
    _, w = load_model(mixtral_dir, dtype=lambda name: torch.bfloat16 if ".experts." in name else torch.float32)
    assert w.layers[0].experts[1]["w_up"].dtype == torch.bfloat16
    assert w.layers[0].attn["wq"].dtype == w.lm_head.dtype == torch.float32


def test_sharded_checkpoint_loads_like_single_file(mixtral_dir, tmp_path):
    _tiny_mixtral(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, sharded = load_model(tmp_path)
    _, single = load_model(mixtral_dir)
    for name, t in single.flat().items():
        torch.testing.assert_close(sharded.flat()[name], t, atol=0, rtol=0)


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(d)


def test_wrong_shape_names_tensor_file_and_shapes(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.block_sparse_moe.experts.2.w1.weight"] = torch.zeros(47, 32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in msg and "model.safetensors" in msg
    assert "expected shape (48, 32)" in msg and "found (47, 32)" in msg


def test_unexpected_tensor_is_named(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(48, 32)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.0\.mlp\.gate_proj\.weight"):
        load_model(d)


def test_quantized_dtype_is_refused_by_name(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.norm.weight"] = torch.zeros(32, dtype=torch.int8)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in model\.safetensors has dtype I8"):
        load_model(d)


def test_index_pointing_at_missing_shard_names_the_file(tmp_path):
    _tiny_mixtral(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / victim).unlink()
    with pytest.raises(CheckpointError, match=f"shard file {victim} listed in model.safetensors.index.json is missing"):
        load_model(tmp_path)


def test_index_naming_the_wrong_file_for_a_tensor(tmp_path):
    _tiny_mixtral(tmp_path, max_shard_size="20KB")
    path = tmp_path / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    files = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][name] = files[1]
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"tensor {name} is not in {files[1]}"):
        load_model(tmp_path)


def test_pickle_only_checkpoint_is_refused_with_reason_and_fix(mixtral_dir, tmp_path):
    d = tmp_path / "binckpt"
    d.mkdir()
    shutil.copy(mixtral_dir / "config.json", d)
    torch.save({"model.norm.weight": torch.ones(32)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "arbitrary code" in msg and "safe_serialization=True" in msg


def test_missing_config_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        stream_tensors(tmp_path / "nope", {}, {})


# ----------------------------------------------------------------------------------------------
# config.json adapter
# ----------------------------------------------------------------------------------------------

def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*LlamaForCausalLM.*MistralForCausalLM.*MixtralForCausalLM"):
        args_from_hf_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def _llama31_config():
    # The shape of a real Llama-3.1-8B config.json (older spelling: rope_theta + rope_scaling).
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
            "hidden_act": "silu"}


def test_legacy_llama31_config():
    a = args_from_hf_config(_llama31_config())
    assert (a.family, a.head_dim, a.gqa_groups, a.rope_theta) == ("llama", 128, 4, 500000.0)
    assert a.rope_scaling.original_max_position_embeddings == 8192
    assert a.eos_token_id == (128001, 128008, 128009)


def test_real_mixtral_config():
    a = args_from_hf_config({"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
                             "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                             "num_local_experts": 8, "num_experts_per_tok": 2, "rope_theta": 1e6,
                             "sliding_window": None, "vocab_size": 32000, "rms_norm_eps": 1e-5})
    assert (a.n_experts, a.top_k, a.is_moe, a.sliding_window, a.rope_scaling) == (8, 2, True, None, None)


@pytest.mark.parametrize("patch, msg", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE scaling type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_key_value_heads": 5}, "not a multiple"),
])
def test_refused_configs(patch, msg):
    with pytest.raises(ConfigError, match=msg):
        args_from_hf_config({**_llama31_config(), **patch})
