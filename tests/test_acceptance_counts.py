"""One per-position acceptance counter (planner/acceptance.py) for the engine, the profiler and the simulator."""
from __future__ import annotations

import random
from pathlib import Path

from specoffload.planner.acceptance import AcceptanceCounts

ROOT = Path(__file__).resolve().parents[1]


def test_batch_rounds_count_as_single_rounds():
    rng = random.Random(0)
    for k in (0, 1, 3, 6):
        ns = [rng.randint(0, k) for _ in range(200)]
        batch, single = AcceptanceCounts(), AcceptanceCounts(k)
        for lo in range(0, len(ns), 17):
            batch.record_rounds(ns[lo:lo + 17], k)
        for n in ns:
            single.record(n)
        assert (batch.tried, batch.accepted, batch.rounds, batch.tokens) == \
            (single.tried, single.accepted, single.rounds, single.tokens)
        assert batch.tokens == sum(ns) + len(ns) and batch.k == k


def test_known_counts():
    c = AcceptanceCounts()
    c.record_rounds([0, 2, 3, 1], 3)
    assert c.tried == [4, 3, 2] and c.accepted == [3, 2, 1]
    assert c.per_position() == [0.75, 2 / 3, 0.5] and c.acceptance_vector() == (0.75, 2 / 3, 0.5)
    assert c.mean_tokens_per_round == 2.5
    c.record_rounds([0], 5)  # a longer draft: positions grow, untried ones read 0 / end the vector
    assert c.per_position()[3:] == [0.0, 0.0] and len(c.acceptance_vector()) == 3
    assert c.record_match([5, 6, 9], [5, 6, 7]) == 2


def test_one_class_counts_acceptance():
    """No other per-position acceptance counter: the runtime, the profiler and the simulator use this one."""
    offenders = []
    for path in list((ROOT / "runtime").rglob("*.py")) + list((ROOT / "planner").rglob("*.py")):
        text = path.read_text()
        for needle in ("class AcceptanceStats", "class AcceptanceCounts", "pos_tried", "pos_acc"):
            if needle in text and path.name != "acceptance.py" and not (needle == "class AcceptanceStats"
                                                                          and path.name == "report.py"):
                offenders.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not offenders, offenders
