"""specoffload-profile --acceptance for a feature draft: the incremental count (one target pass per prompt, the
head's cache kept and rolled back) drafts exactly what a recompute from scratch at every point drafts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from specoffload.runtime.feature_draft import FeatureHead, count_feature_acceptance, write_random_head
from specoffload.runtime.generate import generate
from specoffload.runtime.model import Transformer
from specoffload.runtime.profiler.acceptance import AcceptanceCounts
from specoffload.runtime.random_checkpoint import write_random_checkpoint
from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_paths, tiny_pair_tokenizer

DEMO = Path(__file__).resolve().parent.parent / "runtime" / "assets" / "demo_prompts.jsonl"


class Recorded(AcceptanceCounts):
    """Counts that also keep every round's drafts and the target's tokens they were checked against."""

    def __init__(self, k: int):
        super().__init__(k)
        self.rounds_seen: list[tuple[list[int], list[int]]] = []

    def record_match(self, proposed, truth):
        self.rounds_seen.append((list(proposed), list(truth)))
        return super().record_match(proposed, truth)


@torch.no_grad()
def recompute_each_point(target, head, prompts, k, max_new_tokens, counts):
    """The reference: at each verification point, the target over the whole context and a fresh head cache."""
    outs = [g.tokens for g in generate(target, [list(p) for p in prompts], max_new_tokens)]
    for prompt, out in zip(prompts, outs):
        p = 1
        while p < len(out):
            ctx = list(prompt) + out[:p]
            feats = target.forward(torch.tensor([ctx]), target.new_cache(1, len(ctx)), logits="hidden")[:, :-1]
            hc = head.new_cache(1, len(ctx) + k)
            tokens, d = torch.tensor([ctx[1:]]), []
            for _ in range(k):
                pred, logits = head.forward(hc, [0], tokens, feats, torch.tensor([tokens.shape[1]]))
                d.append(int(logits[0].argmax()))
                tokens, feats = torch.tensor([[d[-1]]]), pred[:, None]
            p += counts.record_match(d, out[p:p + k]) + 1
        counts.target_tokens += len(out)
        counts.sequences += 1
    return counts


def both(target, head, prompts, k, n):
    new = count_feature_acceptance(target, head, prompts, k, n, Recorded(k))
    ref = recompute_each_point(target, head, prompts, k, n, Recorded(k))
    return new, ref


def test_incremental_counts_equal_a_recompute_on_the_tiny_eagle():
    torch.manual_seed(0)
    target = Transformer.from_pretrained(tiny_pair_paths()[0], dtype=torch.float32)
    head = FeatureHead.load(tiny_eagle_path(), target.args, target.weights.embed, target.weights.lm_head)
    tok = tiny_pair_tokenizer()
    texts = [json.loads(x)["prompt"] for x in DEMO.read_text().splitlines()][:3]
    prompts = [tok.encode(t).ids for t in texts]
    new, ref = both(target, head, prompts, 4, 16)
    assert new.rounds_seen == ref.rounds_seen  # every round's four drafts, token for token
    assert (new.tried, new.accepted, new.rounds, new.target_tokens) == (ref.tried, ref.accepted, ref.rounds,
                                                                        ref.target_tokens)
    # A trained head: some rounds accept every draft, some none, so every rollback length is exercised.
    kept = {next((i for i, (a, b) in enumerate(zip(d, t)) if a != b), min(len(d), len(t))) for d, t in ref.rounds_seen}
    assert 0 in kept and 4 in kept and new.accepted[0] > 0


def test_incremental_counts_equal_a_recompute_on_a_random_head(tmp_path):
    """A random head over a random Llama target (its drafts mostly rejected: the one-token rollbacks)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 48,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 64,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "eos_token_id": None,
           "hidden_act": "silu", "tie_word_embeddings": False}
    write_random_checkpoint(tmp_path / "t", cfg, seed=3, device=torch.device("cpu"))
    target = Transformer.from_pretrained(tmp_path / "t", dtype=torch.float32)
    write_random_head(tmp_path / "h", target.args, "eagle", seed=5, std=0.3)
    head = FeatureHead.load(tmp_path / "h", target.args, target.weights.embed, target.weights.lm_head)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 3, 9, 20)]
    new, ref = both(target, head, prompts, 3, 12)
    assert new.rounds_seen == ref.rounds_seen and new.rounds > 10
