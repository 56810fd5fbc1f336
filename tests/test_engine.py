"""The offload engine: exactness of speculative decoding (greedy and sampling), schedules, refill."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from specoffload.planner.schema import Plan, Prediction, Workload
from specoffload.runtime.engine import Engine, EngineError, Request
from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer
from specoffload.planner.acceptance import AcceptanceCounts
from specoffload.runtime.verify import greedy_accept, sampling_accept

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
    st.tuples(st.sampled_from(["serial-spec", "interleaved"]), st.integers(1, 6),
              st.sampled_from(["gpu", "host", "recompute"]), st.integers(1, 3)),
)
SEVEN = [0, 1, 2, 3, 4, 5, 6]


def _case(schedule, batch, micro=1, prefill=2, which=SEVEN, lengths=(MAX_NEW,) * 7, eos_at=None):
    return dict(schedule=schedule, batch=batch, micro=micro, prefill=prefill, which=which, lengths=list(lengths),
                eos_at=eos_at)


# Cases that always run (the draws below add more): every schedule and draft-KV mode, draft lengths 1
# and 6 at both ends, batches smaller than the request list (refill), lengths long enough to verify
# many rounds, and a chosen EOS token that the greedy continuation really produces.
ALWAYS = [
    _case(("offload-only", 0, "gpu", 1), 2, lengths=(MAX_NEW, 3, 7, MAX_NEW, 2, 9, 5)),
    _case(("serial-spec", 1, "gpu", 1), 2, lengths=(MAX_NEW, 3, 7, MAX_NEW, 2, 9, 5)),
    _case(("serial-spec", 6, "host", 2), 3, micro=2, eos_at=9),
    _case(("serial-spec", 4, "recompute", 2), 2, prefill=1, eos_at=4),
    _case(("interleaved", 6, "gpu", 1), 2, micro=2, eos_at=12),
    _case(("interleaved", 1, "host", 1), 1, lengths=(MAX_NEW, 2, 11, 4, MAX_NEW, 6, 3)),
    _case(("interleaved", 3, "recompute", 3), 3, micro=3, prefill=3, eos_at=6),
]


def _always(f):
    for c in reversed(ALWAYS):
        f = example(**c)(f)
    return f


@_always
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(schedule=SCHEDULES, batch=st.integers(1, 4), micro=st.integers(1, 3), prefill=st.integers(1, 4),
       which=st.lists(st.integers(0, len(TEXTS) - 1), min_size=5, max_size=7),
       lengths=st.lists(st.integers(2, MAX_NEW), min_size=7, max_size=7),
       eos_at=st.one_of(st.none(), st.integers(0, MAX_NEW - 1)))
def test_greedy_speculative_equals_target_greedy(pair, prompts, reference, schedule, batch, micro, prefill, which,
                                                  lengths, eos_at):
    """max_tokens >= 2: the first token comes from the prefill, the rest from verification rounds. With
    eos_at set, the token the first request's greedy continuation has there is made the EOS token: every
    sequence must stop right after its first occurrence (inside an accepted draft run, too)."""
    policy, k, kv, sub = schedule
    plan = make_plan(policy, batch, k, min(micro, batch), kv, sub, prefill)
    reqs = [Request(f"r{i}", prompts[w], lengths[i]) for i, w in enumerate(which)]  # more requests than slots: refill
    eng = Engine(plan, pair[0], pair[1])
    if eos_at is not None:
        eng.eos = {reference[which[0]][eos_at]}
    outs = {}
    stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, (f.tokens, f.finish_reason)))
    for i, w in enumerate(which):
        tokens, reason = outs[f"r{i}"]
        assert tokens == expected(reference[w], lengths[i], eng.eos), (policy, k, kv, i)
        assert len(tokens) <= lengths[i]
        assert reason == ("stop" if tokens[-1] in eng.eos else "length")
    if eos_at is not None:  # the chosen EOS really occurred, in the first request at least
        assert outs["r0"][1] == "stop" or lengths[0] <= reference[which[0]].index(reference[which[0]][eos_at])
    assert stats.generated_tokens == sum(len(outs[f"r{i}"][0]) for i in range(len(which)))


def test_eos_inside_an_accepted_draft_run_stops_the_sequence(pair, prompts, reference):
    """EOS chosen as a token the greedy continuations produce mid-run: with k=5 and the shipped draft's
    acceptance, verification rounds accept runs that contain it; nothing after it is committed."""
    counts: dict[int, int] = {}
    for ref in reference:
        for t in set(ref[2:]):
            counts[t] = counts.get(t, 0) + 1
    eos = max(counts, key=lambda t: (counts[t], -t))  # a token most continuations reach
    reqs = [Request(str(i), p, MAX_NEW) for i, p in enumerate(prompts)]
    for policy, kv in (("serial-spec", "gpu"), ("interleaved", "host")):
        eng = Engine(make_plan(policy, 3, 5, 1, kv, 2, 3), pair[0], pair[1])
        eng.eos = {eos}
        outs = {}
        eng.run(reqs, lambda f: outs.__setitem__(f.request.id, (f.tokens, f.finish_reason)))
        stopped = 0
        for i in range(len(prompts)):
            want = expected(reference[i], MAX_NEW, {eos})
            assert outs[str(i)][0] == want, (policy, i)
            if eos in reference[i]:
                assert outs[str(i)] == (want, "stop") and want[-1] == eos and eos not in want[:-1]
                stopped += 1
        assert stopped >= 2


def test_draft_kv_is_rolled_back_to_what_a_fresh_recompute_sees(pair, prompts):
    """The draft's KV after a rejection must be exactly the committed context: per-position acceptance with
    a persistent draft KV (on the GPU or the host) equals the recompute mode's, which re-reads the whole
    context every round. A stale KV entry changes the draft's proposals and so these counts."""
    reqs = [Request(str(i), p, MAX_NEW) for i, p in enumerate(prompts[:5])]
    for policy, k, kv in (("serial-spec", 2, "gpu"), ("interleaved", 5, "host")):
        seen = {}
        for mode in ("recompute", kv):
            eng = Engine(make_plan(policy, 3, k, 1, mode, 2, 3), pair[0], pair[1])
            eng.run(reqs, lambda f: None)
            acc = eng.stats.acceptance
            seen[mode] = (acc.tried, acc.accepted)
        assert seen[kv] == seen["recompute"], (policy, k, seen)
        assert seen["recompute"][1][0] < seen["recompute"][0][0]  # some rejections happened


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
    st_ = AcceptanceCounts()
    st_.record_rounds(torch.tensor([0, 2, 3, 1]), 3)
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


def test_sampled_bonus_token_comes_from_the_position_after_the_last_draft():
    """All k drafts kept (q = p, so every ratio is 1): the added token is drawn from p[k], the target's
    distribution after the last draft token, not from any earlier position's."""
    V, k, n = 5, 3, 6000
    p = torch.zeros(1, k + 1, V)
    for i in range(k):
        p[0, i, i] = 1.0  # position i: certainly token i (the draft proposes exactly that)
    bonus = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    p[0, k] = bonus
    draft = torch.arange(k).view(1, k)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(V)
    for _ in range(n):
        n_acc, nxt = sampling_accept(draft, p[:, :k].clone(), p, [g])
        assert int(n_acc[0]) == k
        counts[int(nxt[0])] += 1
    from scipy.stats import chisquare

    assert chisquare(counts.numpy(), (bonus * n).numpy()).pvalue > 1e-3
    # A rejection at the last position draws from the residual there instead.
    q = p[:, :k].clone()
    q[0, k - 1] = torch.tensor([0.0, 0.0, 0.5, 0.0, 0.5])  # the draft proposes token 2 ...
    p2 = p.clone()
    p2[0, k - 1] = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])  # the target wants 3 there: always rejected
    n_acc, nxt = sampling_accept(draft, q, p2, [g])
    assert int(n_acc[0]) == k - 1 and int(nxt[0]) == 3


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
    assert "eagle -> " in text  # the EAGLE-shaped head's row ran


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
