"""The shipped tiny model pair (package data): a Mixtral-architecture target and its Mistral draft.

Scope: locating and loading ``runtime/assets/tiny-pair/{target,draft,eagle}/`` (Hugging Face folders:
config.json, bf16 model.safetensors with real-checkpoint tensor names, generation_config.json,
tokenizer.json, tokenizer_config.json). Both share one byte-level BPE tokenizer (<s>=0, </s>=1,
<pad>=2) trained on Python source; tools/train_tiny_pair.py made them and wrote TRAINING.md next to
them. Small enough for tests and CPU demos, real enough that speculative acceptance means something.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets" / "tiny-pair"


def tiny_pair_paths() -> tuple[Path, Path]:
    """(target folder, draft folder); each loads offline with transformers' from_pretrained or ours."""
    target, draft = ASSETS / "target", ASSETS / "draft"
    for d in (target, draft):
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d} has no model.safetensors; re-create the pair with "
                                    "`python tools/train_tiny_pair.py` from the repository root")
    return target, draft


def tiny_eagle_path() -> Path:
    """The shipped tiny feature draft (an EAGLE-style head over the tiny target, EAGLE layout): `tiny-eagle`."""
    d = ASSETS / "eagle"
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{d} has no model.safetensors; re-create it with "
                                "`python tools/train_tiny_pair.py --eagle` from the repository root")
    return d


def load_tiny_pair(dtype=None, device: str = "cpu"):
    """(target, draft) as :class:`~specoffload.runtime.model.Transformer`, fp32 on the CPU by default."""
    import torch

    from .model import Transformer

    target, draft = tiny_pair_paths()
    dtype = dtype or torch.float32
    return (Transformer.from_pretrained(target, dtype=dtype, device=device),
            Transformer.from_pretrained(draft, dtype=dtype, device=device))


def tiny_pair_tokenizer():
    """The pair's tokenizer as a ``tokenizers.Tokenizer`` (encoding prepends <s>)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_pair_paths()[0] / "tokenizer.json"))
