"""specoffload-run never loses or duplicates output: foreign files refused, corruption named, one run per
file, write failures and signals stop cleanly, unwritable outputs refused before any model loads."""
from __future__ import annotations

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from specoffload.planner.cli import main as plan_main
from specoffload.runtime import outputs
from specoffload.runtime.outputs import OutputFile, OutputFileError, scan
from specoffload.runtime.run_cli import main as run_main

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self", "for i in range(10):\n",
         "# comment\n", "x = [1, 2, 3]\nprint(", "while True:\n    if", "try:\n    import numpy"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4", "--prompt-len", "8",
                      "--max-prompt-len", "32", "--gen-len", "12", "--num-prompts", "8", "--policy", "serial-spec",
                      "--batch", "2", "-o", str(out)]) == 0
    return out


def write_prompts(path: Path, n: int = 6, max_tokens: int = 10) -> Path:
    with path.open("w") as fh:
        for i in range(n):
            line = {"id": f"p{i}", "prompt": TEXTS[i % len(TEXTS)], "max_tokens": max_tokens}
            if i % 3 == 2:
                line.update(temperature=0.8, top_p=0.95, seed=i)
            fh.write(json.dumps(line) + "\n")
    return path


def out_line(i, **kw) -> str:
    obj = {"id": i, "text": "t", "tokens": [1, 2], "num_tokens": 2, "prompt_tokens": 3, "finish_reason": "length",
           "stop_reason": None, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    obj.update(kw)
    return json.dumps(obj) + "\n"


def run(plan: Path, prompts: Path, out: Path, *extra: str) -> int:
    return run_main([str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate", *extra])


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "specoffload.runtime.run_cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def ids(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text().splitlines()]


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks under test must come first."""
    from specoffload.runtime import engine

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output file was checked")

    monkeypatch.setattr(engine.Engine, "__init__", boom)


# ---------------------------------------------------------------------------------------------
# Files that are not this command's output
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text", [
    ("plan_copy.yaml", None),  # filled with the plan itself
    ("notes.md", "# Notes\n\nremember the milk\n"),
    ("notes.txt", "one line, no newline"),
    ("data.jsonl", '{"id": 1, "prompt": "a prompt file, not an output"}\n'),
    ("empty-object.jsonl", "{}\n"),
])
def test_a_file_that_is_not_our_output_is_refused_and_untouched(plan, tmp_path, capsys, no_model, name, text):
    target = tmp_path / name
    target.write_text(plan.read_text() if text is None else text)
    before = target.read_bytes()
    assert run(plan, write_prompts(tmp_path / "in.jsonl"), target) == 2
    err = capsys.readouterr().err
    assert f"{target}:1" in err and "not this command's output" in err and "Traceback" not in err
    assert target.read_bytes() == before


def test_an_unreadable_line_in_the_middle_is_refused_not_truncated(plan, tmp_path, capsys, no_model):
    out = tmp_path / "out.jsonl"
    rows = [out_line(f"p{i}") for i in range(7)]
    rows[2] = '{"id": "p2", "text": "cut\n'  # line 3 of 7 damaged
    out.write_text("".join(rows))
    before = out.read_bytes()
    assert run(plan, write_prompts(tmp_path / "in.jsonl", n=7), out) == 2
    err = capsys.readouterr().err
    assert f"{out}:3" in err and "left as it is" in err and "remove line 3" in err
    assert out.read_bytes() == before


def test_a_duplicated_id_is_refused(plan, tmp_path, capsys, no_model):
    out = tmp_path / "out.jsonl"
    out.write_text(out_line("p0") + out_line("p1") + out_line("p0"))
    before = out.read_bytes()
    assert run(plan, write_prompts(tmp_path / "in.jsonl"), out) == 2
    assert f"{out}:3: id 'p0' is already on line 1" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_only_a_torn_start_of_an_output_line_is_dropped():
    good = (out_line("a") + out_line("b")).encode()
    for cut in range(1, len(out_line("c"))):  # every prefix of a line: what a crash mid-write leaves
        tail = out_line("c").encode()[:cut]
        done, keep = scan(Path("o.jsonl"), good + tail)
        assert done == {"a", "b"} and keep == len(good)
    with pytest.raises(OutputFileError, match=r"o.jsonl:3: the last line \(no newline\) is not a specoffload-run output line"):
        scan(Path("o.jsonl"), good + b"garbage")
    assert scan(Path("o.jsonl"), b"") == (set(), 0)


def test_output_with_blank_lines_and_integer_like_ids_resumes(tmp_path):
    p = tmp_path / "o.jsonl"
    p.write_text(out_line("1") + "\n" + out_line("2"))
    out = OutputFile(p)
    assert out.open() == {"1", "2"} and out.dropped_bytes == 0
    out.close()


# ---------------------------------------------------------------------------------------------
# One run per file
# ---------------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_file_refuses_at_once_naming_the_holder(plan, tmp_path, capsys, no_model):
    out = tmp_path / "out.jsonl"
    out.write_text(out_line("p0"))
    holder = OutputFile(out)
    holder.open()  # another run holds the file (flock conflicts between open file descriptions)
    try:
        assert run(plan, write_prompts(tmp_path / "in.jsonl"), out) == 2
        err = capsys.readouterr().err
        assert f"--output {out} is in use by process {os.getpid()}" in err and "another specoffload-run" in err
    finally:
        holder.close()
    assert out.read_text() == out_line("p0")


def test_the_lock_is_held_by_a_running_process(plan, tmp_path):
    """A real second process: the first is stopped (SIGSTOP by its own hook-free twin) while holding the lock."""
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "in.jsonl", n=2)
    code = (f"import os, signal, sys; from specoffload.runtime.outputs import OutputFile; o = OutputFile({str(out)!r}); "
            "o.open(); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate")
        assert proc.returncode == 2 and f"is in use by process {holder.pid}" in proc.stderr
    finally:
        holder.communicate("")
    assert out.read_text() == ""


# ---------------------------------------------------------------------------------------------
# Unwritable outputs, checked before anything loads
# ---------------------------------------------------------------------------------------------

def test_unwritable_outputs_are_refused_before_loading(plan, tmp_path, capsys, no_model):
    prompts = write_prompts(tmp_path / "in.jsonl")
    assert run(plan, prompts, tmp_path) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err
    assert run(plan, prompts, Path("/proc/self/status")) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert run(plan, prompts, Path("/proc/specoffload-test/out.jsonl")) == 2
    assert "/proc/specoffload-test" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert run(plan, prompts, tmp_path / "afile" / "out.jsonl") == 2
    assert "is not a folder" in capsys.readouterr().err or "cannot" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_before_loading(plan, tmp_path, capsys, no_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert run(plan, write_prompts(tmp_path / "in.jsonl"), ro / "out.jsonl") == 2
        assert "cannot be written" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_a_file_the_run_created_is_removed_if_it_fails_before_writing(plan, tmp_path, capsys):
    out = tmp_path / "new.jsonl"
    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "def f(x):\n    return x\n" * 6, "max_tokens": 4}) + "\n")
    assert run(plan, prompts, out) == 2
    assert "KV cache" in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------------------------
# Write failures and signals
# ---------------------------------------------------------------------------------------------

def test_disk_full_is_a_clear_error_with_finished_lines_saved(plan, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "in.jsonl")
    real_write, calls = os.write, []

    def write(fd, data):
        if fd == handle[0].fd:
            calls.append(len(data))
            if len(calls) == 3:  # the third line: half of it goes down, then the disk is full
                real_write(fd, bytes(data[:len(data) // 2]))
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    handle = []
    real_open = OutputFile.open

    def open_(self):
        handle.append(self)
        return real_open(self)

    monkeypatch.setattr(OutputFile, "open", open_)
    monkeypatch.setattr(outputs.os, "write", write)
    assert run(plan, prompts, out) == 1
    err = capsys.readouterr().err
    assert f"cannot write {out}: the disk is full" in err and "2 sequences finished so far are saved" in err
    assert out.read_text().endswith("\n") and len(ids(out)) == 2  # the torn third line was cut back
    monkeypatch.undo()
    assert run(plan, prompts, out) == 0
    assert sorted(ids(out)) == [f"p{i}" for i in range(6)]


@pytest.mark.slow
def test_file_size_limit_is_a_clear_error_and_resume_completes(plan, tmp_path):
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "in.jsonl")
    line = len(out_line("p0", text="x" * 40, tokens=list(range(10)), num_tokens=10))
    limit = 2 * line + 20  # room for about two lines

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate",
               preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    assert f"cannot write {out}: the file size limit was reached" in proc.stderr and "Traceback" not in proc.stderr
    saved = ids(out)
    assert 0 < len(saved) < 6 and out.read_text().endswith("\n")
    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate")
    assert proc.returncode == 0, proc.stderr
    assert sorted(ids(out)) == [f"p{i}" for i in range(6)]


@pytest.mark.parametrize("sig, code", [("sigterm", 143), pytest.param("sigint", 130, marks=pytest.mark.slow)])
def test_sigterm_and_sigint_finish_the_line_and_say_how_to_resume(plan, tmp_path, sig, code):
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "in.jsonl")
    # The signal arrives with half of the second line written: that line is finished, then the run stops.
    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate",
               "--threads", "1", env={outputs.CRASH_ENV: f"2:{sig}"})
    assert proc.returncode == code, proc.stderr
    assert f"stopped by {sig.upper()}; 2 finished sequences are in {out}" in proc.stderr
    assert "Rerun the same command to resume" in proc.stderr and "Traceback" not in proc.stderr
    assert len(ids(out)) == 2 and out.read_text().endswith("\n")


def test_nothing_left_to_run_says_so(plan, tmp_path, capsys, no_model):
    out = tmp_path / "out.jsonl"
    prompts = write_prompts(tmp_path / "in.jsonl", n=2)
    out.write_text(out_line("p0") + out_line("p1"))
    assert run(plan, prompts, out, "--report", str(tmp_path / "r.yaml")) == 0
    cap = capsys.readouterr()
    assert "nothing to run: all 2 prompts" in cap.err and "-100%" not in cap.out + cap.err and cap.out == ""
    assert out.read_text() == out_line("p0") + out_line("p1")


# ---------------------------------------------------------------------------------------------
# Crash consistency (slow): SIGKILL at many chosen points, resume each time
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_the_uninterrupted_run(plan, tmp_path):
    n = 8
    prompts = write_prompts(tmp_path / "in.jsonl", n=n, max_tokens=10)
    full = tmp_path / "full.jsonl"
    assert run(plan, prompts, full) == 0
    reference = {json.loads(x)["id"]: json.loads(x) for x in full.read_text().splitlines()}
    out = tmp_path / "out.jsonl"
    rng = random.Random(11)
    for kill in range(10):
        whole = [json.loads(x)["id"] for x in out.read_text().split("\n")[:-1]] if out.exists() else []
        left = n - len(whole)  # (a torn last line from the previous kill is not counted)
        # Kill at the k-th line this process writes: before it, half-way through it, or after all of it
        # (before its fsync). k never reaches the last line left "after", so every run is really killed.
        phase = rng.choice(["before", "mid", "after"])
        k = rng.randint(1, left - 1 if phase == "after" and left > 1 else left)
        if phase == "after" and left == 1:
            phase = "mid"
        point = f"{k}:{phase}"
        proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate",
                   "--threads", "1", env={outputs.CRASH_ENV: point})
        assert proc.returncode == -signal.SIGKILL, (kill, point, proc.stderr)
        # Between crashes the file holds whole lines, perhaps plus one torn one: never a duplicate.
        got = [json.loads(x)["id"] for x in out.read_text().split("\n")[:-1]]
        assert len(got) == len(set(got)) == n - left + (k - 1 if phase != "after" else k), point
    proc = cli(str(plan), "--prompts", str(prompts), "--output", str(out), "--quiet", "--no-simulate")
    assert proc.returncode == 0, proc.stderr
    resumed = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["id"] for x in resumed) == sorted(reference)  # every id exactly once
    for x in resumed:
        assert x == reference[x["id"]]
