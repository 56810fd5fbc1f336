"""specoffload-profile --acceptance: per-position acceptance counts (checked against a naive replay),
prompt-file errors, the Workload it writes and specoffload-plan reading it."""
from __future__ import annotations

import json

import pytest

from specoffload.planner.schema import Workload

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specoffload.runtime import profile_cli  # noqa: E402
from specoffload.runtime.model import Transformer  # noqa: E402
from specoffload.runtime.profiler.acceptance import (AcceptanceCounts, AcceptanceError,  # noqa: E402
                                                     acceptance_reference, count_acceptance, measure_workload,
                                                     read_prompts)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TEXTS = ["def f(x):\n    return", "import os", "class A:\n", "for i in range(10):", "x = [1, 2, 3]\nprint(x",
         "while True:\n    pass"]


def write_tokenizer(folder):
    """A character-level tokenizer (<s>=0, </s>=1, <unk>=2; encoding prepends <s>)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))


def save_random_model(folder, seed, layers=2):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        bos_token_id=0, eos_token_id=1, pad_token_id=2, initializer_range=0.3)
    torch.manual_seed(seed)
    model = MistralForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-pair")
    return save_random_model(root / "target", seed=0, layers=2), save_random_model(root / "draft", seed=1, layers=1)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "in.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(TEXTS)) + "\n")
    return path


def token_prompts(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


# --- counting ------------------------------------------------------------------------------------
def test_record_counts_conditional_positions():
    c = AcceptanceCounts(4)
    c.record(2, 4)  # positions 1, 2 accepted, 3 tried and rejected, 4 not reached
    c.record(4, 4)  # all accepted
    c.record(0, 4)  # first rejected
    c.record(1, 1)  # only one position verifiable (end of the output): accepted
    assert c.tried == [4, 2, 2, 1]
    assert c.accepted == [3, 2, 1, 1]
    assert c.acceptance_vector() == (0.75, 1.0, 0.5, 1.0)
    assert AcceptanceCounts(3, tried=[2, 0, 0], accepted=[1, 0, 0]).acceptance_vector() == (0.5,)
    assert AcceptanceCounts(3, tried=[2, 0, 0], accepted=[1, 0, 0]).per_position() == [0.5, 0.0, 0.0]


@pytest.mark.parametrize("k", [1, 4])
def test_cached_replay_equals_naive_replay(pair_dirs, k):
    tdir, ddir = pair_dirs
    target, draft = Transformer.from_pretrained(tdir), Transformer.from_pretrained(ddir)
    prompts = token_prompts(tdir)[:3]
    fast = count_acceptance(target, draft, prompts, k, max_new_tokens=10, batch=2)
    ref = acceptance_reference(target, draft, prompts, k, max_new_tokens=10)
    assert (fast.tried, fast.accepted, fast.rounds, fast.target_tokens) == (
        ref.tried, ref.accepted, ref.rounds, ref.target_tokens)
    assert fast.rounds > 0 and fast.tried[0] == fast.rounds


def test_a_draft_identical_to_the_target_is_always_accepted(pair_dirs):
    tdir, _ = pair_dirs
    target = Transformer.from_pretrained(tdir)
    c = count_acceptance(target, Transformer.from_pretrained(tdir), token_prompts(tdir), 4, max_new_tokens=16)
    assert c.acceptance_vector() == (1.0,) * len(c.acceptance_vector()) and len(c.acceptance_vector()) >= 2
    # Each round commits its k accepted tokens plus the target's own: ceil(len / (k + 1)) rounds per sequence.
    from specoffload.runtime.generate import generate

    outs = [len(g.tokens) for g in generate(target, token_prompts(tdir), 16)]
    assert c.rounds == sum(-(-n // 5) for n in outs) and c.target_tokens == sum(outs)


def test_different_vocabularies_are_refused(pair_dirs, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    tdir, _ = pair_dirs
    cfg = MistralConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    MistralForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(AcceptanceError, match="vocabularies differ"):
        count_acceptance(Transformer.from_pretrained(tdir), Transformer.from_pretrained(tmp_path), [[0, 5]], 2, 4)


# --- the prompt file -----------------------------------------------------------------------------
@pytest.mark.parametrize("lines,msg", [
    (['{"id": 1, "prompt": "a"}', '{"id": 2, "prompt": "b"', '{"id": 3, "prompt": "c"}'], r"in\.jsonl:2: not valid JSON"),
    (['{"id": 1, "prompt": "a"}', '', '["not", "an", "object"]'], r"in\.jsonl:3: expected a JSON object"),
    (['{"id": 1, "text": "a"}'], r"in\.jsonl:1: no \"prompt\" key \(keys: id, text\)"),
    (['{"id": 1, "prompt": 7}'], r"in\.jsonl:1: \"prompt\" must be a string"),
    (['', '  '], r"in\.jsonl: no prompts"),
])
def test_malformed_prompt_lines_are_named(tmp_path, lines, msg):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AcceptanceError, match=msg):
        read_prompts(path)


def test_prompts_keep_ids_and_line_numbers(prompts_file):
    ps = read_prompts(prompts_file)
    assert [p.id for p in ps] == [str(i) for i in range(len(TEXTS))]
    assert [p.line for p in ps] == list(range(1, len(TEXTS) + 1))
    assert ps[0].text == TEXTS[0]


# --- the Workload and the planner reading it -----------------------------------------------------
def test_workload_fields(pair_dirs, prompts_file):
    tdir, ddir = pair_dirs
    res = measure_workload(str(tdir), str(ddir), prompts_file, k=3, max_new_tokens=10, progress=False)
    w = res.workload
    lengths = [len(p) for p in token_prompts(tdir)]
    assert w.num_prompts == len(TEXTS) and w.gen_len_tokens == 10
    assert w.prompt_len_tokens == round(sum(lengths) / len(lengths)) and w.max_prompt_len_tokens == max(lengths)
    assert isinstance(w.acceptance, tuple) and 1 <= len(w.acceptance) <= 3
    assert w.acceptance == tuple(round(a, 4) for a in res.counts.acceptance_vector())
    assert "greedy" in w.acceptance_source and "k=3" in w.acceptance_source and "in.jsonl" in w.acceptance_source
    assert w.temperature == 0.0


def test_too_long_prompt_names_the_line(pair_dirs, tmp_path):
    tdir, ddir = pair_dirs
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "ok", "prompt": "x"}) + "\n" + json.dumps({"id": "big", "prompt": "y" * 250}) + "\n")
    with pytest.raises(AcceptanceError, match=r"long\.jsonl:2: prompt 'big' has 251 tokens"):
        measure_workload(str(tdir), str(ddir), path, k=4, max_new_tokens=8, progress=False)


def test_cli_acceptance_then_plan(pair_dirs, prompts_file, tmp_path, capsys):
    from specoffload.planner.cli import main as plan_main

    tdir, ddir = pair_dirs
    out = tmp_path / "workload.yaml"
    rc = profile_cli.main(["--acceptance", "--target", str(tdir), "--draft", str(ddir), "--prompts", str(prompts_file),
                           "-k", "4", "--max-new-tokens", "8", "--sample", "4", "--no-progress", "-o", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "acceptance per position (k=4)" in err and f"wrote {out}" in err
    w = Workload.load(out)
    assert w.num_prompts == len(TEXTS) and "4 of 6 prompts" in w.acceptance_source
    rc = plan_main(["--model", str(tdir), "--draft", str(ddir), "--profile", "rtx4090-pcie4", "--workload", str(out),
                    "-o", str(tmp_path / "plan.yaml")])
    assert rc == 0 and (tmp_path / "plan.yaml").exists()


def test_cli_acceptance_error_is_reported(pair_dirs, tmp_path, capsys):
    tdir, ddir = pair_dirs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops}\n')
    rc = profile_cli.main(["--acceptance", "--target", str(tdir), "--draft", str(ddir), "--prompts", str(bad),
                           "--no-progress"])
    assert rc == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a"}\n')
    rc = profile_cli.main(["--acceptance", "--target", str(tmp_path), "--draft", str(ddir), "--prompts", str(good),
                           "--no-progress"])
    assert rc == 2 and "not tiny-target / tiny-draft and not an HF model folder" in capsys.readouterr().err


def test_shipped_tiny_pair(tmp_path):
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    try:
        tiny_pair_paths()
    except FileNotFoundError:
        pytest.skip("the shipped tiny pair is not there yet")
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(TEXTS[:4])))
    res = measure_workload("tiny-target", "tiny-draft", path, k=4, max_new_tokens=16, progress=False)
    a = res.workload.acceptance
    assert len(a) == 4 and all(0.0 <= x <= 1.0 for x in a)
    assert a[0] > 0.3  # a distilled draft agrees with its target far more often than chance
