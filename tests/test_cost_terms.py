"""The profile's cost terms are declared once (planner/cost_terms.py) and read by the schema, the profiler
and the summary."""
from __future__ import annotations

import dataclasses

import pytest

from specoffload.planner import cost_terms as ct
from specoffload.planner.schema import OPTIONAL_FIGURES, HardwareProfile, load_profile
from specoffload.planner.strict import SchemaError

NOT_TERMS = {"name", "source", "device_kind", "device_name", "cpu_name", "provenance", "missing", "schema_version"}


def test_every_profile_figure_has_a_row_and_every_row_a_figure():
    fields = [f.name for f in dataclasses.fields(HardwareProfile) if f.name not in NOT_TERMS]
    assert [t.name for t in ct.TERMS] == fields  # the same terms, in the profile's order
    assert len(ct.BY_NAME) == len(ct.TERMS)
    for t in ct.TERMS:
        assert t.unit and t.description and t.fit and t.fallback in (ct.NULL, ct.ZERO, ct.ESTIMATE)
        assert t.kind in (ct.CURVE, ct.RATE, ct.BYTES, ct.COUNT, ct.COST)
        assert set(t.probes) <= {ct.CUDA, ct.CPU}


def test_the_schema_reads_the_table():
    assert OPTIONAL_FIGURES == ct.OPTIONAL and OPTIONAL_FIGURES
    base = load_profile("rtx4090-pcie4")
    for t in ct.TERMS:
        bad = {"count": 0, "positive": 0.0, "nonneg": -1.0}[t.bound]
        if t.optional:
            bad = -1.0
        with pytest.raises(SchemaError, match=t.name):
            base.with_overrides({t.name: bad})
        if t.optional:  # null is allowed, and listed in missing
            assert t.name in base.with_overrides({t.name: None}).missing


def test_the_summary_reads_the_table():
    from specoffload.runtime.profile_cli import summary

    p = load_profile("cpu-2core").with_overrides({"disk_read_bytes_per_s": 1.5e9})
    text = summary(p)
    for label, terms in ct.summary_lines():
        assert f"  {label:<26} " in text
        for t in terms:
            assert t.summary_as in text
    assert "1.5 GB/s" in text and "disk sequential read" not in summary(load_profile("cpu-2core"))
    assert "MISSING: gpu_matmul_flops_per_s" in summary(p.with_overrides({"gpu_matmul_flops_per_s": None}))


@pytest.mark.parametrize("kind", ["cpu"])
def test_the_profiler_reads_the_table(kind):
    pytest.importorskip("torch")
    from specoffload.runtime.profiler.probes import ALL_PROBES, Profiler, ProfileConfig

    prof = Profiler(ProfileConfig.quick(), device=kind, progress=False)
    probes = prof.probes()
    measured = {f for p in probes for f in p.figures}
    assert {t.name for t in ct.TERMS if kind in t.probes} <= measured
    for p in probes:
        assert set(p.figures) - {"cpu_name"} == set(ct.probe_figures(p.name, kind)), p.name
    assert {pr for t in ct.TERMS for pr in t.probes.values()} <= set(ALL_PROBES)
