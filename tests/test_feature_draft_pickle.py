"""EAGLE-1 heads as published: one pytorch_model.bin (a pickle). Read with torch.load(weights_only=True), no code
from the file runs; the EAGLE names map as for safetensors; anything weights_only cannot load is refused."""
from __future__ import annotations

import pathlib

import pytest
import torch

from specoffload.planner.models import load_model_spec, pickle_strings
from specoffload.runtime.config import load_args
from specoffload.runtime.engine import Engine, EngineError, Request
from specoffload.runtime.feature_draft import (FeatureHead, FeatureHeadError, head_config, head_spec, is_feature_head,
                                               random_head_weights, write_head)
from specoffload.runtime.model import Transformer
from specoffload.runtime.random_checkpoint import write_random_checkpoint

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None,
         "hidden_act": "silu", "tie_word_embeddings": False}
PROMPTS = [[1, 2, 3], [5, 9, 11, 12, 7], [40]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = tmp_path_factory.mktemp("pk") / "llama"
    write_random_checkpoint(d, LLAMA, seed=2, device=torch.device("cpu"))
    return d


def published_bin(folder: pathlib.Path, target_dir: pathlib.Path, seed: int = 4, legacy: bool = False) -> dict:
    """A random head saved as EAGLE-1 heads are: pytorch_model.bin with the EAGLE names, a copy of the target's
    embedding and the rotary buffer; the same weights also as model.safetensors in a sibling folder."""
    args = load_args(target_dir)
    cfg = head_config(args, "eagle")
    w = random_head_weights(cfg, seed=seed, dtype=torch.float32, std=0.3)
    embed = Transformer.from_pretrained(target_dir).weights.embed.to(torch.float16)
    write_head(folder.with_name(folder.name + "-st"), cfg, w, "eagle")
    write_head(folder, cfg, w, "eagle", embed=embed, pickle_file="pytorch_model.bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(args.head_dim // 2)
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return w


@pytest.mark.parametrize("legacy", [False, True])
def test_a_published_bin_head_loads_and_equals_its_safetensors_twin(tmp_path, target, legacy):
    published_bin(tmp_path / "h", target, legacy=legacy)
    assert not list((tmp_path / "h").glob("*.safetensors"))
    assert is_feature_head(tmp_path / "h") and head_spec(tmp_path / "h").fc_bias
    assert "fc.weight" in pickle_strings(tmp_path / "h" / "pytorch_model.bin")  # read without unpickling
    assert load_model_spec(str(tmp_path / "h")).feature_draft  # the planner (no torch) tells it is a head
    m = Transformer.from_pretrained(target)
    a = FeatureHead.load(tmp_path / "h", m.args, m.weights.embed, m.weights.lm_head)
    b = FeatureHead.load(tmp_path / "h-st", m.args, m.weights.embed, m.weights.lm_head)
    assert a.w.keys() == b.w.keys() and all(torch.equal(a.w[k], b.w[k]) for k in a.w)
    tokens, feats = torch.randint(0, 64, (2, 4)), torch.randn(2, 4, 32)
    pa, la = a.forward(a.new_cache(2, 8), [0, 1], tokens, feats, torch.tensor([4, 2]))
    pb, lb = b.forward(b.new_cache(2, 8), [0, 1], tokens, feats, torch.tensor([4, 2]))
    assert torch.equal(pa, pb) and torch.equal(la, lb)


def test_greedy_with_a_bin_head_equals_the_target(tmp_path, target):
    from test_feature_draft import make_plan, target_greedy

    published_bin(tmp_path / "h", target)
    ref = target_greedy(target, PROMPTS, 10)
    eng = Engine(make_plan("serial-spec", 2, 3, "gpu", gen=10), target, tmp_path / "h")
    outs = {}
    eng.run([Request(str(i), p, 10) for i, p in enumerate(PROMPTS)], lambda f: outs.__setitem__(f.request.id, f.tokens))
    assert [outs[str(i)] for i in range(len(PROMPTS))] == ref


class Payload:
    """A pickle that would run code when loaded without weights_only: it touches a marker file."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_weights_only_refuses_is_refused_and_runs_nothing(tmp_path, target):
    w = published_bin(tmp_path / "h", target)
    marker = tmp_path / "ran"
    state = {"fc.weight": w["fc.w"], "evil": Payload(marker)}
    torch.save(state, tmp_path / "h" / "pytorch_model.bin")
    m = Transformer.from_pretrained(target)
    with pytest.raises(FeatureHeadError) as e:
        FeatureHead.load(tmp_path / "h", m.args, m.weights.embed, m.weights.lm_head)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "weights_only=True" in msg and "safetensors" in msg
    assert not marker.exists()  # nothing from the file ran
    # Through the engine too: a clear error naming the file, nothing run.
    from test_feature_draft import make_plan

    with pytest.raises(EngineError, match="cannot load it safely"):
        Engine(make_plan(), target, tmp_path / "h")
    assert not marker.exists()


def test_a_pickle_that_is_no_state_dict_is_refused(tmp_path, target):
    published_bin(tmp_path / "h", target)
    torch.save([torch.zeros(3)], tmp_path / "h" / "pytorch_model.bin")
    m = Transformer.from_pretrained(target)
    with pytest.raises(FeatureHeadError):  # not a head at all now (no fc.weight): refused as such
        FeatureHead.load(tmp_path / "h", m.args, m.weights.embed, m.weights.lm_head)
    torch.save({"state_dict": [torch.zeros(3)], "fc.weight": torch.zeros(1)}, tmp_path / "h" / "pytorch_model.bin")
    with pytest.raises(FeatureHeadError, match="not a state dict"):
        FeatureHead.load(tmp_path / "h", m.args, m.weights.embed, m.weights.lm_head)
