"""When a sequence stops: EOS, stop token ids, stop strings, min_tokens. One checker per sequence.

The engine commits tokens one at a time (a verification round's accepted draft tokens and the
target's own token, in order) and asks the checker after each; the first token that ends the
sequence is the last one committed, so a stop completed inside an accepted run of draft tokens ends
the sequence there and nothing after it is committed or counted.

- EOS (the target's config.json and generation_config.json ids): stops, stop_reason None; not with
  ignore_eos.
- stop_token_ids: stops, stop_reason the id.
- stop strings: the generated text is decoded incrementally (the newest tokens against a short
  window before them, as vLLM's detokenizer does, so a token that ends in the middle of a UTF-8
  character adds no text until the character is complete); a stop string found in the text that
  ends inside what the newest token added stops the sequence, stop_reason the string. The text
  handed back ends before the stop string (the stop string is not included); the tokens go up to
  and including the one that completed it. Several stop strings: the earliest match in the text wins.
- min_tokens: before that many tokens none of the above stops the sequence (the token is kept and
  generation goes on; vLLM instead masks EOS and stop ids out of the distribution before then).

EOS and stop ids are checked before stop strings, so a token that is both reports the id.
"""
from __future__ import annotations

from typing import Iterable

from .requests import Request

REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of an incomplete UTF-8 character


class StopChecker:
    """Stop conditions of one sequence; `step(out)` after each committed token."""

    def __init__(self, req: Request, eos: Iterable[int]):
        self.min_tokens = max(0, int(req.min_tokens))
        self.eos = frozenset() if req.ignore_eos else frozenset(int(e) for e in eos)
        self.stop_ids = frozenset(int(t) for t in req.stop_token_ids)
        self.strings = tuple(req.stop)
        self.decode = req.detokenize
        if self.strings and self.decode is None:
            raise ValueError(f"request {req.id!r} has stop strings but no detokenize function")
        self.text = ""  # the decoded text of the tokens up to read_offset
        self.prefix_offset = 0  # tokens [prefix_offset, read_offset) are decoded again as context
        self.read_offset = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_text: str | None = None  # the text before the stop string, when one matched

    @property
    def stopped(self) -> bool:
        return self.finish_reason is not None

    def step(self, out: list[int]) -> bool:
        """out: the committed tokens, its last just appended. True if the sequence stops at that token."""
        t = out[-1]
        allowed = len(out) >= self.min_tokens
        if allowed and (t in self.eos or t in self.stop_ids):
            self.finish_reason = "stop"
            self.stop_reason = None if t in self.eos and t not in self.stop_ids else t
            return True
        if not self.strings:
            return False
        new = self._new_text(out)
        if not new or not allowed:
            return False
        # A match must end inside the new text: each string is looked for from len(s) - 1 characters before it.
        best: tuple[int, str] | None = None
        for s in self.strings:
            i = self.text.find(s, max(0, len(self.text) - len(new) - len(s) + 1))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        self.finish_reason, self.stop_reason, self.stop_text = "stop", best[1], self.text[:best[0]]
        return True

    def _new_text(self, out: list[int]) -> str:
        """Text the tokens after read_offset add (empty while they end inside a UTF-8 character)."""
        before = self.decode(out[self.prefix_offset:self.read_offset])
        whole = self.decode(out[self.prefix_offset:])
        if len(whole) <= len(before) or whole.endswith(REPLACEMENT):
            return ""
        new = whole[len(before):]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(out)
        return new
