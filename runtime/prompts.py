"""Prompt files (JSONL) and model folders as the commands name them: one reader for every command.

A prompt file has one JSON object per line: {"id": ..., "prompt": "...", "max_tokens": N,
"temperature": T, "top_p": P, "seed": S}; all but "prompt" optional ("id" defaults to the line
number where a command allows it). Every problem is a PromptFileError naming the file and line.
"""
from __future__ import annotations

import json
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


def read_prompts(path: str | Path, require_id: bool = False) -> list[Prompt]:
    """Parse and validate a JSONL prompt file (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: prompts file not found")
    out: list[Prompt] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for n, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise PromptFileError(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                      "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise PromptFileError(f"{path}:{n}: expected a JSON object with a \"prompt\" key, "
                                      f"found {type(obj).__name__}")
            if "prompt" not in obj:
                raise PromptFileError(f"{path}:{n}: no \"prompt\" key (keys: {', '.join(map(str, obj)) or 'none'})")
            unknown = sorted(set(obj) - set(FIELDS))
            if unknown:
                raise PromptFileError(f"{path}:{n}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
            if not isinstance(obj["prompt"], str):
                raise PromptFileError(f"{path}:{n}: \"prompt\" must be a string, found {type(obj['prompt']).__name__}")
            if require_id and "id" not in obj:
                raise PromptFileError(f"{path}:{n}: no \"id\" key (outputs are matched to inputs by id)")
            pid = str(obj.get("id", n))
            if pid in seen:
                raise PromptFileError(f"{path}:{n}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = n
            try:
                mt = obj.get("max_tokens")
                p = Prompt(n, pid, obj["prompt"], None if mt is None else int(mt), float(obj.get("temperature", 0.0)),
                           float(obj.get("top_p", 1.0)), int(obj.get("seed", 0)))
            except (TypeError, ValueError) as exc:
                raise PromptFileError(f"{path}:{n}: bad value ({exc})") from None
            if p.max_tokens is not None and p.max_tokens < 1:
                raise PromptFileError(f"{path}:{n}: max_tokens must be >= 1")
            if p.temperature < 0 or not 0 < p.top_p <= 1:
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
    if not (path / "config.json").is_file():
        raise PromptFileError(f"model {ref!r}: not tiny-target / tiny-draft and not an HF model folder "
                              "(no config.json there)")
    return path
