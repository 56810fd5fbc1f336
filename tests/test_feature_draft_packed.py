"""The feature head's packed forward (linear parts over the valid pairs only) against its padded forward: same
predicted features, logits and cache contents, in fp32, on random heads over Llama / Mistral (sliding window) /
Mixtral targets with ragged rows."""
from __future__ import annotations

import pytest
import torch

from specoffload.runtime.feature_draft import FeatureHead, write_random_head
from specoffload.runtime.model import Transformer
from specoffload.runtime.random_checkpoint import write_random_checkpoint

from test_feature_draft import FAMILY_CONFIGS


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Per family: a random fp32 head (with every optional norm, so each packed op is exercised) over a random
    target."""
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for fam, cfg in FAMILY_CONFIGS.items():
        write_random_checkpoint(root / fam, cfg, seed=1, device=torch.device("cpu"))
        target = Transformer.from_pretrained(root / fam)
        head_dir = write_random_head(root / f"{fam}-head", target.args, seed=3, norms=True, std=0.2)
        out[fam] = FeatureHead.load(head_dir, target.args, target.weights.embed, target.weights.lm_head)
    return out


def two_caches(head: FeatureHead, history: list[int], g: torch.Generator):
    """Two identical caches, each row already holding `history[row]` pairs (rows at different positions)."""
    B, D = len(history), head.args.dim
    caches = [head.new_cache(B + 1, 64) for _ in range(2)]
    rows = list(range(1, B + 1))  # slot 0 unused: rows are not the cache's first slots
    n = torch.tensor(history)
    T = int(n.max())
    tokens = torch.randint(0, head.args.vocab_size, (B, T), generator=g)
    feats = torch.randn(B, T, D, generator=g)
    for c in caches:
        head.forward(c, rows, tokens, feats, n, pack=False)
    return caches, rows


@pytest.mark.parametrize("fam", sorted(FAMILY_CONFIGS))
@pytest.mark.parametrize("n_new", [[3, 1, 5, 2], [1, 1, 4, 1], [5, 5, 5, 5], [1, 1, 1, 1], [2]])
def test_packed_forward_equals_padded(heads, fam, n_new):
    head = heads[fam]
    g = torch.Generator().manual_seed(len(n_new) * 10 + sum(n_new))
    history = [7, 2, 11, 4][:len(n_new)]
    (c_pad, c_pack), rows = two_caches(head, history, g)
    n = torch.tensor(n_new)
    B, T = len(n_new), max(n_new)
    tokens = torch.randint(0, head.args.vocab_size, (B, T), generator=g)
    feats = torch.randn(B, T, head.args.dim, generator=g)
    # Padding past each row's n_new must not matter: poison it in the packed call's inputs.
    mask = torch.arange(T)[None, :] < n[:, None]
    tokens_p = torch.where(mask, tokens, head.args.vocab_size - 1)
    feats_p = torch.where(mask[..., None], feats, torch.full_like(feats, 1e4))
    f_pad, l_pad = head.forward(c_pad, rows, tokens, feats, n, pack=False)
    f_pack, l_pack = head.forward(c_pack, rows, tokens_p, feats_p, n, pack=True)
    torch.testing.assert_close(f_pack, f_pad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_pack, l_pad, rtol=1e-5, atol=1e-5)
    assert torch.equal(c_pack.lengths, c_pad.lengths)
    idx = torch.tensor(rows)
    assert torch.equal(c_pack.lengths[idx], torch.tensor(history) + n)
    for r, length in zip(rows, c_pad.lengths[idx].tolist()):  # every valid key and value the two wrote
        torch.testing.assert_close(c_pack.k[0][r, :, :length], c_pad.k[0][r, :, :length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c_pack.v[0][r, :, :length], c_pad.v[0][r, :, :length], rtol=1e-5, atol=1e-5)
    # A following one-pair step (the draft's later steps) reads the packed call's cache the same way.
    nxt = l_pad.argmax(-1)[:, None]
    a = head.forward(c_pad, rows, nxt, f_pad[:, None], torch.ones(B, dtype=torch.long))
    b = head.forward(c_pack, rows, nxt, f_pack[:, None], torch.ones(B, dtype=torch.long))
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)


def test_packs_only_ragged_rows():
    packs, width = FeatureHead.packs, FeatureHead.computed_width
    assert packs(torch.tensor([3, 1, 5, 2]), 5) and width(torch.tensor([3, 1, 5, 2]), 5) == pytest.approx(2.75)
    assert not packs(torch.tensor([5, 5, 5]), 5) and width(torch.tensor([5, 5, 5]), 5) == 5.0  # all rows full
    assert not packs(torch.tensor([1, 1]), 1) and width(torch.tensor([1, 1]), 1) == 1.0  # one pair per row
    assert not packs(torch.tensor([0, 3]), 3) and width(torch.tensor([0, 3]), 3) == 3.0  # an empty row: padded
