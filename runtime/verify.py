"""Speculative verification: which draft tokens the target keeps, and the token it adds.

Scope: pure tensor functions over one verification of a batch; no model, no cache.

Greedy: keep the longest prefix of draft tokens equal to the target's own argmax at each position,
then append the target's argmax after it. The result is exactly what greedy decoding of the target
alone produces.

Sampling (standard speculative sampling): draft token x_i, drawn from q_i, is kept with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the target's token is drawn from the normalised
residual max(0, p_i - q_i); if all k are kept, a bonus token is drawn from p_{k+1}. Each kept token
and the replacement are then distributed exactly as the target's p (Leviathan et al., Chen et al.).
p and q are the *processed* distributions (temperature and top-p applied to both the same way).
"""
from __future__ import annotations

import torch
from torch import Tensor


def processed_probs(logits: Tensor, temperature: Tensor, top_p: Tensor) -> Tensor:
    """softmax(logits / T) restricted to the top-p nucleus and renormalised, row by row.

    logits [B, ..., V]; temperature, top_p [B] (temperature > 0) -> probs [B, ..., V] (fp32)
    """
    shape = logits.shape
    t = temperature.to(logits.device, torch.float32).view(-1, *([1] * (len(shape) - 1)))
    probs = torch.softmax(logits.float() / t, dim=-1)
    tp = top_p.to(logits.device, torch.float32).view(-1, *([1] * (len(shape) - 1)))
    return top_p_filter(probs, tp)


def top_p_filter(probs: Tensor, top_p: float | Tensor) -> Tensor:
    """Keep the nucleus: the most probable tokens whose mass reaches top_p; renormalise.

    A token is kept if the mass of the tokens ranked above it is still below top_p, so the token that
    crosses top_p is included and the most probable token always is. probs [B, ..., V] -> [B, ..., V];
    top_p a float, or a tensor that broadcasts against probs (one value per row: [B, 1, ..., 1]).
    The one nucleus rule of the runtime: plain generation and speculative verification both use it.
    """
    if (bool((top_p >= 1.0).all()) if isinstance(top_p, Tensor) else top_p >= 1.0):
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_above = sorted_p.cumsum(-1) - sorted_p
    keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_above < top_p)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def draw(probs: Tensor, generators: list[torch.Generator]) -> Tensor:
    """One draw per row from probs [B, V], each row from its own generator (per-request randomness
    makes a request's output independent of which batch it shared).  -> [B] int64"""
    out = torch.empty(probs.shape[0], dtype=torch.long)
    for b, g in enumerate(generators):
        out[b] = torch.multinomial(probs[b].cpu(), 1, generator=g)[0]
    return out.to(probs.device)


def greedy_accept(draft: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    """draft [B, k] (int64); target_logits [B, k+1, V] (position i scores the token after draft[:i]).

    -> (n_accepted [B], next_token [B]): the matching prefix length and the target's own next token.
    """
    return accept_best(draft, target_logits.argmax(-1))


def accept_best(draft: Tensor, best: Tensor) -> tuple[Tensor, Tensor]:
    """greedy_accept given the target's argmax tokens best [B, k+1] (computed once by the caller)."""
    B, k = draft.shape
    if k == 0:
        return torch.zeros(B, dtype=torch.long, device=draft.device), best[:, 0]
    match = (best[:, :k] == draft).long()  # [B, k]
    n_acc = match.cumprod(dim=1).sum(dim=1)  # length of the all-ones prefix
    return n_acc, best.gather(1, n_acc[:, None])[:, 0]


def sampling_accept(draft: Tensor, q: Tensor, p: Tensor, generators: list[torch.Generator]
                    ) -> tuple[Tensor, Tensor]:
    """draft [B, k]; q [B, k, V] draft probs; p [B, k+1, V] target probs; -> (n_accepted [B], next_token [B])."""
    B, k = draft.shape
    n_acc = torch.zeros(B, dtype=torch.long)
    nxt = torch.empty(B, dtype=torch.long)
    for b in range(B):
        g = generators[b]
        i = 0
        while i < k:
            x = int(draft[b, i])
            px, qx = float(p[b, i, x]), float(q[b, i, x])
            u = float(torch.rand((), generator=g))
            if qx > 0 and u * qx <= px:  # accept with probability min(1, px / qx)
                i += 1
                continue
            break
        n_acc[b] = i
        if i == k:
            dist = p[b, k]
        else:
            residual = (p[b, i] - q[b, i]).clamp(min=0)
            total = float(residual.sum())
            dist = residual / total if total > 0 else p[b, i]
        nxt[b] = torch.multinomial(dist.cpu().float(), 1, generator=g)[0]
    return n_acc.to(draft.device), nxt.to(draft.device)
