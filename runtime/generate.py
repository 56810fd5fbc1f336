"""Plain (non-speculative) batched generation through our layers.

Scope: the reference generation loop the speculative engine is compared with. Prompts of different
lengths share one KV cache of ``max_batch`` slots (continuous batching): each step feeds every
active slot either its whole prompt (just admitted) or its last token (decoding), as one ragged
batch; a sequence that stops frees its slot for the next waiting prompt.

Decoding: greedy (temperature 0) or sampling with temperature, top-k, nucleus (top-p) and min-p
filtering (verify.processed_probs, the engine's own rule), drawn from a ``torch.Generator`` so a seed reproduces the output. A sequence stops at an EOS token (kept
in its output, finish reason "eos") or after its own max_new_tokens (finish reason "length").
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .model import Transformer
from .verify import processed_probs, top_p_filter  # noqa: F401 (top_p_filter re-exported here)

_FROM_CONFIG = object()


@dataclass
class Generation:
    """Generated ids of one sequence (prompt excluded; the EOS included when it stopped on one)."""

    tokens: list[int]
    finish_reason: str  # "eos" | "length"


def sample_next(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None, top_k: int = 0, min_p: float = 0.0) -> Tensor:
    """Next token per row: argmax at temperature 0, else a draw from softmax(logits / T) filtered by top-k,
    top-p and min-p in that order (verify.processed_probs).

    logits [B, V] -> [B] (int64)
    """
    if temperature <= 0:
        return logits.argmax(-1)
    B = logits.shape[0]
    probs = processed_probs(logits, torch.full((B,), float(temperature)), torch.full((B,), float(top_p)),
                            torch.full((B,), int(top_k), dtype=torch.long), torch.full((B,), float(min_p)))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def generate(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
             eos_token_id=_FROM_CONFIG, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             min_p: float = 0.0, generator: torch.Generator | None = None, seed: int | None = None,
             max_batch: int | None = None) -> list[Generation]:
    """Generate continuations of token-id prompts; returns one :class:`Generation` per prompt, in order.

    max_new_tokens: one limit for all or one per prompt. eos_token_id: an id, a list of ids, or None
    (never stop early); by default the model config's. Sampling uses ``generator``, or a fresh one
    seeded with ``seed``. max_batch: slots in flight at once (default: all prompts).
    """
    n = len(prompts)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(limits) != n:
        raise ValueError(f"{len(limits)} max_new_tokens for {n} prompts")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = model.args.eos_token_id
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id})
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    longest = max((len(p) + m for p, m in zip(prompts, limits)), default=0)
    if longest > model.args.max_position_embeddings:
        raise ValueError(f"prompt + max_new_tokens = {longest} exceeds max_position_embeddings="
                         f"{model.args.max_position_embeddings}")

    results: list[Generation | None] = [None] * n
    out: list[list[int]] = [[] for _ in range(n)]
    waiting = deque(i for i in range(n) if limits[i] > 0)
    for i in range(n):
        if limits[i] <= 0:
            results[i] = Generation([], "length")
    if not waiting:
        return results  # type: ignore[return-value]
    n_slots = min(max_batch or len(waiting), len(waiting))
    cache = model.new_cache(n_slots, longest)
    owner: list[int | None] = [None] * n_slots  # request in each slot
    pending: list[list[int]] = [[] for _ in range(n_slots)]  # tokens the slot feeds next step

    def admit(slot: int) -> None:
        cache.reset([slot])
        if waiting:
            req = waiting.popleft()
            owner[slot], pending[slot] = req, list(prompts[req])
        else:
            owner[slot], pending[slot] = None, []

    for s in range(n_slots):
        admit(s)
    while any(o is not None for o in owner):
        active = [s for s in range(n_slots) if owner[s] is not None]
        n_new = torch.tensor([len(pending[s]) for s in active])
        tokens = torch.zeros(len(active), int(n_new.max()), dtype=torch.long)  # [B, T], right-padded
        for b, s in enumerate(active):
            tokens[b, :len(pending[s])] = torch.tensor(pending[s])
        logits = model(tokens, cache, slots=active, n_new=n_new, logits="last")  # [B, V]
        nxt = sample_next(logits, temperature, top_p, generator, top_k, min_p).tolist()
        for b, s in enumerate(active):
            req = owner[s]
            out[req].append(nxt[b])
            if nxt[b] in eos or len(out[req]) >= limits[req]:
                results[req] = Generation(out[req], "eos" if nxt[b] in eos else "length")
                admit(s)
            else:
                pending[s] = [nxt[b]]
    return results  # type: ignore[return-value]
