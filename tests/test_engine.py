"""The offload engine: exactness of speculative decoding (greedy and sampling), schedules, refill."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specoffload.planner.schema import Plan, Prediction, Workload
from specoffload.runtime.engine import Engine, EngineError, Request
from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer
from specoffload.runtime.verify import AcceptanceStats, greedy_accept, sampling_accept

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self, value", "for i in range(10):\n",
         "# comment\n", "x = [1, 2, 3]\nprint(", "while True:\n    if", "try:\n    import numpy as np\nexcept"]
MAX_NEW = 24
PRED = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)


def make_plan(policy="interleaved", batch=2, k=3, micro=1, draft_kv="gpu", sub=1, prefill=2) -> Plan:
    return Plan(policy=policy, model="tiny-target", model_fingerprint="", draft="tiny-draft" if k else "",
                draft_fingerprint="", profile="cpu", profile_fingerprint="",
                workload=Workload(prompt_len_tokens=8, gen_len_tokens=MAX_NEW, num_prompts=8, max_prompt_len_tokens=64),
                decode_batch=batch, num_batches=2 if policy == "interleaved" else 1, prefill_batch=prefill,
                draft_sub_batch=sub, draft_len=k, micro_batches=micro, gpu_attn_layers=0, gpu_ffn_layers=0,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv=draft_kv, weight_buffers=2, prediction=PRED)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair_paths()


@pytest.fixture(scope="module")
def prompts():
    tok = tiny_pair_tokenizer()
    return [tok.encode(t).ids for t in TEXTS]


@pytest.fixture(scope="module")
def reference(pair, prompts):
    """transformers' own greedy generate (fp32), one unpadded prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                             pad_token_id=model.config.eos_token_id)
        out.append(gen[0, len(p):].tolist())
    return out


def expected(ref: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    out = []
    for t in ref[:max_tokens]:
        out.append(t)
        if t in eos:
            break
    return out


def run_engine(plan, pair, requests):
    eng = Engine(plan, pair[0], pair[1])
    outs = {}
    stats = eng.run(requests, lambda f: outs.__setitem__(f.request.id, (f.tokens, f.finish_reason)))
    return eng, outs, stats


SCHEDULES = st.one_of(
    st.tuples(st.just("offload-only"), st.just(0), st.just("gpu"), st.just(1)),
    st.tuples(st.sampled_from(["serial-spec", "interleaved"]), st.integers(1, 5),
              st.sampled_from(["gpu", "host", "recompute"]), st.integers(1, 3)),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schedule=SCHEDULES, batch=st.integers(1, 4), micro=st.integers(1, 3), prefill=st.integers(1, 4),
       which=st.lists(st.integers(0, len(TEXTS) - 1), min_size=1, max_size=7),
       lengths=st.lists(st.integers(1, MAX_NEW), min_size=7, max_size=7))
def test_greedy_speculative_equals_target_greedy(pair, prompts, reference, schedule, batch, micro, prefill, which,
                                                  lengths):
    policy, k, kv, sub = schedule
    plan = make_plan(policy, batch, k, min(micro, batch), kv, sub, prefill)
    reqs = [Request(f"r{i}", prompts[w], lengths[i]) for i, w in enumerate(which)]  # more requests than slots: refill
    eng, outs, stats = run_engine(plan, pair, reqs)
    for i, w in enumerate(which):
        tokens, reason = outs[f"r{i}"]
        assert tokens == expected(reference[w], lengths[i], eng.eos), (policy, k, kv, i)
        assert len(tokens) <= lengths[i]
        assert reason == ("eos" if tokens[-1] in eng.eos else "length")
    assert stats.generated_tokens == sum(len(outs[f"r{i}"][0]) for i in range(len(which)))


def test_every_schedule_and_draft_mode_is_exact_and_accepts(pair, prompts, reference):
    reqs = [Request(str(i), p, MAX_NEW) for i, p in enumerate(prompts)]
    for policy, kv in (("serial-spec", "gpu"), ("interleaved", "host"), ("interleaved", "recompute"),
                       ("offload-only", "gpu")):
        plan = make_plan(policy, 3, 0 if policy == "offload-only" else 4, 2, kv, 2, 3)
        eng, outs, stats = run_engine(plan, pair, reqs)
        for i in range(len(prompts)):
            assert outs[str(i)][0] == expected(reference[i], MAX_NEW, eng.eos)
        if plan.draft_len:
            acc = stats.acceptance.per_position()
            assert len(acc) == 4 and acc[0] > 0.3  # the shipped draft is useful
            assert 1.0 < stats.acceptance.mean_tokens_per_round <= 5.0


def test_bad_requests_are_refused_by_name(pair):
    eng = Engine(make_plan("serial-spec"), pair[0], pair[1])
    with pytest.raises(EngineError, match="request 'long'.*exceeds the model's context"):
        eng.check(Request("long", [5] * (eng.model_len - 3), 8))
    # Within the model but beyond the plan's workload: the KV cache was sized for the plan.
    assert eng.max_len == 64 + MAX_NEW + 3 + 1 < eng.model_len
    with pytest.raises(EngineError, match="request 'p'.*KV cache.*prompts up to 64 tokens.*re-plan"):
        eng.check(Request("p", [5] * 65, MAX_NEW))
    eng.check(Request("ok", [5] * 64, MAX_NEW))
    with pytest.raises(EngineError, match="request 'e': empty prompt"):
        eng.check(Request("e", [], 4))


def test_plan_without_draft_model_is_an_error(pair):
    with pytest.raises(EngineError, match="no draft model"):
        Engine(make_plan("serial-spec"), pair[0], None)


# --- verification rules --------------------------------------------------------------------------
def test_greedy_accept_prefix_and_bonus():
    V = 6
    logits = torch.full((2, 4, V), -10.0)
    # row 0: target wants 1, 2, 3, then 5 -> drafts [1, 2, 4] accept 2, next = 3
    for i, t in enumerate([1, 2, 3, 5]):
        logits[0, i, t] = 1.0
    # row 1: all three drafts match; bonus token 0
    for i, t in enumerate([4, 4, 4, 0]):
        logits[1, i, t] = 1.0
    n, nxt = greedy_accept(torch.tensor([[1, 2, 4], [4, 4, 4]]), logits)
    assert n.tolist() == [2, 3] and nxt.tolist() == [3, 0]


def test_acceptance_stats_per_position():
    st_ = AcceptanceStats()
    st_.record(torch.tensor([0, 2, 3, 1]), 3)
    # position 1 tried 4x accepted 3x; position 2 tried 3x accepted 2x; position 3 tried 2x accepted 1x
    assert st_.per_position() == [0.75, 2 / 3, 0.5]
    assert st_.mean_tokens_per_round == pytest.approx((1 + 3 + 4 + 2) / 4)


def test_sampling_accept_preserves_target_distribution():
    """Monte Carlo on a 4-token vocabulary: the committed first token follows p exactly."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q = torch.tensor([0.4, 0.3, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)
    n = 40000
    counts = torch.zeros(4)
    for _ in range(n):
        d = torch.multinomial(q, 1, generator=g)
        _, nxt = sampling_accept(d.view(1, 1), q.view(1, 1, 4), torch.stack([p, p]).view(1, 2, 4), [g])
        n_acc = int(_[0])
        first = int(d) if n_acc == 1 else int(nxt[0])
        counts[first] += 1
    from scipy.stats import chisquare

    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    # and the draft's own distribution would be rejected by the same test
    assert chisquare(counts.numpy(), (q * n).numpy()).pvalue < 1e-6


@pytest.mark.parametrize("p,expect", [(1.0, 4.0), (0.0, 1.0)])
def test_synthetic_acceptance_timing_mode(pair, prompts, p, expect):
    """Random-weight timing runs force acceptance: every draft token kept (p=1) or none (p=0)."""
    eng = Engine(make_plan("serial-spec", 4, 3, 1), pair[0], pair[1], synthetic_acceptance=p)
    eng.eos = set()
    eng.run([Request(str(i), q, 13) for i, q in enumerate(prompts[:4])], lambda f: None)
    assert eng.stats.acceptance.mean_tokens_per_round == pytest.approx(expect)


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu(tmp_path):
    """tools/gpu_check.py end to end at tiny shapes on the CPU (the GPU run's code path)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "tools" / "gpu_check.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path), "--prompts", "8", "--prompt-len", "16", "--gen-len", "4",
                           "--hf-prompts", "2", "--layers", "2", "--draft-layers", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "gpu_check.txt").read_text()
    assert all(line.startswith("[timing mode") for line in text.splitlines())
    assert "serial-spec -> serial-spec" in text and "ratio" in text


def test_timeline_records_every_forward_with_its_shape(pair, prompts):
    # The profiler fits its in-engine figures from these records: shapes and spans must be right.
    plan = make_plan("serial-spec", batch=4, k=2, prefill=4)
    eng = Engine(plan, pair[0], pair[1], trace=True)
    eng.run([Request(str(i), p, 6) for i, p in enumerate(prompts)], lambda f: None)
    recs = eng.timeline.passes
    target = [r for r in recs if r.model == "target" and not r.prefill]
    prefill = [r for r in recs if r.model == "target" and r.prefill]
    steps = [r for r in recs if r.model == "draft" and not r.prefill]
    assert len(target) == eng.stats.slots and len(prefill) == eng.stats.prefill_passes == 2
    assert all(r.query == 3 and 1 <= r.batch <= 4 and r.keys > r.query and r.end > r.start for r in target)
    assert [r.query for r in prefill] == [max(len(p) for p in prompts[:4]), max(len(p) for p in prompts[4:])]
    assert len(steps) == 2 * eng.stats.slots and {r.query for r in steps} <= {1, 2}
    assert sum(r.prefill for r in recs if r.model == "draft") == 2
    # The verification windows hold their target pass.
    for (start, end), r in zip(eng.stats.slot_windows, target):
        assert start - eng.timeline.t0 <= r.start < r.end <= end - eng.timeline.t0
