"""Plain batched generation: greedy equals transformers on the shipped pair; sampling; stopping."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from specoffload.runtime.config import ModelArgs  # noqa: E402
from specoffload.runtime.generate import generate, sample_next, top_p_filter  # noqa: E402
from specoffload.runtime.layers import init_random_weights  # noqa: E402
from specoffload.runtime.model import Transformer  # noqa: E402
from specoffload.runtime.tiny_pair import load_tiny_pair, tiny_pair_paths, tiny_pair_tokenizer  # noqa: E402

SNIPPETS = [
    "import os\n",
    "def fibonacci(n):\n    ",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "    for i in range(len(items)):\n        if items[i] is None:\n            ",
    '"""Utilities for reading configuration files.\n\nThis module provides',
]


@pytest.fixture(scope="module")
def pair():
    return load_tiny_pair()


@pytest.fixture(scope="module")
def prompts():
    tok = tiny_pair_tokenizer()
    ids = [tok.encode(s).ids for s in SNIPPETS]
    assert all(p[0] == 0 for p in ids)  # <s> first, as in training
    assert len({len(p) for p in ids}) == len(ids)  # all lengths differ
    return ids


def test_shipped_pair_format():
    for d in tiny_pair_paths():
        cfg = json.loads((d / "config.json").read_text())
        tok_cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert (tok_cfg["bos_token"], tok_cfg["eos_token"], tok_cfg["pad_token"]) == ("<s>", "</s>", "<pad>")
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            names = set(f.keys())
            assert {f.get_slice(n).get_dtype() for n in names} == {"BF16"}
        if cfg["model_type"] == "mixtral":
            assert "model.layers.3.block_sparse_moe.experts.7.w2.weight" in names
            assert "model.layers.0.block_sparse_moe.gate.weight" in names
        assert (d / "model.safetensors").stat().st_size < 12 * 2**20


@pytest.mark.parametrize("which", ["target", "draft"])
def test_greedy_equals_transformers_generate(pair, prompts, which):
    """Our batch (ragged prompts, 3 slots for 5 prompts: slots get reused) vs HF one prompt at a time."""
    ours = pair[0] if which == "target" else pair[1]
    folder = tiny_pair_paths()[0 if which == "target" else 1]
    # transformers 5 defaults MoE experts to "grouped_mm", which is ~15x slower than "eager" on a CPU.
    extra = {"experts_implementation": "eager"} if which == "target" else {}
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                           **extra).eval()
    max_new = [20, 32, 12, 32, 25]
    got = generate(ours, prompts, max_new, max_batch=3)
    for p, m, g in zip(prompts, max_new, got):
        x = torch.tensor([p])
        with torch.no_grad():
            ref = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=m)[0, len(p):]
        assert g.tokens == ref.tolist()
        assert g.finish_reason == ("eos" if ref[-1].item() == 1 else "length")


def test_transformers_tokenizer_loads_offline():
    tok = transformers.AutoTokenizer.from_pretrained(tiny_pair_paths()[1], local_files_only=True)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2)
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"], skip_special_tokens=True) == "def f(x):\n    return x"


# ----------------------------------------------------------------------------------------------
# Sampling and stopping, on a small random model
# ----------------------------------------------------------------------------------------------

_ARGS = ModelArgs(family="llama", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=48,
                  norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=128, eos_token_id=(49,))
_MODEL = Transformer(_ARGS, init_random_weights(_ARGS, seed=3))
_PROMPTS = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]


def test_sampling_with_a_seed_is_reproducible():
    a = generate(_MODEL, _PROMPTS, 16, temperature=1.0, seed=7, eos_token_id=None)
    b = generate(_MODEL, _PROMPTS, 16, temperature=1.0, generator=torch.Generator().manual_seed(7), eos_token_id=None)
    c = generate(_MODEL, _PROMPTS, 16, temperature=1.0, seed=8, eos_token_id=None)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    assert all(g.finish_reason == "length" and len(g.tokens) == 16 for g in a)


def test_top_p_filter_keeps_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.25, 0.25]])
    kept = top_p_filter(probs, 0.7)
    # Row 0: 0.5 alone < 0.7, 0.5 + 0.3 crosses it -> {1, 3}; row 1: three quarters needed -> 3 tokens.
    torch.testing.assert_close(kept[0], torch.tensor([0.0, 0.625, 0.0, 0.375]))
    assert int((kept[1] > 0).sum()) == 3
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)


def test_sampling_stays_in_the_nucleus_with_its_proportions():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(20000, 4)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[0] == 0 and counts[2] == 0
    assert abs(counts[1].item() - 0.625) < 0.02
    # A nucleus so small it holds one token is greedy decoding.
    tiny = generate(_MODEL, _PROMPTS, 10, temperature=1.0, top_p=1e-6, seed=1, eos_token_id=None)
    greedy = generate(_MODEL, _PROMPTS, 10, eos_token_id=None)
    assert [g.tokens for g in tiny] == [g.tokens for g in greedy]


def test_stops_at_eos_or_length_per_sequence():
    free = generate(_MODEL, _PROMPTS, 12, eos_token_id=None)
    # Declare the 4th greedy token of the first sequence to be EOS: that sequence stops there,
    # keeping the EOS; the others stop at it too if they meet it, else at their own length.
    eos = free[0].tokens[3]
    got = generate(_MODEL, _PROMPTS, [12, 5, 9], eos_token_id=eos, max_batch=2)
    assert got[0].tokens == free[0].tokens[:free[0].tokens.index(eos) + 1] and got[0].finish_reason == "eos"
    for g, f, m in zip(got[1:], free[1:], [5, 9]):
        upto = f.tokens[:m]
        if eos in upto:
            assert g.tokens == upto[:upto.index(eos) + 1] and g.finish_reason == "eos"
        else:
            assert g.tokens == upto and g.finish_reason == "length"
    # Default EOS comes from the config (49 here); zero new tokens is an immediate "length".
    assert generate(_MODEL, [[1]], 0)[0].finish_reason == "length"
    with pytest.raises(ValueError, match="at least one token"):
        generate(_MODEL, [[]], 3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(_MODEL, [[1] * 100], 30)


@pytest.mark.slow
def test_training_script_quick_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "train_tiny_pair.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "training_report.json").read_text())
    assert report["quick"] and report["acceptance"]["k"] == 4
    for sub in ("target", "draft"):
        assert (tmp_path / sub / "model.safetensors").is_file()
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub, local_files_only=True)
