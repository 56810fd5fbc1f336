"""Bad input to every command is a clear error naming the problem and the fix, never a traceback."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from specoffload.planner.cli import main as plan_main
from specoffload.runtime import profile_cli
from specoffload.runtime.prompts import PromptFileError, read_prompts, resolve_model_dir
from specoffload.runtime.run_cli import EXAMPLE as RUN_EXAMPLE
from specoffload.runtime.run_cli import main as run_main
from specoffload.runtime.tiny_pair import tiny_pair_paths

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4"]
WORK = ["--prompt-len", "8", "--gen-len", "8", "--num-prompts", "4"]


def plan_error(capsys, *args: str) -> str:
    assert plan_main(list(args)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("specoffload-plan: error: ")
    return err


# ---------------------------------------------------------------------------------------------
# specoffload-plan
# ---------------------------------------------------------------------------------------------

def test_plan_profile_directory(capsys, tmp_path):
    err = plan_error(capsys, "--model", "tiny-target", "--draft", "tiny-draft", "--profile", str(tmp_path), *WORK)
    assert f"{tmp_path} is a directory; give a YAML file" in err


@pytest.mark.parametrize("args, message", [
    (["--micro-batches", "0"], "--micro-batches must be >= 1, got 0"),
    (["--policy", "serial-spec", "--draft-len", "-3"], "--draft-len must be >= 0, got -3"),
    (["--policy", "serial-spec", "--draft-len", "0"], "--draft-len must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--max-draft-len", "-1"], "--max-draft-len must be >= 1, got -1"),
    (["--acceptance", "1.5"], "--acceptance must be in [0, 1]"),
])
def test_plan_knobs_out_of_range(capsys, tmp_path, args, message):
    out = tmp_path / "plan.yaml"
    assert message in plan_error(capsys, *TINY, *WORK, *args, "-o", str(out))
    assert not out.exists()


def test_plan_speculative_policy_needs_a_draft(capsys):
    err = plan_error(capsys, "--model", "tiny-target", "--profile", "t4", *WORK, "--policy", "interleaved")
    assert "needs a draft model (--draft)" in err


def test_plan_longer_than_the_models_context(capsys, tmp_path):
    out = tmp_path / "plan.yaml"
    err = plan_error(capsys, "--model", "mixtral-8x7b", "--draft", "mistral-7b", "--profile", "rtx4090-pcie4",
                     "--prompt-len", "40000", "--gen-len", "128", "--num-prompts", "100", "-o", str(out))
    assert "over mixtral-8x7b's context of 32768 tokens" in err and not out.exists()
    err = plan_error(capsys, *TINY, "--prompt-len", "5000", "--gen-len", "8", "--num-prompts", "4")
    assert "context of 1024 tokens" in err and "--prompt-len" in err
    err = plan_error(capsys, *TINY, "--prompt-len", "1000", "--gen-len", "16", "--num-prompts", "4",
                     "--draft-len", "8", "--policy", "serial-spec")
    assert "--draft-len 8" in err and "the most that fits is 7" in err


def test_plan_near_the_context_limits_the_draft_length(capsys, tmp_path):
    out = tmp_path / "plan.yaml"
    assert plan_main([*TINY, "--prompt-len", "1000", "--gen-len", "20", "--num-prompts", "4", "-o", str(out)]) == 0
    from specoffload.planner.schema import Plan

    plan = Plan.load(out)
    assert plan.workload.max_context_tokens + plan.draft_len + 1 <= 1024


# ---------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ({"id": "a", "prompt": "x", "max_tokens": 4.5}, '"max_tokens" must be an integer, found 4.5 (float)'),
    ({"id": "a", "prompt": "x", "max_tokens": "8"}, '"max_tokens" must be an integer, found "8" (str)'),
    ({"id": "a", "prompt": "x", "max_tokens": True}, '"max_tokens" must be an integer, found true (bool)'),
    ({"id": None, "prompt": "x"}, '"id" must be a string or an integer, found null (NoneType)'),
    ({"id": True, "prompt": "x"}, '"id" must be a string or an integer, found true (bool)'),
    ({"id": {"a": 1}, "prompt": "x"}, '"id" must be a string or an integer, found {"a": 1} (dict)'),
    ({"id": 1.5, "prompt": "x"}, '"id" must be a string or an integer'),
    ({"id": "a", "prompt": "x", "temperature": "hot"}, '"temperature" must be a number'),
    ({"id": "a", "prompt": "x", "seed": -1}, '"seed" must be an integer'),
    ({"id": "a", "prompt": "x", "top_p": float("nan")}, "top_p in (0, 1]"),
    ({"id": "a", "prompt": "a\ud800b"}, '"prompt" holds a lone surrogate'),
    ({"id": "\udc00", "prompt": "x"}, '"id" holds a lone surrogate'),
])
def test_prompt_values_are_checked(tmp_path, line, message):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps(line) + "\n")
    with pytest.raises(PromptFileError) as exc:
        read_prompts(p, require_id=True)
    assert f"{p}:1" in str(exc.value) and message in str(exc.value)


def test_prompt_ids_may_be_strings_or_integers(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": 7, "prompt": "x", "max_tokens": 3}\n{"id": "b", "prompt": "y"}\n')
    got = read_prompts(p, require_id=True)
    assert [(x.id, x.max_tokens) for x in got] == [("7", 3), ("b", None)]


def test_prompt_file_with_bytes_that_are_not_utf8(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "\xff"}\n')
    with pytest.raises(PromptFileError, match=r"in.jsonl:2: not UTF-8 text \(byte 0xff"):
        read_prompts(p)
    with pytest.raises(PromptFileError, match="is a directory"):
        read_prompts(tmp_path)


def test_lone_surrogate_in_run_and_acceptance(tmp_path, capsys):
    p = tmp_path / "in.jsonl"
    p.write_text('{"id": "s", "prompt": "a\\ud800b"}\n')
    plan = tmp_path / "plan.yaml"
    assert plan_main([*TINY, *WORK, "-o", str(plan)]) == 0
    capsys.readouterr()
    assert run_main([str(plan), "--prompts", str(p), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "in.jsonl:1" in err and "lone surrogate" in err and "Traceback" not in err
    assert profile_cli.main(["--acceptance", "--target", "tiny-target", "--draft", "tiny-draft", "--prompts", str(p),
                             "--no-progress"]) == 2
    assert "lone surrogate" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------------------------

def copy_target(tmp_path: Path, name: str = "model") -> Path:
    d = tmp_path / name
    shutil.copytree(tiny_pair_paths()[0], d)
    return d


def test_missing_model_folder_says_it_is_missing(tmp_path, capsys):
    with pytest.raises(PromptFileError, match="model folder .*nope.* does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))
    plan = tmp_path / "plan.yaml"
    assert plan_main([*TINY, *WORK, "-o", str(plan)]) == 0
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    capsys.readouterr()
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--target", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_truncated_safetensors_is_named(tmp_path, capsys):
    from specoffload.runtime.loader import CheckpointError
    from specoffload.runtime.model import Transformer

    d = copy_target(tmp_path)
    data = (d / "model.safetensors").read_bytes()
    for size in (5, 200, len(data) // 2):
        (d / "model.safetensors").write_bytes(data[:size])
        with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file .* truncated"):
            Transformer.from_pretrained(d)
    plan = tmp_path / "plan.yaml"
    assert plan_main([*TINY, *WORK, "-o", str(plan)]) == 0
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    capsys.readouterr()
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--target", str(d),
                     "--no-simulate"]) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()


def test_pickle_checkpoint_in_acceptance_is_refused_without_traceback(tmp_path, capsys):
    d = copy_target(tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "def f(x):"}\n')
    assert profile_cli.main(["--acceptance", "--target", str(d), "--draft", "tiny-draft", "--prompts", str(prompts),
                             "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("specoffload-profile: error: ") and "pickle" in err and "Traceback" not in err


def test_broken_config_json_is_named(tmp_path):
    from specoffload.runtime.config import ConfigError, load_args

    d = copy_target(tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not readable as JSON"):
        load_args(d)
    cfg = json.loads((tiny_pair_paths()[0] / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="no 'hidden_size' key"):
        load_args(d)
    with pytest.raises(ConfigError, match="does not exist"):
        load_args(tmp_path / "nope")


def test_custom_code_in_config_gets_a_notice(tmp_path, capsys):
    from specoffload.runtime.config import load_args

    d = copy_target(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    load_args(d)
    load_args(d)
    err = capsys.readouterr().err
    assert err.count("names custom model code (auto_map: AutoModelForCausalLM); it is ignored, never run") == 1
    load_args(tiny_pair_paths()[0])
    assert "custom model code" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Help texts, demo, packaging
# ---------------------------------------------------------------------------------------------

def test_run_help_example_fits_the_demo_prompts(tmp_path):
    """The example's plan holds every shipped demo prompt (the KV cache is sized for --max-prompt-len)."""
    from tokenizers import Tokenizer

    words = RUN_EXAMPLE.replace("\\\n", " ").split()
    plan_args = words[words.index("specoffload-plan") + 1:words.index("specoffload-run")]
    run_args = words[words.index("specoffload-run") + 1:]
    run_args = run_args[:run_args.index("--report") + 2]
    prompts = ROOT / run_args[run_args.index("--prompts") + 1]
    assert prompts.is_file()
    longest = int(plan_args[plan_args.index("--max-prompt-len") + 1])
    tok = Tokenizer.from_file(str(tiny_pair_paths()[0] / "tokenizer.json"))
    lengths = [len(tok.encode(json.loads(x)["prompt"]).ids) for x in prompts.read_text().splitlines()]
    assert max(lengths) <= longest
    plan_args[plan_args.index("-o") + 1] = str(tmp_path / "plan.yaml")
    assert plan_main(plan_args) == 0


@pytest.mark.slow
def test_run_help_example_runs(tmp_path, monkeypatch):
    words = RUN_EXAMPLE.replace("\\\n", " ").split()
    plan_args = words[words.index("specoffload-plan") + 1:words.index("specoffload-run")]
    run_args = words[words.index("specoffload-run") + 1:]
    run_args = run_args[:run_args.index("--report") + 2]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runtime").symlink_to(ROOT / "runtime")
    assert plan_main(plan_args) == 0
    assert run_main([*run_args, "--quiet", "--threads", "1"]) == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 64


def test_profile_help_does_not_write_into_profiles():
    text = profile_cli.EXAMPLE
    assert "-o my-machine.yaml" in text and "profiles/" not in text


def test_profile_default_output_is_not_in_profiles(tmp_path, monkeypatch, capsys):
    """Without -o the profile lands in the current folder, never in the package's profiles/."""
    from specoffload.runtime.profiler import probes

    seen = {}

    class Stop(Exception):
        pass

    def fake_run_profile(cfg, device, name, progress, threads):
        seen["name"] = name
        raise Stop

    monkeypatch.setattr(probes, "run_profile", fake_run_profile)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Stop):
        profile_cli.main(["--quick", "--no-progress"])
    assert seen["name"] == probes.default_name("cpu")


def test_demo_echoes_the_commands_a_user_types():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    line = demo.shown("specoffload.planner.cli", ("--profile", str(ROOT / "profiles" / "cpu-2core.yaml"),
                                                  "-o", str(demo.OUT / "plan.yaml")))
    assert line == "specoffload-plan --profile profiles/cpu-2core.yaml -o out/demo/plan.yaml"
    assert set(demo.COMMANDS.values()) == {"specoffload-plan", "specoffload-simulate", "specoffload-profile",
                                           "specoffload-run"}
    source = (ROOT / "tools" / "demo.py").read_text()
    assert '$ {shown(' in source and "$ {' '.join(cmd)}" not in source


def test_pyproject_license_and_packages():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
    assert any(r.startswith("setuptools>=") and int(r.split(">=")[1].split(".")[0]) >= 77
               for r in meta["build-system"]["requires"])
    tool = meta["tool"]["setuptools"]
    assert "specoffload.runtime.assets" in tool["packages"]
    data = tool["package-data"]["specoffload.runtime.assets"]
    assets = ROOT / "runtime" / "assets"
    shipped = {p for pat in data for p in assets.glob(pat) if p.is_file()}
    assert shipped == {p for p in assets.rglob("*") if p.is_file()}  # every asset file is packaged


def test_plan_output_directory(capsys, tmp_path):
    assert "is a directory; give a file name" in plan_error(capsys, *TINY, *WORK, "-o", str(tmp_path))


def test_profile_output_directory_is_refused_before_measuring(tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    prompts.write_text('{"id": "a", "prompt": "x"}\n')
    assert profile_cli.main(["--acceptance", "--target", "tiny-target", "--draft", "tiny-draft", "--prompts",
                             str(prompts), "-o", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert profile_cli.main(["--quick", "-o", str(tmp_path), "--no-progress"]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
