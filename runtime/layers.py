"""Decoder-layer math for the Llama, Mistral and Mixtral families, as plain functions over tensor dicts.

Scope: the pieces one decoder layer is made of, written so an offloading engine can run them on
different devices and stream the weights in between:

    h            = x + attn_out(attn, attend(q, k, v over a KV cache))   where q, k, v = qkv(attn, x, rope)
    x_next       = h + ffn(ffn_w, h)                        (dense SwiGLU)
    x_next       = h + moe(ffn_w, experts, h)               (Mixtral: route, then only the chosen experts)

Weights are *not* nn.Module parameters: each layer is a :class:`LayerWeights` holding three kinds of
plain ``dict[str, Tensor]`` (attention part, FFN part, one dict per expert), so the engine can move the
attention dict to the CPU, the FFN dict to the GPU and copy just the experts the router picked
(``LayerWeights.experts[e]``), with :func:`to_device`.

Shapes: B batch rows, T new tokens per row, L keys, D hidden, H query heads, Hkv key/value heads,
G = H / Hkv query heads per kv head, Dh head dim, F FFN width, E experts, k experts per token,
V vocabulary, N = B * T flattened tokens.

All compute follows the reference implementation's numerics (RMSNorm and router softmax in fp32,
RoPE in the rotate-half layout with cos/sin from fp32 frequencies), so fp32 weights reproduce
transformers' logits to ~1e-5.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ModelArgs

TensorDict = dict[str, Tensor]


# ----------------------------------------------------------------------------------------------
# Weight containers
# ----------------------------------------------------------------------------------------------

def to_device(d: Mapping[str, Tensor], device: torch.device | str, dtype: torch.dtype | None = None,
              non_blocking: bool = False) -> TensorDict:
    """A copy of a tensor dict on ``device`` (and ``dtype``); tensors already there are shared, not copied."""
    return {n: t.to(device=device, dtype=dtype, non_blocking=non_blocking) for n, t in d.items()}


@dataclass
class LayerWeights:
    """One decoder layer.

    attn:    norm [D], wq [H*Dh, D], wk [Hkv*Dh, D], wv [Hkv*Dh, D], wo [D, H*Dh]
    ffn:     norm [D] and either (dense) w_gate [F, D], w_up [F, D], w_down [D, F]
             or (MoE) router [E, D]
    experts: MoE only, one dict per expert: w_gate [F, D], w_up [F, D], w_down [D, F]
             (Mixtral's w1, w3, w2). Empty for dense layers.
    """

    attn: TensorDict
    ffn: TensorDict
    experts: list[TensorDict] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "LayerWeights":
        return LayerWeights(to_device(self.attn, device, dtype), to_device(self.ffn, device, dtype),
                            [to_device(e, device, dtype) for e in self.experts])


@dataclass
class ModelWeights:
    """All weights of a model: embedding [V, D], final norm [D], lm_head [V, D], layers."""

    embed: Tensor
    norm: Tensor
    lm_head: Tensor
    layers: list[LayerWeights]

    # Canonical flat names ("embed", "layers.3.attn.wq", "layers.3.experts.5.w_gate", ...) are what
    # the loader's name map targets and what a placement callback is asked about.
    def flat(self) -> TensorDict:
        out: TensorDict = {"embed": self.embed, "norm": self.norm, "lm_head": self.lm_head}
        for i, lw in enumerate(self.layers):
            out.update({f"layers.{i}.attn.{n}": t for n, t in lw.attn.items()})
            out.update({f"layers.{i}.ffn.{n}": t for n, t in lw.ffn.items()})
            for e, ew in enumerate(lw.experts):
                out.update({f"layers.{i}.experts.{e}.{n}": t for n, t in ew.items()})
        return out

    @classmethod
    def from_flat(cls, args: ModelArgs, flat: Mapping[str, Tensor]) -> "ModelWeights":
        layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            attn = {n: flat[p + "attn." + n] for n in ATTN_KEYS}
            ffn = {n: flat[p + "ffn." + n] for n in (MOE_FFN_KEYS if args.is_moe else DENSE_FFN_KEYS)}
            experts = [{n: flat[f"{p}experts.{e}.{n}"] for n in EXPERT_KEYS} for e in range(args.n_experts)]
            layers.append(LayerWeights(attn, ffn, experts))
        return cls(flat["embed"], flat["norm"], flat["lm_head"], layers)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "ModelWeights":
        return ModelWeights(self.embed.to(device, dtype), self.norm.to(device, dtype),
                            self.lm_head.to(device, dtype), [lw.to(device, dtype) for lw in self.layers])


ATTN_KEYS = ("norm", "wq", "wk", "wv", "wo")
DENSE_FFN_KEYS = ("norm", "w_gate", "w_up", "w_down")
MOE_FFN_KEYS = ("norm", "router")
EXPERT_KEYS = ("w_gate", "w_up", "w_down")


def weight_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Canonical flat name -> expected shape, for every tensor a model with ``args`` has."""
    D, V, F_ = args.dim, args.vocab_size, args.ffn_dim
    q_out, kv_out = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, D), "norm": (D,), "lm_head": (V, D)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn.norm": (D,), p + "attn.wq": (q_out, D), p + "attn.wk": (kv_out, D),
                       p + "attn.wv": (kv_out, D), p + "attn.wo": (D, q_out), p + "ffn.norm": (D,)})
        ffn = {"w_gate": (F_, D), "w_up": (F_, D), "w_down": (D, F_)}
        if args.is_moe:
            shapes[p + "ffn.router"] = (args.n_experts, D)
            for e in range(args.n_experts):
                shapes.update({f"{p}experts.{e}.{n}": s for n, s in ffn.items()})
        else:
            shapes.update({p + "ffn." + n: s for n, s in ffn.items()})
    return shapes


def init_random_weights(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> ModelWeights:
    """Random weights with unit-gain projections (std 1/sqrt(fan_in)) and norms near 1.

    For tests: large enough that attention patterns, routing and logits are far from uniform, so a
    wrong mask, rotation or expert choice shows up in the logits.
    """
    g = torch.Generator().manual_seed(seed)
    flat = {}
    for name, shape in weight_shapes(args).items():
        if len(shape) == 1:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        flat[name] = t.to(dtype)
    if args.tie_word_embeddings:
        flat["lm_head"] = flat["embed"]
    return ModelWeights.from_flat(args, flat)


# ----------------------------------------------------------------------------------------------
# Norm and rotary embedding
# ----------------------------------------------------------------------------------------------

def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, the mean taken in fp32 (low-precision inputs overflow)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_inv_freq(args: ModelArgs, device: torch.device | str = "cpu") -> Tensor:
    """Inverse frequencies f_i = theta^(-2i/Dh), i < Dh/2, optionally Llama-3 scaled.  # [Dh/2] fp32

    Llama 3 scaling, per frequency with wavelength lambda = 2 pi / f and original context L:
    lambda < L / high_freq_factor (fast, local) stays; lambda > L / low_freq_factor (slow, long
    range) is divided by ``factor``; in between, interpolate with weight
    s = (L / lambda - low) / (high - low) on the unscaled frequency.
    """
    Dh = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.int64).float() / Dh))
    s = args.rope_scaling
    if s is not None:
        L = s.original_max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        slow = wavelen > L / s.low_freq_factor
        fast = wavelen < L / s.high_freq_factor
        w = (L / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - w) * inv_freq / s.factor + w * inv_freq
        inv_freq = torch.where(slow, inv_freq / s.factor, torch.where(fast, inv_freq, mid))
    return inv_freq.to(device)


def rope_cos_sin(inv_freq: Tensor, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos and sin of angle p * f for each position p and frequency f, duplicated over both halves.

    positions [B, T] (int) -> cos, sin [B, T, Dh]. Computed once per step and shared by all layers.
    """
    angles = positions.to(inv_freq.device).float()[..., None] * inv_freq  # [B, T, Dh/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, T, Dh]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each pair (x_i, x_{i+Dh/2}) by its angle (the Hugging Face "rotate half" layout).

    x [B, T, heads, Dh], cos/sin [B, T, Dh] -> [B, T, heads, Dh]
    """
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)  # (x1, x2) -> (-x2, x1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ----------------------------------------------------------------------------------------------
# Attention part
# ----------------------------------------------------------------------------------------------

def qkv(args: ModelArgs, w: Mapping[str, Tensor], x: Tensor, cos_sin: tuple[Tensor, Tensor]
        ) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-attention norm, projections and RoPE.

    x [B, T, D] -> q [B, T, H, Dh], k [B, T, Hkv, Dh], v [B, T, Hkv, Dh]  (q and k rotated)
    """
    B, T, _ = x.shape
    h = rms_norm(x, w["norm"], args.norm_eps)
    q = F.linear(h, w["wq"]).view(B, T, args.n_heads, args.head_dim)
    k = F.linear(h, w["wk"]).view(B, T, args.n_kv_heads, args.head_dim)
    v = F.linear(h, w["wv"]).view(B, T, args.n_kv_heads, args.head_dim)
    cos, sin = cos_sin
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_mask(q_pos: Tensor, kv_len: Tensor, L: int, sliding_window: int | None = None) -> Tensor:
    """Which keys each query may see: key j is visible to a query at position p iff
    j < kv_len (written), j <= p (causal; covers the new tokens among themselves too) and,
    with a sliding window W, j > p - W.

    q_pos [B, T], kv_len [B] -> bool [B, T, L]
    """
    j = torch.arange(L, device=q_pos.device)  # [L]
    visible = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < kv_len[:, None, None])
    if sliding_window is not None:
        visible &= j[None, None, :] > q_pos[:, :, None] - sliding_window
    return visible


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, kv_len: Tensor,
              sliding_window: int | None = None, impl: str = "sdpa") -> Tensor:
    """Batched GQA attention of the new queries over a (ragged) key/value history.

    q [B, T, H, Dh]; k, v [B, Hkv, L, Dh] (head-major, as the KV cache stores them; row b holds
    kv_len[b] valid keys, the rest is ignored); q_pos [B, T] absolute query positions; kv_len [B]
    -> o [B, T, H, Dh]. Query head h reads kv head h // G.

    impl="sdpa": torch's scaled_dot_product_attention with enable_gqa (no K/V repeat).
    impl="grouped": the G query heads sharing a kv head are folded into the query axis and hit the
    same K/V with one plain matmul. Both are exact. Rows whose queries see no key at all (padding)
    come out finite.
    impl="host": runtime/host_attention.py (CPU tensors only): reads each row only up to its own
    length, fp32 accumulation whatever the KV dtype, queries that see no key come out 0. This is
    what the KV cache uses on the host (see runtime/kv_cache.py).
    """
    if impl == "host":
        from .host_attention import host_attention

        return host_attention(q, k, v, q_pos, kv_len, sliding_window)
    B, T, H, Dh = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    G = H // Hkv
    visible = attention_mask(q_pos, kv_len, L, sliding_window)  # [B, T, L]
    scale = 1.0 / math.sqrt(Dh)
    # A very negative finite number rather than -inf keeps fully masked (padding) rows finite.
    neg = torch.finfo(q.dtype).min
    if impl == "sdpa":
        bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, neg)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=bias[:, None], scale=scale,
                                           enable_gqa=True)  # [B, H, T, Dh]
        return o.transpose(1, 2)
    if impl != "grouped":
        raise ValueError(f"unknown attention impl {impl!r} (sdpa, grouped, host)")
    qg = q.view(B, T, Hkv, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, Dh)  # [B, Hkv, G*T, Dh]
    scores = torch.matmul(qg, k.transpose(2, 3)) * scale  # [B, Hkv, G*T, L]
    scores = scores.view(B, Hkv, G, T, L).masked_fill(~visible[:, None, None], neg)
    p = torch.softmax(scores, dim=-1).view(B, Hkv, G * T, L)
    o = torch.matmul(p, v)  # [B, Hkv, G*T, Dh]
    return o.view(B, Hkv, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def attn_out(w: Mapping[str, Tensor], o: Tensor) -> Tensor:
    """Output projection of the attention heads: o [B, T, H, Dh] -> [B, T, D] (residual delta)."""
    B, T = o.shape[:2]
    return F.linear(o.reshape(B, T, -1), w["wo"])


# ----------------------------------------------------------------------------------------------
# FFN part
# ----------------------------------------------------------------------------------------------

def swiglu(w: Mapping[str, Tensor], h: Tensor) -> Tensor:
    """w_down(silu(w_gate h) * w_up h): h [..., D] -> [..., D]."""
    return F.linear(F.silu(F.linear(h, w["w_gate"])) * F.linear(h, w["w_up"]), w["w_down"])


def ffn_norm(args: ModelArgs, w: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Pre-FFN RMSNorm: x [B, T, D] -> [B, T, D]."""
    return rms_norm(x, w["norm"], args.norm_eps)


@dataclass
class Routing:
    """Router decision for N tokens: logits [N, E], top-k experts [N, k] and their weights [N, k]."""

    logits: Tensor
    experts: Tensor
    weights: Tensor

    def experts_used(self) -> list[int]:
        """Sorted ids of the experts at least one token needs (what an engine must have resident)."""
        return torch.unique(self.experts).tolist()


def route(args: ModelArgs, w: Mapping[str, Tensor], h: Tensor) -> Routing:
    """Mixtral router: softmax over all E experts (in fp32), keep the top k, renormalise those k to sum 1.

    h [N, D] (normed) -> Routing(logits [N, E], experts [N, k], weights [N, k] in h's dtype)
    """
    logits = F.linear(h, w["router"])  # [N, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_e = torch.topk(probs, args.top_k, dim=-1)  # [N, k]
    top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return Routing(logits, top_e, top_p.to(h.dtype))


def moe_experts(experts: Sequence[Mapping[str, Tensor] | None], h: Tensor, r: Routing) -> Tensor:
    """Weighted sum over each token's chosen experts: sum_j weights[n, j] * expert_{experts[n, j]}(h[n]).

    h [N, D] -> [N, D]. ``experts`` may hold None for experts no token chose (an engine copies only
    ``r.experts_used()``); a None that is needed is an error.
    """
    out = torch.zeros_like(h)
    for e in r.experts_used():
        if experts[e] is None:
            raise RuntimeError(f"expert {e} was chosen by the router but its weights are not resident")
        tok, slot = torch.nonzero(r.experts == e, as_tuple=True)  # tokens routed to e, and which of their k
        y = swiglu(experts[e], h[tok])  # [n_e, D]
        out.index_add_(0, tok, y * r.weights[tok, slot, None])
    return out


def ffn(args: ModelArgs, w: Mapping[str, Tensor], x: Tensor,
        experts: Sequence[Mapping[str, Tensor] | None] | None = None) -> Tensor:
    """The whole FFN half of a layer as a residual delta: x [B, T, D] -> [B, T, D].

    Dense families run SwiGLU; Mixtral routes each token to its top-k experts (``experts``).
    """
    h = ffn_norm(args, w, x)
    if not args.is_moe:
        return swiglu(w, h)
    B, T, D = h.shape
    flat = h.reshape(B * T, D)  # [N, D]
    return moe_experts(experts, flat, route(args, w, flat)).view(B, T, D)
