"""Track and span names come from one module: the engine writes them, the profiler's fit selects by them."""
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from specoffload.planner import trace_names as names  # noqa: E402
from specoffload.runtime.engine import Engine, Request  # noqa: E402
from specoffload.runtime.profiler import in_engine  # noqa: E402
from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer  # noqa: E402

from test_engine import TEXTS, make_plan  # noqa: E402

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"


def kind_of(span: str) -> str:
    """'qkv L3 mb1' -> 'qkv'; 'draft step 2' -> 'draft step'; 'lm_head' -> 'lm_head'."""
    return re.sub(r"( L\d+)?( mb\d+)?( \d+)?$", "", span)


@pytest.fixture(scope="module")
def spans():
    target, draft = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    eng = Engine(make_plan("interleaved", batch=2, k=3, micro=2), target, draft, device="cpu", trace=True)
    eng.run([Request(str(i), tok.encode(t).ids, 6) for i, t in enumerate(TEXTS[:4])], lambda f: None)
    return eng.timeline.spans


def test_every_span_the_fit_selects_is_one_the_engine_emits(spans):
    emitted = {name for _, name, _, _ in spans}
    for prefix in names.FIT_LAYER_PREFIXES + names.FIT_ATTN_PREFIXES:
        assert any(n.startswith(prefix) for n in emitted), f"the fit selects {prefix!r}; the engine wrote none"
    layer, attn = in_engine.layer_and_attention_seconds(spans)
    assert layer > 0 and attn > 0


def test_the_engine_writes_only_declared_tracks_and_span_kinds(spans):
    assert {track for track, _, _, _ in spans} <= set(names.TRACKS.values())
    assert {kind_of(name) for _, name, _, _ in spans} <= set(names.ENGINE_SPANS)


def test_the_fit_selects_by_the_shared_prefixes():
    # A kind renamed in trace_names changes what the engine writes and what the fit selects alike.
    assert in_engine.FIT_LAYER_PREFIXES is names.FIT_LAYER_PREFIXES
    assert in_engine.FIT_ATTN_PREFIXES is names.FIT_ATTN_PREFIXES
    assert names.FIT_LAYER_PREFIXES == (names.layer_prefix(names.SPAN_QKV), names.layer_prefix(names.SPAN_FFN))
    spans = [("gpu", names.slice_name(names.SPAN_QKV, 0, 0), 0.0, 1.0),
             ("gpu", names.slice_name(names.SPAN_FFN, 0, 0), 1.0, 3.0),
             ("cpu-attn", names.slice_name(names.SPAN_ATTN, 0), 3.0, 7.0),
             ("cpu-attn", names.slice_name(names.SPAN_DRAFT_ATTN, 0), 7.0, 15.0),
             ("gpu", names.SPAN_LM_HEAD, 15.0, 31.0)]
    assert in_engine.layer_and_attention_seconds(spans) == (3.0, 4.0)


def test_no_track_or_span_name_is_written_by_hand_in_the_runtime():
    literal = re.compile(r"""\.add\(\s*["']|startswith\(\(?\s*["'](qkv|ffn|attn) L""")
    offenders = [f"{p.relative_to(RUNTIME)}:{i}" for p in RUNTIME.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, f"track/span names written as literals (use planner/trace_names.py): {offenders}"


SIM = Path(__file__).resolve().parents[1] / "planner" / "sim"
PLAN = dict(policy="interleaved", batch=2, k=3, micro=2)


def simulated_slices(plan):
    import dataclasses

    from specoffload.planner.models import load_model_spec
    from specoffload.planner.sim import SimOptions, simulate

    plan = dataclasses.replace(plan, profile="cpu-2core", model_fingerprint=load_model_spec(plan.model).fingerprint,
                               draft_fingerprint=load_model_spec(plan.draft).fingerprint)
    res = simulate(plan, "cpu-2core", SimOptions(trace=True, trace_slots=1000))
    assert res.ok, res.problems
    data = res.trace.to_json()
    tracks = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    return {(tracks[e["tid"]], e["name"]) for e in data["traceEvents"] if e["ph"] == "X"}


def test_the_simulator_names_its_tasks_as_the_engine_names_its_spans(spans):
    """The same small plan, simulated and run: the simulator's task kinds are the engine's span kinds
    (those it models more coarsely stand for the engine's, as SIM_COVERS declares), on the same tracks."""
    sim = simulated_slices(make_plan(**PLAN))
    sim_kinds = {names.span_kind(n) for _, n in sim}
    eng_kinds = {names.span_kind(n) for _, n, _, _ in spans}
    assert sim_kinds <= set(names.SIM_SPANS)
    assert names.engine_kinds(sim_kinds) == eng_kinds
    direct = sim_kinds - set(names.SIM_COVERS)
    assert direct and direct <= eng_kinds
    sim_tracks = {(t, names.span_kind(n)) for t, n in sim if names.span_kind(n) in direct}
    eng_tracks = {(t, names.span_kind(n)) for t, n, _, _ in spans if names.span_kind(n) in direct}
    assert sim_tracks == eng_tracks
    # Per-layer names read the same: the simulator's 'qkv L3 mb1 B0' is the engine's 'qkv L3 mb1' and its batch.
    assert {n.rsplit(" B", 1)[0] for t, n in sim if names.span_kind(n) == names.SPAN_QKV} == \
        {n for t, n, _, _ in spans if names.span_kind(n) == names.SPAN_QKV}


def test_span_kind():
    assert names.span_kind("qkv L3 mb1 B0") == "qkv" and names.span_kind("draft step 2") == "draft step"
    assert names.span_kind("lm_head B1") == "lm_head" and names.span_kind("draft attn L0") == "draft attn"
    assert names.span_kind("weights L12") == "weights" and names.span_kind("attn-out") == "attn-out"


def test_no_task_kind_is_written_by_hand_in_the_simulator():
    # Tasks that run on a resource (traced) take their kind from trace_names; joins (no resource) may not.
    literal = re.compile(r"""Task\(\s*["'][^"']*["']\s*,\s*["']""")
    offenders = [f"{p.name}:{i}" for p in SIM.glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert not offenders, f"simulator task kinds written as literals (use planner/trace_names.py): {offenders}"
