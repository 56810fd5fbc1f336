"""Feature drafts (EAGLE-style heads): loading both layouts, refusal of foreign heads, and exactness of
speculative decoding with a head on the tiny target and on random Llama / Mistral / Mixtral targets."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from specoffload.planner.schema import Plan, Prediction, Workload
from specoffload.runtime.config import load_args
from specoffload.runtime.engine import Engine, EngineError, Request
from specoffload.runtime.feature_draft import (FeatureHead, FeatureHeadError, head_config, head_spec, is_feature_head,
                                               random_head_weights, write_head, write_random_head)
from specoffload.runtime.kv_cache import KVCache
from specoffload.runtime.layers import rms_norm
from specoffload.runtime.model import Transformer
from specoffload.runtime.random_checkpoint import write_random_checkpoint
from specoffload.runtime.tiny_pair import tiny_pair_paths

PRED = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)
FAMILY_CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None,
              "hidden_act": "silu", "tie_word_embeddings": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
                "num_attention_heads": 4, "num_key_value_heads": 1, "num_hidden_layers": 2, "vocab_size": 64,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None,
                "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": 12},
    "mixtral": {"architectures": ["MixtralForCausalLM"], "hidden_size": 32, "intermediate_size": 24,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
                "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None,
                "hidden_act": "silu", "tie_word_embeddings": False, "num_local_experts": 4,
                "num_experts_per_tok": 2},
}


def make_plan(policy="interleaved", batch=2, k=3, draft_kv="gpu", prefill=2, gen=16, max_prompt=64) -> Plan:
    return Plan(policy=policy, model="t", model_fingerprint="", draft="h", draft_fingerprint="", profile="cpu",
                profile_fingerprint="",
                workload=Workload(prompt_len_tokens=8, gen_len_tokens=gen, num_prompts=8,
                                  max_prompt_len_tokens=max_prompt),
                decode_batch=batch, num_batches=2 if policy == "interleaved" else 1, prefill_batch=prefill,
                draft_sub_batch=1, draft_len=k, micro_batches=1, gpu_attn_layers=0, gpu_ffn_layers=0,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv=draft_kv, weight_buffers=2, prediction=PRED)


def target_greedy(target_dir, prompts, n):
    """The target's own greedy continuation, one prompt at a time, full recompute each step."""
    model = Transformer.from_pretrained(target_dir)
    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(model.logits_full(torch.tensor([seq]))[0, -1].argmax()))
        out.append(seq[len(p):])
    return out


def run(plan, target_dir, head_dir, prompts, n, temperature=0.0):
    eng = Engine(plan, target_dir, head_dir)
    outs = {}
    reqs = [Request(str(i), list(p), n, temperature=temperature, seed=i) for i, p in enumerate(prompts)]
    stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, f.tokens))
    return eng, [outs[str(i)] for i in range(len(prompts))], stats


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fd")
    out = {}
    for fam, cfg in FAMILY_CONFIGS.items():
        write_random_checkpoint(root / fam, cfg, seed=1, device=torch.device("cpu"))
        out[fam] = root / fam
    return out


# -- loading ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout,norms", [("eagle", False), ("speculators", False), ("speculators", True),
                                          ("eagle", True)])
def test_random_head_in_each_layout_loads_and_runs(tmp_path, targets, layout, norms):
    args = load_args(targets["mixtral"])
    cfg = head_config(args, layout, norms=norms, verifier="random-mixtral")
    w = random_head_weights(cfg, seed=3, dtype=torch.float32, input_norm=norms, embed_norm=norms, out_norm=norms)
    if layout == "eagle" and norms:  # the HASS-style names of an EAGLE-layout head
        w_eagle = {("hidden_layernorm" if k == "attn.norm" else k): v for k, v in w.items()}
        from safetensors.torch import save_file

        names = {"fc.w": "fc.weight", "fc.b": "fc.bias", "embed_norm": "embed_layernorm.weight",
                 "out_norm": "lm_head_layernorm.weight", "hidden_layernorm": "hidden_layernorm.weight"}
        for k in ("wq", "wk", "wv", "wo"):
            names[f"attn.{k}"] = f"layers.0.self_attn.{k[1]}_proj.weight"
        names.update({"ffn.norm": "layers.0.post_attention_layernorm.weight",
                      "ffn.w_gate": "layers.0.mlp.gate_proj.weight", "ffn.w_up": "layers.0.mlp.up_proj.weight",
                      "ffn.w_down": "layers.0.mlp.down_proj.weight"})
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        save_file({names[k]: v.contiguous() for k, v in w_eagle.items()}, str(tmp_path / "model.safetensors"))
    else:
        write_head(tmp_path, cfg, w, layout, embed=torch.zeros(args.vocab_size, args.dim, dtype=torch.bfloat16))
    assert is_feature_head(tmp_path)
    spec = head_spec(tmp_path)
    assert spec.layout == layout and spec.fc_bias
    assert (spec.input_norm, spec.embed_norm, spec.out_norm) == (norms, norms, norms)
    assert spec.args.n_experts == 0 and spec.args.n_layers == 1  # the head's FFN is dense even over Mixtral
    tw = Transformer.from_pretrained(targets["mixtral"]).weights
    head = FeatureHead.load(tmp_path, args, tw.embed, tw.lm_head)
    # Against a straight re-computation from the canonical weights.
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 5))
    feats = torch.randn(2, 5, args.dim)
    cache = head.new_cache(2, 16)
    pred, logits = head.forward(cache, [0, 1], tokens, feats, torch.tensor([5, 3]))
    assert pred.shape == (2, args.dim) and logits.shape == (2, args.vocab_size)
    assert cache.lengths.tolist() == [5, 3]
    e = tw.embed[tokens]
    if norms:
        e = rms_norm(e, w["embed_norm"], args.norm_eps)
    x = torch.cat((e, feats), -1) @ w["fc.w"].T + w["fc.b"]
    h = rms_norm(x, w["attn.norm"], args.norm_eps) if norms else x
    ref = KVCache.for_model(spec.args, 1, 16)
    from specoffload.runtime.layers import apply_rope, rope_cos_sin, rope_inv_freq, swiglu

    cos, sin = rope_cos_sin(rope_inv_freq(spec.args), torch.arange(5)[None], torch.float32)
    a = spec.args
    q = apply_rope((h[:1] @ w["attn.wq"].T).view(1, 5, a.n_heads, a.head_dim), cos, sin)
    k = apply_rope((h[:1] @ w["attn.wk"].T).view(1, 5, a.n_kv_heads, a.head_dim), cos, sin)
    v = (h[:1] @ w["attn.wv"].T).view(1, 5, a.n_kv_heads, a.head_dim)
    o = ref.attend(0, [0], q, k, v)
    y = x[:1] + o.reshape(1, 5, -1) @ w["attn.wo"].T
    y = y + swiglu({"w_gate": w["ffn.w_gate"], "w_up": w["ffn.w_up"], "w_down": w["ffn.w_down"]},
                   rms_norm(y, w["ffn.norm"], a.norm_eps))
    assert torch.allclose(pred[0], y[0, -1], atol=1e-5)
    z = rms_norm(y[0, -1], w["out_norm"], a.norm_eps) if norms else y[0, -1]
    assert torch.allclose(logits[0], z @ tw.lm_head.T, atol=1e-4)


def test_head_for_another_target_is_refused_naming_both(tmp_path, targets):
    llama = load_args(targets["llama"])
    write_random_head(tmp_path / "h", llama)
    mix = load_args(targets["mixtral"])
    other = dataclasses.replace(mix, dim=64, vocab_size=99)
    tw = Transformer.from_pretrained(targets["mixtral"]).weights
    with pytest.raises(FeatureHeadError) as e:
        FeatureHead.load(tmp_path / "h", other, tw.embed, tw.lm_head)
    msg = str(e.value)
    assert "hidden size 32 (the target's is 64)" in msg and "vocabulary 64 (the target's is 99)" in msg
    # A head whose embedding copy has another vocabulary is refused through the engine as well.
    cfg = head_config(mix, "eagle")
    cfg["vocab_size"] = 80
    write_head(tmp_path / "v", cfg, random_head_weights(cfg))
    with pytest.raises(EngineError, match="vocabulary 80 \\(the target's is 64\\)"):
        Engine(make_plan(), targets["mixtral"], tmp_path / "v")


def test_non_head_folders_are_told_apart(tmp_path, targets):
    assert not is_feature_head(targets["llama"])
    (tmp_path / "config.json").write_text(json.dumps({"speculators_model_type": "mlp_speculator"}))
    with pytest.raises(FeatureHeadError, match="only 'eagle'"):
        head_spec(tmp_path)


def test_recompute_plan_is_refused_for_a_feature_draft(tmp_path, targets):
    write_random_head(tmp_path, load_args(targets["llama"]))
    with pytest.raises(EngineError, match="recompute"):
        Engine(make_plan(draft_kv="recompute"), targets["llama"], tmp_path)


# -- exactness -------------------------------------------------------------------------------------

PROMPTS = [[0, 5, 9, 3], [0, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 33, 12, 40, 2, 2], [0, 60, 4]]


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
@pytest.mark.parametrize("policy,k,draft_kv,batch,layout", [
    ("serial-spec", 3, "gpu", 2, "eagle"), ("interleaved", 2, "host", 1, "speculators"),
    ("interleaved", 4, "gpu", 2, "eagle")])
def test_greedy_with_random_head_equals_target_greedy(tmp_path, targets, family, policy, k, draft_kv, batch, layout):
    """Random heads reject most drafts: the rollback path, every schedule, refill (5 prompts, 2-4 slots)."""
    head = write_random_head(tmp_path / "h", load_args(targets[family]), layout, seed=7, norms=layout == "speculators")
    n = 12
    ref = target_greedy(targets[family], PROMPTS, n)
    eng, outs, stats = run(make_plan(policy, batch, k, draft_kv, gen=n), targets[family], head, PROMPTS, n)
    assert outs == ref
    assert stats.sequences == len(PROMPTS)


@pytest.mark.parametrize("family", ["llama", "mistral", "mixtral"])
@pytest.mark.parametrize("draft_kv", ["gpu", "host"])
def test_fused_prefill_with_random_head_equals_target_greedy(tmp_path, targets, family, draft_kv):
    """The fused prefill (refill chunks in verifications; the head prefills each chunk from the chunk's own
    hidden states) on random targets with a random head: the rejection path, 5 prompts through 2 rows in
    chunks of 1, so every refill after the first is fused."""
    head = write_random_head(tmp_path / "h", load_args(targets[family]), "eagle", seed=7)
    n = 12
    ref = target_greedy(targets[family], PROMPTS, n)
    plan = make_plan("serial-spec", 2, 3, draft_kv, prefill=1, gen=n).replace(fuse_prefill=True)
    eng, outs, stats = run(plan, targets[family], head, PROMPTS, n)
    assert outs == ref
    assert stats.sequences == len(PROMPTS) and stats.fused_passes >= 2 and stats.prefill_passes <= 2


@pytest.fixture(scope="module")
def tiny():
    target, _ = tiny_pair_paths()
    from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_tokenizer

    return target, tiny_eagle_path(), tiny_pair_tokenizer()


TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self, value",
         "for i in range(10):\n", "x = [1, 2, 3]\nprint("]


@pytest.mark.parametrize("policy,draft_kv", [("serial-spec", "gpu"), ("interleaved", "host")])
def test_tiny_eagle_greedy_equals_target_and_accepts(tiny, policy, draft_kv):
    target, head, tok = tiny
    prompts = [tok.encode(t).ids for t in TEXTS]
    n = 16
    ref = target_greedy(target, prompts, n)
    eng, outs, stats = run(make_plan(policy, 2, 4, draft_kv, gen=n), target, head, prompts, n)
    eos = set(load_args(target).eos_token_id)
    for o, r in zip(outs, ref):
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        assert o == r[:cut]
    # A trained head is accepted far more often than chance.
    assert stats.acceptance.per_position()[0] > 0.3


@pytest.mark.parametrize("family,policy,draft_kv", [("llama", "serial-spec", "gpu"), ("mistral", "interleaved", "host"),
                                                    ("mixtral", "interleaved", "gpu")])
def test_every_round_drafts_what_a_fresh_recompute_drafts(tmp_path, targets, family, policy, draft_kv):
    """The head's cache bookkeeping (prefill, pending pairs, rollback after 0..k accepted) checked round by
    round: each round's drafts equal those of a head run from scratch over the committed context with the
    target's features. Timing mode keeps a random number of drafts per round, so every rollback length
    occurs (outputs are then not the target's; the bookkeeping is what is checked)."""
    head = write_random_head(tmp_path / "h", load_args(targets[family]), "eagle", seed=11, std=0.3)
    k = 3
    eng = Engine(make_plan(policy, 2, k, draft_kv, gen=14), targets[family], head, synthetic_acceptance=0.6)
    model = Transformer.from_pretrained(targets[family])
    fresh_head = FeatureHead.load(head, model.args, model.weights.embed, model.weights.lm_head)
    checked, kept = [], []
    orig_propose, orig_commit = eng.draft.propose, eng.draft.commit

    def fresh(ctx: list[int]) -> list[int]:
        feats = model.forward(torch.tensor([ctx]), model.new_cache(1, len(ctx)), logits="hidden")[:, :-1]
        cache = fresh_head.new_cache(1, len(ctx) + k)
        tokens, d = torch.tensor([ctx[1:]]), []
        for _ in range(k):
            pred, logits = fresh_head.forward(cache, [0], tokens, feats, torch.tensor([tokens.shape[1]]))
            d.append(int(logits[0].argmax()))
            tokens, feats = torch.tensor([[d[-1]]]), pred[:, None]
        return d

    def propose(seqs, k_):
        yield from orig_propose(seqs, k_)
        for s in seqs:
            checked.append(s.drafted.tolist() == fresh(s.req.prompt + s.out))

    def commit(seqs, n_accepted, k_, news):
        kept.extend(n_accepted)
        orig_commit(seqs, n_accepted, k_, news)

    eng.draft.propose, eng.draft.commit = propose, commit
    eng.run([Request(str(i), list(p), 14) for i, p in enumerate(PROMPTS)], lambda f: None)
    assert len(checked) > 10 and all(checked), checked
    assert set(kept) == set(range(k + 1))  # every rollback length happened


def test_profile_acceptance_measures_the_tiny_eagle(tmp_path):
    from pathlib import Path

    from specoffload.runtime.profiler.acceptance import measure_workload

    prompts = Path(__file__).resolve().parent.parent / "runtime" / "assets" / "demo_prompts.jsonl"
    res = measure_workload("tiny-target", "tiny-eagle", prompts, k=4, max_new_tokens=12, sample=4, progress=False)
    acc = res.workload.acceptance
    assert len(acc) == 4 and all(0.0 <= a <= 1.0 for a in acc)
    assert acc[0] > 0.2  # a trained head, far above chance (1/4096)
    assert "draft tiny-eagle" in res.workload.acceptance_source
