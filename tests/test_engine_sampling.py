"""Speculative sampling preserves the target's distribution: a statistical test on a tiny vocabulary.

A random Mixtral-architecture target and a different random Mistral-architecture draft with an
8-token vocabulary; thousands of requests of one prompt, each with its own seed, through the engine
with speculation; the empirical joint distribution of the generated tokens is compared (chi-square)
with the target's exact distribution, computed by enumeration.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from specoffload.planner.schema import Plan, Prediction, Workload
from specoffload.runtime.engine import Engine, Request
from specoffload.runtime.model import Transformer
from specoffload.runtime.verify import processed_probs

V = 8
PROMPT = [0, 3, 5]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    root = tmp_path_factory.mktemp("tinyvocab")
    torch.manual_seed(0)
    tcfg = MixtralConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64, initializer_range=0.6, eos_token_id=None, bos_token_id=0)
    MixtralForCausalLM(tcfg).save_pretrained(root / "target", safe_serialization=True)
    torch.manual_seed(1)
    dcfg = MistralConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         initializer_range=0.6, eos_token_id=None, bos_token_id=0)
    MistralForCausalLM(dcfg).save_pretrained(root / "draft", safe_serialization=True)
    return root / "target", root / "draft"


def exact_joint(target_dir, n: int, temperature: float, top_p: float, top_k: int = 0,
                min_p: float = 0.0) -> dict[tuple[int, ...], float]:
    """P(x1..xn | prompt) under the target with temperature/top-k/top-p/min-p, by enumerating every prefix."""
    model = Transformer.from_pretrained(target_dir)
    t, tp = torch.tensor([temperature]), torch.tensor([top_p])
    tk, mp = torch.tensor([top_k]), torch.tensor([min_p])
    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in probs.items():
            logits = model.logits_full(torch.tensor([PROMPT + list(prefix)]))[:, -1]
            dist = processed_probs(logits, t, tp, tk, mp)[0]
            for x in range(V):
                nxt[prefix + (x,)] = pr * float(dist[x])
        probs = nxt
    return probs


def plan_for(policy: str, k: int, draft_kv: str) -> Plan:
    pred = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)
    return Plan(policy=policy, model="t", model_fingerprint="", draft="d", draft_fingerprint="", profile="cpu",
                profile_fingerprint="", workload=Workload(prompt_len_tokens=3, gen_len_tokens=3, num_prompts=1),
                decode_batch=64, num_batches=2 if policy == "interleaved" else 1, prefill_batch=64,
                draft_sub_batch=16, draft_len=k, micro_batches=1, gpu_attn_layers=0, gpu_ffn_layers=0,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv=draft_kv, weight_buffers=2, prediction=pred)


@pytest.mark.parametrize("policy,k,draft_kv,temperature,top_p", [
    ("serial-spec", 2, "gpu", 1.0, 1.0),
    ("interleaved", 3, "recompute", 0.7, 0.9),
    # k = 1: a round that keeps its draft token adds a bonus token, the 3rd, inside the generated span.
    ("serial-spec", 1, "host", 1.0, 1.0),
])
def test_speculative_sampling_follows_target_distribution(pair, policy, k, draft_kv, temperature, top_p):
    n_tokens, n = 3, 3000
    eng = Engine(plan_for(policy, k, draft_kv), pair[0], pair[1])
    seen: dict[tuple[int, ...], int] = {}
    eng.run([Request(f"s{i}", PROMPT, n_tokens, temperature, top_p, seed=7) for i in range(n)],
            lambda f: seen.__setitem__(tuple(f.tokens), seen.get(tuple(f.tokens), 0) + 1))
    assert sum(seen.values()) == n
    assert eng.stats.acceptance.rounds > 0 and 0.0 < eng.stats.acceptance.per_position()[0] < 1.0
    assert_follows(seen, exact_joint(pair[0], n_tokens, temperature, top_p), n)


@pytest.mark.slow
@pytest.mark.parametrize("policy,k,draft_kv,temperature,top_p,top_k,min_p", [
    ("serial-spec", 2, "gpu", 1.0, 1.0, 3, 0.0),  # top-k alone: the draft's and target's top 3 differ
    ("interleaved", 3, "host", 0.8, 0.95, 5, 0.15),  # all four, in their order
    ("serial-spec", 1, "recompute", 1.2, 1.0, 0, 0.2),  # min-p alone
])
def test_speculative_sampling_with_top_k_and_min_p_follows_target_distribution(pair, policy, k, draft_kv, temperature,
                                                                               top_p, top_k, min_p):
    n_tokens, n = 3, 3000
    eng, seen = sample_counts(pair[0], pair[1], plan_for(policy, k, draft_kv), n_tokens, n, temperature, top_p, top_k,
                              min_p)
    assert eng.stats.acceptance.rounds > 0 and 0.0 < eng.stats.acceptance.per_position()[0] < 1.0
    exact = exact_joint(pair[0], n_tokens, temperature, top_p, top_k, min_p)
    # the filters cut: some sequences the plain distribution allows have probability 0 here, and never occur
    assert any(pr == 0.0 for pr in exact.values())
    assert all(exact[seq] > 0 for seq in seen)
    assert_follows(seen, exact, n)


def sample_counts(target_dir, draft_dir, plan: Plan, n_tokens: int, n: int, temperature: float, top_p: float,
                  top_k: int, min_p: float) -> tuple[Engine, dict[tuple[int, ...], int]]:
    """n sampled continuations of PROMPT (seed 7, each its own generator) -> the engine and how often each
    sequence of n_tokens tokens was generated (all n counted)."""
    eng = Engine(plan, target_dir, draft_dir)
    seen: dict[tuple[int, ...], int] = {}
    eng.run([Request(f"s{i}", PROMPT, n_tokens, temperature, top_p, seed=7, top_k=top_k, min_p=min_p)
             for i in range(n)], lambda f: seen.__setitem__(tuple(f.tokens), seen.get(tuple(f.tokens), 0) + 1))
    assert sum(seen.values()) == n
    return eng, seen


def assert_follows(seen: dict[tuple[int, ...], int], exact: dict[tuple[int, ...], float], n: int) -> None:
    """Chi-square of the generated sequences against the exact joint distribution."""
    # Marginals of the 2nd and 3rd tokens (decided by verification) and the joint of the 1st and 2nd.
    for keep in ((1,), (2,), (0, 1), (1, 2)):
        cells: dict[tuple[int, ...], list[float]] = {}
        for seq, pr in exact.items():
            c = cells.setdefault(tuple(seq[i] for i in keep), [0.0, 0.0])
            c[0] += pr
        for seq, cnt in seen.items():
            cells[tuple(seq[i] for i in keep)][1] += cnt
        big = [(p, o) for p, o in cells.values() if p * n >= 5]  # chi-square needs expected counts >= 5
        small_p = sum(p for p, o in cells.values() if p * n < 5)
        small_o = sum(o for p, o in cells.values() if p * n < 5)
        exp = [p * n for p, _ in big] + ([small_p * n] if small_p > 0 else [])
        obs = [o for _, o in big] + ([small_o] if small_p > 0 else [])
        scale = sum(obs) / sum(exp)
        pvalue = chisquare(obs, [e * scale for e in exp]).pvalue
        assert pvalue > 1e-3, (keep, pvalue)


@pytest.fixture(scope="module")
def feature_head(pair, tmp_path_factory):
    """A random feature-draft head (EAGLE layout) over the tiny-vocabulary target, large weights so its
    proposals vary and are sometimes accepted."""
    from specoffload.runtime.config import load_args
    from specoffload.runtime.feature_draft import write_random_head

    return write_random_head(tmp_path_factory.mktemp("head") / "h", load_args(pair[0]), "eagle", seed=5, std=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("policy,k,draft_kv,temperature,top_p,top_k,min_p", [
    ("serial-spec", 2, "gpu", 1.0, 1.0, 0, 0.0),
    ("interleaved", 3, "host", 0.7, 0.9, 0, 0.0),
    ("serial-spec", 3, "gpu", 0.9, 0.95, 4, 0.1),
])
def test_speculative_sampling_with_feature_draft_follows_target_distribution(pair, feature_head, policy, k, draft_kv,
                                                                             temperature, top_p, top_k, min_p):
    n_tokens, n = 3, 3000
    eng, seen = sample_counts(pair[0], feature_head, plan_for(policy, k, draft_kv), n_tokens, n, temperature, top_p,
                              top_k, min_p)
    assert eng.stats.acceptance.rounds > 0 and 0.0 < eng.stats.acceptance.per_position()[0] < 1.0
    exact = exact_joint(pair[0], n_tokens, temperature, top_p, top_k, min_p)
    assert all(exact[seq] > 0 for seq in seen)
    assert_follows(seen, exact, n)
