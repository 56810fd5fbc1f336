"""Streaming safetensors checkpoint loader, driven by a name map and a placement callback.

Scope: Hugging Face model folders in safetensors format, single-file (``model.safetensors``) or
sharded (``model.safetensors.index.json`` + shards). Tensors are read one at a time
(``safe_open``, memory-mapped), converted to the compute dtype and put straight onto the device or
memory tier the placement callback names, so peak host memory is about one tensor beyond what is
placed on the host. Everything is checked: names against the map before any data is read (missing
and unexpected tensors listed), shapes and on-disk dtypes per tensor (naming tensor and file), and
at the end that every expected tensor arrived with the right shape and dtype.

Pickle checkpoints (``*.bin``, ``*.pt``) are refused: unpickling executes arbitrary code from the
file, and it cannot be memory-mapped or read one tensor at a time.

Placement tiers: "gpu" (CUDA), "cpu" (pageable host memory), "pinned" (page-locked host memory for
fast async copies to the GPU; plain CPU memory where CUDA does not exist), "disk" (not read: a
placeholder on the meta device, for layers the disk tier reads from the checkpoint every pass), or
any torch device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import ModelArgs, load_args
from .layers import ModelWeights, weight_shapes


class CheckpointError(ValueError):
    """A checkpoint folder we cannot load; the message names the tensor or file at fault."""


Placement = Callable[[str], "str | torch.device"]
#: one dtype for every tensor, or canonical name -> dtype (e.g. bf16 experts in host memory, fp32 rest)
DtypeSpec = "torch.dtype | Callable[[str], torch.dtype]"

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: safetensors dtype strings we convert from; anything else (int8, fp8 ...) is a quantized format
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_SHOW = 8  # how many names an error lists before "... and N more"


def _names(names) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(names[:_SHOW]) + more


# ----------------------------------------------------------------------------------------------
# Name map: on-disk (Hugging Face) names -> our canonical names
# ----------------------------------------------------------------------------------------------

def hf_name_map(args: ModelArgs) -> dict[str, str]:
    """HF tensor name -> canonical name (see ``ModelWeights.flat``) for Llama / Mistral / Mixtral.

    Mixtral uses the names of the released checkpoints (and of transformers' save_pretrained):
    ``model.layers.N.block_sparse_moe.gate.weight`` (router) and
    ``model.layers.N.block_sparse_moe.experts.E.w1|w3|w2.weight`` (gate, up, down projections).
    With tied embeddings there is no ``lm_head.weight`` to read.
    """
    m = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm"}
    if not args.tie_word_embeddings:
        m["lm_head.weight"] = "lm_head"
    for i in range(args.n_layers):
        hf, our = f"model.layers.{i}.", f"layers.{i}."
        m[hf + "input_layernorm.weight"] = our + "attn.norm"
        for p, n in (("q", "wq"), ("k", "wk"), ("v", "wv"), ("o", "wo")):
            m[f"{hf}self_attn.{p}_proj.weight"] = our + "attn." + n
        m[hf + "post_attention_layernorm.weight"] = our + "ffn.norm"
        if args.is_moe:
            m[hf + "block_sparse_moe.gate.weight"] = our + "ffn.router"
            for e in range(args.n_experts):
                for p, n in (("w1", "w_gate"), ("w3", "w_up"), ("w2", "w_down")):
                    m[f"{hf}block_sparse_moe.experts.{e}.{p}.weight"] = f"{our}experts.{e}.{n}"
        else:
            for p, n in (("gate", "w_gate"), ("up", "w_up"), ("down", "w_down")):
                m[f"{hf}mlp.{p}_proj.weight"] = our + "ffn." + n
    return m


def _ignorable(name: str, args: ModelArgs | None) -> bool:
    """Extra tensors that carry no weights: RoPE buffers some old exports saved, and a duplicate
    lm_head in a tied checkpoint (the embedding is used)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return name == "lm_head.weight" and args is not None and args.tie_word_embeddings


# ----------------------------------------------------------------------------------------------
# Finding the files
# ----------------------------------------------------------------------------------------------

def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable safetensors file ({exc}); it may be truncated or corrupt (an "
                           "interrupted download or copy?): fetch or copy it again")


def _open_safetensors(path: Path):
    """safe_open, with a damaged file reported as a CheckpointError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


def _refuse_pickle(model_dir: Path, found: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{model_dir} holds only pickle checkpoint files ({_names(found)}); they are refused: unpickling "
        "runs arbitrary code from the file, and pickles cannot be memory-mapped or streamed one tensor at a "
        "time (slow, and the whole file lands in host memory). Convert once with transformers: "
        "`AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`.")


def checkpoint_layout(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint.

    Errors: no folder, a shard the index names but that does not exist (named), only pickle files.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint folder {d} does not exist")
    index = d / INDEX_FILE
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
        except (ValueError, AttributeError, OSError) as exc:
            raise CheckpointError(f"{index} is not a readable index (a JSON object with a weight_map): {exc}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
        if not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        missing_files = sorted({fn for fn in weight_map.values() if not (d / fn).is_file()})
        if missing_files:
            fn = missing_files[0]
            held = [n for n, f in weight_map.items() if f == fn]
            raise CheckpointError(
                f"shard file {fn} listed in {INDEX_FILE} is missing from {d} (it should hold {_names(held)})"
                + (f"; also missing: {', '.join(missing_files[1:])}" if len(missing_files) > 1 else ""))
        return {n: d / fn for n, fn in weight_map.items()}
    files = [d / SINGLE_FILE] if (d / SINGLE_FILE).is_file() else sorted(d.glob("*.safetensors"))
    if len(files) == 1:
        with _open_safetensors(files[0]) as f:
            return {n: files[0] for n in f.keys()}
    if len(files) > 1:
        raise CheckpointError(f"{d} has several .safetensors files ({_names(p.name for p in files)}) "
                              f"but no {INDEX_FILE} saying which tensor is where")
    pickles = [p.name for p in d.iterdir() if p.name.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise _refuse_pickle(d, pickles)
    raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {d}")


# ----------------------------------------------------------------------------------------------
# Placement
# ----------------------------------------------------------------------------------------------

def _resolve(tier: str | torch.device) -> tuple[torch.device, bool]:
    """Placement tier -> (device, pin?)."""
    if isinstance(tier, str) and tier in ("gpu", "cpu", "pinned"):
        if tier == "gpu":
            if not torch.cuda.is_available():
                raise CheckpointError("placement asked for 'gpu' but CUDA is not available")
            return torch.device("cuda"), False
        return torch.device("cpu"), tier == "pinned" and torch.cuda.is_available()
    return torch.device(tier), False


def _place(t: Tensor, tier, dtype: torch.dtype) -> Tensor:
    device, pin = _resolve(tier)
    t = t.to(device=device, dtype=dtype)
    return t.pin_memory() if pin else t


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------

def stream_tensors(model_dir: str | Path, name_map: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                   *, dtype: DtypeSpec = torch.float32, placement: Placement | None = None,
                   ignorable: Callable[[str], bool] = lambda n: False) -> dict[str, Tensor]:
    """Read the tensors ``name_map`` names (on-disk -> canonical), one at a time, into place.

    shapes: canonical name -> expected shape. placement: canonical name -> tier (default "cpu").
    dtype: a dtype, or canonical name -> dtype. Returns canonical name -> tensor in its dtype on its
    tier. Raises CheckpointError naming the tensor/file for missing, unexpected, wrongly shaped or
    non-float tensors.
    """
    placement = placement or (lambda name: "cpu")
    dtype_of = dtype if callable(dtype) else (lambda name: dtype)
    layout = checkpoint_layout(model_dir)
    missing = [n for n in name_map if n not in layout]
    if missing:
        raise CheckpointError(f"checkpoint {model_dir} is missing {len(missing)} tensor(s): {_names(missing)}")
    extra = [n for n in layout if n not in name_map and not ignorable(n)]
    if extra:
        raise CheckpointError(f"checkpoint {model_dir} has {len(extra)} unexpected tensor(s): {_names(extra)}")

    out: dict[str, Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for n in name_map:
        by_file.setdefault(layout[n], []).append(n)
    for path, names in sorted(by_file.items()):
        try:
            _read_file(path, names, name_map, shapes, placement, dtype_of, out)
        except SafetensorError as exc:
            raise _unreadable(path, exc) from None
    _audit(out, shapes, name_map, dtype_of)
    return out


def _read_file(path: Path, names: list[str], name_map, shapes, placement, dtype_of, out: dict) -> None:
    """Read `names` from one safetensors file into `out`, checking shape and dtype of each."""
    with _open_safetensors(path) as f:
        present = set(f.keys())
        for hf_name in names:
            if hf_name not in present:
                raise CheckpointError(f"tensor {hf_name} is not in {path.name} (where {INDEX_FILE} says it is)")
            ours = name_map[hf_name]
            sl = f.get_slice(hf_name)
            shape, disk_dtype = tuple(sl.get_shape()), sl.get_dtype()
            if shape != tuple(shapes[ours]):
                raise CheckpointError(f"tensor {hf_name} in {path.name}: expected shape {tuple(shapes[ours])}, "
                                      f"found {shape}")
            if disk_dtype not in _FLOAT_DTYPES:
                raise CheckpointError(f"tensor {hf_name} in {path.name} has dtype {disk_dtype}; only float "
                                      f"checkpoints ({', '.join(sorted(_FLOAT_DTYPES))}) are supported")
            tier = placement(ours)
            if isinstance(tier, str) and tier == "disk":  # the disk tier reads it every pass: not loaded
                out[ours] = torch.empty(shape, dtype=dtype_of(ours), device="meta")
                continue
            out[ours] = _place(f.get_tensor(hf_name), tier, dtype_of(ours))


def _audit(out, shapes, name_map, dtype_of) -> None:
    """Final audit: everything arrived, with the shape and dtype asked for."""
    for ours, shape in shapes.items():
        if ours not in out:
            if ours in name_map.values():
                raise CheckpointError(f"tensor {ours} was never loaded")
            continue  # not read from disk (e.g. a tied lm_head), the caller fills it in
        t, want = out[ours], dtype_of(ours)
        if tuple(t.shape) != tuple(shape) or t.dtype != want:
            raise CheckpointError(f"tensor {ours} arrived as {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {want}")


def load_model(model_dir: str | Path, *, dtype: DtypeSpec = torch.float32, placement: Placement | None = None,
               args: ModelArgs | None = None) -> tuple[ModelArgs, ModelWeights]:
    """Load a Llama / Mistral / Mixtral HF folder: config.json -> ModelArgs, safetensors -> ModelWeights.

    dtype: the dtype every tensor is converted to (fp32 default: bf16 files, exact fp32 math), or
    canonical name -> dtype.
    placement: canonical tensor name (e.g. "layers.3.experts.5.w_gate") -> "gpu" | "cpu" | "pinned"
    | torch device; default everything on the CPU.
    """
    args = args or load_args(model_dir)
    placement = placement or (lambda name: "cpu")
    flat = stream_tensors(model_dir, hf_name_map(args), weight_shapes(args), dtype=dtype, placement=placement,
                          ignorable=lambda n: _ignorable(n, args))
    if args.tie_word_embeddings:
        # One matrix serves as input embedding and output projection; share it unless placed apart.
        tier, emb = placement("lm_head"), flat["embed"]
        head_device, head_pin = _resolve(tier)
        head_dtype = dtype("lm_head") if callable(dtype) else dtype
        same = emb.device == head_device and emb.is_pinned() == head_pin and emb.dtype == head_dtype
        flat["lm_head"] = emb if same else _place(emb, tier, head_dtype)
    return args, ModelWeights.from_flat(args, flat)


def checkpoint_size_bytes(model_dir: str | Path) -> int:
    """Bytes of safetensors data in a folder (for reports)."""
    return sum(os.path.getsize(p) for p in set(checkpoint_layout(model_dir).values()))
