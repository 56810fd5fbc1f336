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
