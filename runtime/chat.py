"""Chat templates: a model folder's Jinja template renders a chat ("messages") into prompt text.

Found where transformers keeps it: chat_template.jinja in the folder, else "chat_template" in
tokenizer_config.json (a string, or a list of {"name", "template"} of which "default" is used). Rendered
the way transformers' apply_chat_template does: a sandboxed Jinja environment (trim_blocks,
lstrip_blocks), the variables messages, add_generation_prompt=True, bos_token, eos_token (and the other
special tokens of tokenizer_config.json), raise_exception() and strftime_now(); the text is then
tokenized without adding special tokens (the template writes BOS itself where the model wants it).
Needs only jinja2 (which torch depends on), not transformers.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path


class ChatTemplateError(ValueError):
    """No usable chat template, or one that fails on a chat; the message names the folder and the fix."""


def _token_text(v) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # an AddedToken as saved
        return v["content"]
    return None


class ChatTemplate:
    """The chat template of one model folder. `render(messages)` -> prompt text."""

    def __init__(self, source: str, where: str, special: dict[str, str]):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - torch depends on jinja2
            raise ChatTemplateError("chat prompts need the jinja2 package; pip install jinja2") from None

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent,
                                                                                        ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.where = where
        self.special = special
        try:
            self.template = env.from_string(source)
        except TemplateError as exc:
            raise ChatTemplateError(f"{where}: the chat template is not valid Jinja ({exc}); fix it") from None

    def render(self, messages) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=[dict(m) for m in messages], add_generation_prompt=True,
                                        **self.special)
        except TemplateError as exc:
            raise ChatTemplateError(f"the chat template of {self.where} refuses this chat: {exc}") from None


def load_chat_template(model_dir: str | Path) -> ChatTemplate | None:
    """The folder's chat template, or None where it has none."""
    d = Path(model_dir)
    cfg_path = d / "tokenizer_config.json"
    cfg: dict = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ChatTemplateError(f"{cfg_path}: cannot be read as JSON ({exc}); fix it") from None
        if not isinstance(cfg, dict):
            raise ChatTemplateError(f"{cfg_path}: expected a JSON object; fix it")
    special = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if (t := _token_text(cfg.get(k))) is not None}
    special.setdefault("bos_token", "")
    special.setdefault("eos_token", "")
    jinja = d / "chat_template.jinja"
    if jinja.is_file():
        return ChatTemplate(jinja.read_text(encoding="utf-8"), str(jinja), special)
    source = cfg.get("chat_template")
    if source is None:
        return None
    if isinstance(source, list):  # named templates
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
        if source is None:
            raise ChatTemplateError(f"{cfg_path}: \"chat_template\" is a list without a \"default\" template; "
                                    "name one \"default\"")
    if not isinstance(source, str):
        raise ChatTemplateError(f"{cfg_path}: \"chat_template\" must be a Jinja string; fix it")
    return ChatTemplate(source, str(cfg_path), special)
