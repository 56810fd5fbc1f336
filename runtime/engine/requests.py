"""What the engine is asked to do and what it hands back: requests, sequences in slots, results."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class Finished:
    request: Request
    tokens: list[int]  # generated ids, capped at max_tokens; the EOS included when it stopped on one
    finish_reason: str  # "eos" | "length"


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
