"""Our layers against transformers, and the KV cache against full recompute.

Tiny random models of each family are saved with save_pretrained(safe_serialization=True) and
loaded by our loader; weights are re-drawn at unit gain (std 1/sqrt(fan_in), norms near 1) so that
attention, routing and logits are far from uniform and a wrong mask, rotation or expert shows up.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from specoffload.runtime.config import ModelArgs  # noqa: E402
from specoffload.runtime.kv_cache import KVCache  # noqa: E402
from specoffload.runtime.layers import attention, init_random_weights  # noqa: E402
from specoffload.runtime.model import Transformer  # noqa: E402

V = 96


def _hf_configs():
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    return {
        # llama3 scaling with a short original context, so slow, smoothed and fast frequencies all occur
        "llama3-tied": ("LlamaForCausalLM", LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 32})),
        # head_dim != hidden / heads, and MQA (one kv head)
        "llama-headdim": ("LlamaForCausalLM", LlamaConfig(**common, num_key_value_heads=1, head_dim=32,
                                                          rope_theta=500.0)),
        # a sliding window shorter than the test sequences, so it matters
        "mistral-window": ("MistralForCausalLM", MistralConfig(**common, num_key_value_heads=2, sliding_window=7)),
        "mixtral": ("MixtralForCausalLM", MixtralConfig(**common, num_key_value_heads=2, num_local_experts=8,
                                                        num_experts_per_tok=2, sliding_window=None)),
    }


def _unit_gain_(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


@pytest.fixture(scope="module", params=list(_hf_configs()))
def hf_pair(request, tmp_path_factory):
    """(transformers model in fp32, our Transformer loaded from its save_pretrained folder)."""
    arch, cfg = _hf_configs()[request.param]
    torch.manual_seed(0)
    hf = getattr(transformers, arch)(cfg).eval()
    _unit_gain_(hf)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d, safe_serialization=True)
    return hf, Transformer.from_pretrained(d)


def test_prefill_matches_transformers(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, V, (3, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(ids).logits  # [B, T, V]
    got = ours.logits_full(ids)
    assert ref.abs().max() > 1.0  # logits are not trivially small
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_cached_decode_matches_transformers(hf_pair):
    """Prefill 11 tokens, then decode one token at a time; both sides use their KV caches."""
    hf, ours = hf_pair
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(3))
    cache = ours.new_cache(2, 32)
    got = [ours(ids[:, :11], cache)]
    with torch.no_grad():
        out = hf(ids[:, :11], use_cache=True)
        ref, past = [out.logits], out.past_key_values
        for t in range(11, 19):
            got.append(ours(ids[:, t:t + 1], cache))
            out = hf(ids[:, t:t + 1], cache=past, use_cache=True)
            ref.append(out.logits)
            past = out.past_key_values
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(ref, 1), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------
# KV cache: ragged incremental steps equal full recompute
# ----------------------------------------------------------------------------------------------

def _args(family: str, window: int | None = None) -> ModelArgs:
    moe = family == "mixtral"
    return ModelArgs(family=family, vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     ffn_dim=48, norm_eps=1e-5, rope_theta=10000.0, n_experts=4 if moe else 0, top_k=2 if moe else 0,
                     max_position_embeddings=64, sliding_window=window)


_MODELS = {f: Transformer(_args(f, w), init_random_weights(_args(f, w), seed=5))
           for f, w in (("llama", None), ("mistral", 5), ("mixtral", None))}


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(sorted(_MODELS)),
       lengths=st.lists(st.integers(1, 14), min_size=1, max_size=4),
       chunk_seed=st.integers(0, 2**16),
       impl=st.sampled_from(["sdpa", "grouped"]))
def test_ragged_cached_steps_equal_full_recompute(family, lengths, chunk_seed, impl):
    """Rows advance by random, different chunk sizes per step (0 included); every position's logits
    equal those of a full forward of that row alone."""
    model = _MODELS[family]
    model.attn_impl = impl
    g = torch.Generator().manual_seed(chunk_seed)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    B = len(seqs)
    # Use slots in reverse order inside a larger cache: rows are gathered, not a contiguous view.
    slots = list(range(B + 1, 1, -1))[:B]
    cache = model.new_cache(B + 2, 16)
    done = [0] * B
    got = [[] for _ in range(B)]
    while any(d < n for d, n in zip(done, lengths)):
        n_new = [int(torch.randint(0, n - d + 1, (1,), generator=g)) for d, n in zip(done, lengths)]
        T = max(max(n_new), 1)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            tokens[b, :n_new[b]] = seqs[b][done[b]:done[b] + n_new[b]]
        logits = model(tokens, cache, slots=slots, n_new=torch.tensor(n_new))
        for b in range(B):
            got[b].append(logits[b, :n_new[b]])
            done[b] += n_new[b]
    assert cache.lengths[slots].tolist() == lengths
    for b in range(B):
        ref = model.logits_full(seqs[b][None])[0]
        torch.testing.assert_close(torch.cat(got[b]), ref, atol=1e-4, rtol=0)


def test_last_logits_are_those_of_last_valid_token():
    model = _MODELS["llama"]
    tokens = torch.randint(0, V, (2, 6))
    n_new = torch.tensor([6, 3])
    full = model(tokens, model.new_cache(2, 8), n_new=n_new)
    last = model(tokens, model.new_cache(2, 8), n_new=n_new, logits="last")
    torch.testing.assert_close(last, torch.stack([full[0, 5], full[1, 2]]))


def test_rollback_then_new_tokens_equals_fresh():
    """Speculative verification: write 4 guesses, keep 1, continue with other tokens."""
    model = _MODELS["mixtral"]
    prompt, guess, other = torch.randint(0, V, (1, 7)), torch.randint(0, V, (1, 4)), torch.randint(0, V, (1, 3))
    cache = model.new_cache(1, 20)
    model(prompt, cache)
    model(guess, cache)
    cache.rollback([0], 8)  # accept the first guess only
    got = model(other, cache)
    ref = model.logits_full(torch.cat([prompt, guess[:, :1], other], 1))[:, -3:]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="beyond"):
        cache.rollback([0], 99)


def test_slot_reset_and_reuse():
    model = _MODELS["mistral"]
    cache = model.new_cache(2, 24)
    a, b, c = (torch.randint(0, V, (1, n)) for n in (9, 5, 12))
    model(a, cache, slots=[0])
    model(b, cache, slots=[1])
    cache.reset([0])
    got = model(c, cache, slots=[0])  # the longer new prompt overwrites the old one
    torch.testing.assert_close(got, model.logits_full(c), atol=1e-4, rtol=0)
    torch.testing.assert_close(model(b[:, :1], cache, slots=[1]),
                               model.logits_full(torch.cat([b, b[:, :1]], 1))[:, -1:], atol=1e-4, rtol=0)


def test_cache_overflow_is_an_error():
    model = _MODELS["llama"]
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache)


def test_attention_impls_agree_and_padding_rows_are_finite():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 8, 16, generator=g)  # [B, T, H, Dh]
    k, v = torch.randn(3, 2, 10, 16, generator=g), torch.randn(3, 2, 10, 16, generator=g)  # [B, Hkv, L, Dh]
    kv_len = torch.tensor([10, 3, 0])  # the last row has no keys at all
    q_pos = (kv_len - 4).clamp(min=0)[:, None] + torch.arange(4)
    a = attention(q, k, v, q_pos, kv_len, sliding_window=4, impl="sdpa")
    b = attention(q, k, v, q_pos, kv_len, sliding_window=4, impl="grouped")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cache_layout_and_pinned_request_without_cuda():
    cache = KVCache(n_layers=2, n_slots=3, max_len=5, n_kv_heads=2, head_dim=4, pin=True)
    assert cache.k[0].shape == (3, 2, 5, 4)  # [S, Hkv, max_len, Dh]
    assert cache.k[0].device.type == "cpu"
