"""Property tests: whatever bytes or JSON a user's file holds, the readers answer with the project's own
clear error types (naming the file), never a traceback from somewhere else."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specoffload.planner.schema import HardwareProfile, Plan, Workload, load_profile
from specoffload.planner.sim import Report
from specoffload.planner.strict import SchemaError, load_yaml, to_plain
from specoffload.runtime.outputs import OUTPUT_KEYS, OutputFileError, scan
from specoffload.runtime.prompts import FIELDS, PromptFileError, read_prompts

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
CONTRACTS = (HardwareProfile, Workload, Plan, Report)


def _tmp(data: bytes, suffix: str) -> Path:
    fh = tempfile.NamedTemporaryFile(delete=False, suffix=suffix)
    fh.write(data)
    fh.close()
    return Path(fh.name)


def _reference(cls):
    """A valid instance of each contract, as plain data (from the shipped files)."""
    from specoffload.planner.cli import main as plan_main

    if cls is HardwareProfile:
        return to_plain(load_profile("t4"))
    d = Path(tempfile.mkdtemp())
    plan_main(["--model", "tiny-target", "--draft", "tiny-draft", "--profile", "t4", "--prompt-len", "8",
               "--gen-len", "8", "--num-prompts", "4", "-o", str(d / "plan.yaml")])
    plan = Plan.load(d / "plan.yaml")
    if cls is Plan:
        return to_plain(plan)
    if cls is Workload:
        return to_plain(plan.workload)
    from specoffload.planner.sim import simulate

    return to_plain(simulate(plan, "t4").report)


REFERENCES = {}


def reference(cls):
    if cls not in REFERENCES:
        REFERENCES[cls] = _reference(cls)
    return REFERENCES[cls]


# ---------------------------------------------------------------------------------------------
# JSONL prompt reader
# ---------------------------------------------------------------------------------------------

def _read(data: bytes):
    p = _tmp(data, ".jsonl")
    try:
        return read_prompts(p, require_id=True)
    except PromptFileError as exc:
        assert str(p) in str(exc)
        return None
    finally:
        p.unlink()


@SETTINGS
@given(st.binary(max_size=300))
def test_prompt_reader_on_arbitrary_bytes(data):
    _read(data)


@SETTINGS
@given(st.lists(json_values, min_size=1, max_size=4))
def test_prompt_reader_on_arbitrary_json_lines(values):
    _read("\n".join(json.dumps(v) for v in values).encode())


@SETTINGS
@given(st.lists(st.fixed_dictionaries({"id": json_values, "prompt": json_values},
                                      optional={k: json_values for k in FIELDS if k not in ("id", "prompt")}),
                min_size=1, max_size=3))
def test_prompt_reader_on_prompt_shaped_objects(objs):
    got = _read("\n".join(json.dumps(o) for o in objs).encode())
    if got is not None:  # accepted: every value is of its documented type
        for p in got:
            assert isinstance(p.id, str) and (p.text is None) != (p.messages is None)
            assert p.text is None or (isinstance(p.text, str) and p.text.encode("utf-8"))
            assert p.max_tokens is None or (type(p.max_tokens) is int and p.max_tokens >= 1)
            assert p.temperature is None or p.temperature >= 0
            assert p.top_p is None or 0 < p.top_p <= 1
            assert p.seed is None or type(p.seed) is int


# ---------------------------------------------------------------------------------------------
# JSONL output reader (resume)
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=300))
def test_output_reader_on_arbitrary_bytes(data):
    try:
        done, keep = scan(Path("out.jsonl"), data)
    except OutputFileError as exc:
        assert "out.jsonl" in str(exc)
        return
    assert 0 <= keep <= len(data) and (keep == len(data) or b"\n" not in data[keep:])


@SETTINGS
@given(st.lists(json_values, max_size=4), st.binary(max_size=40))
def test_output_reader_on_arbitrary_json_lines(values, tail):
    data = "".join(json.dumps(v) + "\n" for v in values).encode() + tail
    try:
        scan(Path("out.jsonl"), data)
    except OutputFileError:
        pass


@SETTINGS
@given(st.lists(st.text(max_size=6), unique=True, max_size=5), st.integers(0, 200))
def test_output_reader_keeps_every_whole_line_and_drops_only_a_torn_one(ids, cut):
    lines = [json.dumps({"id": i, "text": "x", "tokens": [1], "num_tokens": 1, "prompt_tokens": 2,
                         "finish_reason": "stop", "stop_reason": None,
                         "usage": {"prompt_tokens": 2, "completion_tokens": 1}}).encode() + b"\n" for i in ids]
    whole = b"".join(lines[:-1]) if lines else b""
    torn = lines[-1][:min(cut, len(lines[-1]) - 1)] if lines else b""
    done, keep = scan(Path("out.jsonl"), whole + torn)
    assert done == set(ids[:-1]) and keep == len(whole)
    assert list(json.loads(lines[0]) if lines else OUTPUT_KEYS) == list(OUTPUT_KEYS)


# ---------------------------------------------------------------------------------------------
# YAML contracts
# ---------------------------------------------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(CONTRACTS))
def test_yaml_contracts_on_arbitrary_bytes(data, cls):
    p = _tmp(data, ".yaml")
    try:
        cls.from_dict(load_yaml(p), str(p))
    except SchemaError as exc:
        assert str(p) in str(exc) or "key" in str(exc)
    finally:
        p.unlink()


@SETTINGS
@given(json_values, st.sampled_from(CONTRACTS))
def test_yaml_contracts_on_arbitrary_json(value, cls):
    try:
        cls.from_dict(value, "f.yaml")
    except SchemaError:
        pass


@SETTINGS
@given(st.sampled_from(CONTRACTS), st.data())
def test_yaml_contracts_with_one_value_replaced(cls, data):
    """A valid file with one key (at any depth) set to arbitrary JSON: loaded, or a SchemaError."""
    doc = json.loads(json.dumps(reference(cls)))
    node = doc
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        node[key] = data.draw(json_values)
        break
    try:
        cls.from_dict(doc, "f.yaml")
    except SchemaError:
        pass
