"""Random-weight checkpoints in Hugging Face format (safetensors, real tensor names), written directly.

For timing runs without downloads (tools/gpu_check.py) and the profiler's engine probe: no model
is instantiated, each tensor is drawn and saved under the name a real checkpoint uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def write_random_checkpoint(folder: Path, config: dict, seed: int, device: torch.device) -> None:
    """Random bf16 weights (std 0.02) under the real HF names, one safetensors shard per layer."""
    from safetensors.torch import save_file

    from specoffload.runtime.config import args_from_hf_config
    from specoffload.runtime.layers import weight_shapes
    from specoffload.runtime.loader import hf_name_map

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    args = args_from_hf_config(config)
    shapes = weight_shapes(args)
    by_ours = {ours: hf for hf, ours in hf_name_map(args).items()}
    g = torch.Generator(device=device).manual_seed(seed)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for ours, shape in shapes.items():
        if ours not in by_ours:
            continue  # tied lm_head
        part = ours.split(".")[1] if ours.startswith("layers.") else "outer"
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        if len(shape) == 1:
            t = torch.ones(shape, device=device)
        shards.setdefault(part, {})[by_ours[ours]] = t.to(torch.bfloat16).cpu()
    index = {"metadata": {}, "weight_map": {}}
    for part, tensors in shards.items():
        name = f"model-{part}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        index["weight_map"].update({n: name for n in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def hf_config_for(spec, num_layers: int | None = None, vocab_size: int | None = None, dense: bool = False,
                  max_positions: int = 1024) -> dict:
    """A Hugging Face config.json for a ModelSpec's shapes (fewer layers or a smaller vocabulary on
    request; `dense`: a Mistral-style model with the spec's dimensions and one FFN of its
    intermediate size instead of experts)."""
    moe = spec.num_experts > 0 and not dense
    config = {"architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
              "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
              "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
              "head_dim": spec.head_dim, "num_hidden_layers": num_layers or spec.num_layers,
              "vocab_size": vocab_size or spec.vocab_size, "max_position_embeddings": max_positions,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None, "hidden_act": "silu",
              "tie_word_embeddings": False}
    if moe:
        config.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token)
    return config
