"""Engine.run's `more` hook: requests arriving while a run is under way join free slots and come out
exactly as they do when all are given at once (what a cluster engine relies on to take shards as a stream)."""
from __future__ import annotations

import pytest
import torch

from specoffload.runtime.engine import Engine, EngineError, Request
from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

from test_engine import TEXTS, make_plan


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: two spin against each other on a busy 2-core machine (100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("policy,k", [("serial-spec", 2), ("interleaved", 1), ("offload-only", 0)])
def test_requests_fed_during_a_run_equal_one_batch_of_all(policy, k):
    target, draft = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    reqs = [Request(f"r{i}", tok.encode(t).ids, 6 + 3 * i, temperature=0.8 if i % 3 == 2 else 0.0, seed=i)
            for i, t in enumerate(TEXTS)]
    plan = make_plan(policy, batch=2, k=k)
    eng = Engine(plan, target, draft)
    whole = {}
    eng.run(reqs, lambda f: whole.__setitem__(f.request.id, f.tokens))
    # The same requests, two at first and the rest handed over one or two at a time as slots free up.
    rest = list(reqs[2:])
    asked = []

    def more():
        asked.append(len(rest))
        out = rest[:2]
        del rest[:2]
        return out

    streamed = {}
    eng2 = Engine(plan, target, draft)
    eng2.run(reqs[:2], lambda f: streamed.__setitem__(f.request.id, f.tokens), more=more)
    assert not rest and len(asked) >= 3  # it asked more than once: the run took work while under way
    assert streamed == whole


def test_a_streamed_request_is_checked():
    target, draft = tiny_pair_paths()
    eng = Engine(make_plan("serial-spec", batch=2, k=1), target, draft)
    pending = [Request("long", [1] * 500, 4)]

    def more():
        out = pending[:]
        pending.clear()
        return out

    with pytest.raises(EngineError, match="'long'"):
        eng.run([Request("a", [1, 2, 3], 2)], lambda f: None, more=more)


def test_streamed_requests_fill_an_idle_batch_while_the_other_runs():
    """Interleaved: batch 0 holds the first requests, batch 1 is idle; requests that arrive later go into
    batch 1 on its turn (the schedule asks the stream when its queue is empty), not after batch 0 drains."""
    target, draft = tiny_pair_paths()
    plan = make_plan("interleaved", batch=2, k=1)
    eng = Engine(plan, target, draft)
    eng.eos = set()  # every sequence runs to its length
    later = [Request("c", [1, 2, 3], 3), Request("d", [4, 5], 3)]
    calls = []

    def more():
        calls.append(1)
        if len(calls) < 3:
            return []
        out = later[:]
        later.clear()
        return out

    done = []
    eng.run([Request("a", [1, 2, 3], 20), Request("b", [2, 3], 20)], lambda f: done.append(f.request.id), more=more)
    assert sorted(done) == ["a", "b", "c", "d"] and done.index("c") < done.index("a")
    assert any(op == "refill" and g == 1 and n == 2 for op, g, n in eng.schedule_log)
