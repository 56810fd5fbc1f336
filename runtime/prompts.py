"""Prompt files (JSONL) and model folders as the commands name them: one reader for every command.

A prompt file has one JSON object per line. Fields (all but one of "prompt" / "messages" optional;
"id" defaults to the line number where a command allows it):

    id              string or integer, unique in the file
    prompt          the text to continue, or
    messages        a chat: [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...], rendered
                    with the target tokenizer's chat template (runtime/chat.py)
    max_tokens      tokens to generate at most (>= 1)
    min_tokens      EOS, stop ids and stop strings do not end a sequence before this many tokens (>= 0)
    temperature     >= 0 (0: greedy)      top_p   in (0, 1]
    top_k           integer; 0 or -1: no limit       min_p   in [0, 1] (0: off)
    seed            integer in [0, 2**63)
    stop            a string or a list of strings: generation ends when the text contains one (the
                    text handed back ends before it)
    stop_token_ids  a list of token ids that end generation (the id is kept in the tokens)
    ignore_eos      true: do not stop at EOS

A sampling field left out is None in the Prompt, so the model's generation_config.json defaults can
apply (runtime/generation_config.py). Every problem is a PromptFileError naming the file and line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("id", "prompt", "messages", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
          "stop", "stop_token_ids", "ignore_eos")
#: the per-request generation fields, as named in the JSONL, on Prompt and on the engine's Request
SAMPLING_FIELDS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                   "stop_token_ids", "ignore_eos")


class PromptFileError(ValueError):
    """A prompt file or model folder we cannot use; the message names the file, line or folder."""


@dataclass(frozen=True)
class Prompt:
    """One input line. `text` is the "prompt" field (None for a chat); `messages` the chat (None for a
    plain prompt), as a tuple of {"role", "content"} dicts. Generation fields are None where unset."""

    line: int
    id: str
    text: str | None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    messages: tuple[dict, ...] | None = None
    min_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool | None = None

    @property
    def prompt(self) -> str | None:
        return self.text


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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_fields(obj: dict, where: str) -> dict:
    """Validate the generation fields of one input object (a JSONL line, or the Python API's sampling
    parameters as a dict); -> {field: value} for the fields present and not null, normalised (stop as a
    tuple of strings, stop_token_ids as a tuple of ints, numbers as float/int). PromptFileError naming
    `where` and the field otherwise."""
    out: dict = {}

    def bad(key: str, want: str):
        return PromptFileError(f"{where}: \"{key}\" must be {want}, found {_show(obj[key])}")

    for key in ("max_tokens", "min_tokens", "top_k", "seed"):
        v = obj.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise bad(key, "an integer")
        out[key] = v
    if "max_tokens" in out and out["max_tokens"] < 1:
        raise PromptFileError(f"{where}: max_tokens must be >= 1")
    if "min_tokens" in out and out["min_tokens"] < 0:
        raise bad("min_tokens", "an integer >= 0")
    if "min_tokens" in out and "max_tokens" in out and out["min_tokens"] > out["max_tokens"]:
        raise PromptFileError(f"{where}: min_tokens ({out['min_tokens']}) is above max_tokens ({out['max_tokens']}); "
                              "lower min_tokens or raise max_tokens")
    if "top_k" in out and out["top_k"] < -1:
        raise bad("top_k", "an integer >= -1 (0 or -1: no limit)")
    if "seed" in out and not 0 <= out["seed"] < 2**63:
        raise PromptFileError(f"{where}: \"seed\" must be an integer in [0, 2**63), found {_show(obj['seed'])}")
    for key in ("temperature", "top_p", "min_p"):
        v = obj.get(key)
        if v is None:
            continue
        if not _is_number(v):
            raise bad(key, "a number")
        out[key] = float(v)
    if not math.isfinite(out.get("temperature", 0.0)) or out.get("temperature", 0.0) < 0 \
            or not 0 < out.get("top_p", 1.0) <= 1:
        raise PromptFileError(f"{where}: temperature must be >= 0 and top_p in (0, 1]")
    if not 0 <= out.get("min_p", 0.0) <= 1:
        raise bad("min_p", "a number in [0, 1]")
    stop = obj.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(x, str) for x in stops):
            raise bad("stop", "a string or a list of strings")
        if any(x == "" for x in stops):
            raise PromptFileError(f"{where}: \"stop\" holds an empty string, which would stop at once; remove it")
        for x in stops:
            _check_text(x, where, "stop")
        out["stop"] = tuple(stops)
    ids = obj.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(x) and x >= 0 for x in ids):
            raise bad("stop_token_ids", "a list of token ids (integers >= 0)")
        out["stop_token_ids"] = tuple(ids)
    ig = obj.get("ignore_eos")
    if ig is not None:
        if not isinstance(ig, bool):
            raise bad("ignore_eos", "true or false")
        out["ignore_eos"] = ig
    return out


def check_messages(messages, where: str) -> tuple[dict, ...]:
    """A chat: a non-empty list of {"role": str, "content": str} objects. -> a tuple of fresh dicts."""
    if not isinstance(messages, list) or not messages:
        raise PromptFileError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} "
                              f"objects, found {_show(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            got = f"keys {sorted(map(str, m))}" if isinstance(m, dict) else _show(m)
            raise PromptFileError(f"{where}: messages[{i}] must be an object with exactly the keys \"role\" and "
                                  f"\"content\", found {got}")
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise PromptFileError(f"{where}: messages[{i}].{key} must be a string, found {_show(m[key])}")
            _check_text(m[key], where, f"messages[{i}].{key}")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


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
            raise PromptFileError(f"{path}:{n}: expected a JSON object with a \"prompt\" or \"messages\" key, "
                                  f"found {type(obj).__name__}")
        if "prompt" not in obj and "messages" not in obj:
            raise PromptFileError(f"{path}:{n}: no \"prompt\" key (keys: {', '.join(map(str, obj)) or 'none'}); give "
                                  "\"prompt\" (text to continue) or \"messages\" (a chat)")
        if "prompt" in obj and "messages" in obj:
            raise PromptFileError(f"{path}:{n}: both \"prompt\" and \"messages\"; give one of the two (\"prompt\" "
                                  "for text to continue, \"messages\" for a chat)")
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise PromptFileError(f"{path}:{n}: unknown field(s) {unknown}; allowed: {', '.join(FIELDS)}")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise PromptFileError(f"{path}:{n}: \"prompt\" must be a string, found {_show(obj['prompt'])}")
        if require_id and "id" not in obj:
            raise PromptFileError(f"{path}:{n}: no \"id\" key (outputs are matched to inputs by id)")
        where = f"{path}:{n}"
        text, messages = None, None
        if "prompt" in obj:
            text = obj["prompt"]
            _check_text(text, where, "prompt")
        else:
            messages = check_messages(obj["messages"], where)
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
        out.append(Prompt(n, pid, text, messages=messages, **check_fields(obj, where)))
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
