"""specoffload-profile, hardware side: the fitting on synthetic data with known answers, the probes on
tiny sizes, forced probe failures, the CLI, and the planner/simulator reading a written profile unchanged."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from specoffload.planner.models import load_model_spec
from specoffload.planner.planner import make_plan
from specoffload.planner.schema import OPTIONAL_FIGURES, Curve, HardwareProfile, Workload
from specoffload.planner.strict import SchemaError
from specoffload.runtime.profiler.fit import (AttentionPoint, Stats, curve_points, fit_attention, fit_excess, nnls,
                                              relative_spread)

torch = pytest.importorskip("torch")

from specoffload.runtime import profile_cli  # noqa: E402
from specoffload.runtime.profiler import probes  # noqa: E402
from specoffload.runtime.profiler.probes import (ALL_PROBES, FORCE_FAIL_ENV, ProfileConfig, attention_call,  # noqa: E402
                                                 attention_workload, run_profile)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


WORKLOAD = Workload(prompt_len_tokens=64, gen_len_tokens=32, num_prompts=64, acceptance=0.7)


def plan_on(profile, target, draft, workload=WORKLOAD):
    return make_plan(profile, target, draft, workload)


# --- fitting on synthetic measurements -----------------------------------------------------------
def test_stats_median_and_iqr_spread():
    st = Stats.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert st.median == 3.0
    assert st.spread == pytest.approx((4.0 - 2.0) / 3.0)
    assert Stats.of([2.5]).spread == 0.0
    with pytest.raises(ValueError):
        Stats.of([])


def test_nnls_known_answer_clips_a_negative_coefficient():
    # b = 2*x0 - 1*x1 exactly; with x >= 0 the best is x1 = 0 and x0 the projection onto column 0.
    a = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, 2.0]])
    b = 2 * a[:, 0] - a[:, 1]
    x, r = nnls(a, b)
    assert x[1] == 0.0
    assert x[0] == pytest.approx(b.sum() / 3.0)
    assert r == pytest.approx(np.linalg.norm(a[:, 0] * x[0] - b))


def test_nnls_agrees_with_scipy():
    optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(40):
        a = rng.normal(size=(12, 3))
        b = rng.normal(size=12)
        x, r = nnls(a, b)
        xs, rs = optimize.nnls(a, b)
        assert r == pytest.approx(rs, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(x, xs, atol=1e-8)


def synthetic_points(overhead, bw, rate, noise, seed=0, spec=None):
    """Attention times from a known model, with multiplicative noise, on a grid like the quick mode's."""
    spec = spec or load_model_spec("mixtral-8x7b")
    rng = np.random.default_rng(seed)
    pts = []
    for b in (1, 4, 16):
        for q in (1, 5, 9):
            for ctx in (64, 512, 2048):
                kv, fl = attention_workload(spec, b, q, ctx)
                t = (overhead + kv / bw + fl / rate) * (1 + noise * rng.standard_normal())
                pts.append(AttentionPoint(b, q, ctx, kv, fl, t))
    return pts


@pytest.mark.parametrize("overhead,bw,rate", [(2e-4, 4e9, 60e9), (5e-5, 40e9, 500e9), (1e-3, 1e9, 10e9)])
def test_attention_fit_recovers_known_figures(overhead, bw, rate):
    exact = fit_attention(synthetic_points(overhead, bw, rate, noise=0.0))
    assert exact.overhead_seconds == pytest.approx(overhead, rel=1e-6)
    assert exact.kv_read_bytes_per_s == pytest.approx(bw, rel=1e-6)
    assert exact.flops_per_s == pytest.approx(rate, rel=1e-6)
    assert exact.rel_max_residual < 1e-9
    noisy = fit_attention(synthetic_points(overhead, bw, rate, noise=0.01, seed=1))
    assert noisy.overhead_seconds == pytest.approx(overhead, rel=0.05)
    assert noisy.kv_read_bytes_per_s == pytest.approx(bw, rel=0.05)
    assert noisy.flops_per_s == pytest.approx(rate, rel=0.05)
    assert 0.003 < noisy.rel_rms_residual < 0.03  # ~ the noise level
    assert not noisy.bounded
    for p in synthetic_points(overhead, bw, rate, noise=0.0):
        assert noisy.predict(p.kv_bytes, p.flops) == pytest.approx(p.seconds, rel=0.05)


def test_attention_fit_flags_a_rate_the_data_cannot_see():
    spec = load_model_spec("mixtral-8x7b")
    pts = [AttentionPoint(p.batch, p.query, p.context, p.kv_bytes, p.flops, 1e-4 + p.flops / 50e9)
           for p in synthetic_points(0, 1, 1, 0.0, spec=spec)]  # no bandwidth term at all
    fit = fit_attention(pts)
    assert fit.bounded == ("kv_read_bytes_per_s",)
    assert math.isfinite(fit.kv_read_bytes_per_s) and fit.kv_read_bytes_per_s > 0
    assert fit.flops_per_s == pytest.approx(50e9, rel=1e-3)
    # The bound keeps the unseen term under 1% of every measured time.
    assert all(p.kv_bytes / fit.kv_read_bytes_per_s <= 0.01 * p.seconds * (1 + 1e-9) for p in pts)


def test_attention_fit_refuses_unidentifiable_grids():
    pts = synthetic_points(1e-4, 4e9, 60e9, 0.0)
    with pytest.raises(ValueError, match="query count"):
        fit_attention([p for p in pts if p.query == 5])
    with pytest.raises(ValueError, match="at least 3"):
        fit_attention(pts[:2])


def test_curve_points_build_a_curve():
    raw = [(1 << 20, 8e9), (65536, 2e9), (1 << 20, 10e9), (1 << 20, 9e9), (4096, 0.0), (256 << 20, 12.3456789e9)]
    pts = curve_points(raw)
    assert [x for x, _ in pts] == [65536, 1 << 20, 256 << 20]  # sorted; duplicates merged; zero dropped
    assert pts[1][1] == 9e9  # median of the duplicates
    assert pts[2][1] == 12.35e9  # four significant digits
    c = Curve(pts)
    assert c(65536) == 2e9 and c(1e12) == 12.35e9 and c(1) == 2e9
    assert 2e9 < c(262144) < 9e9  # log-x interpolation between measured points
    with pytest.raises(ValueError):
        curve_points([(0, 1.0), (1, -2.0)])


def test_relative_spread():
    assert relative_spread(1.0, 1.1) == pytest.approx(0.1 / 1.05)
    assert relative_spread(0.0, 0.0) == 0.0


# --- probes on tiny sizes ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_result():
    return run_profile(ProfileConfig.tiny(), device="cpu", name="tiny-test", progress=False, warn=lambda m: None)


def test_tiny_profile_has_every_figure_and_provenance(tiny_result, tmp_path):
    p = tiny_result.profile
    assert p.source == "measured" and p.device_kind == "cpu" and p.name == "tiny-test"
    assert p.missing == () and not tiny_result.failed
    for name in OPTIONAL_FIGURES:
        assert getattr(p, name) is not None, name
    assert isinstance(p.gpu_matmul_flops_per_s, Curve) and len(p.gpu_matmul_flops_per_s.points) == 2
    assert [x for x, _ in p.h2d_pinned_bytes_per_s.points] == [4096, 65536]
    assert p.device_op_overhead_seconds > 0 and p.cpu_attn_overhead_seconds >= 0
    assert p.cpu_cores >= 1 and p.host_mem_bytes > 0 and p.gpu_mem_reserve_bytes < p.gpu_mem_bytes
    prov = p.provenance
    for key in ("mode", "date", "torch", "cuda", "device", "cpu", "threads", "timing", "transfers",
                "gpu_matmul_flops_per_s", "cpu_attention", "fit.cpu_attention", "data.cpu_attention", "data.matmul",
                "data.memcpy", "device_op_overhead_seconds", "host_mem_bytes", "gpu_mem_reserve_bytes"):
        assert key in prov, key
    assert prov["mode"] == "test" and "memcpy" in prov["transfers"] and "fp32" in prov["gpu_matmul_flops_per_s"]
    fit = json.loads(prov["fit.cpu_attention"])
    assert set(fit) >= {"overhead_seconds", "kv_read_bytes_per_s", "flops_per_s", "rel_rms_residual"}
    rows = json.loads(prov["data.cpu_attention"].split(": ", 1)[1])
    assert len(rows) == 8 and all(len(r) == 6 for r in rows)  # batch, query, context, seconds, spread, residual
    # Round trip through the strict loader: what is written is what the planner reads.
    p.save(tmp_path / "p.yaml")
    assert HardwareProfile.load(tmp_path / "p.yaml") == p


def test_attention_call_is_the_runtimes_attention():
    from specoffload.runtime.kv_cache import KVCache
    from specoffload.runtime.layers import attention

    g = torch.Generator().manual_seed(0)
    cache = KVCache(2, 3, 16, 2, 8)
    for t in cache.k + cache.v:
        t.normal_(generator=g)
    cache.lengths[:] = torch.tensor([5, 9, 2])
    q, k, v = torch.randn(3, 2, 4, 8, generator=g), torch.randn(3, 2, 2, 8, generator=g), torch.randn(3, 2, 2, 8, generator=g)
    out = attention_call(cache, 1, [0, 1, 2], q, k, v)
    kv_len = cache.lengths + 2
    ref = attention(q, cache.k[1][:, :, :11], cache.v[1][:, :, :11], cache.positions([0, 1, 2], 2), kv_len)
    torch.testing.assert_close(out, ref)


def test_default_name_is_machine_derived():
    name = probes.default_name("cpu")
    assert name.startswith(f"cpu-{probes.cpu_cores()}c-")
    assert all(c.isalnum() or c == "-" for c in name)


# --- failures: reported, null, missing, and refused by the planner by name ------------------------
def test_forced_failure_writes_null_and_missing_and_the_planner_names_it(tmp_path, tiny_target_draft):
    seen = []
    res = run_profile(ProfileConfig.tiny(force_fail=frozenset({"cpu_attention"})), device="cpu", name="broken",
                      progress=False, warn=seen.append)
    assert res.failed == {"cpu_attention": "forced to fail (test hook: SPECOFFLOAD_PROFILE_FAIL / force_fail)",
                          "engine_layers": "skipped: it fits on top of cpu_attn_kv_read_bytes_per_s, "
                                           "cpu_attn_flops_per_s, whose probe failed"}
    seen = [m for m in seen if "busy" not in m]  # a load warning may come too on a shared machine
    assert len(seen) == 2 and "probe 'cpu_attention' failed" in seen[0] and "engine_layers" in seen[1]
    assert "cpu_attn_kv_read_bytes_per_s" in seen[0] and "null" in seen[0]
    p = res.profile
    assert p.missing == ("cpu_attn_kv_read_bytes_per_s", "cpu_attn_flops_per_s")
    assert p.cpu_attn_kv_read_bytes_per_s is None and p.cpu_attn_overhead_seconds == 0.0
    assert "failed.cpu_attention" in p.provenance
    path = tmp_path / "broken.yaml"
    p.save(path)
    text = path.read_text()
    assert "cpu_attn_kv_read_bytes_per_s: null" in text
    loaded = HardwareProfile.load(path)
    target, draft = tiny_target_draft
    with pytest.raises(SchemaError, match="'cpu_attn_kv_read_bytes_per_s' is missing"):
        make_plan(loaded, target, draft, WORKLOAD)


def test_a_figure_the_planner_does_not_need_may_be_missing(monkeypatch, tiny_target_draft):
    # On a CPU-only machine the cost model never charges transfers: a failed memcpy probe still plans.
    monkeypatch.setenv(FORCE_FAIL_ENV, "memcpy")
    res = run_profile(ProfileConfig.tiny(), device="cpu", progress=False, warn=lambda m: None)
    assert set(res.profile.missing) == {"h2d_pinned_bytes_per_s", "h2d_pageable_bytes_per_s",
                                        "d2h_pinned_bytes_per_s", "d2h_pageable_bytes_per_s"}
    target, draft = tiny_target_draft
    assert plan_on(res.profile, target, draft).plan.decode_batch >= 1


def test_an_exception_inside_a_probe_is_caught(monkeypatch):
    def boom(self):
        raise RuntimeError("simulated allocator error\nsecond line")

    monkeypatch.setattr(probes.Profiler, "probe_matmul", boom)
    seen = []
    res = run_profile(ProfileConfig.tiny(), device="cpu", progress=False, warn=seen.append)
    assert res.failed["matmul"] == "RuntimeError: simulated allocator error"
    assert set(res.failed) == {"matmul", "engine_layers"} and "skipped" in res.failed["engine_layers"]
    assert res.profile.missing == ("gpu_matmul_flops_per_s",)
    assert any("probe 'matmul' failed: RuntimeError: simulated allocator error" in m for m in seen)


def test_a_required_figure_falls_back_and_says_so():
    seen = []
    # engine_layers would measure the per-layer fixed costs again, in the engine: fail it too to see the fallback.
    failing = frozenset({"host_memory", "device_op_overhead", "engine_layers"})
    res = run_profile(ProfileConfig.tiny(force_fail=failing), device="cpu", progress=False, warn=seen.append)
    p = res.profile
    assert set(res.failed) == failing and p.missing == ()
    assert p.host_mem_bytes > 0 and p.device_op_overhead_seconds == 0.0 and p.device_op_token_seconds == 0.0
    assert p.provenance["host_mem_bytes"].startswith("fallback after probe failure")
    assert "failed" in p.provenance["device_op_overhead_seconds"]
    assert "did not run" in p.provenance["device_op_token_seconds"]
    assert any("host_mem_bytes" in m and "fallback" in m for m in seen)


def test_samples_are_taken_in_rounds_over_the_points():
    calls = []
    cfg = ProfileConfig.tiny(reps=3, warmup=1, min_sample_s=0.0)
    stats = probes.measure_many([lambda: calls.append("a"), lambda: calls.append("b")], probes.Clock(torch.device("cpu")),
                                cfg)
    # a: warm-up + calibration, b: the same, then three rounds of one sample each
    assert "".join(calls) == "aabb" + "ab" * 3
    assert len(stats) == 2 and all(len(s.samples) == 3 and s.inner == 1 for s in stats)


def test_unknown_forced_probe_is_an_error():
    with pytest.raises(probes.ProbeFailure, match="unknown probe"):
        run_profile(ProfileConfig.tiny(force_fail=frozenset({"nope"})), device="cpu", progress=False)


# --- the planner and the simulator consume the measured profile as written ------------------------
@pytest.fixture(scope="module")
def tiny_target_draft(tmp_path_factory):
    """The shipped pair's specs; if its assets are not there, the same shapes from a config.json written here."""
    try:
        return load_model_spec("tiny-target"), load_model_spec("tiny-draft")
    except SchemaError:
        d = tmp_path_factory.mktemp("pair")
        t = {"architectures": ["MixtralForCausalLM"], "hidden_size": 128, "num_attention_heads": 8,
             "num_key_value_heads": 2, "num_hidden_layers": 4, "intermediate_size": 256, "num_local_experts": 8,
             "num_experts_per_tok": 2, "vocab_size": 4096, "max_position_embeddings": 1024}
        dr = {"architectures": ["MistralForCausalLM"], "hidden_size": 128, "num_attention_heads": 8,
              "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 384, "vocab_size": 4096,
              "max_position_embeddings": 1024}
        (d / "target.json").write_text(json.dumps(t))
        (d / "draft.json").write_text(json.dumps(dr))
        return load_model_spec(str(d / "target.json")), load_model_spec(str(d / "draft.json"))


def test_planner_and_simulator_run_on_the_written_profile(tiny_result, tmp_path, tiny_target_draft):
    path = tmp_path / "cpu-test.yaml"
    tiny_result.profile.save(path)
    profile = HardwareProfile.load(path)
    target, draft = tiny_target_draft
    result = plan_on(profile, target, draft)
    plan = result.plan
    assert plan.profile == "tiny-test" and plan.prediction.throughput_tokens_per_s > 0
    try:
        from specoffload.planner.sim import simulate
    except ImportError:
        pytest.skip("specoffload.planner.sim is not there yet")
    sim = simulate(plan, profile)
    assert sim.ok, sim.problems
    assert sim.report is not None


def test_committed_cpu_profile_loads_and_plans(tiny_target_draft):
    from specoffload.planner.schema import profiles_dir

    shipped = sorted(profiles_dir().glob("cpu-*.yaml"))
    if not shipped:
        pytest.skip("no measured cpu-*.yaml profile committed yet")
    target, draft = tiny_target_draft
    for path in shipped:
        p = HardwareProfile.load(path)
        assert p.source == "measured" and p.device_kind == "cpu" and not p.missing
        assert plan_on(p, target, draft).plan.decode_batch >= 1


# --- the CLI -------------------------------------------------------------------------------------
@pytest.fixture
def tiny_modes(monkeypatch):
    """Make --quick and full mode use the tiny test sizes (the CLI's own code path otherwise)."""
    def tiny(cls=None, **kw):
        kw.pop("model", None)
        return ProfileConfig.tiny(**kw)

    monkeypatch.setattr(ProfileConfig, "quick", classmethod(lambda cls, **kw: tiny(**kw)))
    monkeypatch.setattr(ProfileConfig, "full", classmethod(lambda cls, **kw: tiny(**kw)))


def test_cli_writes_profile_with_forced_failure(tiny_modes, tmp_path, capsys):
    out = tmp_path / "profiles" / "cpu-cli.yaml"
    rc = profile_cli.main(["--quick", "-o", str(out), "--no-progress", "--device", "cpu", "--force-fail", "matmul"])
    assert rc == 0
    cap = capsys.readouterr()
    assert "probe 'matmul' failed: forced to fail" in cap.err
    assert f"wrote {out}" in cap.out and "MISSING: gpu_matmul_flops_per_s" in cap.out
    p = HardwareProfile.load(out)
    assert p.name == "cpu-cli" and p.missing == ("gpu_matmul_flops_per_s",)


def test_cli_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        profile_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "specoffload-profile --quick -o my-machine.yaml" in text and "profiles/" not in text
    assert "--acceptance --target tiny-target --draft tiny-draft" in text
    assert "--force-fail" not in text  # the test hook stays out of the help


def test_cli_argument_errors(capsys):
    with pytest.raises(SystemExit):
        profile_cli.main(["--acceptance", "--target", "tiny-target"])
    assert "--acceptance needs --draft, --prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        profile_cli.main(["--prompts", "x.jsonl"])
    assert "go with --acceptance" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "specoffload-profile"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "usage: specoffload-profile" in out.stdout


def test_all_probe_names_are_known():
    names = {p.name for p in probes.Profiler(ProfileConfig.tiny(), "cpu", progress=False).probes()}
    assert names <= set(ALL_PROBES)


# --- CUDA ----------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_profile_measures_every_figure(tmp_path):
    res = run_profile(ProfileConfig.tiny(gpu_alloc_chunk_bytes=1 << 30, gpu_alloc_min_chunk_bytes=256 << 20),
                      device="cuda", progress=False)
    p = res.profile
    assert not res.failed, res.failed
    assert p.device_kind == "cuda" and not p.missing
    assert p.h2d_pinned_bytes_per_s is not p.h2d_pageable_bytes_per_s  # measured separately on CUDA
    assert 0 < p.gpu_mem_reserve_bytes < p.gpu_mem_bytes <= torch.cuda.get_device_properties(0).total_memory
    assert "bf16" in p.provenance["gpu_matmul_flops_per_s"]
    p.save(tmp_path / "cuda.yaml")
    assert HardwareProfile.load(tmp_path / "cuda.yaml") == p


@pytest.mark.gpu
def test_cuda_forced_transfer_failure():
    res = run_profile(ProfileConfig.tiny(force_fail=frozenset({"h2d_pageable"})), device="cuda", progress=False,
                      warn=lambda m: None)
    assert res.profile.missing == ("h2d_pageable_bytes_per_s",)


def test_attention_fit_recovers_per_sequence_and_per_row_costs():
    spec = load_model_spec("mixtral-8x7b")
    pts = []
    for b in (1, 4, 16, 64):
        for q in (1, 5, 9):
            for ctx in (16, 64, 512):
                kv, fl = attention_workload(spec, b, q, ctx)
                t = 2e-4 + b * (3e-6 + q * 1e-6) + kv / 4e9 + fl / 60e9
                pts.append(AttentionPoint(b, q, ctx, kv, fl, t))
    fit = fit_attention(pts)
    assert fit.seq_seconds == pytest.approx(3e-6, rel=1e-4) and fit.row_seconds == pytest.approx(1e-6, rel=1e-4)
    assert fit.overhead_seconds == pytest.approx(2e-4, rel=1e-4) and fit.rel_max_residual < 1e-6
    assert fit.predict(*attention_workload(spec, 32, 3, 100), batch=32, query=3) == pytest.approx(
        2e-4 + 32 * (3e-6 + 3e-6) + attention_workload(spec, 32, 3, 100)[0] / 4e9
        + attention_workload(spec, 32, 3, 100)[1] / 60e9, rel=1e-4)


# --- the in-engine fit ------------------------------------------------------------------------------
def test_excess_fit_recovers_fixed_costs_on_top_of_a_known_part():
    rng = np.random.default_rng(0)
    tokens = np.array([1, 2, 4, 8, 16, 32, 64, 128, 256], dtype=float)
    experts = np.minimum(8.0, 2.0 * tokens)
    known = 1e-6 * tokens ** 1.2  # e.g. matmuls at the measured rate
    truth = (3e-4, 4e-6, 5e-5)
    cols = np.stack([np.ones_like(tokens), tokens, experts], axis=1)
    t = known + cols @ np.array(truth)
    fit = fit_excess(t, known, cols)
    assert fit.coef == pytest.approx(truth, rel=1e-6) and fit.rel_max_residual < 1e-9
    noisy = fit_excess(t * (1 + 0.02 * rng.standard_normal(t.size)), known, cols)
    assert noisy.rel_rms_residual < 0.05 and noisy.coef[0] == pytest.approx(truth[0], rel=0.3)
    # A cost the data does not show stays at zero rather than going negative.
    assert fit_excess(known + 3e-4, known, cols).coef == pytest.approx((3e-4, 0.0, 0.0), abs=1e-12)


def test_excess_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="3 points cannot fit 3 terms"):
        fit_excess([1.0, 2.0, 3.0], [0.0] * 3, [[1, 1, 1]] * 3)
    with pytest.raises(ValueError, match="positive"):
        fit_excess([1.0, -2.0, 3.0], [0.0] * 3, [[1], [2], [3]])
    with pytest.raises(ValueError, match="one row of columns"):
        fit_excess([1.0, 2.0, 3.0], [0.0] * 3, [[1], [2]])


def test_engine_layers_probe_fits_inside_the_engine(tiny_result):
    p = tiny_result.profile
    prov = p.provenance
    assert "engine_layers" in prov and "Values replaced" in prov["engine_layers"]
    data = prov["data.engine_layers"]
    assert data.startswith("target passes [batch, query") and "draft steps" in data and "runs [batch" in data
    # Every figure the in-engine fit writes is there, nonnegative, and the engine's bookkeeping is seen.
    for f in ("device_op_token_seconds", "device_logit_element_seconds", "engine_draft_round_overhead_seconds",
              "engine_draft_seq_overhead_seconds", "engine_draft_step_overhead_seconds"):
        assert getattr(p, f) >= 0.0
    assert p.engine_pass_overhead_seconds + p.engine_seq_overhead_seconds > 0
    assert p.device_op_overhead_seconds + p.device_op_token_seconds > 0


def test_engine_layers_probe_is_skipped_on_a_reference_too_big_for_the_budget():
    res = run_profile(ProfileConfig.tiny(engine_max_bytes=1024), device="cpu", progress=False, warn=lambda m: None)
    assert "engine_layers" in res.failed and "in-engine budget" in res.failed["engine_layers"]
    assert res.profile.device_op_token_seconds == 0.0  # the micro-benchmark figures stand
    res = run_profile(ProfileConfig.tiny(engine_draft_lens=(0,)), device="cpu", progress=False, warn=lambda m: None)
    assert "cannot fit the 6 bookkeeping terms" in res.failed["engine_layers"]
