"""The per-layer pieces compose across devices the way the offload engine will use them.

Attention weights and the KV cache stay on the host; the FFN part runs on another device, and for
Mixtral only the experts the router picked are copied there (the others stay None). The result must
equal the one-device Transformer. On a CPU-only machine both "devices" are the CPU (the composition is
still checked); with CUDA the gpu-marked case moves real tensors, pinned memory included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specoffload.runtime import layers as L
from specoffload.runtime.config import ModelArgs
from specoffload.runtime.kv_cache import KVCache
from specoffload.runtime.model import Transformer

ARGS = ModelArgs(family="mixtral", vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                 ffn_dim=48, norm_eps=1e-5, rope_theta=10000.0, n_experts=8, top_k=2, max_position_embeddings=64)


def split_step(args: ModelArgs, w: L.ModelWeights, tokens: torch.Tensor, cache: KVCache, dev: str,
               copied: list[int]) -> torch.Tensor:
    """One step with attention on the host (w.layers[i].attn and the cache on the CPU) and the FFN,
    embedding and head on ``dev``; experts are copied to ``dev`` per layer only if routed to.

    tokens [B, T] -> logits [B, T, V]; records how many experts each layer copied in ``copied``.
    """
    B, T = tokens.shape
    slots = range(B)
    inv_freq = L.rope_inv_freq(args)  # host
    cos_sin = L.rope_cos_sin(inv_freq, cache.positions(slots, T))  # [B, T, Dh] x2, host
    x = F.embedding(tokens.to(dev), w.embed)  # [B, T, D] on dev
    for i, lw in enumerate(w.layers):
        q, k, v = L.qkv(args, lw.attn, x.cpu(), cos_sin)  # host
        o = cache.attend(i, slots, q, k, v)  # host, [B, T, H, Dh]
        x = x + L.attn_out(lw.attn, o).to(dev)
        h = L.ffn_norm(args, lw.ffn, x).reshape(B * T, args.dim)  # [N, D] on dev
        r = L.route(args, lw.ffn, h)
        resident = [None] * args.n_experts
        for e in r.experts_used():
            resident[e] = L.to_device(lw.experts[e], dev, non_blocking=True)
        copied.append(len(r.experts_used()))
        x = x + L.moe_experts(resident, h, r).view(B, T, args.dim)
    cache.advance(slots, T)
    return F.linear(L.rms_norm(x, w.norm, args.norm_eps), w.lm_head)


def _split_weights(w: L.ModelWeights, dev: str) -> L.ModelWeights:
    pin = dev != "cpu"
    host = (lambda t: t.pin_memory()) if pin else (lambda t: t)
    layers = [L.LayerWeights(attn=dict(lw.attn), ffn=L.to_device(lw.ffn, dev),
                             experts=[{n: host(t) for n, t in e.items()} for e in lw.experts]) for lw in w.layers]
    return L.ModelWeights(w.embed.to(dev), w.norm.to(dev), w.lm_head.to(dev), layers)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_split_devices_equal_one_device(dev):
    w = L.init_random_weights(ARGS, seed=11)
    ref_model = Transformer(ARGS, w)
    tokens = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    ref_cache, cache = ref_model.new_cache(3, 16), KVCache.for_model(ARGS, 3, 16)
    split_w, copied = _split_weights(w, dev), []
    got = [split_step(ARGS, split_w, tokens[:, :6], cache, dev, copied)]
    got += [split_step(ARGS, split_w, tokens[:, t:t + 1], cache, dev, copied) for t in range(6, 9)]
    ref = [ref_model(tokens[:, :6], ref_cache)] + [ref_model(tokens[:, t:t + 1], ref_cache) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(got, 1).cpu(), torch.cat(ref, 1), atol=1e-4, rtol=0)
    # Decoding 3 tokens touches at most 3 * top_k = 6 of the 8 experts per layer: fewer are copied.
    assert max(copied[-3 * ARGS.n_layers:]) <= 6


def test_missing_routed_expert_is_an_error():
    w = L.init_random_weights(ARGS, seed=1)
    h = torch.randn(4, ARGS.dim)
    r = L.route(ARGS, w.layers[0].ffn, h)
    with pytest.raises(RuntimeError, match=f"expert {r.experts_used()[0]} was chosen"):
        L.moe_experts([None] * ARGS.n_experts, h, r)
