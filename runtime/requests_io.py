"""From input prompts to engine requests, and from finished sequences to output lines: one place for
every front end (specoffload-run's JSONL path, its Ray path, the Python API).

    io = RequestIO.from_model_dir(target_dir)           # tokenizer, generation_config.json, chat template
    req = io.request(prompt, default_max_tokens=256)    # a Prompt (runtime/prompts.py) -> engine Request
    line = io.output_line(finished)                     # an engine Finished -> one output line (a dict)

A request's fields: its own where set; else, for temperature / top_p / top_k / min_p, the target's
generation_config.json defaults (when it sets do_sample); else the runtime's defaults (greedy,
top_p 1, no top_k, min_p 0, seed 0, min_tokens 0, no stops). A chat ("messages") is rendered with the
target tokenizer's chat template (runtime/chat.py); a model without one refuses chats.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import ChatTemplate, ChatTemplateError, load_chat_template
from .engine.requests import Finished, Request
from .generation_config import GenerationConfig, GenerationConfigError, load_generation_config
from .prompts import Prompt

#: the runtime's defaults for fields neither the request nor generation_config.json sets
DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 0, "min_tokens": 0,
            "stop": (), "stop_token_ids": (), "ignore_eos": False}


class RequestError(ValueError):
    """A prompt or model folder we cannot turn into requests; the message names it and the fix (the caller
    adds the prompt file and line)."""


@dataclass
class RequestIO:
    tokenizer: Any  # a tokenizers.Tokenizer
    generation: GenerationConfig
    chat: ChatTemplate | None
    model_dir: Path

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, tokenizer=None) -> "RequestIO":
        """Read the target folder's tokenizer.json (unless given), generation_config.json and chat template."""
        d = Path(model_dir)
        if tokenizer is None:
            tok_path = d / "tokenizer.json"
            if not tok_path.is_file():
                raise RequestError(f"{d}: no tokenizer.json (the run needs the target's tokenizer)")
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(tok_path))
            except Exception as exc:  # the tokenizers library raises its own exception types
                raise RequestError(f"{tok_path}: cannot read the tokenizer ({exc})") from None
        try:
            generation = load_generation_config(d)
            chat = load_chat_template(d)
        except (GenerationConfigError, ChatTemplateError) as exc:
            raise RequestError(str(exc)) from None
        return cls(tokenizer, generation, chat, d)

    # -- in ---------------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        """Token ids -> text (special tokens skipped), as output lines and stop strings see it."""
        return self.tokenizer.decode(list(ids))

    def render_chat(self, messages) -> str:
        if self.chat is None:
            raise RequestError(f"a chat (\"messages\") needs a chat template, and {self.model_dir} has none (no "
                               "chat_template in tokenizer_config.json, no chat_template.jinja); give a \"prompt\" "
                               "instead, or add the model's template")
        try:
            return self.chat.render(messages)
        except ChatTemplateError as exc:
            raise RequestError(str(exc)) from None

    def prompt_ids(self, p: Prompt) -> list[int]:
        """A prompt's token ids: the text with the tokenizer's special tokens (BOS), or the rendered chat as
        the template writes it (no special tokens added)."""
        if p.messages is not None:
            return self.tokenizer.encode(self.render_chat(p.messages), add_special_tokens=False).ids
        if p.text is None:
            raise RequestError(f"prompt {p.id!r} has neither text nor messages")
        return self.tokenizer.encode(p.text).ids

    def all_prompt_ids(self, prompts, source: str) -> list[list[int]]:
        """Every prompt's token ids (prompt_ids); a prompt that cannot be encoded is a RequestError naming
        source:line."""
        out = []
        for p in prompts:
            try:
                out.append(self.prompt_ids(p))
            except RequestError as exc:
                raise RequestError(f"{source}:{p.line}: {exc}") from None
        return out

    def fields(self, p: Prompt) -> dict:
        """The generation fields of a prompt, resolved: its own, else generation_config's, else DEFAULTS."""
        out = dict(DEFAULTS)
        out.update(self.generation.sampling_defaults())
        for key in DEFAULTS:
            v = getattr(p, key)
            if v is not None:
                out[key] = v
        out["top_k"] = max(0, int(out["top_k"]))  # -1 and 0: no limit
        return out

    def request(self, p: Prompt, default_max_tokens: int, ids: list[int] | None = None) -> Request:
        """The engine request for a prompt (max_tokens: its own, else default_max_tokens); `ids`: its token
        ids when the caller has them already (prompt_ids), so a prompt is encoded once."""
        f = self.fields(p)
        return Request(p.id, self.prompt_ids(p) if ids is None else ids, p.max_tokens or default_max_tokens, temperature=f["temperature"],
                       top_p=f["top_p"], seed=f["seed"], top_k=f["top_k"], min_p=f["min_p"],
                       min_tokens=f["min_tokens"], stop=tuple(f["stop"]), stop_token_ids=tuple(f["stop_token_ids"]),
                       ignore_eos=bool(f["ignore_eos"]), detokenize=self.decode if f["stop"] else None)

    # -- out --------------------------------------------------------------------------------------
    def text(self, f: Finished) -> str:
        """The finished sequence's text: ending before the stop string where one stopped it."""
        return f.text if f.text is not None else self.decode(f.tokens)

    def output_line(self, f: Finished) -> dict:
        """One output line (keys: runtime/outputs.py OUTPUT_KEYS, in that order)."""
        return output_line(f, self.text(f))


def output_line(f: Finished, text: str) -> dict:
    return {"id": f.request.id, "text": text, "tokens": list(f.tokens), "num_tokens": len(f.tokens),
            "prompt_tokens": len(f.request.prompt), "finish_reason": f.finish_reason, "stop_reason": f.stop_reason,
            "usage": {"prompt_tokens": len(f.request.prompt), "completion_tokens": len(f.tokens)}}
