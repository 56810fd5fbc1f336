"""specoffload-run --ray: two CPU engines on a local Ray cluster give the single-process run's output, id for
id and token for token; a worker killed mid-run and a driver killed mid-run lose nothing and duplicate nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from specoffload.planner.cli import main as plan_main  # noqa: E402
from specoffload.runtime.run_cli import main as run_main  # noqa: E402

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self", "for i in range(10):\n",
         "# comment\n", "x = [1, 2, 3]\nprint(", "while True:\n    if", "try:\n    import numpy"]
N = 16


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module: two CPUs (one per engine), a small object store, no dashboard."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20, logging_level="warning",
                 log_to_driver=False, labels={"specoffload-profile": "t4"})  # the node's kind, for --ray-plans
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A plan for the tiny pair, 16 prompts (some sampled, seeded), and the single-process run's output."""
    d = tmp_path_factory.mktemp("cluster")
    plan = d / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4", "--prompt-len", "8",
                      "--max-prompt-len", "32", "--gen-len", "16", "--num-prompts", str(N), "--policy", "serial-spec",
                      "-o", str(plan)]) == 0
    prompts = d / "in.jsonl"
    with prompts.open("w") as fh:
        for i in range(N):
            line = {"id": f"p{i}", "prompt": TEXTS[i % len(TEXTS)] + str(i), "max_tokens": 16}
            if i % 4 == 3:
                line.update(temperature=0.8, top_p=0.95, seed=i)
            fh.write(json.dumps(line) + "\n")
    single = d / "single.jsonl"
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(single), "--quiet", "--no-simulate",
                     "--threads", "1"]) == 0
    return plan, prompts, {x["id"]: x for x in lines(single)}


def cluster_args(plan, prompts, out, *extra):
    return [str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate", "--threads", "1",
            "--ray", "local", "--ray-workers", "2", "--shard-size", "4", *extra]


def assert_same(out: Path, single: dict) -> list[dict]:
    got = lines(out)
    assert sorted(x["id"] for x in got) == sorted(single), "every id exactly once"
    for x in got:
        assert x == single[x["id"]], f"{x['id']} differs from the single-process run"
    return got


def test_two_engines_equal_the_single_process_run(cluster, job, tmp_path):
    plan, prompts, single = job
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.yaml"
    assert run_main(cluster_args(plan, prompts, out, "--report", str(rep))) == 0
    assert_same(out, single)
    report = yaml.safe_load(rep.read_text())
    assert report["engines"] == 2 and report["engines_lost"] == 0 and report["shards_retried"] == 0
    assert report["sequences"] == N and report["generated_tokens"] == sum(x["num_tokens"] for x in single.values())
    per = report["per_engine"]
    # Two shards queued at each engine from the start: both engines ran shards, and their counts add up.
    assert [p["shards"] for p in per] == [2, 2] and sum(p["sequences"] for p in per) == N
    assert all(p["tokens_per_s_busy"] > 0 and p["report"]["kind"] == "measured" for p in per)
    assert sum(p["report"]["generated_tokens"] for p in per) == report["generated_tokens"]


@pytest.mark.slow
def test_an_engine_the_checkpoint_does_not_match_is_refused_naming_it(cluster, job, tmp_path, capsys):
    plan, prompts, _ = job
    from specoffload.runtime.tiny_pair import tiny_pair_paths

    out = tmp_path / "out.jsonl"
    assert run_main(cluster_args(plan, prompts, out, "--target", str(tiny_pair_paths()[1]))) == 2
    err = capsys.readouterr().err
    assert "engine 0 on" in err and "plan was made for model 'tiny-target'" in err and "re-plan" in err
    assert not out.exists() or out.read_text() == ""


def test_bad_cluster_flags_are_refused_before_ray_starts(tmp_path, capsys, job):
    plan, prompts, _ = job
    assert run_main([str(plan), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"), "--ray", "local",
                     "--ray-workers", "0"]) == 2
    assert "--ray-workers" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_killed_mid_run_loses_nothing(cluster, job, tmp_path, monkeypatch, capsys):
    plan, prompts, single = job
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.yaml"
    # Engine 1 is dealt two shards (8 prompts) and dies after finishing 6 of its sequences: mid-run.
    monkeypatch.setenv("SPECOFFLOAD_FAULT_WORKER_EXIT", "1:6")
    assert run_main(cluster_args(plan, prompts, out, "--report", str(rep))) == 0
    assert_same(out, single)
    report = yaml.safe_load(rep.read_text())
    assert report["engines_lost"] == 1 and report["missing"] == 0
    assert "engine 1" in report["events"][0] and "lost" in report["events"][0]
    per, retried = report["per_engine"], report["shards_retried"]
    # What engine 1 did not return went to engine 0, and nothing else was redone.
    assert per[1]["lost"] and retried >= 1 and per[1]["shards"] + retried == 2 and per[0]["shards"] == 2 + retried
    # The end summary says it too: which engine was lost, and that its shards were redone elsewhere.
    out = capsys.readouterr().out
    assert "1 lost" in out and f"{retried} shards retried" in out and "engine 1 on" in out and "[lost]" in out
    assert "lost (" in out and "went back to the queue" in out


@pytest.mark.slow
def test_resume_after_the_driver_is_killed(cluster, job, tmp_path):
    plan, prompts, single = job
    out = tmp_path / "out.jsonl"
    args = cluster_args(plan, prompts, out)
    args[args.index("local")] = cluster  # a driver process of its own, joining the module's cluster
    env = dict(os.environ, SPECOFFLOAD_FAULT_DRIVER_EXIT="5")
    proc = subprocess.run([sys.executable, "-m", "specoffload.runtime.run_cli", *args], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    assert len(lines(out)) == 5
    with out.open("a") as fh:
        fh.write('{"id": "p15", "text": "half a li')  # a line cut short by the crash
    assert run_main(cluster_args(plan, prompts, out)) == 0
    assert_same(out, single)


@pytest.mark.slow
def test_each_node_runs_the_plan_made_for_its_kind(cluster, job, tmp_path):
    plan, prompts, single = job
    other = tmp_path / "plan.l4.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "l4", "--prompt-len", "8",
                      "--max-prompt-len", "32", "--gen-len", "16", "--num-prompts", str(N), "--policy", "offload-only",
                      "-o", str(other)]) == 0
    out, rep = tmp_path / "out.jsonl", tmp_path / "report.yaml"
    # The first plan (for l4) is for unlabelled nodes; this node is labelled t4 and runs the t4 plan.
    args = cluster_args(other, prompts, out, "--ray-plans", str(plan), "--report", str(rep))
    assert run_main(args) == 0
    assert_same(out, single)
    report = yaml.safe_load(rep.read_text())
    assert [p["profile"] for p in report["per_engine"]] == ["t4", "t4"]
    assert all(p["plan"] == str(plan) for p in report["per_engine"])
