"""One command and the Python API: specoffload-run without a plan file, --ordered, --dtype, the profile cache,
`from specoffload import LLM, SamplingParams`; each against the plan-file path on the tiny pair (greedy)."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specoffload.planner.cli import main as plan_main
from specoffload.planner.schema import Plan, load_profile
from specoffload.runtime import oneshot
from specoffload.runtime.run_cli import main as run_main

ROOT = Path(__file__).resolve().parent.parent
PROFILE = str(ROOT / "profiles" / "cpu-2core.yaml")
TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self", "for i in range(10):\n",
         "# comment\n", "x = [1, 2, 3]\nprint("]
MAX_TOKENS = 8


def write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    """The same prompts three ways: a plan file, the one-shot command (--ordered), the Python API."""
    from specoffload import LLM, SamplingParams

    d = tmp_path_factory.mktemp("oneshot")
    prompts = write_prompts(d / "in.jsonl")
    plan = d / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", PROFILE, "--prompt-len", "8",
                      "--max-prompt-len", "16", "--gen-len", str(MAX_TOKENS), "--num-prompts", str(len(TEXTS)),
                      "--policy", "serial-spec", "-o", str(plan)]) == 0
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(d / "planned.jsonl"), "--profile",
                     PROFILE, "--quiet", "--threads", "1"]) == 0
    assert run_main(["--model", "tiny-pair", "--prompts", str(prompts), "--output", str(d / "one.jsonl"),
                     "--profile", PROFILE, "--max-tokens", str(MAX_TOKENS), "--policy", "interleaved", "--ordered", "--save-plan",
                     str(d / "made.yaml"), "--quiet", "--threads", "1"]) == 0
    llm = LLM("tiny-pair", profile=PROFILE, threads=1)
    api = llm.generate(TEXTS, SamplingParams(max_tokens=MAX_TOKENS))
    return d, prompts, api, llm


def test_one_shot_and_api_match_the_plan_file_path(runs):
    d, _, api, llm = runs
    planned = {o["id"]: o for o in lines(d / "planned.jsonl")}
    one = {o["id"]: o for o in lines(d / "one.jsonl")}
    assert set(planned) == set(one) == {f"p{i}" for i in range(len(TEXTS))}
    for k in planned:
        assert (one[k]["tokens"], one[k]["text"]) == (planned[k]["tokens"], planned[k]["text"]), k
        assert len(planned[k]["tokens"]) >= 1
    # the API: results in input order, read from the same output lines
    assert [r.token_ids for r in api] == [planned[f"p{i}"]["tokens"] for i in range(len(TEXTS))]
    assert [r.text for r in api] == [planned[f"p{i}"]["text"] for i in range(len(TEXTS))]
    for r, t in zip(api, TEXTS):
        assert r.usage["completion_tokens"] == len(r.token_ids) <= MAX_TOKENS
        assert r.usage["prompt_tokens"] == len(llm.tokenizer.encode(t).ids) > 0
        assert r.usage["total_tokens"] == r.usage["prompt_tokens"] + r.usage["completion_tokens"]
        assert r.finish_reason in ("stop", "eos", "length")
    # the plan made for the prompts: their count, their longest prompt, the generation asked for
    made = Plan.load(d / "made.yaml")
    w = made.workload
    assert (w.num_prompts, w.gen_len_tokens) == (len(TEXTS), MAX_TOKENS)
    assert w.max_prompt_len == max(r.usage["prompt_tokens"] for r in api)
    assert made.model == "tiny-target" and made.draft == "tiny-draft" and made.policy == "interleaved"


def test_ordered_copy_is_in_input_order_and_output_untouched(runs):
    d, prompts, _, _ = runs
    ordered = lines(d / "one.jsonl.ordered.jsonl")
    assert [o["id"] for o in ordered] == [json.loads(x)["id"] for x in prompts.read_text().splitlines()]
    assert sorted(map(json.dumps, ordered)) == sorted(map(json.dumps, lines(d / "one.jsonl")))


def test_ordered_rerun_and_a_foreign_target(runs, capsys):
    d, prompts, _, _ = runs
    ordered = d / "one.jsonl.ordered.jsonl"
    before = ordered.read_bytes()
    # everything is done: the rerun runs nothing, loads nothing, and writes the same ordered copy
    assert run_main(["--model", "tiny-pair", "--prompts", str(prompts), "--output", str(d / "one.jsonl"),
                     "--ordered", "--quiet"]) == 0
    assert "nothing to run" in capsys.readouterr().err and ordered.read_bytes() == before
    # a file that is not an ordered copy is refused before the run: nothing is created, the file is kept
    foreign = d / "keep.txt"
    foreign.write_text("not outputs\n")
    assert run_main(["--model", "tiny-pair", "--prompts", str(prompts), "--output", str(d / "new.jsonl"),
                     "--ordered", str(foreign), "--quiet"]) == 2
    assert "not an ordered copy" in capsys.readouterr().err
    assert foreign.read_text() == "not outputs\n" and not (d / "new.jsonl").exists()


def test_write_ordered_reorders_and_refuses_foreign_files(tmp_path):
    out = tmp_path / "out.jsonl"
    rows = [{"id": i, "text": i, "tokens": [n]} for n, i in enumerate(["c", "a", "b"])]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = out.read_bytes()
    path = oneshot.write_ordered(out, None, ["a", "b", "c"])
    assert path == tmp_path / "out.jsonl.ordered.jsonl"
    assert [o["id"] for o in lines(path)] == ["a", "b", "c"] and out.read_bytes() == before
    foreign = tmp_path / "notes.txt"
    foreign.write_text("my notes\n")
    with pytest.raises(oneshot.OneShotError, match="not an ordered copy"):
        oneshot.write_ordered(out, foreign, ["a", "b", "c"])
    assert foreign.read_text() == "my notes\n"
    with pytest.raises(oneshot.OneShotError, match="the output file itself"):
        oneshot.write_ordered(out, out, ["a", "b", "c"])
    with pytest.raises(oneshot.OneShotError, match="1 of 4 prompts have no output"):
        oneshot.write_ordered(out, None, ["a", "b", "c", "d"])


def test_api_reuses_its_engine_and_takes_one_prompt(runs):
    from specoffload import SamplingParams

    _, _, api, llm = runs
    engine = llm.engine
    again = llm.generate(TEXTS[1], SamplingParams(max_tokens=MAX_TOKENS))
    assert llm.engine is engine  # fits the engine planned for more: no new plan, no reload
    assert again[0].token_ids == api[1].token_ids
    with pytest.raises(ValueError, match="2 prompts but 3 SamplingParams"):
        llm.generate(TEXTS[:2], [SamplingParams()] * 3)


def test_sampling_params_map_to_prompt_fields_by_name():
    from specoffload import SamplingParams
    from specoffload.runtime.prompts import Prompt

    have = {f.name for f in dataclasses.fields(Prompt)}
    values = {"max_tokens": 5, "min_tokens": 1, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "min_p": 0.1, "seed": 3,
              "stop": ["\n"], "stop_token_ids": [2], "ignore_eos": True}
    assert set(values) == {f.name for f in dataclasses.fields(SamplingParams)}
    for name, value in values.items():
        sp = SamplingParams(**{name: value})
        if name in have:
            assert sp.prompt_fields()[name] == value
        else:  # a field this build's prompts do not have is refused, by name, not silently dropped
            with pytest.raises(oneshot.OneShotError, match=f"SamplingParams {name}: not supported"):
                sp.prompt_fields()
    assert set(SamplingParams(max_tokens=None).prompt_fields()) == set()  # unset: the defaults apply
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_cached_profile_is_found_and_said(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPECOFFLOAD_CACHE", str(tmp_path / "cache"))
    messages = []
    with pytest.raises(oneshot.OneShotError, match="no profile for this machine .* --no-profile-make"):
        oneshot.find_profile(None, "cpu", None, make=False, log=messages.append)
    cached = oneshot.cache_dir() / f"{oneshot.machine_key('cpu', None)}.yaml"
    assert cached.parent == tmp_path / "cache" / "profiles"
    cached.parent.mkdir(parents=True)
    shutil.copy(PROFILE, cached)
    profile, ref = oneshot.find_profile(None, "cpu", None, make=False, log=messages.append)
    assert ref == str(cached) and profile.name == load_profile(PROFILE).name
    assert "cached profile" in messages[-1] and str(cached) in messages[-1]
    # another KV dtype is another profile (the attention probe measured another element size)
    assert oneshot.machine_key("cpu", "bf16") != oneshot.machine_key("cpu", None)


def test_one_shot_uses_the_cached_profile(tmp_path, monkeypatch, capsys, one_torch_thread):
    monkeypatch.setenv("SPECOFFLOAD_CACHE", str(tmp_path / "cache"))
    cached = oneshot.cache_dir() / f"{oneshot.machine_key('cpu', None)}.yaml"
    cached.parent.mkdir(parents=True)
    shutil.copy(PROFILE, cached)
    prompts = write_prompts(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    assert run_main(["--model", "tiny-target", "--draft", "none", "--prompts", str(prompts), "--output", str(out),
                     "--max-tokens", "4", "--device", "cpu", "--no-profile-make", "--quiet", "--threads", "1"]) == 0
    err = capsys.readouterr()
    assert f"cached profile {cached}" in err.err
    assert "offload-only" in err.out  # no draft: the plan's summary names the policy
    assert len(lines(out)) == len(TEXTS)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specoffload.runtime.run_cli", *args], capture_output=True, text=True,
                          env=env)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = [x for x in proc.stderr.splitlines() if "error" in x]
    assert len(err) == 1, proc.stderr
    return err[0]


def test_errors_are_one_line(tmp_path):
    import os

    prompts = write_prompts(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    base = ["--prompts", str(prompts), "--output", str(out)]
    msg = _one_line_error(_cli("--model", str(tmp_path / "nope"), *base))
    assert "does not exist" in msg and "nope" in msg
    msg = _one_line_error(_cli("--model", "mixtral-8x7b", *base))
    assert "preset has shapes but no weights" in msg
    msg = _one_line_error(_cli(*base))
    assert "give a plan file, or --model" in msg
    env = dict(os.environ, SPECOFFLOAD_CACHE=str(tmp_path / "empty-cache"))
    msg = _one_line_error(_cli("--model", "tiny-target", "--device", "cpu", "--no-profile-make", *base, env=env))
    assert "no profile for this machine" in msg and "--profile" in msg
    assert not out.exists()  # created for the run, nothing written: removed again
    msg = _one_line_error(_cli("--model", "tiny-pair", "--dtype", "fp8", *base))
    assert "--dtype" in msg and "fp8" in msg


def test_dtype_is_planned_for():
    """fp32 doubles the bytes of weights and KV the plan holds; the model's fingerprint does not change."""
    from specoffload.planner.models import load_model_spec, with_dtype

    t = load_model_spec("tiny-target")
    t32 = with_dtype(t, "fp32")
    assert t32.kv_bytes_per_token == 2 * t.kv_bytes_per_token and t32.total_bytes == 2 * t.total_bytes
    assert t32.fingerprint == t.fingerprint and with_dtype(t, "fp16").kv_bytes_per_token == t.kv_bytes_per_token
    profile = load_profile(PROFILE)
    workload = oneshot.workload_for([10, 20, 30], [8, 8, 16])
    assert (workload.prompt_len_tokens, workload.max_prompt_len, workload.gen_len_tokens) == (20, 30, 16)
    plans = {dt: oneshot.plan_for_prompts("tiny-target", "tiny-draft", profile, workload, dt, policy="serial-spec")
             for dt in ("bf16", "fp32")}
    assert plans["fp32"].plan.dtype == "fp32" and plans["bf16"].plan.dtype == "bf16"
    peak = {dt: r.plan.prediction.peak_mem_bytes for dt, r in plans.items()}
    assert max(peak["fp32"].values()) > max(peak["bf16"].values())


def test_fp16_warns_and_bad_dtype_is_named():
    import torch

    said = []
    assert oneshot.torch_dtype("fp16", warn=said.append) is torch.float16
    assert len(said) == 1 and "65504" in said[0] and "overflow" in said[0]
    assert oneshot.torch_dtype(None) is None and oneshot.torch_dtype("bf16", warn=said.append) is torch.bfloat16
    assert len(said) == 1
    with pytest.raises(oneshot.OneShotError, match="fp8"):
        oneshot.torch_dtype("fp8")


def test_top_level_package_is_light():
    """`import specoffload` and its planner need no torch; LLM is loaded on first use."""
    code = ("import sys, specoffload, specoffload.planner.planner; assert 'torch' not in sys.modules; "
            "from specoffload import LLM; import specoffload.runtime.api as a; assert LLM is a.LLM; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_api_with_a_plan_file_and_chats(runs):
    """LLM(plan=...) runs that plan (the models checked against it); chats need a build whose prompts take them."""
    from specoffload import LLM, SamplingParams
    from specoffload.runtime.prompts import Prompt

    d, _, api, _ = runs
    llm = LLM("tiny-pair", plan=str(d / "made.yaml"), profile=PROFILE, threads=1)
    assert llm.plan.policy == "interleaved" and llm.engine is not None
    outs = llm.generate(TEXTS, SamplingParams(max_tokens=MAX_TOKENS))
    assert [o.token_ids for o in outs] == [o.token_ids for o in api]
    chat = [{"role": "user", "content": "def add(a, b):"}]
    if "messages" in {f.name for f in dataclasses.fields(Prompt)}:
        # The chat template makes this prompt longer than the pinned plan's workload: refused, naming the fix.
        with pytest.raises(oneshot.OneShotError, match="exceeds the .* KV cache"):
            llm.chat(chat, SamplingParams(max_tokens=4))
        # Without a pinned plan the API plans for the rendered chat's own length.
        free = LLM("tiny-pair", profile=PROFILE, threads=1)
        out = free.chat(chat, SamplingParams(max_tokens=4))[0]
        rendered = free.rio.prompt_ids(Prompt(line=1, id="c", text="", messages=tuple(chat)))
        assert out.usage["prompt_tokens"] == len(rendered) and 1 <= len(out.token_ids) <= 4
    else:
        with pytest.raises(oneshot.OneShotError, match="chat messages are not supported"):
            llm.chat(chat)


def test_api_errors_name_the_problem(tmp_path):
    from specoffload import LLM

    with pytest.raises(oneshot.OneShotError, match="does not exist"):
        LLM(str(tmp_path / "nope"), profile=PROFILE)
    with pytest.raises(oneshot.OneShotError, match="preset has shapes but no weights"):
        LLM("mixtral-8x7b", profile=PROFILE)
    with pytest.raises(oneshot.OneShotError, match="plan was made for model"):
        LLM("tiny-draft", draft="none", plan=_plan_for("tiny-target", tmp_path), profile=PROFILE)


def _plan_for(model: str, tmp_path: Path) -> str:
    out = tmp_path / "plan.yaml"
    assert plan_main(["--model", model, "--profile", PROFILE, "--prompt-len", "8", "--gen-len", "4", "--num-prompts",
                      "2", "-o", str(out)]) == 0
    return str(out)


def test_engine_follows_the_plans_dtype(runs):
    import torch

    from specoffload.runtime.engine import Engine
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    d = runs[0]
    target, draft = tiny_pair_paths()
    plan = Plan.load(d / "made.yaml").replace(dtype="bf16")
    assert Engine(plan, target, draft, device="cpu").dtype is torch.bfloat16
    assert Engine(plan, target, draft, device="cpu", dtype=torch.float32).dtype is torch.float32  # asked for wins
    assert Engine(plan.replace(dtype=""), target, draft, device="cpu").dtype is torch.float32  # the CPU's default
