"""Request semantics around the engine: JSONL fields and their validation, generation_config.json, chat
templates, the sampling filters (top-k, min-p) and the output line (finish_reason, stop_reason, usage)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from specoffload.runtime.engine.requests import Finished, Request
from specoffload.runtime.generation_config import GenerationConfigError, load_generation_config
from specoffload.runtime.outputs import OUTPUT_KEYS, OutputFileError, scan
from specoffload.runtime.prompts import Prompt, PromptFileError, read_prompts
from specoffload.runtime.requests_io import RequestError, RequestIO
from specoffload.runtime.tiny_pair import tiny_pair_paths
from specoffload.runtime.verify import min_p_filter, processed_probs, top_k_filter


def write(path: Path, *objs) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


# -- sampling filters ----------------------------------------------------------------------------

def test_top_k_and_min_p_filters_known_answers():
    p = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(top_k_filter(p, 2), torch.tensor([[4 / 7, 3 / 7, 0, 0], [0.25] * 4]))  # ties all kept
    assert torch.allclose(top_k_filter(p, torch.tensor([[1], [0]])), torch.tensor([[1.0, 0, 0, 0], [0.25] * 4]))
    assert torch.equal(top_k_filter(p, 0), p) and torch.equal(top_k_filter(p, 9), p)
    assert torch.allclose(min_p_filter(p, 0.5), torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0], [0.25] * 4]))
    assert torch.equal(min_p_filter(p, 0.0), p)


def test_processed_probs_order_is_temperature_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    # top_k 4 -> [.5 .2 .15 .1]/.95; top_p .8 keeps .5/.95=.526, .2/.95 (mass above .526 < .8), .15/.95 (.737 < .8);
    # min_p .35 then drops .15 (< .35 * .5)
    got = processed_probs(logits, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([4]), torch.tensor([0.35]))
    assert torch.allclose(got, torch.tensor([[5 / 7, 2 / 7, 0, 0, 0]]), atol=1e-6)
    # top-p before min-p (transformers' order): on [.4 .3 .2 .1], top_p .75 keeps three (mass above .2 is .7),
    # min_p .3 keeps them all (.2 >= .3 * .4). min-p first (vLLM's order) would keep [.4 .3 .2]/.9, after which
    # top_p .75 drops .2 (mass above it .78): [4/7 3/7 0 0].
    four = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    got = processed_probs(four, torch.tensor([1.0]), torch.tensor([0.75]), torch.tensor([0]), torch.tensor([0.3]))
    assert torch.allclose(got, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0]]), atol=1e-6)
    # top_k=1 wins over everything
    got = processed_probs(logits, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1]), torch.tensor([0.0]))
    assert torch.equal(got, torch.tensor([[1.0, 0, 0, 0, 0]]))
    # temperature first: at T=2 the tail rises above min_p's floor
    hot = processed_probs(logits, torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.35]))
    assert int((hot > 0).sum()) == 4


# -- JSONL fields ----------------------------------------------------------------------------------

def test_every_field_is_read_and_unset_ones_are_none(tmp_path):
    f = write(tmp_path / "in.jsonl",
              {"id": "a", "prompt": "x", "max_tokens": 9, "min_tokens": 2, "temperature": 0.5, "top_p": 0.9,
               "top_k": 4, "min_p": 0.1, "seed": 3, "stop": ["\n\n", "END"], "stop_token_ids": [7, 8],
               "ignore_eos": True},
              {"id": "b", "messages": [{"role": "user", "content": "hi"}], "stop": "."},
              {"id": "c", "prompt": "y"})
    a, b, c = read_prompts(f, require_id=True)
    assert a == Prompt(1, "a", "x", 9, 0.5, 0.9, 3, None, 2, 4, 0.1, ("\n\n", "END"), (7, 8), True)
    assert a.prompt == "x"
    assert b.text is None and b.messages == ({"role": "user", "content": "hi"},) and b.stop == (".",)
    assert all(getattr(c, k) is None for k in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
                                               "seed", "stop", "stop_token_ids", "ignore_eos", "messages"))


@pytest.mark.parametrize("obj,msg", [
    ({"id": 1, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "both \"prompt\" and \"messages\""),
    ({"id": 1}, "no \"prompt\" key"),
    ({"id": 1, "messages": []}, "\"messages\" must be a non-empty list"),
    ({"id": 1, "messages": "hi"}, "\"messages\" must be a non-empty list"),
    ({"id": 1, "messages": [{"role": "user"}]}, "messages[0] must be an object with exactly the keys"),
    ({"id": 1, "messages": [{"role": "user", "content": 3}]}, "messages[0].content must be a string"),
    ({"id": 1, "prompt": "x", "stop": 3}, "\"stop\" must be a string or a list of strings"),
    ({"id": 1, "prompt": "x", "stop": ["a", 1]}, "\"stop\" must be a string or a list of strings"),
    ({"id": 1, "prompt": "x", "stop": ""}, "empty string"),
    ({"id": 1, "prompt": "x", "stop_token_ids": [1, -2]}, "\"stop_token_ids\" must be a list of token ids"),
    ({"id": 1, "prompt": "x", "stop_token_ids": 5}, "\"stop_token_ids\" must be a list of token ids"),
    ({"id": 1, "prompt": "x", "ignore_eos": 1}, "\"ignore_eos\" must be true or false"),
    ({"id": 1, "prompt": "x", "top_k": 2.5}, "\"top_k\" must be an integer"),
    ({"id": 1, "prompt": "x", "top_k": -3}, "\"top_k\" must be an integer >= -1"),
    ({"id": 1, "prompt": "x", "min_p": 1.5}, "\"min_p\" must be a number in [0, 1]"),
    ({"id": 1, "prompt": "x", "min_tokens": -1}, "\"min_tokens\" must be an integer >= 0"),
    ({"id": 1, "prompt": "x", "min_tokens": 5, "max_tokens": 3}, "min_tokens (5) is above max_tokens (3)"),
    ({"id": 1, "prompt": "x", "temperature": -1}, "temperature must be >= 0"),
    ({"id": 1, "prompt": "x", "top_p": 0}, "top_p in (0, 1]"),
    ({"id": 1, "prompt": "x", "top_q": 0}, "unknown field(s) ['top_q']"),
])
def test_bad_fields_are_named_with_file_and_line(tmp_path, obj, msg):
    f = write(tmp_path / "in.jsonl", {"id": 0, "prompt": "ok"}, obj)
    with pytest.raises(PromptFileError) as e:
        read_prompts(f, require_id=True)
    assert str(e.value).startswith(f"{f}:2: ") and msg in str(e.value)


# -- generation_config.json ------------------------------------------------------------------------

def test_generation_config_eos_and_defaults(tmp_path):
    assert load_generation_config(tmp_path).eos_token_ids == ()  # no file: nothing
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [1, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
         "repetition_penalty": 1.1}))
    g = load_generation_config(tmp_path)
    assert g.eos_token_ids == (1, 7) and g.sampling_defaults() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "temperature": 0.6}))
    g = load_generation_config(tmp_path)
    assert g.eos_token_ids == (3,) and g.sampling_defaults() == {}  # without do_sample: greedy, as transformers
    for bad, field in (({"eos_token_id": "x"}, "eos_token_id"), ({"top_p": 2}, "top_p"),
                       ({"do_sample": "yes"}, "do_sample")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(GenerationConfigError, match=f"generation_config.json: \"{field}\" must be"):
            load_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(GenerationConfigError, match="cannot be read as JSON"):
        load_generation_config(tmp_path)


@pytest.fixture
def target_copy(tmp_path):
    d = tmp_path / "target"
    shutil.copytree(tiny_pair_paths()[0], d)
    return d


def test_request_fields_own_then_generation_config_then_defaults(target_copy):
    (target_copy / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 1, "do_sample": True, "temperature": 0.7, "top_k": 40, "min_p": 0.05}))
    rio = RequestIO.from_model_dir(target_copy)
    r = rio.request(Prompt(1, "a", "def f():", temperature=0.2, top_k=-1), default_max_tokens=11)
    assert (r.max_tokens, r.temperature, r.top_p, r.top_k, r.min_p, r.seed) == (11, 0.2, 1.0, 0, 0.05, 0)
    assert (r.stop, r.stop_token_ids, r.ignore_eos, r.min_tokens, r.detokenize) == ((), (), False, 0, None)
    r = rio.request(Prompt(2, "b", "x", max_tokens=5, stop=("\n",), seed=9, min_tokens=2, ignore_eos=True), 11)
    assert (r.max_tokens, r.temperature, r.top_k, r.seed, r.stop, r.min_tokens, r.ignore_eos) == \
        (5, 0.7, 40, 9, ("\n",), 2, True)
    assert r.detokenize(rio.tokenizer.encode("ab").ids) == "ab"


# -- chat --------------------------------------------------------------------------------------------

CHAT = ({"role": "system", "content": "You write Python."}, {"role": "user", "content": "sum a list"},
        {"role": "assistant", "content": "sum(xs)"}, {"role": "user", "content": "and the mean?"})


def test_chat_renders_as_transformers_apply_chat_template():
    from transformers import AutoTokenizer

    target = tiny_pair_paths()[0]
    rio = RequestIO.from_model_dir(target)
    ours = rio.prompt_ids(Prompt(1, "c", None, messages=CHAT))
    theirs = AutoTokenizer.from_pretrained(target).apply_chat_template(list(CHAT), add_generation_prompt=True,
                                                                       tokenize=True)
    theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
    assert ours == list(theirs) and ours[0] == 0 and ours.count(0) == 1  # one BOS, written by the template
    assert rio.render_chat(CHAT).endswith("# assistant:\n")


def test_chat_without_a_template_is_a_clear_error_and_a_jinja_file_is_used(target_copy):
    cfg = json.loads((target_copy / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (target_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    rio = RequestIO.from_model_dir(target_copy)
    with pytest.raises(RequestError, match="needs a chat template.*has none.*give a \"prompt\" instead"):
        rio.request(Prompt(1, "c", None, messages=CHAT), 8)
    assert rio.request(Prompt(1, "p", "x = 1"), 8).prompt[0] == 0  # plain prompts still work
    (target_copy / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    rio = RequestIO.from_model_dir(target_copy)
    assert rio.render_chat(CHAT[1:2]) == "[user] sum a list\n[assistant] "
    with pytest.raises(RequestError, match="refuses this chat: no system turns"):
        rio.prompt_ids(Prompt(1, "c", None, messages=CHAT))


# -- output lines ------------------------------------------------------------------------------------

def test_output_line_shape_and_the_resume_scanner(tmp_path):
    rio = RequestIO.from_model_dir(tiny_pair_paths()[0])
    req = Request("a", [0, 5, 6], 10)
    ids = rio.tokenizer.encode("x = 1\nEND", add_special_tokens=False).ids
    stopped = rio.output_line(Finished(req, ids, "stop", "END", "x = 1\n"))
    assert list(stopped) == list(OUTPUT_KEYS)
    assert (stopped["text"], stopped["finish_reason"], stopped["stop_reason"]) == ("x = 1\n", "stop", "END")
    assert stopped["usage"] == {"prompt_tokens": 3, "completion_tokens": len(ids)}
    length = rio.output_line(Finished(req, ids, "length"))
    assert length["text"] == "x = 1\nEND" and length["stop_reason"] is None
    by_id = rio.output_line(Finished(Request("b", [0], 4), [5, 9], "stop", 9))
    data = b"".join(json.dumps(x).encode() + b"\n" for x in (stopped, length | {"id": "c"}, by_id))
    assert scan(tmp_path / "o", data) == ({"a", "b", "c"}, len(data))
    for bad in ({"finish_reason": "eos"}, {"usage": {"prompt_tokens": 3}}, {"stop_reason": 1.5},
                {"usage": {"prompt_tokens": 3, "completion_tokens": True}}):
        with pytest.raises(OutputFileError, match="not a specoffload-run output line"):
            scan(tmp_path / "o", json.dumps(stopped | bad).encode() + b"\n")


def test_an_earlier_versions_output_file_is_refused_by_name(tmp_path):
    old = {"id": "a", "text": "t", "tokens": [1], "num_tokens": 1, "prompt_tokens": 2, "finish_reason": "eos"}
    with pytest.raises(OutputFileError) as e:
        scan(tmp_path / "o.jsonl", json.dumps(old).encode() + b"\n")
    assert "o.jsonl:1: an output line of an earlier specoffload-run" in str(e.value)
    assert "Give --output a new file" in str(e.value)


# -- end to end through specoffload-run --------------------------------------------------------------

def test_run_with_chats_stops_and_the_new_output_line(tmp_path, target_copy, capsys):
    from specoffload.planner.cli import main as plan_main
    from specoffload.runtime.run_cli import main as run_main

    plan = tmp_path / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4", "--prompt-len", "16",
                      "--max-prompt-len", "48", "--gen-len", "24", "--num-prompts", "4", "-o", str(plan)]) == 0
    prompts = write(tmp_path / "in.jsonl",
                    {"id": "chat", "messages": list(CHAT[1:2]), "max_tokens": 24},
                    {"id": "stop", "prompt": "def foo(x):\n    return", "stop": ["\n"], "min_tokens": 1},
                    {"id": "ids", "prompt": "import os\nimport", "stop_token_ids": [201], "ignore_eos": True},
                    {"id": "sampled", "prompt": "for i in", "temperature": 0.9, "top_k": 20, "min_p": 0.05, "seed": 4})
    out = tmp_path / "out.jsonl"
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate"]) == 0
    lines = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(lines) == {"chat", "stop", "ids", "sampled"}
    for x in lines.values():
        assert list(x) == list(OUTPUT_KEYS) and x["finish_reason"] in ("stop", "length")
        assert x["usage"] == {"prompt_tokens": x["prompt_tokens"], "completion_tokens": len(x["tokens"])}
    assert lines["chat"]["prompt_tokens"] == len(RequestIO.from_model_dir(tiny_pair_paths()[0]).prompt_ids(
        Prompt(1, "c", None, messages=CHAT[1:2])))
    s = lines["stop"]
    assert s["finish_reason"] == "stop" and s["stop_reason"] == "\n" and "\n" not in s["text"]
    assert "\n" in RequestIO.from_model_dir(tiny_pair_paths()[0]).decode(s["tokens"])
    i = lines["ids"]
    assert (i["finish_reason"], i["stop_reason"], i["tokens"][-1], i["tokens"].count(201)) == ("stop", 201, 201, 1)
    # a chat for a model without a template: refused before anything runs, naming the line
    cfg = json.loads((target_copy / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (target_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    out2 = tmp_path / "out2.jsonl"
    capsys.readouterr()
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(out2), "--quiet", "--no-simulate",
                     "--target", str(target_copy)]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:1: a chat (\"messages\") needs a chat template" in err and "Traceback" not in err
    assert not out2.exists()
