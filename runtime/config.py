"""Model arguments: what the runtime's layers need from a Hugging Face ``config.json``.

The shape facts (layers, hidden size, heads and key/value heads, head_dim, FFN width, experts and
top-k, vocabulary, tied embeddings, context length) come from the planner's adapter,
``specoffload.planner.models.config_shape``, which owns them; this module adds what only running the
model needs (RoPE theta and scaling, norm epsilon, sliding window, special tokens) and refuses what our
layers cannot compute (activations, biases, RoPE types).

Scope: decoder-only Llama, Mistral and Mixtral checkpoints (the families whose layers live in
``specoffload.runtime.layers``). Everything else is refused with an error naming the families we
support, so that a checkpoint we would silently compute wrongly never loads.

Both config spellings are read: transformers 5 writes ``rope_parameters`` (theta and scaling in one
dict); older files (and most real checkpoints on the hub) have a top-level ``rope_theta`` and an
optional ``rope_scaling`` dict.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from specoffload.planner.models import FAMILIES, MODEL_TYPES, config_shape

#: architecture name in config.json -> our family name (the planner's table)
SUPPORTED_ARCHITECTURES: dict[str, str] = dict(FAMILIES)
#: model_type in config.json -> our family name (used when "architectures" is absent)
SUPPORTED_MODEL_TYPES: dict[str, str] = dict(MODEL_TYPES)


class ConfigError(ValueError):
    """A config.json we cannot (or must not) run."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (the only scaling type we implement)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and constants of one decoder-only model. ``n_experts == 0`` means a dense FFN."""

    family: str  # "llama" | "mistral" | "mixtral"
    vocab_size: int
    dim: int  # hidden size D
    n_layers: int
    n_heads: int  # query heads H
    n_kv_heads: int  # key/value heads Hkv (GQA: H = Hkv * groups)
    head_dim: int  # Dh
    ffn_dim: int  # intermediate size F (per expert for MoE)
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    n_experts: int = 0
    top_k: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # Mistral: a query at p sees keys at (p - window, p]
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    @property
    def gqa_groups(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.is_moe and not 0 < self.top_k <= self.n_experts:
            raise ConfigError(f"num_experts_per_tok={self.top_k} must be in 1..num_local_experts={self.n_experts}")


def _supported_list() -> str:
    return ", ".join(f"{a} ({f})" for a, f in SUPPORTED_ARCHITECTURES.items())


def _family(cfg: Mapping[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[a]
    if archs:
        raise ConfigError(f"unsupported architecture {archs}; supported: {_supported_list()}")
    mt = cfg.get("model_type")
    if mt in SUPPORTED_MODEL_TYPES:
        return SUPPORTED_MODEL_TYPES[mt]
    raise ConfigError(f"unsupported model_type {mt!r} (no 'architectures' in config); supported: {_supported_list()}")


def _rope(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from either the transformers-5 or the older config spelling."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    if legacy and not params.get("rope_type"):
        params.update(legacy)
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    # Old configs call the type "type"; "default" (or no dict at all) means plain RoPE.
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"unsupported RoPE scaling type {rope_type!r}; supported: default, llama3")
    try:
        scaling = RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"llama3 RoPE scaling lacks {e.args[0]!r}") from None
    return float(theta), scaling


def args_from_hf_config(cfg: Mapping[str, Any]) -> ModelArgs:
    """Translate a parsed HF config.json (dict) into :class:`ModelArgs`; refuse what we cannot run."""
    family = _family(cfg)
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (SwiGLU with silu only)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{flag}=true is not supported (bias-free projections only)")
    shape = config_shape(dict(cfg), family)
    theta, scaling = _rope(cfg)
    if family == "mixtral":  # the runtime builds the experts: both keys are required, not defaulted
        for key in ("num_local_experts", "num_experts_per_tok"):
            if key not in cfg:
                raise KeyError(key)
    # Llama has no sliding window; Mistral/Mixtral may (None or absent = full attention).
    window = cfg.get("sliding_window") if family != "llama" else None
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelArgs(
        family=family,
        vocab_size=shape.vocab_size,
        dim=shape.hidden_size,
        n_layers=shape.num_layers,
        n_heads=shape.num_heads,
        n_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        ffn_dim=shape.intermediate_size,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        n_experts=shape.num_experts,
        top_k=shape.experts_per_token,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=shape.max_position_embeddings,
        sliding_window=None if window is None else int(window),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
    )


def load_args(model_dir: str | Path) -> ModelArgs:
    """Read ``model_dir/config.json`` and adapt it; a missing file is a clear error."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist" if not folder.exists()
                          else f"{folder} is a file, not a model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {folder} (a Hugging Face model folder needs one)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path}: not readable as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    try:
        args = args_from_hf_config(cfg)
    except KeyError as exc:
        raise ConfigError(f"{path}: no {exc.args[0]!r} key (needed to build the model)") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise ConfigError(f"{path}: {exc}") from None
        raise ConfigError(f"{path}: a value of the wrong type ({exc})") from None
    notice_custom_code(path, cfg, args.family)
    return args


_NOTICED: set[str] = set()


def notice_custom_code(path: Path, cfg: Mapping[str, Any], family: str) -> None:
    """A config that names custom model code (auto_map, as trust_remote_code would run) gets a notice, once:
    that code is never run; the weights go through our own layers for the family the config declares."""
    auto_map = cfg.get("auto_map")
    key = str(path.resolve())
    if not auto_map or key in _NOTICED:
        return
    _NOTICED.add(key)
    names = ", ".join(sorted(map(str, auto_map))) if isinstance(auto_map, dict) else str(auto_map)
    print(f"note: {path} names custom model code (auto_map: {names}); it is ignored, never run: the weights are "
          f"computed by specoffload's own {family} layers, as for any {family} checkpoint. If the custom code "
          "changes the model's math, the outputs will differ from it", file=sys.stderr)

