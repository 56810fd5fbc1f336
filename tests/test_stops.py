"""Stopping: stop strings, stop token ids, EOS (config.json and generation_config.json), min_tokens and
ignore_eos, under every schedule (offload-only; serial and interleaved speculation with the dense draft
and with the feature draft tiny-eagle). Greedy output with stops equals the target's own greedy output
cut where an independent check (full decodes of each prefix) says the sequence stops, and a stop that
completes inside an accepted run of draft tokens ends the sequence at that token."""
from __future__ import annotations

import random
import shutil
import zlib

import pytest
import torch

from specoffload.planner.schema import Plan, Prediction, Workload
from specoffload.runtime.engine import Engine, Request
from specoffload.runtime.engine.stops import StopChecker
from specoffload.runtime.generate import generate
from specoffload.runtime.model import Transformer
from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_paths, tiny_pair_tokenizer

TEXTS = ["def foo(x):\n    return", "import os\nimport", "class A:\n    def __init__(self, value",
         "for i in range(10):\n", "x = [1, 2, 3]\nprint(", "while True:\n    if"]
N = 32
PRED = Prediction(1, 1, 1, 1, 1, 1, 1, 0, 1, {}, {}, {}, "h2d", 0, 0)
# (policy, k, draft, draft KV): every schedule and draft kind, the draft KV modes among them
SCHEDULES = [("offload-only", 0, None, "gpu"), ("serial-spec", 4, "draft", "recompute"),
             ("interleaved", 4, "draft", "host"), ("serial-spec", 4, "eagle", "gpu"), ("interleaved", 3, "eagle", "host")]
SPECULATIVE = [s for s in SCHEDULES if s[1]]


def make_plan(policy: str, k: int, draft_kv: str = "gpu", batch: int = 3) -> Plan:
    return Plan(policy=policy, model="tiny-target", model_fingerprint="", draft="d" if k else "",
                draft_fingerprint="", profile="cpu", profile_fingerprint="",
                workload=Workload(prompt_len_tokens=8, gen_len_tokens=N, num_prompts=8, max_prompt_len_tokens=32),
                decode_batch=batch, num_batches=2 if policy == "interleaved" else 1, prefill_batch=3,
                draft_sub_batch=1, draft_len=k, micro_batches=1, gpu_attn_layers=0, gpu_ffn_layers=0,
                gpu_kv_sequences=0, target_attention="cpu", draft_kv=draft_kv, weight_buffers=2, prediction=PRED)


@pytest.fixture(scope="module")
def tiny():
    target, draft = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(t).ids for t in TEXTS]
    model = Transformer.from_pretrained(target, dtype=torch.float32)
    ref = [g.tokens for g in generate(model, prompts, N, eos_token_id=None)]  # the target's own greedy, no stops
    return {"target": target, "draft": draft, "eagle": tiny_eagle_path(), "tok": tok, "prompts": prompts, "ref": ref}


def engine(tiny, schedule, target=None) -> Engine:
    policy, k, kind, draft_kv = schedule
    return Engine(make_plan(policy, k, draft_kv), target or tiny["target"], tiny[kind] if kind else None)


def run(eng: Engine, reqs: list[Request]) -> dict:
    outs = {}
    eng.run(reqs, lambda f: outs.__setitem__(f.request.id, f))
    assert eng.stats.generated_tokens == sum(len(f.tokens) for f in outs.values())  # nothing after a stop counted
    return outs


def oracle(ref: list[int], decode, eos: set[int], max_tokens: int, stop=(), stop_ids=(), min_tokens=0,
           ignore_eos=False):
    """(tokens, finish_reason, stop_reason, text) for a greedy continuation, from full decodes of each prefix."""
    for i in range(min(len(ref), max_tokens)):
        t = ref[i]
        if i + 1 < min_tokens:
            continue
        if (t in eos and not ignore_eos) or t in stop_ids:
            return ref[:i + 1], "stop", (t if t in stop_ids else None), decode(ref[:i + 1])
        before, now = decode(ref[:i]), decode(ref[:i + 1])
        hits = [(now.find(s, max(0, len(before) - len(s) + 1)), s) for s in stop]
        hits = [h for h in hits if h[0] >= 0]
        if hits:
            j, s = min(hits)
            return ref[:i + 1], "stop", s, now[:j]
    cut = ref[:max_tokens]
    return cut, "length", None, decode(cut)


def got(f, decode):
    return f.tokens, f.finish_reason, f.stop_reason, f.text if f.text is not None else decode(f.tokens)


def decoder(tok):
    return lambda ids: tok.decode(list(ids))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: f"{s[0]}-{s[2]}-{s[3]}")
def test_greedy_with_stops_equals_target_greedy_cut_where_it_stops(tiny, schedule):
    """Stop strings taken from the continuations themselves (short and multi-token ones), stop ids, min_tokens,
    ignore_eos, mixed across requests that share batches."""
    tok, ref, dec = tiny["tok"], tiny["ref"], decoder(tiny["tok"])
    eng = engine(tiny, schedule)
    rng = random.Random(zlib.crc32(repr(schedule).encode()))
    reqs, want = [], {}
    for i, (p, r) in enumerate(zip(tiny["prompts"], ref)):
        text = dec(r)
        a = rng.randrange(1, max(2, len(text) - 8))
        stop = (text[a:a + rng.choice([1, 3, 7])], "\u00a7never")  # the first one occurs by construction
        stop_ids = (r[rng.randrange(2, 20)],) if i % 2 else ()
        min_tokens = (0, 5, 12)[i % 3]
        req = Request(f"r{i}", p, N, stop=stop, stop_token_ids=stop_ids, min_tokens=min_tokens,
                      ignore_eos=i == 4, detokenize=dec)
        reqs.append(req)
        want[req.id] = oracle(r, dec, eng.eos, N, stop, stop_ids, min_tokens, i == 4)
    outs = run(eng, reqs)
    stopped = 0
    for req in reqs:
        assert got(outs[req.id], dec) == want[req.id], (schedule, req.id)
        stopped += outs[req.id].finish_reason == "stop"
    assert stopped >= 4


def accepted_runs(eng: Engine, reqs: list[Request]) -> tuple[dict, list[tuple[str, int]]]:
    """Run without stops, recording each verification round's committed tokens; -> (outputs, [(id, position)])
    of tokens that were accepted draft tokens with a further accepted token after them in the same round."""
    rounds: list[tuple[str, int, int]] = []  # (id, first position, tokens committed at once)
    commit = eng._commit

    def spy(s, tokens):
        rounds.append((s.req.id, len(s.out), len(tokens)))
        return commit(s, tokens)

    eng._commit = spy
    outs = run(eng, reqs)
    eng._commit = commit
    mids = [(rid, start + j) for rid, start, n in rounds for j in range(n - 2)]  # not the last accepted, not the bonus
    return outs, mids


@pytest.mark.parametrize("schedule", SPECULATIVE, ids=lambda s: f"{s[0]}-{s[2]}-{s[3]}")
def test_stop_inside_an_accepted_draft_run_ends_the_sequence_there(tiny, schedule):
    """Take the target's greedy continuation; pick a token in the middle of a run of accepted draft tokens (more
    drafts were accepted after it in the same round); make its text (a multi-token stop string that only
    completes at that token) or its id the stop. The sequence must end exactly at that token: nothing of
    the round after it committed or counted, the text cut before the stop string."""
    tok, dec = tiny["tok"], decoder(tiny["tok"])
    base = [Request(f"r{i}", p, N) for i, p in enumerate(tiny["prompts"])]
    outs, mids = accepted_runs(engine(tiny, schedule), base)
    string_cases, id_cases = [], []
    for rid, pos in mids:
        out = outs[rid].tokens
        if pos < 2 or pos >= len(out) - 1:
            continue
        if out[pos] not in out[:pos] and out[pos] not in engine_eos(tiny):
            id_cases.append((rid, pos, out[pos]))
        before, upto = dec(out[:pos]), dec(out[:pos + 1])
        own = len(upto) - len(before)  # characters the token itself adds
        for length in range(own + 1, own + 8):  # longer than the token's own text: the stop spans tokens
            s = upto[-length:]
            if len(s) == length and s not in before and s.strip():
                string_cases.append((rid, pos, s))
                break
    assert string_cases and id_cases, "no accepted run long enough to stop inside"
    by_id = {r.id: r for r in base}
    reqs, want = [], {}
    for n, (rid, pos, s) in enumerate(string_cases[:6]):
        req = Request(f"s{n}", by_id[rid].prompt, N, stop=(s,), detokenize=dec)
        reqs.append(req)
        upto = dec(outs[rid].tokens[:pos + 1])
        want[req.id] = (outs[rid].tokens[:pos + 1], "stop", s, upto[:upto.index(s)])
    for n, (rid, pos, t) in enumerate(id_cases[:6]):
        req = Request(f"i{n}", by_id[rid].prompt, N, stop_token_ids=(t,))
        reqs.append(req)
        want[req.id] = (outs[rid].tokens[:pos + 1], "stop", t, dec(outs[rid].tokens[:pos + 1]))
    res = run(engine(tiny, schedule), reqs)
    for req in reqs:
        assert got(res[req.id], dec) == want[req.id], (schedule, req.id)


def engine_eos(tiny) -> set[int]:
    from specoffload.runtime.config import load_args

    return set(load_args(tiny["target"]).eos_token_id)


def test_min_tokens_and_ignore_eos_around_a_real_eos(tiny, tmp_path):
    """A token of the greedy continuation made an EOS through generation_config.json (config.json's EOS kept):
    it stops the sequence there; min_tokens past it makes the sequence go on to its next EOS or stop; with
    ignore_eos the sequence runs to max_tokens."""
    dec = decoder(tiny["tok"])
    ref = tiny["ref"][0]
    pos = next(i for i in range(3, N) if ref[i] not in ref[:i])
    eos_tok = ref[pos]
    folder = tmp_path / "target"
    shutil.copytree(tiny["target"], folder)
    (folder / "generation_config.json").write_text(f'{{"eos_token_id": [1, {eos_tok}]}}')
    for schedule in (SCHEDULES[0], SCHEDULES[2]):
        eng = engine(tiny, schedule, target=folder)
        assert eng.eos == {1, eos_tok}
        p = tiny["prompts"][0]
        reqs = [Request("plain", p, N), Request("min", p, N, min_tokens=pos + 2), Request("ignore", p, N, ignore_eos=True)]
        outs = run(eng, reqs)
        assert got(outs["plain"], dec) == (ref[:pos + 1], "stop", None, dec(ref[:pos + 1]))
        assert got(outs["plain"], dec) == oracle(ref, dec, eng.eos, N)
        assert got(outs["min"], dec) == oracle(ref, dec, eng.eos, N, min_tokens=pos + 2)
        assert len(outs["min"].tokens) > pos + 1
        assert got(outs["ignore"], dec) == (ref, "length", None, dec(ref))


def test_stop_checker_incremental_text_matches_full_decode_on_multibyte_text():
    """Incremental decoding holds back a token that ends inside a UTF-8 character; a stop string of multi-byte
    characters split over several tokens is found at the token that completes it, text cut before it."""
    tok = tiny_pair_tokenizer()
    dec = decoder(tok)
    text = "x = 'caf\u00e9 \u00fcber \u65e5\u672c\u8a9e'\nprint(x)"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert dec(ids) == text
    for stop in ("\u00fcber", "\u65e5\u672c", "\u8a9e'\npr", "nope"):
        ck = StopChecker(Request("a", [0], 100, stop=(stop,), detokenize=dec), eos=())
        out, hit = [], None
        for t in ids:
            out.append(t)
            if ck.step(out):
                hit = len(out)
                break
        if stop == "nope":
            assert hit is None and ck.text == text
            continue
        # the first prefix whose full decode holds the stop string is where it stops
        first = next(n for n in range(1, len(ids) + 1) if stop in dec(ids[:n]))
        assert hit == first and ck.stop_reason == stop and ck.stop_text == text[:text.index(stop)]


def test_stop_ids_and_eos_precedence_and_min_tokens_unit():
    ck = StopChecker(Request("a", [0], 10, stop_token_ids=(7,), min_tokens=3), eos=(1,))
    out = []
    for t, want in ((7, False), (1, False), (7, True)):  # before min_tokens neither stops
        out.append(t)
        assert ck.step(out) is want
    assert (ck.finish_reason, ck.stop_reason) == ("stop", 7)
    ck = StopChecker(Request("a", [0], 10, ignore_eos=True, stop_token_ids=(1,)), eos=(1,))
    assert ck.step([1]) and ck.stop_reason == 1  # an EOS id also listed as a stop id stops, reported as the id
    ck = StopChecker(Request("a", [0], 10, ignore_eos=True), eos=(1,))
    assert not ck.step([1])
    ck = StopChecker(Request("a", [0], 10), eos=(1,))
    assert ck.step([5, 1]) and ck.stop_reason is None
