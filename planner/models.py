"""The HF config.json adapter for shapes, and ModelSpec: byte, FLOP and KV counts from them.

This module owns the shape facts of a config.json: the family, layers, hidden size, heads and
key/value heads (GQA), head_dim, FFN width, experts and top-k, vocabulary, tied embeddings and
context length (`config_shape`). The planner's ModelSpec is built from them here; the runtime's
ModelArgs (runtime/config.py) takes the same facts from `config_shape` and adds only what running
the model needs (RoPE, norm epsilon, sliding window, special tokens, dtype). Nothing else reads
config.json for sizes. Presets are HF configs written out here (from the models' published
config.json files), so they go through the same adapter.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import fingerprint
from .strict import SchemaError

FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}
MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "mixtral": "mixtral"}  # model_type -> family


@dataclass(frozen=True)
class ConfigShape:
    """The shape facts of one decoder-only config.json (no validation: ModelSpec and ModelArgs check)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # GQA: num_heads = num_kv_heads x groups
    head_dim: int
    intermediate_size: int  # dense MLP width, or one expert's width
    num_experts: int  # 0 for dense models
    experts_per_token: int  # top-k; 0 for dense
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int


def config_shape(config: dict[str, Any], family: str, feature_draft: bool = False) -> ConfigShape:
    """Read the shape facts of a config.json dict of `family`. A missing key raises KeyError, a value of
    the wrong type ValueError / TypeError: the caller words the error for its own users. Experts count
    for the mixtral family only, and never for a feature draft (its layer is dense)."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    moe = family == "mixtral" and not feature_draft
    return ConfigShape(
        num_layers=int(config["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate_size=int(config["intermediate_size"]),
        num_experts=int(config.get("num_local_experts", 0)) if moe else 0,
        experts_per_token=int(config.get("num_experts_per_tok", 0)) if moe else 0,
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
    )


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # llama | mistral | mixtral
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width, or one expert's width
    num_experts: int  # 0 for dense models
    experts_per_token: int  # top-k; 0 for dense
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    weight_bytes_per_param: int = 2  # bf16 checkpoints
    # Bytes per element of weights, activations and KV as the runtime holds them (the compute dtype: 2 for
    # bf16/fp16, 4 for fp32); 0 = weight_bytes_per_param. A run choice, not a shape: not in the fingerprint.
    dtype_bytes: int = 0
    source: str = ""  # what load_model_spec() takes to build this spec again (preset name or path)
    # A feature draft (EAGLE-style head): fc [embedding; target feature] 2H -> H, then its layer(s); the
    # embedding and LM head are the target's (resident with the target), so not counted here.
    feature_draft: bool = False

    def __post_init__(self):
        if self.family not in FAMILIES.values():
            raise ValueError(f"unknown family {self.family!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts):
            raise ValueError("experts_per_token must be in 1..num_experts")

    # --- bytes --------------------------------------------------------------------------------
    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def attn_params_per_layer(self) -> int:
        h = self.hidden_size
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h

    @property
    def expert_params(self) -> int:
        """One expert (or the dense MLP): gate, up, down."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def ffn_params_per_layer(self) -> int:
        return self.expert_params * max(1, self.num_experts)

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size

    @property
    def fc_params(self) -> int:
        """A feature draft's fc over [embedding; feature] (with bias), counted with its first layer."""
        return 2 * self.hidden_size * self.hidden_size + self.hidden_size if self.feature_draft else 0

    @property
    def layer_params(self) -> int:
        return (self.attn_params_per_layer + self.router_params_per_layer + self.ffn_params_per_layer
                + self.norm_params_per_layer + self.fc_params // max(1, self.num_layers))

    @property
    def embed_params(self) -> int:
        return 0 if self.feature_draft else self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if (self.tie_word_embeddings or self.feature_draft) else self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        final_norm = 0 if self.feature_draft else self.hidden_size
        return self.num_layers * self.layer_params + self.embed_params + self.lm_head_params + final_norm

    def b(self, params: float) -> float:
        """Parameters to bytes."""
        return params * self.element_bytes

    @property
    def element_bytes(self) -> int:
        """Bytes per element in memory at run time (the compute dtype's; see dtype_bytes)."""
        return self.dtype_bytes or self.weight_bytes_per_param

    @property
    def attn_bytes_per_layer(self) -> float:
        return self.b(self.attn_params_per_layer + self.norm_params_per_layer)

    @property
    def ffn_bytes_per_layer(self) -> float:
        """All experts (or the MLP) plus the router: the part a plan may stream."""
        return self.b(self.ffn_params_per_layer + self.router_params_per_layer)

    @property
    def expert_bytes(self) -> float:
        return self.b(self.expert_params)

    @property
    def total_bytes(self) -> float:
        return self.b(self.total_params)

    @property
    def outer_bytes(self) -> float:
        """Embedding, final norm and LM head: always resident on the compute device."""
        return self.b(self.embed_params + self.lm_head_params + self.hidden_size)

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return 2 * self.kv_dim * self.element_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        return self.num_layers * self.kv_bytes_per_token_per_layer

    # --- FLOPs --------------------------------------------------------------------------------
    def expected_experts(self, tokens: float) -> float:
        """Expected number of distinct experts a layer's `tokens` routed tokens touch.

        With uniform routing, each token picks top_k of E experts; an expert is missed by one
        token with probability (1 - top_k/E), by all with that to the power `tokens`.
        """
        if not self.num_experts:
            return 1.0
        e, k = self.num_experts, self.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** max(tokens, 0.0))

    @property
    def linear_flops_per_token_per_layer(self) -> float:
        """Projection, router and (active) FFN FLOPs for one token in one layer (2 per MAC)."""
        active_experts = self.experts_per_token if self.num_experts else 1
        return 2.0 * (self.attn_params_per_layer + self.router_params_per_layer
                      + active_experts * self.expert_params + self.fc_params / max(1, self.num_layers))

    def attention_flops(self, query_tokens: float, context: float) -> float:
        """q·K and p·V for `query_tokens` queries over `context` keys, one layer, one sequence."""
        return 4.0 * query_tokens * context * self.q_dim

    @property
    def lm_head_flops_per_token(self) -> float:
        return 2.0 * self.vocab_size * self.hidden_size

    @property
    def fingerprint(self) -> str:
        """Hash of the shapes only: the same config under another name or path matches."""
        import dataclasses

        return fingerprint({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                            if f.name not in ("name", "source", "dtype_bytes") and not (f.name == "feature_draft"
                                                                         and not self.feature_draft)})

    def describe(self) -> str:
        experts = f", {self.num_experts} experts top-{self.experts_per_token}" if self.num_experts else ""
        if self.feature_draft:
            return (f"{self.name}: feature draft ({self.family} target), {self.num_layers} layer, hidden "
                    f"{self.hidden_size}, {self.total_params / 1e9:.2f} B params of its own "
                    f"({self.total_bytes / 2**30:.2f} GiB in bf16; embedding and LM head are the target's)")
        return (f"{self.name}: {self.family}, {self.num_layers} layers, hidden {self.hidden_size}{experts}, "
                f"{self.total_params / 1e9:.2f} B params, {self.total_bytes / 2**30:.1f} GiB in bf16")


def from_hf_config(config: dict[str, Any], name: str, source: str = "", feature_draft: bool = False) -> ModelSpec:
    """Adapt an HF config.json dict (Llama, Mistral or Mixtral architecture).

    Feature drafts (EAGLE-style heads): a speculators-layout config (``speculators_model_type: eagle``), or an
    EAGLE-layout config with ``feature_draft`` (set by the caller, who saw the head's ``fc.weight``, or by a
    preset). Their layer is dense whatever the target family (as published), the target's family is kept.
    """
    where = source or name
    if config.get("speculators_model_type") is not None:
        if config["speculators_model_type"] != "eagle":
            raise SchemaError(f"{where}: speculators model type {config['speculators_model_type']!r} is not "
                              "supported (only 'eagle')")
        verifier = ((config.get("speculators_config") or {}).get("verifier") or {})
        layer = dict(config.get("transformer_layer_config") or {})
        layer["architectures"] = verifier.get("architectures") or layer.get("architectures") or ["LlamaForCausalLM"]
        config, feature_draft = layer, True
    feature_draft = feature_draft or bool(config.get("feature_draft"))
    archs = config.get("architectures") or []
    family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
    if family is None:
        family = MODEL_TYPES.get(config.get("model_type", ""))
    if family is None:
        raise SchemaError(f"{where}: unsupported architecture {archs or config.get('model_type')!r}; "
                          f"supported: {', '.join(FAMILIES)}")
    try:
        shape = config_shape(config, family, feature_draft)
        spec = ModelSpec(name=name, family=family, **dataclasses.asdict(shape), weight_bytes_per_param=2,
                         source=source or name, feature_draft=feature_draft)
    except KeyError as exc:
        raise SchemaError(f"{where}: config.json lacks key {exc.args[0]!r}") from None
    except ValueError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    return spec


def _mixtral(layers, hidden, heads, ffn, ctx):
    return {"architectures": ["MixtralForCausalLM"], "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": 8, "num_hidden_layers": layers, "intermediate_size": ffn,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
            "max_position_embeddings": ctx, "tie_word_embeddings": False}


# Published config.json values (head_dim = hidden / heads unless given).
PRESETS: dict[str, dict[str, Any]] = {
    "mixtral-8x7b": _mixtral(32, 4096, 32, 14336, 32768),
    "mixtral-8x22b": _mixtral(56, 6144, 48, 16384, 65536),
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
                   "vocab_size": 32000, "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "llama-3-70b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "num_hidden_layers": 80, "intermediate_size": 28672,
                    "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "llama-3.2-1b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "num_hidden_layers": 16, "intermediate_size": 8192,
                     "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True},
}
# Feature drafts (EAGLE heads) with public checkpoints, shapes from their published config.json and tensors:
# Mixtral-8x7B-Instruct's head (0.28 B parameters: fc 8192 -> 4096 with bias, one layer with 32 KV heads and
# a dense FFN of 14336) and Llama-3-Instruct-70B's (0.99 B: 8 KV heads, FFN 28672).
PRESETS["eagle-mixtral-8x7b"] = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
                                 "num_attention_heads": 32, "num_key_value_heads": 32, "num_hidden_layers": 1,
                                 "intermediate_size": 14336, "vocab_size": 32000, "max_position_embeddings": 32768,
                                 "tie_word_embeddings": False, "feature_draft": True}
PRESETS["eagle-llama-3-70b"] = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
                                "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 1,
                                "intermediate_size": 28672, "vocab_size": 128256, "max_position_embeddings": 8192,
                                "tie_word_embeddings": False, "feature_draft": True}
ALIASES = {"mixtral": "mixtral-8x7b", "mistral": "mistral-7b", "llama-3.3-70b": "llama-3-70b",
           "llama3-70b": "llama-3-70b"}
# The tiny pair shipped inside the package (runtime/assets), read from its config.json.
TINY_PAIR = {"tiny-target": "target", "tiny-draft": "draft", "tiny-eagle": "eagle"}


def tiny_pair_dir(which: str) -> Path:
    """Folder of the shipped tiny model (`target` or `draft`), found without importing torch."""
    spec = importlib.util.find_spec("specoffload.runtime")
    if spec is None or not spec.submodule_search_locations:
        raise SchemaError("the specoffload.runtime package is not installed; the tiny pair ships inside it")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "tiny-pair" / which


def known_models() -> list[str]:
    return sorted(PRESETS) + sorted(ALIASES) + sorted(TINY_PAIR)


def load_model_spec(name_or_path: str) -> ModelSpec:
    """A preset name, an alias, `tiny-target`/`tiny-draft`, or a config.json / model folder path."""
    key = name_or_path.strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return from_hf_config(PRESETS[key], key, source=key)
    path = tiny_pair_dir(TINY_PAIR[key]) if key in TINY_PAIR else Path(name_or_path)
    ref = key if key in TINY_PAIR else str(path)
    head = path.is_dir() and _has_fc_tensor(path)
    if path.is_dir():
        path = path / "config.json"
    name = key if key in TINY_PAIR else (path.parent.name if path.name == "config.json" else path.stem)
    if not path.exists():
        raise SchemaError(f"unknown model {name_or_path!r}: not a preset and no such file or folder. "
                          f"Presets: {', '.join(known_models())}; or give an HF config.json or model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON: {exc}") from None
    head = head or (path.name == "config.json" and _has_fc_tensor(path.parent))
    return from_hf_config(config, name, source=ref, feature_draft=head)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def pickle_weights_file(folder: Path) -> Path | None:
    """The one pickle weights file (pytorch_model.bin, as EAGLE-1 heads ship) of a folder without safetensors."""
    try:
        if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
            return None
        found = sorted(p for p in folder.iterdir() if p.name.endswith(PICKLE_SUFFIXES) and p.is_file())
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def pickle_strings(path: Path, limit: int = 1 << 26) -> set[str]:
    """The strings a torch.save pickle holds (a state dict's tensor names among them), read with pickletools'
    opcode reader: nothing is unpickled, no code runs. Zip files (torch >= 1.6) read their data.pkl; the
    legacy format its first pickles (magic, protocol, system info, the object)."""
    import io
    import pickletools
    import zipfile

    def scan(stream, count: int) -> set[str]:
        out: set[str] = set()
        for _ in range(count):
            try:
                for op, arg, _pos in pickletools.genops(stream):
                    if isinstance(arg, str):
                        out.add(arg)
            except Exception:  # noqa: BLE001 - not a pickle (or its end): what was read so far is the answer
                break
        return out

    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if pkl is None or z.getinfo(pkl).file_size > limit:
                    return set()
                return scan(io.BytesIO(z.read(pkl)), 1)
        except zipfile.BadZipFile:
            return set()
    with open(path, "rb") as f:
        return scan(f, 4)


def _has_fc_tensor(folder: Path) -> bool:
    """Whether a model folder's weights hold an EAGLE head's ``fc.weight`` (read from the safetensors header, or
    from a pickle's opcodes without unpickling it; without torch)."""
    import struct

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            return "fc.weight" in json.loads(index.read_text()).get("weight_map", {})
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() \
            else sorted(folder.glob("*.safetensors"))
        if not files and pickle_weights_file(folder) is not None:
            return "fc.weight" in pickle_strings(pickle_weights_file(folder))
        if len(files) != 1:
            return False
        with open(files[0], "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return "fc.weight" in json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False


def check_draft_for_target(target: ModelSpec, draft: ModelSpec | None) -> None:
    """A feature draft reads the target's hidden states and uses its LM head: hidden size and vocabulary
    must be the target's."""
    if draft is None or not draft.feature_draft:
        return
    bad = []
    if draft.hidden_size != target.hidden_size:
        bad.append(f"hidden size {draft.hidden_size} (the target's is {target.hidden_size})")
    if draft.vocab_size != target.vocab_size:
        bad.append(f"vocabulary {draft.vocab_size} (the target's is {target.vocab_size})")
    if bad:
        raise SchemaError(f"feature draft {draft.name} was made for another target than {target.name}: "
                          + "; ".join(bad) + ". Use the head trained for this target")


#: compute dtypes a run may use, by the name the commands take, and their bytes per element
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def with_dtype(spec: ModelSpec | None, dtype: str | None) -> ModelSpec | None:
    """`spec` as the runtime holds it in `dtype` (bf16 / fp16 / fp32; None or "" keeps the checkpoint's
    element size): weights and KV bytes follow it; the fingerprint does not change."""
    if spec is None or not dtype:
        return spec
    if dtype not in DTYPE_BYTES:
        raise SchemaError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    return dataclasses.replace(spec, dtype_bytes=DTYPE_BYTES[dtype])


def load_plan_models(plan) -> tuple[ModelSpec, ModelSpec | None]:
    """The target and draft specs a plan was made for, checked against its fingerprints, in the plan's dtype."""
    specs = []
    for role, ref, fp in (("model", plan.model, plan.model_fingerprint), ("draft", plan.draft, plan.draft_fingerprint)):
        if not ref:
            specs.append(None)
            continue
        spec = load_model_spec(ref)
        if spec.fingerprint != fp:
            raise SchemaError(f"plan's {role} {ref!r} has changed since the plan was made (fingerprint "
                              f"{spec.fingerprint}, plan says {fp}); re-run specoffload-plan")
        specs.append(with_dtype(spec, getattr(plan, "dtype", "")))
    return specs[0], specs[1]
