"""Prompt files (JSONL) and model folders as the commands name them: one reader for every command.

A prompt file has one JSON object per line: {"id": ..., "prompt": "...", "max_tokens": N,
"temperature": T, "top_p": P, "seed": S}; all but "prompt" optional ("id" defaults to the line
number where a command allows it). Every problem is a PromptFileError naming the file and line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("id", "prompt", "max_tokens", "temperature", "top_p", "seed")


class PromptFileError(ValueError):
    """A prompt file or model folder we cannot use; the message names the file, line or folder."""


@dataclass(frozen=True)
class Prompt:
    line: int
    id: str
    text: str
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


def _show(value) -> str:
    text = json.dumps(value)
    return f"{text[:40] + '...' if len(text) > 40 else text} ({type(value).__name__})"


def _check_text(text: str, where: str, key: str) -> None:
    """Text must be valid Unicode: JSON can spell a lone surrogate (\\ud800), which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptFileError(f"{where}: \"{key}\" holds a lone surrogate {text[exc.start]!r} at character "
                              f"{exc.start}, which is not valid Unicode text (a \\ud800-\\udfff escape that is not "
                              "half of a pair); fix or remove that escape") from None


def read_prompts(path: str | Path, require_id: bool = False) -> list[Prompt]:
    """Parse and validate a JSONL prompt file (blank lines skipped)."""
    path = Path(path)
    if path.is_dir():
        raise PromptFileError(f"{path} is a directory; --prompts takes a JSONL file")
    if not path.is_file():
        raise PromptFileError(f"{path}: prompts file not found")
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot read the prompts file ({exc.strerror or exc})") from None
    for n, raw_bytes in enumerate(data.splitlines(keepends=True), start=1):
        try:
            raw = raw_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PromptFileError(f"{path}:{n}: not UTF-8 text (byte {raw_bytes[exc.start]:#04x} at column "
                                  f"{exc.start + 1}); a prompt file is UTF-8 JSONL") from None
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                  "each line must be one JSON object") from None
        except (ValueError, RecursionError) as exc:  # e.g. an integer of more digits than Python parses
            raise PromptFileError(f"{path}:{n}: cannot be read as JSON ({exc}); each line must be one JSON "
                                  "object") from None
        if not isinstance(obj, dict):
            raise PromptFileError(f"{path}:{n}: expected a JSON object with a \"prompt\" key, "
                                  f"found {type(obj).__name__}")
        if "prompt" not in obj:
            raise PromptFileError(f"{path}:{n}: no \"prompt\" key (keys: {', '.join(map(str, obj)) or 'none'})")
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise PromptFileError(f"{path}:{n}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        if not isinstance(obj["prompt"], str):
            raise PromptFileError(f"{path}:{n}: \"prompt\" must be a string, found {_show(obj['prompt'])}")
        if require_id and "id" not in obj:
            raise PromptFileError(f"{path}:{n}: no \"id\" key (outputs are matched to inputs by id)")
        where = f"{path}:{n}"
        _check_text(obj["prompt"], where, "prompt")
        if "id" in obj:
            raw_id = obj["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise PromptFileError(f"{where}: \"id\" must be a string or an integer, found "
                                      f"{_show(raw_id)}")
            if isinstance(raw_id, str):
                _check_text(raw_id, where, "id")
            pid = str(raw_id)
        else:
            pid = str(n)
        if pid in seen:
            raise PromptFileError(f"{path}:{n}: duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = n
        mt = obj.get("max_tokens")
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int)):
            raise PromptFileError(f"{where}: \"max_tokens\" must be an integer, found {_show(mt)}")
        for key in ("temperature", "top_p"):
            v = obj.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise PromptFileError(f"{where}: \"{key}\" must be a number, found {_show(v)}")
        seed = obj.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise PromptFileError(f"{where}: \"seed\" must be an integer in [0, 2**63), found {_show(seed)}")
        temperature = float(obj["temperature"] if obj.get("temperature") is not None else 0.0)
        top_p = float(obj["top_p"] if obj.get("top_p") is not None else 1.0)
        p = Prompt(n, pid, obj["prompt"], mt, temperature, top_p, seed)
        if p.max_tokens is not None and p.max_tokens < 1:
            raise PromptFileError(f"{path}:{n}: max_tokens must be >= 1")
        if not (math.isfinite(p.temperature) and p.temperature >= 0) or not 0 < p.top_p <= 1:
            raise PromptFileError(f"{path}:{n}: temperature must be >= 0 and top_p in (0, 1]")
        out.append(p)
    if not out:
        raise PromptFileError(f"{path}: no prompts (empty file)")
    return out


def resolve_model_dir(ref: str) -> Path:
    """`tiny-target` / `tiny-draft` (the shipped pair), `tiny-eagle` (its feature draft), or an HF model folder
    (or its config.json)."""
    if ref == "tiny-eagle":
        from .tiny_pair import tiny_eagle_path

        return tiny_eagle_path()
    if ref in ("tiny-target", "tiny-draft"):
        from .tiny_pair import tiny_pair_paths

        target, draft = tiny_pair_paths()
        return target if ref == "tiny-target" else draft
    path = Path(ref)
    if path.name == "config.json":
        path = path.parent
    if not path.exists():
        raise PromptFileError(f"model folder {str(path)!r} does not exist (and it is not tiny-target / tiny-draft, "
                              "the pair shipped with the package); give an HF model folder")
    if not path.is_dir():
        raise PromptFileError(f"model {ref!r} is a file, not a model folder; give the HF model folder holding "
                              "config.json and the safetensors")
    if not (path / "config.json").is_file():
        raise PromptFileError(f"model {ref!r}: not tiny-target / tiny-draft and not an HF model folder "
                              "(no config.json there)")
    return path
