"""Speculative verification: which draft tokens the target keeps, and the token it adds.

Scope: pure tensor functions over one verification of a batch; no model, no cache.

Greedy: keep the longest prefix of draft tokens equal to the target's own argmax at each position,
then append the target's argmax after it. The result is exactly what greedy decoding of the target
alone produces.

Sampling (standard speculative sampling): draft token x_i, drawn from q_i, is kept with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the target's token is drawn from the normalised
residual max(0, p_i - q_i); if all k are kept, a bonus token is drawn from p_{k+1}. Each kept token
and the replacement are then distributed exactly as the target's p (Leviathan et al., Chen et al.).
p and q are the *processed* distributions (processed_probs: temperature, top-k, top-p and min-p applied
to both the same way, in that order, the order of transformers' samplers; vLLM applies min-p before
top-k/top-p, which can differ when both min-p and top-p cut).
"""
from __future__ import annotations

import torch
from torch import Tensor


def processed_probs(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: Tensor | None = None,
                    min_p: Tensor | None = None) -> Tensor:
    """The one sampling distribution of the runtime, row by row: softmax(logits / T), then the top-k most
    probable tokens, then the top-p nucleus, then the tokens whose probability is at least min_p times the
    most probable one's; renormalised. Draft and target go through it alike, so speculative sampling
    follows the target's processed distribution.

    logits [B, ..., V]; temperature, top_p [B] (temperature > 0); top_k [B] (<= 0: no limit) and min_p [B]
    (0: off), optional -> probs [B, ..., V] (fp32). Ties at the k-th probability are all kept.
    """
    shape = logits.shape
    view = (-1, *([1] * (len(shape) - 1)))
    t = temperature.to(logits.device, torch.float32).view(view)
    probs = torch.softmax(logits.float() / t, dim=-1)
    if top_k is not None:
        probs = top_k_filter(probs, top_k.to(logits.device).view(view))
    tp = top_p.to(logits.device, torch.float32).view(view)
    probs = top_p_filter(probs, tp)
    if min_p is not None:
        probs = min_p_filter(probs, min_p.to(logits.device, torch.float32).view(view))
    return probs


def sampling_tensors(reqs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(temperature, top_p, top_k, min_p) [B] for processed_probs, from objects carrying those fields
    (the engine's Requests)."""
    return (torch.tensor([float(r.temperature) for r in reqs]), torch.tensor([float(r.top_p) for r in reqs]),
            torch.tensor([int(r.top_k) for r in reqs], dtype=torch.long),
            torch.tensor([float(r.min_p) for r in reqs]))


def top_k_filter(probs: Tensor, top_k: int | Tensor) -> Tensor:
    """Keep the top_k most probable tokens (every token tied with the k-th too); <= 0 or >= V keeps all.
    top_k an int or an integer tensor broadcasting against probs ([B, 1, ..., 1]); renormalised."""
    V = probs.shape[-1]
    k = top_k if isinstance(top_k, Tensor) else torch.tensor(top_k)
    k = k.to(probs.device, torch.long)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    if bool((k >= V).all()):
        return probs
    sorted_p = probs.sort(dim=-1, descending=True).values
    kth = sorted_p.gather(-1, (k - 1).expand(*probs.shape[:-1], 1))  # the k-th largest per row
    kept = probs * (probs >= kth)
    return kept / kept.sum(-1, keepdim=True)


def min_p_filter(probs: Tensor, min_p: float | Tensor) -> Tensor:
    """Keep the tokens whose probability is at least min_p times the row's largest; renormalise.
    min_p a float or a tensor broadcasting against probs; 0 keeps all (the most probable token always stays)."""
    if (bool((min_p <= 0).all()) if isinstance(min_p, Tensor) else min_p <= 0):
        return probs
    floor = probs.amax(-1, keepdim=True) * min_p
    kept = probs * (probs >= floor)
    return kept / kept.sum(-1, keepdim=True)


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
