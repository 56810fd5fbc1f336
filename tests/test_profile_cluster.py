"""specoffload-profile --ray: nodes grouped into kinds by hardware, a kind's profile merged from its nodes,
the profiling run on each node by a Ray task (a local cluster here), the --cluster argument it prints planning,
and the errors (no Ray, nothing at the address, bad -o)."""
from __future__ import annotations

import dataclasses
import os
import re
import sys

import pytest

from specoffload.planner.cli import main as plan_main
from specoffload.planner.schema import Curve, HardwareProfile, load_profile

pytest.importorskip("torch")

from specoffload.runtime import profile_cli  # noqa: E402
from specoffload.runtime.profile_cluster import (gather_profiles, hardware_key, kind_names,  # noqa: E402
                                                 merge_profiles)


def hw(kind="cuda", gpu="NVIDIA H200", gpus=8, cpu="AMD EPYC 9454 48-Core Processor", cores=96, mem=1510):
    return {"device_kind": kind, "gpu": gpu if kind == "cuda" else "", "gpus": gpus if kind == "cuda" else 0,
            "cpu": cpu, "cores": cores, "host_mem_gib": mem, "host": "n"}


def test_kinds_are_named_for_their_hardware_and_unique():
    nodes = [hw(), hw(), hw(gpu="NVIDIA L4", gpus=1), hw("cpu", cpu="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=64),
             hw("cpu", cpu="Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz", cores=64, mem=256)]
    keys = [hardware_key(h) for h in nodes]
    assert keys[0] == keys[1] and len(set(keys)) == 4  # the two H200 nodes are one kind; the host name is no part
    distinct = list(dict.fromkeys(keys))
    names = kind_names([nodes[keys.index(k)] for k in distinct])
    assert names[:2] == ["h200x8", "l4"]
    # Two CPU kinds that differ only in memory: the names say so, and stay distinct.
    assert names[2] != names[3] and names[2].startswith("cpu-64c-intel-xeon-gold-6338") and names[3].endswith("-256g")
    for n in names:  # usable as a file name and as a Ray label value
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*[a-z0-9]", n) and len(n) <= 63


def test_a_kind_s_profile_is_the_median_of_its_nodes_with_the_smallest_memory():
    base = load_profile("cpu-2core")

    def node(scale: float, mem_gib: float):
        return dataclasses.replace(
            base, host_mem_bytes=mem_gib * 2**30, cpu_attn_kv_read_bytes_per_s=base.cpu_attn_kv_read_bytes_per_s * scale,
            engine_pass_overhead_seconds=1e-4 * scale,
            gpu_matmul_flops_per_s=Curve(tuple((x, y * scale) for x, y in base.gpu_matmul_flops_per_s.points)),
            provenance={**base.provenance, "host": f"h{scale}"})

    profs = [node(1.0, 30), node(3.0, 31), node(2.0, 29)]
    m = merge_profiles(profs, "cpu-2c-x", ["a", "b", "c"])
    assert m.name == "cpu-2c-x" and m.host_mem_bytes == 29 * 2**30
    assert m.cpu_attn_kv_read_bytes_per_s == pytest.approx(2 * base.cpu_attn_kv_read_bytes_per_s)
    assert m.engine_pass_overhead_seconds == pytest.approx(2e-4)
    assert [y for _, y in m.gpu_matmul_flops_per_s.points] == pytest.approx(
        [2 * y for _, y in base.gpu_matmul_flops_per_s.points])
    assert m.provenance["cluster.nodes"] == "a, b, c" and "median" in m.provenance["cluster.merge"]
    assert all(f"cluster.node.{n}" in m.provenance for n in "abc")
    # A figure one node could not measure comes from the others, and is no longer missing.
    lacking = dataclasses.replace(profs[0], cpu_mem_bandwidth_bytes_per_s=None, missing=("cpu_mem_bandwidth_bytes_per_s",))
    m2 = merge_profiles([lacking, profs[1]], "k", ["a", "b"])
    assert m2.cpu_mem_bandwidth_bytes_per_s == profs[1].cpu_mem_bandwidth_bytes_per_s and not m2.missing
    one = merge_profiles(profs[:1], "solo", ["a"])
    assert one.name == "solo" and one.host_mem_bytes == 30 * 2**30 and one.provenance["cluster.nodes"] == "a"


# --- on a local Ray cluster ----------------------------------------------------------------------
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module; `--ray local` then uses it (a driver already connected stays)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 * 2**20, logging_level="warning",
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def cheap_profiler():
    """A profiler for the node's Ray task that returns a real HardwareProfile (the shipped CPU one) stamped with
    the process and host it ran in, so the test sees where it ran, without minutes of probes. (Made inside a
    function: Ray then ships it by value; the node's worker cannot import this test module.)"""
    def profile(args):
        import os as _os
        import socket as _socket

        from specoffload.planner.schema import load_profile as _load

        p = _load("cpu-2core")
        prov = {**p.provenance, "host": _socket.gethostname(), "pid": str(_os.getpid()),
                "mode": "quick" if args.quick else "full"}
        return {"profile": dataclasses.replace(p, provenance=prov), "failed": {}, "warnings": ["a note from the node"],
                "seconds": 0.01}

    return profile


def test_every_node_is_profiled_on_itself_and_the_plan_argument_plans(local_ray, tmp_path, capsys):
    out = tmp_path / "kinds"
    args = profile_cli.parse_args(["--ray", "local", "--quick", "-o", str(out)])
    assert gather_profiles(args, profiler=cheap_profiler()) == 0
    cap = capsys.readouterr()
    files = sorted(out.glob("*.yaml"))
    assert len(files) == 1 and files[0].stem.startswith(f"cpu-{os.cpu_count()}c-")  # this machine: one node, one kind
    p = HardwareProfile.load(files[0])
    assert p.name == files[0].stem and p.provenance["mode"] == "quick"  # --quick reached the node
    assert p.provenance["pid"] != str(os.getpid())  # profiled in the node's Ray worker, not in the driver
    assert p.provenance["cluster.nodes"] and "a note from the node" in cap.err
    arg = re.search(r"--cluster (\S+)", cap.out).group(1)
    assert arg == f"{files[0]}:1"
    # The printed argument is what specoffload-plan --cluster takes.
    plan = tmp_path / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--cluster", arg, "--prompt-len", "8",
                      "--gen-len", "8", "--num-prompts", "16", "-o", str(plan)]) == 0
    assert plan.is_file()
    # Run again into the same folder: the kind's file exists, nothing is profiled or overwritten.
    before = files[0].read_bytes()
    assert profile_cli.main(["--ray", "local", "--quick", "-o", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err and files[0].read_bytes() == before


def test_a_failing_node_is_reported_by_name(local_ray, tmp_path, capsys):
    def broken(args):
        raise RuntimeError("probe exploded")

    out = tmp_path / "kinds"
    args = profile_cli.parse_args(["--ray", "local", "-o", str(out)])
    assert gather_profiles(args, profiler=broken) == 2
    err = capsys.readouterr().err
    assert "error: node" in err and "RuntimeError: probe exploded" in err and "no profile for cpu-" in err
    assert not list(out.glob("*.yaml"))


def test_cluster_errors_are_one_line_and_touch_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as a fresh driver: the address is checked
    assert profile_cli.main(["--ray", "127.0.0.1:9", "-o", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert "--ray 127.0.0.1:9: nothing answers there" in err and "ray start --head" in err and "Traceback" not in err
    afile = tmp_path / "a.yaml"
    afile.write_text("keep")
    assert profile_cli.main(["--ray", "local", "-o", str(afile)]) == 2
    assert "-o is a folder" in capsys.readouterr().err and afile.read_text() == "keep"
    assert profile_cli.main(["--ray", "local", "--name", "x", "-o", str(tmp_path / "k")]) == 2
    assert "--name names one profile" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_cli.main(["--ray", "local", "--acceptance", "--target", "a", "--draft", "b", "--prompts", "c"])
    assert "does not go with --acceptance" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert profile_cli.main(["--ray", "local", "-o", str(tmp_path / "k")]) == 2
    assert "pip install 'specoffload[cluster]'" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()


@pytest.mark.slow
def test_the_real_probes_run_on_the_node(local_ray, tmp_path, capsys):
    """The default profiler (the single-machine probes) on the node, at the test sizes (set inside the task)."""
    def tiny_real(args):
        from specoffload.runtime.profile_cluster import profile_node
        from specoffload.runtime.profiler.probes import ProfileConfig

        def tiny(cls=None, **kw):
            kw.pop("model", None)
            return ProfileConfig.tiny(**kw)

        ProfileConfig.quick = classmethod(lambda cls, **kw: tiny(**kw))
        return profile_node(args)

    out = tmp_path / "kinds"
    args = profile_cli.parse_args(["--ray", "local", "--quick", "--device", "cpu", "--threads", "1", "-o", str(out)])
    assert gather_profiles(args, profiler=tiny_real) == 0
    (path,) = out.glob("*.yaml")
    p = HardwareProfile.load(path)
    assert p.source == "measured" and p.device_kind == "cpu" and p.provenance["mode"] == "test"
    assert f"--cluster {path}:1" in capsys.readouterr().out
