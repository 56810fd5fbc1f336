"""specoffload-simulate: reports, traces, what-ifs, sweeps, and clear errors on bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from specoffload.planner.costmodel import Knobs
from specoffload.planner.models import load_model_spec
from specoffload.planner.schema import Workload, load_profile
from specoffload.planner.sim import Report
from specoffload.planner.sim.cli import main
from specoffload.planner.sim.scenario import plan_at

PROFILE = "rtx4090-pcie4"


@pytest.fixture(scope="module")
def small_plan_path(tmp_path_factory) -> Path:
    prof = load_profile(PROFILE)
    work = Workload(prompt_len_tokens=128, gen_len_tokens=24, num_prompts=40, acceptance=0.7)
    plan = plan_at(prof, load_model_spec("mistral-7b"), load_model_spec("llama-3.2-1b"), work,
                   Knobs("interleaved", 16, 8, 2, 2, "gpu", 16, 2), {"attn_gpu": 0.5, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    path = tmp_path_factory.mktemp("plans") / "plan.yaml"
    plan.save(path)
    return path


@pytest.fixture(scope="module")
def mixtral_plan():
    prof = load_profile(PROFILE)
    work = Workload(prompt_len_tokens=512, gen_len_tokens=16, num_prompts=200, acceptance=0.7)
    return plan_at(prof, load_model_spec("mixtral-8x7b"), load_model_spec("mistral-7b"), work,
                   Knobs("interleaved", 100, 100, 2, 1, "host", 100, 2), {"attn_gpu": 0.5, "ffn_gpu": 0.0, "kv_gpu": 0.0})


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_trace_and_round_trip(small_plan_path, tmp_path, capsys):
    report, trace = tmp_path / "report.yaml", tmp_path / "trace.json"
    code, out, err = run(capsys, small_plan_path, "--report", report, "--trace", trace, "--seed", 3, "--quiet")
    assert code == 0, err
    for label in ("throughput end to end", "throughput decode only", "busy h2d", "peak memory gpu",
                  "fraction of physical bound", "tokens per round", "time prefill", "acceptance:"):
        assert label in out
    assert "simulated" in out and "predicted" in out and "%" in out
    rep = Report.load(report)
    assert rep.kind == "simulated" and rep.seed == 3 and rep.sequences == 40 and rep.generated_tokens == 40 * 24
    assert set(rep.busy_fraction) == {"gpu", "cpu", "h2d", "d2h"}
    assert set(rep.peak_mem_bytes) == set(rep.capacity_bytes) == {"gpu", "pinned", "host"}
    assert "throughput_tokens_per_s" in rep.predicted and "busy_fraction.h2d" in rep.predicted
    Report.from_dict(json.loads(json.dumps(yaml_plain(report))))  # strict loader accepts its own output
    data = json.loads(trace.read_text())
    assert any(e.get("args", {}).get("name") == "cpu-attn" for e in data["traceEvents"])


def yaml_plain(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_overflowing_plan_is_rejected_with_pool_time_task(mixtral_plan, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    mixtral_plan.replace(gpu_ffn_layers=32).save(path)
    code, out, err = run(capsys, path, "--quiet")
    assert code == 1
    line = next(l for l in err.splitlines() if l.startswith("INFEASIBLE"))
    assert line.startswith("INFEASIBLE (overflow): gpu memory overflows at t=0.000 s in task "
                           "'setup: resident FFN weights (32 layers)'")
    assert "over by" in line and "GiB" in line


def test_what_if_set_and_profile(small_plan_path, capsys):
    code, out, _ = run(capsys, small_plan_path, "--set", "h2d_bytes_per_s=64e9", "--set", "gpu_mem_bytes=48e9",
                       "--quiet")
    assert code == 0 and "what-if" in out
    code, out, _ = run(capsys, small_plan_path, "--profile", "rtx4090-pcie3", "--quiet")
    assert code == 0 and "rtx4090-pcie3" in out


@pytest.mark.parametrize("args,message", [
    (["--set", "warp_drive=9"], "unknown profile field 'warp_drive'"),
    (["--set", "h2d_bytes_per_s"], "expected FIELD=VALUE"),
    (["--set", "gpu_mem_bytes=lots"], "gpu_mem_bytes"),
    (["--sweep", "h2d_bytes_per_s=1:2"], "FIELD=START:STOP:N"),
    (["--sweep", "nope=1e9,2e9"], "unknown profile field 'nope'"),
    (["--replan"], "--replan needs --sweep"),
    (["--draft", "mistral-7b"], "--draft is for re-planning"),
    (["--sweep", "h2d_bytes_per_s=2e10,3e10", "--replan", "all", "--draft", "gpt-9"], "unknown model 'gpt-9'"),
    (["--profile", "no-such-machine"], "not a shipped profile"),
])
def test_bad_input_is_one_clear_line(small_plan_path, capsys, args, message):
    code, out, err = run(capsys, small_plan_path, *args, "--quiet")
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("specoffload-simulate: error:") and message in lines[0]
    assert "Traceback" not in err


def test_bad_plan_files(tmp_path, small_plan_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("policy: [\n")
    code, _, err = run(capsys, broken)
    assert code == 2 and "not valid YAML" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(small_plan_path.read_text().replace("micro_batches:", "micro_batchez:"))
    code, _, err = run(capsys, wrong)
    assert code == 2 and "micro_batchez" in err
    code, _, err = run(capsys, tmp_path / "missing.yaml")
    assert code == 2 and "file not found" in err
    other = tmp_path / "other.yaml"
    other.write_text(small_plan_path.read_text().replace(f"profile: {PROFILE}", "profile: my-lab-box"))
    code, _, err = run(capsys, other)
    assert code == 2 and "--profile" in err


def test_sweep_one_field_csv_and_png(small_plan_path, tmp_path, capsys):
    out_csv, out_png = tmp_path / "s.csv", tmp_path / "s.png"
    code, out, _ = run(capsys, small_plan_path, "--sweep", "h2d_bytes_per_s+d2h_bytes_per_s=12e9:48e9:3",
                       "--csv", out_csv, "--plot", out_png, "--quiet")
    assert code == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert [float(r["h2d_bytes_per_s+d2h_bytes_per_s"]) for r in rows] == [12e9, 30e9, 48e9]
    tput = [float(r["sim_tokens_per_s"]) for r in rows]
    assert tput == sorted(tput)  # more bandwidth never hurts this plan
    assert out_png.exists() and out_png.stat().st_size > 1000


def test_sweep_grid_and_replan(small_plan_path, tmp_path, capsys):
    out_csv, out_png = tmp_path / "g.csv", tmp_path / "g.png"
    code, _, _ = run(capsys, small_plan_path, "--sweep", "gpu_mem_bytes=16e9,24e9", "--sweep",
                     "h2d_bytes_per_s=12e9,50e9", "--replan", "--csv", out_csv, "--plot", out_png, "--quiet")
    assert code == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 4 and {r["policy"] for r in rows} == {"interleaved"}
    assert all(r["feasible"] == "True" for r in rows)
    assert out_png.exists()


def test_sweep_without_matplotlib_writes_csv_and_says_so(small_plan_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out_csv = tmp_path / "n.csv"
    code, out, _ = run(capsys, small_plan_path, "--sweep", "h2d_bytes_per_s=20e9,40e9", "--csv", out_csv,
                       "--plot", tmp_path / "n.png", "--quiet")
    assert code == 0 and out_csv.exists() and "plot skipped" in out and not (tmp_path / "n.png").exists()


def test_help_shows_a_worked_example(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "specoffload-simulate plan.yaml --sweep h2d_bytes_per_s+d2h_bytes_per_s=" in out
    assert "--replan all --draft mistral-7b" in out and "exit status" in out


def test_console_script_is_installed(small_plan_path):
    exe = Path(sys.executable).parent / "specoffload-simulate"
    out = subprocess.run([str(exe), str(small_plan_path), "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "throughput end to end" in out.stdout


def test_replan_all_needs_a_draft_when_the_plan_has_none(tmp_path, capsys):
    prof = load_profile(PROFILE)
    work = Workload(prompt_len_tokens=128, gen_len_tokens=8, num_prompts=8, acceptance=0.7)
    plan = plan_at(prof, load_model_spec("mistral-7b"), None, work, Knobs("offload-only", 8, 8, 0, 1, "gpu", 8, 2),
                   {"attn_gpu": 0.0, "ffn_gpu": 0.0, "kv_gpu": 0.0})
    path = tmp_path / "offload.yaml"
    plan.save(path)
    code, _, err = run(capsys, path, "--sweep", "h2d_bytes_per_s=2e10,3e10", "--replan", "all", "--quiet")
    assert code == 2 and "--draft" in err
