"""generation_config.json: a model folder's EOS ids and sampling defaults.

Read where the file exists (none is fine: no extra EOS, no defaults). Used:
- eos_token_id (an id or a list of ids): the engine stops on these as well as on config.json's
  (an instruct model's end-of-turn token is often listed only here).
- temperature, top_p, top_k, min_p: defaults for requests that leave them unset, applied only when the
  file sets do_sample to true (as transformers does: without it generation is greedy). A field
  the file does not name keeps the runtime's default (temperature 0 = greedy, top_p 1, top_k and
  min_p off); a request's own value always wins (runtime/requests_io.py).
Other fields (max_new_tokens, repetition_penalty, ...) are not used.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FILE = "generation_config.json"


class GenerationConfigError(ValueError):
    """A generation_config.json we cannot use; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None

    def sampling_defaults(self) -> dict[str, float | int]:
        """The sampling fields this file sets for requests that leave them unset ({} without do_sample)."""
        if not self.do_sample:
            return {}
        return {k: v for k, v in (("temperature", self.temperature), ("top_p", self.top_p), ("top_k", self.top_k),
                                  ("min_p", self.min_p)) if v is not None}


def load_generation_config(model_dir: str | Path) -> GenerationConfig:
    """The folder's generation_config.json, checked; an empty GenerationConfig where there is none."""
    path = Path(model_dir) / FILE
    if not path.is_file():
        return GenerationConfig()
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerationConfigError(f"{path}: cannot be read as JSON ({exc}); fix the file or remove it") from None
    if not isinstance(obj, dict):
        raise GenerationConfigError(f"{path}: expected a JSON object, found {type(obj).__name__}; fix the file "
                                    "or remove it")

    def bad(key: str, want: str):
        return GenerationConfigError(f"{path}: \"{key}\" must be {want}, found {obj[key]!r}; fix the file or "
                                     "remove the field")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    eos = obj.get("eos_token_id")
    if eos is None:
        eos_ids: tuple[int, ...] = ()
    elif is_int(eos):
        eos_ids = (eos,)
    elif isinstance(eos, list) and all(is_int(e) for e in eos):
        eos_ids = tuple(eos)
    else:
        raise bad("eos_token_id", "a token id or a list of token ids")
    if any(e < 0 for e in eos_ids):
        raise bad("eos_token_id", "non-negative")
    do_sample = obj.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise bad("do_sample", "true or false")

    def number(key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
        v = obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < lo or v > hi or (lo_open and v == lo):
            raise bad(key, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")
        return float(v)

    top_k = obj.get("top_k")
    if top_k is not None and not is_int(top_k):
        raise bad("top_k", "an integer")
    return GenerationConfig(eos_token_ids=eos_ids, do_sample=do_sample,
                            temperature=number("temperature", 0.0, math.inf), top_p=number("top_p", 0.0, 1.0, True),
                            top_k=top_k, min_p=number("min_p", 0.0, 1.0))
