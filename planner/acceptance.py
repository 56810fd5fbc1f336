"""Per-position acceptance counts: the one counter the runtime's engine, the profiler's acceptance
measurement and the simulator keep (pure Python, no torch).

A verification round of one sequence checks up to k draft tokens and keeps the first n (0..k) of them.
tried[i] counts the rounds that reached draft position i + 1 (n >= i), accepted[i] those that kept it
(n >= i + 1), so accepted[i] / tried[i] is the Workload's a_i = P(position i+1 kept | positions before
it kept).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence


@dataclass
class AcceptanceCounts:
    """tried[i] / accepted[i]: verification rounds that reached / kept draft position i + 1."""

    k: int = 0  # positions counted; grows with the longest round recorded
    tried: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    rounds: int = 0
    tokens: int = 0  # tokens the rounds committed (n + 1 each, before capping at a sequence's length)
    target_tokens: int = 0  # (whole sequences counted) tokens the target generated in all
    sequences: int = 0  # (whole sequences counted) sequences

    def __post_init__(self):
        self._grow(self.k)

    def _grow(self, k: int) -> None:
        self.k = max(self.k, k)
        self.tried += [0] * (self.k - len(self.tried))
        self.accepted += [0] * (self.k - len(self.accepted))

    def record(self, n_accepted: int, verifiable: int | None = None) -> None:
        """One round: the first n_accepted draft tokens kept, of `verifiable` positions that could be
        checked (default k; fewer when the sequence ends before k more tokens)."""
        reach = self.k if verifiable is None else min(verifiable, self.k)
        for i in range(min(n_accepted + 1, reach)):
            self.tried[i] += 1
        for i in range(min(n_accepted, self.k)):
            self.accepted[i] += 1
        self.rounds += 1
        self.tokens += n_accepted + 1

    def record_rounds(self, n_accepted: Iterable[int], k: int) -> None:
        """Rounds of k draft tokens each (k = 0: one token per round), n_accepted kept per round: a
        verification of a batch. Takes a list, an array or a tensor of counts."""
        self._grow(k)
        values = n_accepted.tolist() if hasattr(n_accepted, "tolist") else list(n_accepted)
        for n, c in Counter(values).items():
            for i in range(min(n + 1, k)):
                self.tried[i] += c
            for i in range(min(n, k)):
                self.accepted[i] += c
        self.rounds += len(values)
        self.tokens += sum(values) + len(values)

    def record_match(self, proposed: Sequence[int], truth: Sequence[int]) -> int:
        """One greedy round: record how many leading draft tokens equal the target's, and return that count."""
        n = 0
        while n < len(truth) and proposed[n] == truth[n]:
            n += 1
        self.record(n, len(truth))
        return n

    def per_position(self) -> list[float]:
        """a_i for each of the k positions (0.0 where none was tried)."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted, self.tried)]

    def acceptance_vector(self) -> tuple[float, ...]:
        """a_i for the positions tried at least once: a Workload's vector ends at its last tried position
        (Workload reuses the last value beyond it)."""
        out = []
        for a, t in zip(self.accepted, self.tried):
            if t == 0:
                break
            out.append(a / t)
        return tuple(out)

    @property
    def mean_tokens_per_round(self) -> float:
        return self.tokens / self.rounds if self.rounds else 0.0
