"""The fused prefill (plan.fuse_prefill): a live batch's refill chunk rides in the next verification's weight
sweep. Outputs are those of the unfused engine (and the target's own greedy ones), the steps follow
planner/schedule.py's rule, and a fused forward computes exactly what two separate forwards compute."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from specoffload.planner import trace_names as names
from specoffload.planner.schedule import DRAFT, REFILL, VERIFY
from specoffload.runtime.engine import Engine, Request, Target, Timeline, padded
from specoffload.runtime.generate import generate
from specoffload.runtime.model import Transformer
from specoffload.runtime.tiny_pair import tiny_eagle_path, tiny_pair_paths, tiny_pair_tokenizer

from test_engine import TEXTS, expected, make_plan  # tests/ is on sys.path (pytest rootdir-relative imports)

# Mixed lengths: a few long requests keep the batch live while short ones free rows for the next chunks.
MAX_TOKENS = [20, 5, 9, 3, 14, 6, 11, 4, 8, 12]
DRAFTS = {"offload-only": None, "draft": "draft", "eagle": "eagle"}


@pytest.fixture(scope="module")
def tiny():
    t_dir, d_dir = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(t).ids for t in TEXTS]
    prompts += [tok.encode(t + " x").ids for t in TEXTS[:len(MAX_TOKENS) - len(prompts)]]
    assert len({len(p) for p in prompts}) > 4  # mixed prompt lengths
    return t_dir, {"draft": d_dir, "eagle": tiny_eagle_path()}, prompts


@pytest.fixture(scope="module")
def reference(tiny):
    """The target's own greedy continuations (no EOS cut: the engine's EOS set is applied per test)."""
    t_dir, _, prompts = tiny
    return [g.tokens for g in generate(Transformer.from_pretrained(t_dir), prompts, max(MAX_TOKENS),
                                       eos_token_id=None)]


def plan_for(kind: str, fuse: bool, batch: int = 4, prefill: int = 2, micro: int = 1):
    if kind == "offload-only":
        plan = make_plan("offload-only", batch, 0, micro, "gpu", 1, prefill)
    else:
        plan = make_plan("serial-spec", batch, 3, micro, "gpu", 1, prefill)
    return dataclasses.replace(plan, fuse_prefill=fuse)


def run(kind: str, fuse: bool, tiny, temperature: float = 0.0, trace: bool = False, **kw):
    t_dir, drafts, prompts = tiny
    eng = Engine(plan_for(kind, fuse, **kw), t_dir, drafts.get(kind) if DRAFTS[kind] else None, trace=trace)
    outs = {}
    reqs = [Request(str(i), p, n, temperature=temperature, seed=100 + i)
            for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))]
    stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, (f.tokens, f.finish_reason)))
    return eng, outs, stats


@pytest.mark.parametrize("kind,micro", [("offload-only", 1), ("draft", 1), ("draft", 2), ("eagle", 2)])
def test_fused_outputs_equal_unfused_and_the_targets_greedy(tiny, reference, kind, micro):
    """Refills happen (10 requests, a batch of 4, chunks of 2, mixed lengths), fused and not; with two
    micro-batches the chunk is split as its prefill alone would be."""
    results = {}
    for fuse in (False, True):
        eng, outs, stats = run(kind, fuse, tiny, micro=micro)
        for i, n in enumerate(MAX_TOKENS):
            assert outs[str(i)][0] == expected(reference[i], n, eng.eos), (kind, fuse, i)
        # Drafts depend only on each sequence's context (a feature draft: on the target's states of it, the
        # chunk's read from the fused pass), so every round accepts as many fused or not.
        results[fuse] = outs, (stats.acceptance.tried, stats.acceptance.accepted)
        assert stats.fused_passes > 0 if fuse else stats.fused_passes == 0
    assert results[True] == results[False]


@pytest.mark.parametrize("kind", list(DRAFTS))
def test_fused_sampling_draws_what_the_unfused_engine_draws(tiny, kind):
    """Each sequence draws from its own generator (seeded per request), in the same order fused or not (its
    first token, then its draft and verification rounds), so the outputs are the same."""
    outs = {fuse: run(kind, fuse, tiny, temperature=0.9)[1] for fuse in (False, True)}
    assert outs[True] == outs[False]
    greedy = run(kind, False, tiny)[1]
    assert any(outs[True][r][0] != greedy[r][0] for r in greedy)  # really sampled


def test_fused_steps_defer_refills_into_the_next_verification(tiny):
    """The step log: refills of a live batch (n > 0 after the first step) are each followed by a
    verification, which carries their chunk; the chunk's sequences join before the next draft round.
    Only the first chunk has a sweep of its own (the batch never drains); nothing counted beyond max_tokens."""
    eng, outs, stats = run("draft", True, tiny)
    log = eng.schedule_log
    assert log[0] == (REFILL, 0, 2) and log[1][0] == DRAFT  # the start: one chunk, prefilled at once
    deferred = [i for i, (op, _, n) in enumerate(log) if op == REFILL and n > 0 and i > 0]
    assert deferred and stats.prefill_passes == 1
    assert stats.fused_passes == len(deferred)
    for i in deferred:
        op, _, n = log[i]
        assert 1 <= n <= 2  # at most one chunk (prefill_batch) per refill
        assert [s[0] for s in log[i + 1:i + 3]] == [DRAFT, VERIFY]
        # The draft round before the fused verification drafts only the live rows, not the waiting chunk ...
        assert log[i + 1][2] == log[i + 2][2]
        # ... and the one after it drafts the chunk's rows too (none of them ends at its first token here).
        nxt = next(j for j in range(i + 3, len(log)) if log[j][0] == DRAFT)
        assert log[nxt][2] >= n
    assert sum(n for op, _, n in log if op == REFILL) == len(MAX_TOKENS)
    assert stats.sweeps == stats.slots + stats.prefill_passes
    assert stats.prefill_tokens == sum(len(p) for p in tiny[2])
    assert stats.sequences == len(MAX_TOKENS)
    for i, n in enumerate(MAX_TOKENS):
        toks, reason = outs[str(i)]
        assert len(toks) == n or (reason == "stop" and toks[-1] in eng.eos)
    assert stats.generated_tokens == sum(len(t) for t, _ in outs.values())


@pytest.mark.parametrize("kind", ["offload-only", "eagle"])
def test_a_newcomer_that_ends_at_its_first_token_finishes_after_the_fused_pass(tiny, reference, kind):
    """Requests of one token in deferred chunks: done at their first token (the chunk's logits), never
    verified or drafted, their rows free for the next chunk; the rest as unfused."""
    t_dir, drafts, prompts = tiny
    lengths = [12, 1, 1, 7, 1, 1, 5, 1, 9, 1]
    reqs = [Request(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, lengths))]
    results = {}
    for fuse in (False, True):
        eng = Engine(plan_for(kind, fuse), t_dir, drafts.get(kind) if DRAFTS[kind] else None)
        outs = {}
        stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, f.tokens))
        for i, n in enumerate(lengths):
            assert outs[str(i)] == expected(reference[i], n, eng.eos), (fuse, i)
        assert stats.sequences == len(reqs) and stats.generated_tokens == sum(len(t) for t in outs.values())
        results[fuse] = (outs, stats)
    stats = results[True][1]
    assert stats.fused_passes > 0 and stats.prefill_passes == 1
    assert stats.acceptance.rounds == results[False][1].acceptance.rounds  # only the long ones are verified
    assert results[True][0] == results[False][0]


def test_a_chunk_admitted_to_a_drained_batch_is_prefilled_at_once(tiny):
    """With nothing live the one chunk has a sweep of its own: a batch of 2 with chunks of 2 and equal
    lengths drains before every refill, so no refill is deferred and nothing is fused."""
    t_dir, _, prompts = tiny
    eng = Engine(plan_for("offload-only", True, batch=2), t_dir)
    stats = eng.run([Request(str(i), p, 3) for i, p in enumerate(prompts[:6])], lambda f: None)
    assert stats.fused_passes == 0 and stats.prefill_passes == 3
    assert [e for e in eng.schedule_log if e[0] == REFILL and e[2]] == [(REFILL, 0, 2)] * 3


def test_the_fused_trace_names_the_chunks_work_apart(tiny):
    """The chunk's layer work is in 'prefill' spans (declared kinds); its pass record and the verification's
    span the whole fused pass; the verification's spans stay qkv/attn/ffn."""
    eng, _, stats = run("draft", True, tiny, trace=True, micro=2)
    spans = eng.timeline.spans
    assert {names.span_kind(n) for _, n, _, _ in spans} <= set(names.ENGINE_SPANS)
    L = eng.target.args.n_layers
    assert sum(n.startswith(names.layer_prefix(names.SPAN_PREFILL)) for _, n, _, _ in spans) == \
        2 * L * sum(min(2, r.batch) for r in eng.timeline.passes if r.fused and r.prefill)  # two halves per mb
    recs = [r for r in eng.timeline.passes if r.model == "target"]
    fused = [r for r in recs if r.fused]
    assert len(fused) == 2 * stats.fused_passes
    assert len([r for r in recs if r.prefill and not r.fused]) == stats.prefill_passes
    assert len([r for r in recs if not r.prefill]) == stats.slots
    for v, c in zip(fused[::2], fused[1::2]):
        assert not v.prefill and c.prefill and (v.start, v.end) == (c.start, c.end) and v.query == 4


@pytest.mark.parametrize("micro,keep_hidden", [(1, False), (2, True)])
def test_a_fused_forward_equals_two_forwards_bitwise_on_the_cpu(tiny, micro, keep_hidden):
    """fp32 on the CPU: the same ops on the same shapes (the chunk in the micro-batches a prefill of it alone
    uses), so logits, hidden states and both parts' KV are bitwise those of a verification forward
    followed by a prefill forward."""
    t_dir, _, prompts = tiny
    plan = plan_for("draft", True, batch=5, micro=micro)
    targets = []
    for _ in range(2):
        t = Target(t_dir, plan, torch.device("cpu"), torch.float32, 5, 96, Timeline(enabled=False))
        t.keep_hidden = keep_hidden
        # Three live rows with a context (their prompts), as before a verification.
        t.forward([0, 1, 2], padded(prompts[:3]), torch.tensor([len(p) for p in prompts[:3]]), prefill=True,
                  logits_at="last")
        targets.append(t)
    g = torch.Generator().manual_seed(0)
    ver = torch.randint(3, 500, (3, 4), generator=g)
    n_ver = torch.full((3,), 4)
    chunk = [prompts[5], prompts[8]]
    c_tok, c_new = padded(chunk), torch.tensor([len(p) for p in chunk])
    a, b = targets
    fused, fused_chunk = a.forward([0, 1, 2], ver, n_ver, chunk=([4, 3], c_tok, c_new))
    sep = b.forward([0, 1, 2], ver, n_ver)
    sep_hidden = b.last_hidden
    sep_chunk = b.forward([4, 3], c_tok, c_new, prefill=True, logits_at="last")
    assert torch.equal(fused, sep) and torch.equal(fused_chunk, sep_chunk)
    if keep_hidden:
        assert torch.equal(a.last_hidden, sep_hidden) and torch.equal(a.chunk_hidden, b.last_hidden)
    else:
        assert a.chunk_hidden is None
    slots = [0, 1, 2, 3, 4]
    assert torch.equal(a.kv.lengths(slots), b.kv.lengths(slots))
    lengths = a.kv.lengths(slots).tolist()
    for j in range(a.args.n_layers):
        for s, n in zip(slots, lengths):
            assert torch.equal(a.kv.host.k[j][s, :, :n], b.kv.host.k[j][s, :, :n])
            assert torch.equal(a.kv.host.v[j][s, :, :n], b.kv.host.v[j][s, :, :n])


def test_a_fused_chunk_must_take_other_slots(tiny):
    t_dir, _, prompts = tiny
    t = Target(t_dir, plan_for("draft", True), torch.device("cpu"), torch.float32, 4, 96, Timeline(enabled=False))
    with pytest.raises(AssertionError, match="shares slots"):
        t.forward([0, 1], torch.ones(2, 4, dtype=torch.long), torch.full((2,), 4),
                  chunk=([1], padded(prompts[:1]), torch.tensor([len(prompts[0])])))


def test_a_fused_plan_with_two_batches_is_refused():
    with pytest.raises(ValueError, match="fuse_prefill needs one batch"):
        dataclasses.replace(make_plan("interleaved"), fuse_prefill=True)


@pytest.mark.gpu
@pytest.mark.parametrize("gpu_kv", [0, 1])
def test_cuda_fused_outputs_equal_unfused_and_the_targets_greedy(tiny, reference, gpu_kv):
    """CUDA, fp32, every layer streamed, two micro-batches: the chunk is launched while the first micro-batch
    attends on the CPU, its keys/values land in the host cache at the layer's end; a GPU-KV row too."""
    t_dir, drafts, prompts = tiny
    reqs = [Request(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))]
    results = {}
    for fuse in (False, True):
        plan = plan_for("draft", fuse, micro=2).replace(gpu_kv_sequences=gpu_kv, gpu_attn_layers=0,
                                                         gpu_ffn_layers=0, weight_buffers=2)
        eng = Engine(plan, t_dir, drafts["draft"], device="cuda", dtype=torch.float32)
        outs = {}
        stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, f.tokens))
        for i, n in enumerate(MAX_TOKENS):
            assert outs[str(i)] == expected(reference[i], n, eng.eos), (fuse, i)
        assert (stats.fused_passes > 0) == fuse
        results[fuse] = outs
    assert results[True] == results[False]


@pytest.mark.parametrize("device_rows", [False, True])
def test_the_cuda_code_path_on_the_cpu_with_events_faked(tiny, monkeypatch, device_rows):
    """No GPU here: the CUDA branch of the layer loop (`_attend_cuda`; the chunk launched between the q/k/v
    copies of the first micro-batch with host rows and the host's wait; prompt keys/values written at the
    layer's end), run on the CPU with CUDA events, streams and pinning faked, must give the unfused
    outputs; with device_rows a slot's KV stands in a second ("device") cache, so rows are split between
    partitions. Every event recorded is waited for."""
    from specoffload.runtime.engine import target as target_mod
    from specoffload.runtime.kv_cache import KVCache

    waits = []

    class Event:
        def record(self, stream=None):
            waits.append(1)

        def synchronize(self):
            waits.append(-1)

    class Stream:  # orders work: here, where everything runs in line, only counted
        def wait_stream(self, other):
            waits.append(0)

        def wait_event(self, ev):  # the compute stream waits for the chunk's previous layer
            waits.append(3)

        def record_event(self):  # waited for by the copy stream (the weight buffer's next copy), not the host
            waits.append(2)
            return Event()

    streams_entered = []

    @contextlib.contextmanager
    def stream(s):
        streams_entered.append(s)
        yield

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: Stream())
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    monkeypatch.setattr(target_mod.Target, "_attend", lambda self, j, slots, q, k, v, n_new, prefill, writes,
                        spans=True, after_issue=None: self._attend_cuda(j, slots, q, k, v, n_new, prefill, writes,
                                                                         spans, after_issue))
    t_dir, drafts, prompts = tiny
    reqs = [Request(str(i), p, n) for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS))]
    results, launched = {}, []
    for fuse in (False, True):
        eng = Engine(plan_for("draft", fuse, micro=2), t_dir, drafts["draft"])
        eng.target.streams.cuda = True  # the layer loop's CUDA branch; the streamer keeps its CPU bookkeeping
        eng.target.streams.chunk = Stream()  # the chunk's own stream
        kv = eng.target.kv
        if device_rows:  # slot 0 "on the device": its own cache, as TargetKV builds one on CUDA
            args = eng.target.args
            kv.gpu_slots, kv.host_slots = [0], list(range(1, 4))
            kv.where = {0: ("dev", 0), **{s: ("host", s - 1) for s in range(1, 4)}}
            kv.dev = KVCache.for_model(args, 1, eng.max_len)
            kv.host = KVCache.for_model(args, 3, eng.max_len)
        attention = eng.target._chunk_attention

        def chunk_attention(*a, _orig=attention):
            import traceback
            launched.append(any(f.name == "_attend_cuda" for f in traceback.extract_stack()))
            return _orig(*a)

        eng.target._chunk_attention = chunk_attention
        outs = {}
        stats = eng.run(reqs, lambda f: outs.__setitem__(f.request.id, f.tokens))
        results[fuse] = outs
        assert (stats.fused_passes > 0) == fuse
    assert results[True] == results[False]
    n_layers = eng.target.args.n_layers
    assert len(launched) == n_layers * stats.fused_passes and all(launched)  # inside a host attention
    assert waits.count(1) == waits.count(-1) > 0
    # Every chunk stage ran inside the chunk stream's context, one launch and the rest per layer.
    assert streams_entered and all(isinstance(x, Stream) for x in streams_entered)
    assert len(streams_entered) == 2 * n_layers * stats.fused_passes
    assert waits.count(2) == n_layers * stats.fused_passes  # each layer's buffer also waits for the chunk
    assert waits.count(3) == (n_layers - 1) * stats.fused_passes  # ... and so does the next layer
