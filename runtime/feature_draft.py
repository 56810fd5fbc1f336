"""Feature drafts: EAGLE-1/2 style heads that draft from the target's own hidden states.

Scope: the head's weights and config (two on-disk layouts), its forward over one decoder layer with
its own KV cache, and the engine-side draft that keeps that cache per sequence.

The head, per position i (f_i: the target's last hidden state at position i after its final norm,
i.e. what the target's LM head reads; t_{i+1}: the token that followed position i):

    x_i   = fc([embed(t_{i+1}); f_i])                 2D -> D (bias optional)
    g_i   = x_i + attn(norm?(x_i))  over the head's one-layer KV cache at position i
    f'_i  = g_i + mlp(norm(g_i))                      the predicted feature of position i + 1
    logits= lm_head(norm_out?(f'_i))                  the target's LM head: the draft of t_{i+2}

The embedding and LM head are the target's (a head checkpoint that carries its own copy of the
embedding has it checked for shape and then ignored). Drafting continues autoregressively from the
predicted feature: step j feeds (f'_{previous}, d_j). After verification the predicted entries are
rolled back and the accepted positions are fed again with the target's true features.

Layouts read:
  * EAGLE (as published with the EAGLE heads for Llama, Vicuna and Mixtral targets): a config.json in the
    target family's own form (hidden_size, heads, intermediate_size, vocab_size, ...) and tensors
    ``fc.weight`` [D, 2D] (+ ``fc.bias``), ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
    ``layers.0.post_attention_layernorm.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``, optionally
    ``layers.0.input_layernorm.weight`` (heads without it feed the fc output to the projections unnormed),
    ``embed_layernorm.weight`` / ``hidden_layernorm.weight`` / ``lm_head_layernorm.weight`` (variants trained
    with extra norms) and ``embed_tokens.weight`` (a copy of the target's, ignored).
  * speculators (``"speculators_model_type": "eagle"`` in config.json): the layer's config under
    ``transformer_layer_config``, ``fusion_bias`` / ``layernorms`` flags, and tensors ``fusion_fc.*``,
    ``transformer.*`` (the layer, same inner names), ``embedding_layernorm.weight``,
    ``pre_lm_head_layernorm.weight``.
Both in safetensors (a single file or an index of shards), as the rest of the loader, or, as EAGLE-1 heads are
published, one pickle file (``pytorch_model.bin``): read with ``torch.load(weights_only=True)``, which
rebuilds tensors and plain containers only and runs no code from the file; a pickle it refuses is refused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from specoffload.planner.schema import Plan
from specoffload.planner.trace_names import SPAN_DRAFT_PREFILL, SPAN_DRAFT_STEP, TRACK_GPU

from .config import ConfigError, ModelArgs, args_from_hf_config
from .kv_cache import KVCache
from .layers import apply_rope, attn_out, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from .loader import CheckpointError, checkpoint_layout, stream_tensors
from .verify import draw, processed_probs, sampling_tensors


class FeatureHeadError(ValueError):
    """A feature-draft checkpoint we cannot run, or one made for another target."""


# ----------------------------------------------------------------------------------------------
# Config and layout
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """What a head checkpoint holds: its layer's shapes and which optional tensors it has."""

    layout: str  # "eagle" | "speculators"
    args: ModelArgs  # the decoder layer's shapes (n_layers 1, dense FFN)
    fc_bias: bool
    input_norm: bool  # a norm on the fc output before the attention projections
    embed_norm: bool  # a norm on the token embedding before the fc
    out_norm: bool  # a norm before the LM head
    verifier: str = ""  # the target the checkpoint names, if it names one

    @property
    def dim(self) -> int:
        return self.args.dim

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size


# canonical name -> (eagle name, speculators name)
_NAMES = {
    "fc.w": ("fc.weight", "fusion_fc.weight"),
    "fc.b": ("fc.bias", "fusion_fc.bias"),
    "embed_norm": ("embed_layernorm.weight", "embedding_layernorm.weight"),
    "out_norm": ("lm_head_layernorm.weight", "pre_lm_head_layernorm.weight"),
    "attn.norm": ("layers.0.input_layernorm.weight", "transformer.input_layernorm.weight"),
    "attn.wq": ("layers.0.self_attn.q_proj.weight", "transformer.self_attn.q_proj.weight"),
    "attn.wk": ("layers.0.self_attn.k_proj.weight", "transformer.self_attn.k_proj.weight"),
    "attn.wv": ("layers.0.self_attn.v_proj.weight", "transformer.self_attn.v_proj.weight"),
    "attn.wo": ("layers.0.self_attn.o_proj.weight", "transformer.self_attn.o_proj.weight"),
    "ffn.norm": ("layers.0.post_attention_layernorm.weight", "transformer.post_attention_layernorm.weight"),
    "ffn.w_gate": ("layers.0.mlp.gate_proj.weight", "transformer.mlp.gate_proj.weight"),
    "ffn.w_up": ("layers.0.mlp.up_proj.weight", "transformer.mlp.up_proj.weight"),
    "ffn.w_down": ("layers.0.mlp.down_proj.weight", "transformer.mlp.down_proj.weight"),
}
_OPTIONAL = {"fc.b", "embed_norm", "out_norm", "attn.norm"}
# Tensors some heads carry that we take from the target instead (or that carry no weights).
_SHARED = {"embed_tokens.weight", "lm_head.weight", "model.embed_tokens.weight"}


def _pickle_file(d: Path) -> Path | None:
    from specoffload.planner.models import pickle_weights_file

    return pickle_weights_file(d) if d.is_dir() else None


def _tensor_names(d: Path) -> set[str]:
    """The head's tensor names: from the safetensors headers, or from a pickle's opcodes (nothing unpickled)."""
    from specoffload.planner.models import pickle_strings

    pkl = _pickle_file(d)
    if pkl is not None:
        return pickle_strings(pkl)
    return set(checkpoint_layout(d))


def load_pickle_state(path: Path) -> dict[str, Tensor]:
    """A pickled state dict, loaded with torch.load(weights_only=True): tensors and plain containers only, no code
    run. Anything else (a pickled module, custom classes) is refused naming the file and the fix."""
    import pickle

    fix = ("only plain tensor state dicts are read from pickle files (no code from them runs); convert it once to "
           "safetensors where you trust it: safetensors.torch.save_file(torch.load(f), 'model.safetensors')")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise FeatureHeadError(f"{path}: torch.load(weights_only=True) cannot load it safely ({why}); {fix}") from None
    if isinstance(obj, dict) and set(obj) <= {"state_dict", "model"} and len(obj) == 1:
        obj = next(iter(obj.values()))  # {"state_dict": {...}} as some trainers save
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise FeatureHeadError(f"{path}: not a state dict (a mapping of tensor names to tensors) but a "
                               f"{type(obj).__name__}; {fix}")
    return obj


def _tensors_from_state(state: dict[str, Tensor], name_map: dict[str, str], shapes, dtype, device, ignorable,
                        where: Path) -> dict[str, Tensor]:
    """stream_tensors' checks and placement for an in-memory state dict (a pickled head)."""
    missing = [n for n in name_map if n not in state]
    if missing:
        raise FeatureHeadError(f"feature-draft head {where} is missing {len(missing)} tensor(s): "
                               f"{', '.join(sorted(missing)[:8])}")
    extra = [n for n in state if n not in name_map and not ignorable(n)]
    if extra:
        raise FeatureHeadError(f"feature-draft head {where} has {len(extra)} unexpected tensor(s): "
                               f"{', '.join(sorted(extra)[:8])}")
    out = {}
    for disk, ours in name_map.items():
        t = state[disk]
        if tuple(t.shape) != tuple(shapes[ours]):
            raise FeatureHeadError(f"tensor {disk} in {where.name}: expected shape {tuple(shapes[ours])}, found "
                                   f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise FeatureHeadError(f"tensor {disk} in {where.name} has dtype {t.dtype}; only float heads are supported")
        out[ours] = t.to(device=device, dtype=dtype).clone()
    return out


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FeatureHeadError(f"no config.json in {model_dir} (a feature-draft head folder needs one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FeatureHeadError(f"{path}: not valid JSON: {e}") from None


def is_feature_head(model_dir: str | Path) -> bool:
    """True for a folder holding a feature-draft head in either layout (checked without loading tensors)."""
    d = Path(model_dir)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if cfg.get("speculators_model_type") == "eagle":
        return True
    try:
        names = _tensor_names(d)
    except CheckpointError:
        return False
    return "fc.weight" in names or "fusion_fc.weight" in names


def head_spec(model_dir: str | Path) -> HeadSpec:
    """Read a head's config.json and tensor names; refuse layouts we cannot run, naming why."""
    d = Path(model_dir)
    cfg = _read_config(d)
    speculators = cfg.get("speculators_model_type") is not None
    if speculators and cfg.get("speculators_model_type") != "eagle":
        raise FeatureHeadError(f"{d}: speculators model type {cfg.get('speculators_model_type')!r} is not supported; "
                               "only 'eagle' (EAGLE-1/2 and HASS heads) is")
    layer_cfg = dict(cfg.get("transformer_layer_config") or {}) if speculators else dict(cfg)
    if not layer_cfg:
        raise FeatureHeadError(f"{d}/config.json has no transformer_layer_config")
    if not layer_cfg.get("architectures") and layer_cfg.get("model_type") not in ("llama", "mistral", "mixtral"):
        layer_cfg["architectures"] = ["LlamaForCausalLM"]
    layer_cfg.setdefault("num_hidden_layers", 1)
    try:
        args = args_from_hf_config(layer_cfg)
    except (ConfigError, KeyError) as e:
        raise FeatureHeadError(f"{d}/config.json: {e}") from None
    try:
        names = _tensor_names(d)
    except CheckpointError as e:
        raise FeatureHeadError(str(e)) from None
    col = 1 if speculators else 0
    moe = [n for n in names if "block_sparse_moe" in n]
    if moe:
        raise FeatureHeadError(f"{d}: the head's layer has experts ({moe[0]}); feature-draft heads with a "
                               "dense FFN (as published) are supported")
    if _NAMES["fc.w"][col] not in names:
        other = _NAMES["fc.w"][1 - col]
        hint = f" (it has {other}: is config.json from the other layout?)" if other in names else ""
        raise FeatureHeadError(f"{d}: no {_NAMES['fc.w'][col]} tensor, so not a feature-draft head{hint}")
    args = replace(args, n_layers=1, n_experts=0, top_k=0)
    verifier = ""
    if speculators:
        v = (cfg.get("speculators_config") or {}).get("verifier") or {}
        verifier = str(v.get("name_or_path") or "")

    def has(key: str) -> bool:
        return _NAMES[key][col] in names

    input_norm = has("attn.norm") or (not speculators and "hidden_layernorm.weight" in names)
    return HeadSpec("speculators" if speculators else "eagle", args, fc_bias=has("fc.b"), input_norm=input_norm,
                    embed_norm=has("embed_norm"), out_norm=has("out_norm"), verifier=verifier)


def head_shapes(spec: HeadSpec) -> dict[str, tuple[int, ...]]:
    a = spec.args
    D, H, Hkv, Dh, Fd = a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim
    s = {"fc.w": (D, 2 * D), "attn.wq": (H * Dh, D), "attn.wk": (Hkv * Dh, D), "attn.wv": (Hkv * Dh, D),
         "attn.wo": (D, H * Dh), "ffn.norm": (D,), "ffn.w_gate": (Fd, D), "ffn.w_up": (Fd, D), "ffn.w_down": (D, Fd)}
    for key, flag in (("fc.b", spec.fc_bias), ("embed_norm", spec.embed_norm), ("out_norm", spec.out_norm),
                      ("attn.norm", spec.input_norm)):
        if flag:
            s[key] = (D,)
    return s


def head_name_map(spec: HeadSpec) -> dict[str, str]:
    col = 1 if spec.layout == "speculators" else 0
    return {_NAMES[k][col]: k for k in head_shapes(spec)}


def check_against_target(spec: HeadSpec, target: ModelArgs, where: str | Path = "") -> None:
    """A head trained for another target is refused: hidden size and vocabulary must match."""
    problems = []
    if spec.dim != target.dim:
        problems.append(f"hidden size {spec.dim} (the target's is {target.dim})")
    if spec.vocab_size != target.vocab_size:
        problems.append(f"vocabulary {spec.vocab_size} (the target's is {target.vocab_size})")
    if problems:
        named = f" (it names {spec.verifier})" if spec.verifier else ""
        raise FeatureHeadError(f"feature-draft head {where}{named} was made for another target: "
                               + "; ".join(problems) + ". Use the head trained for this target model")


# ----------------------------------------------------------------------------------------------
# The head
# ----------------------------------------------------------------------------------------------

class FeatureHead:
    """A loaded head: its own weights on `device`, the target's embedding and LM head by reference."""

    def __init__(self, spec: HeadSpec, weights: dict[str, Tensor], embed: Tensor, lm_head: Tensor):
        self.spec, self.args, self.w = spec, spec.args, weights
        self.embed, self.lm_head = embed, lm_head
        self.device, self.dtype = weights["fc.w"].device, weights["fc.w"].dtype
        self.inv_freq = rope_inv_freq(self.args, self.device)

    @classmethod
    def load(cls, model_dir: str | Path, target_args: ModelArgs, embed: Tensor, lm_head: Tensor,
             dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "FeatureHead":
        d = Path(model_dir)
        spec = head_spec(d)
        check_against_target(spec, target_args, d)
        col = 1 if spec.layout == "speculators" else 0
        name_map = head_name_map(spec)
        pkl = _pickle_file(d)
        state = load_pickle_state(pkl) if pkl is not None else None
        names = set(state) if state is not None else set(checkpoint_layout(d))
        if spec.layout == "eagle" and spec.input_norm and _NAMES["attn.norm"][0] not in names:
            name_map = {("hidden_layernorm.weight" if v == "attn.norm" else k): v for k, v in name_map.items()}
        shared_shapes = {"embed_tokens.weight": (target_args.vocab_size, target_args.dim),
                         "model.embed_tokens.weight": (target_args.vocab_size, target_args.dim),
                         "lm_head.weight": (target_args.vocab_size, target_args.dim)}
        for n in _SHARED & names:
            if state is not None:
                shape = tuple(state[n].shape)
            else:
                from safetensors import safe_open

                with safe_open(str(checkpoint_layout(d)[n]), framework="pt") as f:
                    shape = tuple(f.get_slice(n).get_shape())
            if shape != shared_shapes[n]:
                raise FeatureHeadError(f"feature-draft head {d}: {n} is {shape}, the target's is "
                                       f"{shared_shapes[n]}; the head was made for another target")

        def ignorable(n: str) -> bool:
            return (n in _SHARED or n.endswith("rotary_emb.inv_freq")
                    or (col == 0 and n == "hidden_layernorm.weight" and not spec.input_norm))

        if state is not None:
            w = _tensors_from_state(state, name_map, head_shapes(spec), dtype, device, ignorable, pkl)
            del state
        else:
            try:
                w = stream_tensors(d, name_map, head_shapes(spec), dtype=dtype, placement=lambda n: device,
                                   ignorable=ignorable)
            except CheckpointError as e:
                raise FeatureHeadError(str(e)) from None
        return cls(spec, w, embed.to(device, dtype), lm_head.to(device, dtype))

    def new_cache(self, n_slots: int, max_len: int, device=None) -> KVCache:
        return KVCache.for_model(self.args, n_slots, max_len, dtype=self.dtype, device=device or self.device)

    @staticmethod
    def packs(n_new: Tensor, T: int) -> bool:
        """Whether a forward over [B, T] pairs with `n_new` valid per row runs its linear parts packed: when rows
        are ragged (some row has fewer than T valid pairs) and every row has at least one."""
        return T > 1 and int(n_new.min()) >= 1 and int(n_new.sum()) < n_new.numel() * T

    @staticmethod
    def computed_width(n_new: Tensor, T: int) -> float:
        """Pairs per row the linear parts compute in a forward over [B, T] (what the timeline records): the
        mean of n_new when the forward packs, else T."""
        return float(n_new.sum()) / n_new.numel() if FeatureHead.packs(n_new, T) else float(T)

    def forward(self, cache: KVCache, rows, tokens: Tensor, feats: Tensor, n_new: Tensor, pack: bool | None = None
                ) -> tuple[Tensor, Tensor]:
        """New (token, feature) pairs [B, T] / [B, T, D] (right-padded, n_new valid per row; n_new on the host)
        through the head.

        Extends the cache by n_new. Returns (predicted feature [B, D], logits [B, V] fp32) at each row's
        last valid pair.

        Ragged rows (see `packs`; `pack` forces it on or off) run packed: the valid pairs are gathered into
        [N, ...] (N = sum of n_new) for the fc, norms, q/k/v, o and FFN; only q/k/v are scattered to the padded
        [B, T, ...] layout for the cache's attention, whose output is gathered back. The index tensors are
        built once per call on the host from n_new, with no per-row Python work.
        """
        a, w, dev = self.args, self.w, self.device
        B, T = tokens.shape
        if pack is None:
            pack = self.packs(n_new, T)
        n_new = n_new.to(torch.long)
        if pack:
            valid = (torch.arange(T)[None, :] < n_new[:, None]).flatten()  # [B*T] on the host
            sel = valid.nonzero().squeeze(1).to(dev)  # flat (row, column) of each valid pair
            last_of = n_new.cumsum(0) - 1  # each row's last pair among the packed ones
        else:
            sel = None
            last_of = torch.arange(B) * T + (n_new - 1).clamp(min=0)
        M = B * T if sel is None else sel.numel()  # pairs the linear parts compute

        def pairs(t: Tensor) -> Tensor:  # [B, T, ...] -> [1, M, ...]
            t = t.reshape(1, B * T, *t.shape[2:])
            return t if sel is None else t.index_select(1, sel)

        def grid(t: Tensor) -> Tensor:  # [1, M, heads, Dh] -> [B, T, heads, Dh], zeros at the padding when packed
            if sel is None:
                return t.view(B, T, *t.shape[2:])
            out = t.new_zeros(B * T, *t.shape[2:])
            return out.index_copy_(0, sel, t[0]).view(B, T, *t.shape[2:])

        cos, sin = rope_cos_sin(self.inv_freq, pairs(cache.positions(rows, T).to(dev)), self.dtype)  # [1, M, Dh]
        e = F.embedding(pairs(tokens.to(dev)), self.embed)  # [1, M, D]
        if "embed_norm" in w:
            e = rms_norm(e, w["embed_norm"], a.norm_eps)
        x = F.linear(torch.cat((e, pairs(feats.to(dev, self.dtype))), dim=-1), w["fc.w"], w.get("fc.b"))
        h = rms_norm(x, w["attn.norm"], a.norm_eps) if "attn.norm" in w else x
        q = apply_rope(F.linear(h, w["attn.wq"]).view(1, M, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(F.linear(h, w["attn.wk"]).view(1, M, a.n_kv_heads, a.head_dim), cos, sin)
        v = F.linear(h, w["attn.wv"]).view(1, M, a.n_kv_heads, a.head_dim)
        o = cache.attend(0, rows, grid(q), grid(k), grid(v), n_new).to(dev, self.dtype)  # [B, T, H, Dh]
        x = x + attn_out({"wo": w["attn.wo"]}, pairs(o))
        x = x + swiglu({"w_gate": w["ffn.w_gate"], "w_up": w["ffn.w_up"], "w_down": w["ffn.w_down"]},
                       rms_norm(x, w["ffn.norm"], a.norm_eps))
        cache.advance(rows, n_new)
        last = x[0].index_select(0, last_of.to(dev))  # [B, D]
        y = rms_norm(last, w["out_norm"], a.norm_eps) if "out_norm" in w else last
        return last, F.linear(y, self.lm_head).float()

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.w.values())


# ----------------------------------------------------------------------------------------------
# Writing heads (tests, timing runs, training)
# ----------------------------------------------------------------------------------------------

def head_config(target_args: ModelArgs, layout: str = "eagle", ffn_dim: int | None = None,
                n_heads: int | None = None, n_kv_heads: int | None = None, norms: bool = False,
                verifier: str = "") -> dict:
    """A config.json for a head over a target with these args (the target's family and shapes)."""
    a = target_args
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[a.family]
    n_heads = n_heads or a.n_heads
    layer = {"architectures": [arch], "hidden_size": a.dim, "num_attention_heads": n_heads,
             "num_key_value_heads": n_kv_heads or a.n_kv_heads, "head_dim": a.head_dim,
             "intermediate_size": ffn_dim or (a.ffn_dim if not a.is_moe else a.ffn_dim),
             "num_hidden_layers": 1, "vocab_size": a.vocab_size, "rms_norm_eps": a.norm_eps,
             "rope_theta": a.rope_theta, "max_position_embeddings": a.max_position_embeddings,
             "hidden_act": "silu", "tie_word_embeddings": False}
    if a.family == "mixtral":
        layer.update(num_local_experts=a.n_experts, num_experts_per_tok=a.top_k)
    if a.sliding_window is not None:
        layer["sliding_window"] = a.sliding_window
    if layout == "eagle":
        return {**layer, "bias": True}
    if layout != "speculators":
        raise ValueError(f"layout must be 'eagle' or 'speculators', not {layout!r}")
    layer = {**{k: v for k, v in layer.items() if k not in ("num_local_experts", "num_experts_per_tok")},
             "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {"architectures": ["EagleSpeculator"], "speculators_model_type": "eagle", "layernorms": norms,
            "fusion_bias": True, "transformer_layer_config": layer,
            "speculators_config": {"algorithm": "eagle", "verifier": {"name_or_path": verifier,
                                                                      "architectures": [arch]}}}


def write_head(folder: str | Path, config: dict, weights: dict[str, Tensor], layout: str = "eagle",
               embed: Tensor | None = None, pickle_file: str | None = None) -> None:
    """Save canonical head weights under a layout's tensor names (bf16 unless given otherwise): model.safetensors,
    or with `pickle_file` (e.g. "pytorch_model.bin", as EAGLE-1 heads are published) a torch.save state dict."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    col = 1 if layout == "speculators" else 0
    out = {_NAMES[k][col]: t.contiguous().cpu() for k, t in weights.items()}
    if embed is not None:
        out["embed_tokens.weight"] = embed.contiguous().cpu()
    if pickle_file:
        torch.save(out, folder / pickle_file)
        return
    from safetensors.torch import save_file

    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})


def random_head_weights(spec_or_config, seed: int = 0, dtype: torch.dtype = torch.bfloat16, std: float = 0.02,
                        fc_bias: bool = True, input_norm: bool = False, embed_norm: bool = False,
                        out_norm: bool = False) -> dict[str, Tensor]:
    """Random canonical weights for a head config (norm weights around 1)."""
    cfg = spec_or_config
    layer = cfg.get("transformer_layer_config", cfg)
    args = replace(args_from_hf_config({**layer, "num_hidden_layers": 1}), n_experts=0, top_k=0)
    spec = HeadSpec("eagle", args, fc_bias, input_norm, embed_norm, out_norm)
    g = torch.Generator().manual_seed(seed)
    w = {}
    for name, shape in head_shapes(spec).items():
        if len(shape) == 1:
            t = torch.ones(shape) + (0.1 * torch.randn(shape, generator=g) if name != "fc.b" else 0)
            if name == "fc.b":
                t = std * torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        w[name] = t.to(dtype)
    return w


def write_random_head(folder: str | Path, target_args: ModelArgs, layout: str = "eagle", seed: int = 0,
                      norms: bool = False, std: float = 0.02, **cfg_kw) -> Path:
    """A random head over a target, in a layout (for tests and timing runs)."""
    cfg = head_config(target_args, layout, norms=norms, **cfg_kw)
    w = random_head_weights(cfg, seed=seed, std=std, input_norm=norms, embed_norm=norms, out_norm=norms)
    write_head(folder, cfg, w, layout)
    return Path(folder)


# ----------------------------------------------------------------------------------------------
# The engine's feature draft
# ----------------------------------------------------------------------------------------------

class FeatureDraft:
    """The feature draft in the engine: the Draft interface (prefill / propose / commit / release).

    Per slot it keeps a one-layer KV cache (on the device, or on the host when the plan says so) of the
    pairs fed with the target's true features, plus the pairs not yet fed (`pending`: the target's
    features of the newest committed positions and the tokens that followed them). Drafting feeds the
    pending pairs, then k - 1 predicted ones; commit rolls the cache back to the true-feature part and
    queues the verification's accepted positions. The target must keep its last hidden states
    (``target.keep_hidden``); prefill and commit read them right after the target's pass.
    """

    def __init__(self, model_dir: str | Path, plan: Plan, target, device: torch.device, dtype: torch.dtype,
                 n_slots: int, max_len: int, timeline):
        """Reads the plan's draft_kv only: where the head's KV cache lives (gpu or host; recompute is refused)."""
        from .engine import EngineError

        if plan.draft_kv == "recompute":
            raise EngineError("a feature draft keeps its one-layer KV cache (draft_kv 'gpu' or 'host'); the plan "
                              "says 'recompute': re-plan with this draft (specoffload-plan --draft ...)")
        self.head = FeatureHead.load(model_dir, target.args, target.w.embed, target.w.lm_head, dtype=dtype,
                                     device=device)
        self.args = replace(self.head.args, vocab_size=target.args.vocab_size)
        self.target, self.device, self.dtype, self.tl = target, device, dtype, timeline
        self.mode = plan.draft_kv
        kv_device = "cpu" if self.mode == "host" else device
        self.kv = self.head.new_cache(n_slots, max_len, device=kv_device)
        # Per slot, as whole-batch tensors (one indexed op per round, no per-sequence Python work): the target's
        # features of the pending pairs (at most k + 1: the verification's kept positions), how many are
        # pending, and the cache length that holds only true-feature pairs (what commit rolls back to).
        self.feats = torch.zeros(n_slots, max(1, plan.draft_len + 1), self.head.args.dim, dtype=dtype, device=device)
        self.n_feats = torch.zeros(n_slots, dtype=torch.long)
        self.base = torch.zeros(n_slots, dtype=torch.long)
        target.keep_hidden = True

    @property
    def w(self) -> SimpleNamespace:
        """The head's own tensors, with the `flat()` of a model's weights (the engine's host-memory count)."""
        return SimpleNamespace(flat=lambda: dict(self.head.w))

    def prefill(self, seqs, prompts: list[list[int]], hidden: Tensor | None = None) -> None:
        """Feed the prompt's pairs whose next token is known (positions 0..n-2); keep f_{n-1} pending.
        `hidden`: the target's final-norm states of the prompts [B, T, D]; None: the target's last pass's
        (a fused pass passes its chunk's, `target.chunk_hidden`)."""
        from .engine import padded

        if hidden is None:
            hidden = self.target.last_hidden  # [B, T, D]: the prefill's features
        rows = [s.slot for s in seqs]
        idx = torch.tensor(rows, dtype=torch.long)
        self.kv.reset(rows)
        n = torch.tensor([len(p) for p in prompts])
        self.feats[idx, 0] = hidden[torch.arange(len(seqs), device=hidden.device), (n - 1).to(hidden.device)].to(
            self.device, self.dtype)
        self.n_feats[idx] = 1
        feed = [i for i, p in enumerate(prompts) if len(p) > 1]
        if feed:
            t0 = time.perf_counter()
            tokens = padded([prompts[i][1:] for i in feed])
            feats = hidden[feed, :tokens.shape[1]]
            frows = [rows[i] for i in feed]
            self.head.forward(self.kv, frows, tokens, feats, n[feed] - 1)
            t1 = time.perf_counter()
            self.tl.add(TRACK_GPU, SPAN_DRAFT_PREFILL, t0, t1)
            if self.tl.enabled:
                self.tl.add_pass("draft", len(feed), self.head.computed_width(n[feed] - 1, tokens.shape[1]),
                                 float(int(n.max()) - 1), t0, t1, True)
        self.base[idx] = self.kv.lengths[idx]

    def release(self, slots: list[int]) -> None:
        self.kv.reset(slots)
        idx = torch.tensor(slots, dtype=torch.long)
        self.n_feats[idx] = 0
        self.base[idx] = 0

    def propose(self, seqs, k: int) -> Iterator[None]:
        """Draft k tokens per sequence into seq.drafted (and seq.draft_probs for sampled rows); a generator
        that yields after each step, as Draft.propose."""
        from .engine import padded

        if not seqs or k == 0:
            return
        rows = [s.slot for s in seqs]
        idx = torch.tensor(rows, dtype=torch.long)
        n_new = torch.tensor([len(s.pending) for s in seqs])
        tokens = padded([s.pending for s in seqs])
        if not torch.equal(self.n_feats[idx], n_new):
            bad = int((self.n_feats[idx] != n_new).nonzero()[0, 0])
            raise AssertionError(f"slot {rows[bad]}: {int(self.n_feats[rows[bad]])} pending features for "
                                 f"{int(n_new[bad])} tokens")
        feats = self.feats[idx, :tokens.shape[1]]  # [B, T, D]; past each row's n_new: ignored (padding)
        sampled = [i for i, s in enumerate(seqs) if s.req.temperature > 0]
        params = sampling_tensors([seqs[i].req for i in sampled])
        drafted = torch.zeros(len(seqs), k, dtype=torch.long)
        probs: list[Tensor] = []
        for step in range(k):
            t0 = time.perf_counter()
            keys = float(self.kv.lengths[idx].max()) + int(n_new.max()) if self.tl.enabled else 0.0
            # Pairs per row the linear parts compute (packed: the mean of n_new), for the trace.
            width = self.head.computed_width(n_new, tokens.shape[1]) if self.tl.enabled else 0.0
            pred, logits = self.head.forward(self.kv, rows, tokens, feats, n_new)
            t_fwd = time.perf_counter()  # the pass record covers the forward; the step span its bookkeeping too
            if step == 0:
                self.base[idx] = self.kv.lengths[idx]
            nxt = logits.argmax(-1).cpu()
            if sampled:
                p = processed_probs(logits[sampled], *params)
                nxt[sampled] = draw(p, [seqs[i].generator for i in sampled]).cpu()
                probs.append(p.cpu())
            drafted[:, step] = nxt
            tokens, feats = nxt[:, None], pred[:, None]
            n_new = torch.ones(len(seqs), dtype=torch.long)
            t1 = time.perf_counter()
            self.tl.add(TRACK_GPU, f"{SPAN_DRAFT_STEP} {step}", t0, t1)
            if self.tl.enabled:
                self.tl.add_pass("draft", len(seqs), width, keys, t0, t_fwd, False)
            yield
        self.n_feats[idx] = 0
        for i, s in enumerate(seqs):
            s.drafted = drafted[i]
            s.pending = []
        for r, i in enumerate(sampled):
            seqs[i].draft_probs = torch.stack([p[r] for p in probs])  # [k, V]

    def commit(self, seqs, n_accepted: list[int], k: int, new_tokens: list[list[int]]) -> None:
        """After verification: drop the predicted-feature entries; queue the accepted positions' true
        features with the tokens that followed them (the accepted drafts, then the target's token)."""
        hidden = self.target.last_hidden  # [B, k+1, D]: the verification's features
        slots = [s.slot for s in seqs]
        idx = torch.tensor(slots, dtype=torch.long)
        self.kv.rollback(slots, self.base[idx])
        # All k + 1 positions in one copy; the first a + 1 of each row are the pending ones.
        self.feats[idx, :hidden.shape[1]] = hidden.to(self.device, self.dtype)
        self.n_feats[idx] = torch.tensor(n_accepted, dtype=torch.long) + 1
        for s, new in zip(seqs, new_tokens):
            s.pending = list(new)


# ----------------------------------------------------------------------------------------------
# Acceptance measurement (specoffload-profile --acceptance)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def count_feature_acceptance(target, head: FeatureHead, prompts, k: int, max_new_tokens: int, counts,
                             progress=None):
    """Per-position greedy acceptance of a feature draft, into an AcceptanceCounts.

    The target decodes each prompt greedily. A verification point p (p >= 1 of the target's tokens
    committed: the head drafts after the target's own first token, as in the engine) gives the head the
    target's features of every committed position but the newest, paired with the token that followed
    each; the head drafts k tokens; draft token i is tried when 1..i-1 were accepted and accepted when it
    equals the target's token there; the next point is p + n + 1.

    Incremental, as the engine runs: the target's features come from one pass over the prompt and its
    greedy output (position i's feature depends on tokens 0..i only, so every point reads the same ones);
    the head's one-layer cache keeps the true-feature pairs fed so far, each point feeds only the pairs
    since the last one, drafts, and rolls its k - 1 predicted entries back. Linear in the output's length
    (recomputing each point from scratch was quadratic: slow on long prompts); same counts.
    """
    from .generate import generate

    outs = [g.tokens for g in generate(target, [list(p) for p in prompts], max_new_tokens)]
    for prompt, out in zip(prompts, outs):
        seq = list(prompt) + out
        n_prompt = len(prompt)
        if len(out) > 1:
            cache = target.new_cache(1, len(seq))
            feats_all = target.forward(torch.tensor([seq[:-1]]), cache, logits="hidden")  # [1, len-1, D]: f_0..
            hc = head.new_cache(1, len(seq) + k)
            fed = 0  # pairs (t_{i+1}, f_i) in the head's cache: i < fed
        p = 1
        while p < len(out):
            n_ctx = n_prompt + p  # the context: prompt + out[:p]; pairs i = 0 .. n_ctx - 2 are known
            tokens = torch.tensor([seq[fed + 1:n_ctx]])
            feats = feats_all[:, fed:n_ctx - 1]
            d = []
            for _ in range(k):
                pred, logits = head.forward(hc, [0], tokens, feats, torch.tensor([tokens.shape[1]]))
                d.append(int(logits[0].argmax()))
                tokens, feats = torch.tensor([[d[-1]]]), pred[:, None]
            fed = n_ctx - 1
            hc.rollback([0], [fed])  # keep the true-feature pairs only
            n_acc = counts.record_match(d, out[p:p + k])
            p += n_acc + 1
        counts.target_tokens += len(out)
        counts.sequences += 1
        if progress is not None:
            progress(1)
    return counts
