"""specoffload-plan --cluster: a plan per kind of node, the prompts split so every kind finishes together."""
from __future__ import annotations

import pytest

from specoffload.planner.cli import main as plan_main
from specoffload.planner.cluster import engine_share, parse_cluster
from specoffload.planner.schema import Plan, load_profile
from specoffload.planner.strict import SchemaError


def test_parse_cluster_and_its_errors():
    kinds = parse_cluster("rtx4090-pcie4:16, l4:4x2")
    assert [(k.profile_ref, k.nodes, k.engines_per_node, k.engines) for k in kinds] == \
        [("rtx4090-pcie4", 16, 1, 16), ("l4", 4, 2, 8)]
    for bad in ("rtx4090-pcie4", "l4:0", "l4:2x0", ":3", "l4:two"):
        with pytest.raises(SchemaError, match="PROFILE:NODES"):
            parse_cluster(bad)


def test_engines_on_one_node_share_its_host():
    p = load_profile("l4")
    half = engine_share(p, 2)
    assert half.host_mem_bytes == p.host_mem_bytes / 2 and half.pinned_mem_bytes == p.pinned_mem_bytes / 2
    assert half.cpu_attn_kv_read_bytes_per_s == p.cpu_attn_kv_read_bytes_per_s / 2
    assert half.cpu_cores == max(1, p.cpu_cores // 2) and half.name == "l4/2"
    assert half.h2d_pinned_bytes_per_s == p.h2d_pinned_bytes_per_s  # each GPU keeps its own link
    assert engine_share(p, 1) is p


def test_cluster_plans_split_the_prompts_by_speed(tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert plan_main(["--model", "tiny-target", "--cluster", "t4:3,l4:1x2", "--prompt-len", "16", "--gen-len", "16",
                      "--num-prompts", "5000", "--policy", "offload-only", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    t4, l4 = Plan.load(tmp_path / "plan.t4.yaml"), Plan.load(tmp_path / "plan.l4-2.yaml")
    assert l4.profile == "l4/2"
    # Every engine's share covers the job, and the kinds are predicted to finish within a few percent.
    assert 3 * t4.workload.num_prompts + 2 * l4.workload.num_prompts >= 5000
    a, b = t4.prediction.total_seconds, l4.prediction.total_seconds
    assert abs(a - b) / max(a, b) < 0.05, (a, b)
    # The faster kind per engine gets more prompts per engine.
    fast, slow = (t4, l4) if t4.prediction.throughput_tokens_per_s > l4.prediction.throughput_tokens_per_s else (l4, t4)
    assert fast.workload.num_prompts > slow.workload.num_prompts
    assert "predicted job:" in text and "binding:" in text


def test_profile_or_cluster_is_required(capsys):
    assert plan_main(["--model", "tiny-target", "--prompt-len", "8", "--gen-len", "8", "--num-prompts", "4"]) == 2
    assert "--cluster" in capsys.readouterr().err
