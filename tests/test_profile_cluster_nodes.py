"""specoffload-profile --ray on a Ray cluster of two nodes (two raylets on this machine): one task per node,
each on its own node, and the two nodes (same hardware) merged into one kind of two."""
from __future__ import annotations

import os
import re

import pytest

from specoffload.planner.schema import HardwareProfile, load_profile

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from specoffload.runtime import profile_cli  # noqa: E402
from specoffload.runtime.profile_cluster import gather_profiles  # noqa: E402


@pytest.mark.slow
def test_two_nodes_are_each_profiled_on_themselves_and_merged(tmp_path, capsys):
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "object_store_memory": 80 * 2**20})
    cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    try:
        ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)

        def where(args):
            import dataclasses as _dc

            import ray as _ray

            from specoffload.planner.schema import load_profile as _load

            p = _load("cpu-2core")
            node = _ray.get_runtime_context().get_node_id()
            return {"profile": _dc.replace(p, provenance={**p.provenance, "host": node[:8]},
                                           host_mem_bytes=p.host_mem_bytes * (1 + int(node[:2], 16) / 1000)),
                    "failed": {}, "warnings": [], "seconds": 0.0}

        out = tmp_path / "kinds"
        args = profile_cli.parse_args(["--ray", cluster.address, "-o", str(out)])
        assert gather_profiles(args, profiler=where) == 0
        ids = sorted(n["NodeID"][:8] for n in ray.nodes() if n["Alive"])
        assert len(ids) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
    (path,) = out.glob("*.yaml")
    p = HardwareProfile.load(path)
    # Each node's task ran on that node: the node ids they saw are the two nodes', each once.
    assert sorted(p.provenance["host"].split(", ")) == ids
    nodes = p.provenance["cluster.nodes"].split(", ")
    assert sorted(n.rsplit("/", 1)[1] for n in nodes) == ids
    assert "2 nodes of the same hardware" in p.provenance["cluster.merge"]
    base = load_profile("cpu-2core").host_mem_bytes  # memory: the smaller node's
    assert p.host_mem_bytes == pytest.approx(min(base * (1 + int(i[:2], 16) / 1000) for i in ids))
    assert re.search(rf"--cluster {re.escape(str(path))}:2\b", capsys.readouterr().out)
