"""specoffload-run: JSONL in/out, resume after a kill, bad input, plan checks, the measured report."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from specoffload.planner.cli import main as plan_main
from specoffload.planner.schema import Plan
from specoffload.planner.sim import Report
from specoffload.runtime.outputs import CRASH_ENV
from specoffload.runtime.run_cli import finished_ids, main as run_main
from specoffload.runtime.tiny_pair import tiny_pair_paths

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self", "for i in range(10):\n",
         "# comment\n", "x = [1, 2, 3]\nprint(", "while True:\n    if", "try:\n    import numpy"]


def write_prompts(path: Path, n: int = 12, max_tokens: int = 20) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            line = {"id": f"p{i}", "prompt": TEXTS[i % len(TEXTS)], "max_tokens": max_tokens}
            if i % 3 == 2:  # some sampled requests: per-request seeds make them reproducible too
                line.update(temperature=0.8, top_p=0.95, seed=i)
            fh.write(json.dumps(line) + "\n")
    return path


def make_plan(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4", "--prompt-len", "8",
                      "--max-prompt-len", "32", "--gen-len", "20", "--num-prompts", "12", "-o", str(out), *extra]) == 0
    return out


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "specoffload.runtime.run_cli", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_run_writes_outputs_report_and_trace(tmp_path, capsys):
    plan = make_plan(tmp_path, "--policy", "interleaved")
    prompts = write_prompts(tmp_path / "in.jsonl")
    out, rep, trace = tmp_path / "out.jsonl", tmp_path / "report.yaml", tmp_path / "trace.json"
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(out), "--report", str(rep),
                     "--trace", str(trace), "--quiet"]) == 0
    got = lines(out)
    assert sorted(x["id"] for x in got) == sorted(f"p{i}" for i in range(12)) and len(got) == 12
    for x in got:
        assert 1 <= x["num_tokens"] <= 20 and x["finish_reason"] in ("stop", "length") and isinstance(x["text"], str)
    report = Report.load(rep)
    assert report.kind == "measured" and report.generated_tokens == sum(x["num_tokens"] for x in got)
    assert report.acceptance.draft_len == Plan.load(plan).draft_len and report.predicted
    # Host memory: the engine's own tensors (both models' fp32 weights at least), the process's RSS in a note.
    weights = sum(f.stat().st_size for d in tiny_pair_paths() for f in Path(d).glob("*.safetensors"))
    assert 2 * weights * 0.9 < report.peak_mem_bytes["host"] < 2 * weights + 50 * 2**20
    assert any("peak RSS" in n for n in report.notes)
    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e.get("name") == "thread_name"} >= {"gpu", "cpu-attn"}
    assert "measured" in capsys.readouterr().out


def test_resume_after_kill_has_every_id_once_with_the_same_text(tmp_path):
    plan = make_plan(tmp_path, "--policy", "serial-spec", "--batch", "1")
    prompts = write_prompts(tmp_path / "in.jsonl", n=8, max_tokens=16)
    full = tmp_path / "full.jsonl"
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(full), "--quiet", "--no-simulate"]) == 0
    part = tmp_path / "part.jsonl"
    # The run kills itself (SIGKILL) just before its 4th output line: a crash at a fixed point, no timing.
    env = dict(os.environ, **{CRASH_ENV: "4:before"})
    proc = subprocess.run([sys.executable, "-m", "specoffload.runtime.run_cli", str(plan), "--prompts", str(prompts),
                           "--output", str(part), "--quiet", "--no-simulate"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    assert proc.returncode == -signal.SIGKILL
    assert len(part.read_text().splitlines()) == 3, "the run should have been interrupted after 3 lines"
    with part.open("a") as fh:
        fh.write('{"id": "p7", "text": "half a li')  # a line cut short by the crash
    cli(str(plan), "--prompts", str(prompts), "--output", str(part), "--quiet", "--no-simulate")
    resumed = lines(part)
    assert sorted(x["id"] for x in resumed) == sorted(f"p{i}" for i in range(8))  # each exactly once
    by_id = {x["id"]: x for x in lines(full)}
    for x in resumed:
        assert x["text"] == by_id[x["id"]]["text"] and x["tokens"] == by_id[x["id"]]["tokens"]


def out_line(i, **kw) -> str:
    obj = {"id": i, "text": "t", "tokens": [1, 2], "num_tokens": 2, "prompt_tokens": 3, "finish_reason": "length",
           "stop_reason": None, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    obj.update(kw)
    return json.dumps(obj) + "\n"


def test_torn_last_line_is_dropped_on_open_and_finished_ids_only_reads(tmp_path):
    from specoffload.runtime.outputs import OutputFile

    p = tmp_path / "o.jsonl"
    text = out_line("a") + out_line("b") + '{"id": "c", "te'
    p.write_text(text)
    assert finished_ids(p) == {"a", "b"} and p.read_text() == text  # reading changes nothing
    out = OutputFile(p)
    assert out.open() == {"a", "b"} and out.dropped_bytes == len('{"id": "c", "te')
    out.close()
    assert p.read_text() == out_line("a") + out_line("b")


def test_bad_input_is_named_and_outputs_are_kept(tmp_path):
    plan = make_plan(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text(out_line("old"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "ok"}\n{"id": 2, "prompt": \n')
    proc = cli(str(plan), "--prompts", str(bad), "--output", str(out), check=False)
    assert proc.returncode == 2 and "bad.jsonl:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "big", "prompt": "x = 1\n" * 2000}) + "\n")
    proc = cli(str(plan), "--prompts", str(long), "--output", str(out), check=False)
    assert proc.returncode == 2 and "long.jsonl:1" in proc.stderr and "'big'" in proc.stderr and "context" in proc.stderr
    missing = tmp_path / "m.jsonl"
    missing.write_text('{"id": "x"}\n')
    proc = cli(str(plan), "--prompts", str(missing), "--output", str(out), check=False)
    assert proc.returncode == 2 and 'no "prompt" key' in proc.stderr
    assert out.read_text() == out_line("old")


def test_prompts_longer_than_the_plan_are_refused_unless_forced(tmp_path):
    # The KV cache is sized for the plan's workload (longest prompt + generation), not the model's context.
    plan = make_plan(tmp_path)
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "def f(x):\n    return x\n" * 6, "max_tokens": 4}) + "\n")
    out, rep = tmp_path / "out.jsonl", tmp_path / "rep.yaml"
    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--no-simulate", check=False)
    assert proc.returncode == 2 and "in.jsonl:1: request 'a'" in proc.stderr and "KV cache" in proc.stderr
    assert "prompts up to 32 tokens" in proc.stderr and "re-plan" in proc.stderr and not out.exists()
    cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--no-simulate", "--force", "--report", str(rep),
        "--quiet")
    assert [x["id"] for x in lines(out)] == ["a"] and "forced: KV cache sized for" in rep.read_text()


def test_plan_for_another_model_is_refused(tmp_path):
    plan = Plan.load(make_plan(tmp_path))
    other = tmp_path / "other.yaml"
    plan.replace(model_fingerprint="0123456789ab").save(other)
    prompts = write_prompts(tmp_path / "in.jsonl", n=2)
    proc = cli(str(other), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), check=False)
    assert proc.returncode == 2 and "plan was made for model 'tiny-target'" in proc.stderr and "re-plan" in proc.stderr


def test_plan_the_simulator_rejects_is_refused_unless_forced(tmp_path):
    plan = make_plan(tmp_path)
    prof = yaml.safe_load((Path(__import__("specoffload.planner.schema", fromlist=["x"]).profiles_dir()) / "t4.yaml").read_text())
    prof["gpu_mem_bytes"] = 2e6  # far too small for the weights the plan keeps resident: the GPU pool overflows
    prof["gpu_mem_reserve_bytes"] = 1e6
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump(prof))
    prompts = write_prompts(tmp_path / "in.jsonl", n=2)
    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--profile", str(small),
               check=False)
    assert proc.returncode == 2 and "simulator rejects this plan" in proc.stderr and "--force" in proc.stderr
    cli(str(plan), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--profile", str(small),
        "--force", "--quiet")


def test_run_help_shows_an_example():
    proc = cli("--help")
    assert "example:" in proc.stdout and "specoffload-run plan.yaml" in proc.stdout


def test_a_fused_plan_runs_end_to_end_and_writes_what_the_unfused_one_does(tmp_path):
    """specoffload-plan --fuse-prefill on (a batch smaller than the job, so refills ride in verifications),
    then specoffload-run: the same outputs as the unfused plan's run (greedy and seeded sampling), and the
    report counts the fused passes next to the plan's prediction of them."""
    prompts = write_prompts(tmp_path / "in.jsonl")
    outs = {}
    for fuse in ("on", "off"):
        d = tmp_path / fuse
        d.mkdir()
        plan = make_plan(d, "--policy", "serial-spec", "--batch", "4", "--fuse-prefill", fuse)
        assert Plan.load(plan).fuse_prefill == (fuse == "on")
        out, rep = d / "out.jsonl", d / "report.yaml"
        assert run_main([str(plan), "--prompts", str(prompts), "--output", str(out), "--report", str(rep),
                         "--quiet"]) == 0
        outs[fuse] = {x["id"]: x["text"] for x in lines(out)}
        report = Report.load(rep)
        if fuse == "on":
            assert report.fused_passes > 0 and report.prefill_passes == 1
            assert report.predicted["fused_passes"] > 0
        else:
            assert report.fused_passes == 0 and report.prefill_passes > 1
    assert len(outs["on"]) == 12 and outs["on"] == outs["off"]
