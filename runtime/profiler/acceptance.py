"""The per-position acceptance vector of a (target, draft, prompts) triple, written as a Workload.

Greedy measurement: the target decodes each prompt greedily (its output is what speculative decoding
must reproduce). Verification points follow what a greedy speculative run would do: at a point p
(p of the target's tokens already committed) the draft proposes k tokens greedily from the prompt
plus those p tokens; draft token i is *tried* when tokens 1..i-1 were accepted, and *accepted* when
it equals the target's token at that position; the run then commits the n accepted tokens plus the
target's own next token, so the next point is p + n + 1. Positions past the end of the target's
output (its length limit or EOS) cannot be verified and are not counted.

    a_i = accepted_i / tried_i   (conditional acceptance, Workload.acceptance's definition)

The draft keeps its KV cache across rounds (rolled back to the accepted prefix after each round,
as the engine does), so the cost is one draft token per proposal, not a re-read of the context.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from specoffload.planner.acceptance import AcceptanceCounts  # the one per-position counter (callers import it here too)
from specoffload.planner.costmodel import expected_tokens
from specoffload.planner.schema import Workload
from specoffload.runtime.prompts import Prompt, PromptFileError
from specoffload.runtime.prompts import read_prompts as _read_prompts
from specoffload.runtime.prompts import resolve_model_dir as _resolve_model_dir


class AcceptanceError(ValueError):
    """Bad input to the acceptance measurement (the message names the file, line or model)."""


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[Prompt]:
    """The shared JSONL reader (runtime/prompts.py); ids default to line numbers here."""
    try:
        return _read_prompts(path)
    except PromptFileError as exc:
        raise AcceptanceError(str(exc)) from None


def resolve_model_dir(ref: str) -> Path:
    try:
        return _resolve_model_dir(ref)
    except PromptFileError as exc:
        raise AcceptanceError(str(exc)) from None


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    file = model_dir / "tokenizer.json"
    if not file.is_file():
        raise AcceptanceError(f"{model_dir}: no tokenizer.json (the prompts are text; a tokenizer is needed)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # the tokenizers library raises its own exception types
        raise AcceptanceError(f"{file}: cannot read the tokenizer ({exc})") from None


# ----------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------

def count_acceptance(target, draft, prompts: Sequence[Sequence[int]], k: int, max_new_tokens: int,
                     batch: int | None = None, progress=None) -> AcceptanceCounts:
    """Greedy per-position acceptance of `draft` against `target` (runtime Transformers) on token prompts.

    batch: sequences processed together (default all). progress: optional callable(n_done_sequences).
    """
    from specoffload.runtime.generate import generate

    if k < 1:
        raise AcceptanceError(f"draft length k must be >= 1, got {k}")
    if target.args.vocab_size != draft.args.vocab_size:
        raise AcceptanceError(f"target and draft vocabularies differ ({target.args.vocab_size} vs "
                              f"{draft.args.vocab_size} tokens): they must share a tokenizer")
    counts = AcceptanceCounts(k)
    n = len(prompts)
    batch = max(1, min(batch or n, n))
    for start in range(0, n, batch):
        chunk = [list(p) for p in prompts[start:start + batch]]
        outs = [g.tokens for g in generate(target, chunk, max_new_tokens, max_batch=batch)]
        _draft_rounds(draft, chunk, outs, k, counts)
        counts.target_tokens += sum(len(o) for o in outs)
        counts.sequences += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return counts


@torch.no_grad()
def _draft_rounds(draft, prompts: list[list[int]], outs: list[list[int]], k: int, counts: AcceptanceCounts) -> None:
    """Replay the verification points of greedy speculative decoding along the target's outputs."""
    B = len(prompts)
    seqs = [p + o for p, o in zip(prompts, outs)]
    max_len = max(len(s) for s in seqs) + k + 1
    cache = draft.new_cache(B, max_len)
    done_p = [0] * B  # target tokens committed per sequence
    pending = [list(p) for p in prompts]  # tokens each slot feeds at the next round's first step
    active = [s for s in range(B) if outs[s]]
    while active:
        proposals = [[] for _ in active]
        feed = [pending[s] for s in active]
        for step in range(k):
            n_new = torch.tensor([len(f) for f in feed])
            tokens = torch.zeros(len(active), int(n_new.max()), dtype=torch.long)
            for b, f in enumerate(feed):
                tokens[b, :len(f)] = torch.tensor(f)
            nxt = draft(tokens, cache, slots=active, n_new=n_new, logits="last").argmax(-1).tolist()
            for b, t in enumerate(nxt):
                proposals[b].append(t)
            feed = [[t] for t in nxt]
        still = []
        for b, s in enumerate(active):
            p, P = done_p[s], len(prompts[s])
            truth = outs[s][p:p + k]
            n_acc = counts.record_match(proposals[b], truth)
            # The cache holds the context (P + p tokens) then d_1..d_{k-1}; keep the accepted ones.
            keep = P + p + min(n_acc, k - 1)
            cache.rollback([s], [keep])
            done_p[s] = p + n_acc + 1
            if done_p[s] < len(outs[s]):
                pending[s] = seqs[s][keep:P + done_p[s]]
                still.append(s)
        active = still


def acceptance_reference(target, draft, prompts: Sequence[Sequence[int]], k: int,
                         max_new_tokens: int) -> AcceptanceCounts:
    """The same counts computed naively (every proposal re-reads the whole context): for tests."""
    from specoffload.runtime.generate import generate

    counts = AcceptanceCounts(k)
    outs = [g.tokens for g in generate(target, [list(p) for p in prompts], max_new_tokens)]
    with torch.no_grad():
        for prompt, out in zip(prompts, outs):
            p = 0
            while p < len(out):
                ctx = list(prompt) + out[:p]
                d = []
                for _ in range(k):
                    logits = draft.logits_full(torch.tensor([ctx + d]))
                    d.append(int(logits[0, -1].argmax()))
                truth = out[p:p + k]
                n_acc = counts.record_match(d, truth)
                p += n_acc + 1
            counts.target_tokens += len(out)
            counts.sequences += 1
    return counts


# ----------------------------------------------------------------------------------------------
# The whole measurement
# ----------------------------------------------------------------------------------------------

@dataclass
class AcceptanceResult:
    workload: Workload
    counts: AcceptanceCounts
    prompt_lengths: list[int]


def measure_workload(target_ref: str, draft_ref: str, prompts_path: str | Path, k: int = 8,
                     max_new_tokens: int = 64, sample: int | None = None, batch: int = 32,
                     progress: bool = True) -> AcceptanceResult:
    """Load the pair (runtime loader, fp32, CPU), tokenize the prompts, count, and build the Workload."""
    from specoffload.runtime.model import Transformer

    if max_new_tokens < 1:
        raise AcceptanceError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    prompts = read_prompts(prompts_path)
    tdir, ddir = resolve_model_dir(target_ref), resolve_model_dir(draft_ref)
    tok = load_tokenizer(tdir)
    from specoffload.runtime.requests_io import RequestError, RequestIO

    try:
        rio = RequestIO.from_model_dir(tdir, tokenizer=tok)  # chats rendered as a run renders them
        ids = rio.all_prompt_ids(prompts, prompts_path)
    except RequestError as exc:
        raise AcceptanceError(str(exc)) from None
    for p, x in zip(prompts, ids):
        if not x:
            raise AcceptanceError(f"{prompts_path}:{p.line}: prompt {p.id!r} encodes to no tokens")
    from specoffload.runtime.feature_draft import (FeatureHead, FeatureHeadError, count_feature_acceptance,
                                                   is_feature_head)

    target = Transformer.from_pretrained(tdir, dtype=torch.float32)
    feature = is_feature_head(ddir)
    if feature:  # an EAGLE-style head: it reads the target's features and uses its embedding and LM head
        try:
            draft = FeatureHead.load(ddir, target.args, target.weights.embed, target.weights.lm_head)
        except FeatureHeadError as e:
            raise AcceptanceError(f"draft {draft_ref!r}: {e}") from None
    else:
        draft = Transformer.from_pretrained(ddir, dtype=torch.float32)
    limit = min(target.args.max_position_embeddings, draft.args.max_position_embeddings)
    for p, x in zip(prompts, ids):
        if len(x) + max_new_tokens + k > limit:
            raise AcceptanceError(
                f"{prompts_path}:{p.line}: prompt {p.id!r} has {len(x)} tokens; with --max-new-tokens "
                f"{max_new_tokens} and k={k} that exceeds the models' {limit} positions")
    measured = ids[:sample] if sample else ids
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(measured), desc="acceptance", unit="prompt", dynamic_ncols=True)
    try:
        if feature:
            counts = count_feature_acceptance(target, draft, measured, k, max_new_tokens, AcceptanceCounts(k),
                                              progress=bar.update if bar is not None else None)
        else:
            counts = count_acceptance(target, draft, measured, k, max_new_tokens, batch=batch,
                                      progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    acc = counts.acceptance_vector()
    if not acc:
        raise AcceptanceError("no verification round happened (the target generated no tokens)")
    lengths = [len(x) for x in ids]
    mean_len = max(1, round(sum(lengths) / len(lengths)))
    acc_r = tuple(round(a, 4) for a in acc)
    date = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    source = (f"measured {date} by specoffload-profile --acceptance: greedy; target {target_ref}, draft {draft_ref}, "
              f"k={k}, max_new_tokens {max_new_tokens}; {len(measured)} of {len(prompts)} prompts from "
              f"{Path(prompts_path).name}; {counts.rounds} verification rounds over {counts.target_tokens} target "
              f"tokens; tried per position {counts.tried}, accepted {counts.accepted}; "
              f"E[tokens/round] at k={len(acc_r)}: {expected_tokens(acc_r):.3f}")
    workload = Workload(prompt_len_tokens=mean_len, gen_len_tokens=max_new_tokens, num_prompts=len(prompts),
                        acceptance=acc_r, acceptance_source=source, max_prompt_len_tokens=max(lengths))
    return AcceptanceResult(workload, counts, lengths)
