"""What the engine is asked to do and what it hands back: requests, sequences in slots, results."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor


class EngineError(ValueError):
    """A request or plan the engine cannot run; the message names the field and the fix."""


@dataclass
class Request:
    id: str
    prompt: list[int]  # token ids, BOS included if the tokenizer adds one
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0  # <= 0: no limit
    min_p: float = 0.0  # 0: off
    min_tokens: int = 0  # EOS, stop ids and stop strings do not end the sequence before this many tokens
    stop: tuple[str, ...] = ()  # stop strings (need `detokenize`)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    detokenize: Callable[[Sequence[int]], str] | None = None  # token ids -> text, for stop strings


@dataclass
class Finished:
    request: Request
    tokens: list[int]  # generated ids, capped at max_tokens; up to and including the token that stopped it
    finish_reason: str  # "stop" (EOS, a stop token id or a stop string) | "length"
    stop_reason: str | int | None = None  # the stop string matched, the stop token id, or None (EOS, length)
    text: str | None = None  # a stop string's finish: the text before the stop string; else None (decode tokens)


@dataclass(eq=False)  # identity: the schedules test membership per pass (value equality would compare tokens)
class Seq:
    """A request in a slot. `last` is the newest committed token, not yet in the target's KV cache;
    `pending` are committed tokens the draft has not seen yet (1 or 2 of them)."""

    req: Request
    slot: int
    out: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    drafted: Tensor | None = None  # [k] draft tokens awaiting verification
    draft_probs: Tensor | None = None  # [k, V] their processed draft distributions (sampling)
    stops: object | None = None  # its StopChecker (engine/stops.py), made at admission

    @property
    def last(self) -> int:
        return self.out[-1]

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - len(self.out)


def padded(rows: list[list[int]]) -> Tensor:
    """Token rows of different lengths -> [B, max len] int64, right-padded with 0 (one tensor build)."""
    width = max(len(r) for r in rows)
    return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
