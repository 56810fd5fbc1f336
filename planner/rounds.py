"""Acceptance and verification rounds: tokens one verification yields, and rounds a sequence needs.

A round is one verification of a sequence: its k draft tokens are checked and 1..k+1 tokens kept
(the accepted prefix plus one from the target). The distribution of rounds to reach a generation
length, its expected maximum over a batch and the makespan with refill are what the cost model
multiplies its per-step time by.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

EXACT_SUMS = 16  # sums of up to this many sequences' rounds are convolved exactly (RoundStats.sum_cdf)


@dataclass(frozen=True)
class RoundStats:
    """Verification rounds a sequence needs to reach its generation length (the first token comes
    from the prefill, so rounds produce the other gen_len - 1)."""

    expected_tokens: float  # E[tokens per round], uncapped
    mean_rounds: float
    cdf: tuple[float, ...]  # P(rounds <= r) for r = 0, 1, ...

    def expected_max(self, n: float) -> float:
        """E[max of n i.i.d. round counts]: the slowest of n sequences."""
        if n <= 1:
            return self.mean_rounds
        return float(np.sum(1.0 - self._cdf ** n))

    def shifted(self, extra: int = 1) -> "RoundStats":
        """The same sequences holding their row `extra` more steps each (a fused plan: the pass that
        prefills a sequence is a step of its batch that yields it nothing)."""
        return RoundStats(self.expected_tokens, self.mean_rounds + extra, (0.0,) * extra + tuple(self.cdf))

    @functools.cached_property
    def _cdf(self) -> np.ndarray:
        return np.asarray(self.cdf)

    @functools.cached_property
    def pmf(self) -> np.ndarray:
        return np.diff(self._cdf, prepend=0.0).clip(min=0.0)

    @functools.cached_property
    def _sums(self) -> dict[int, np.ndarray]:
        return {}

    def sum_cdf(self, q: int) -> tuple[int, np.ndarray]:
        """(offset, CDF from there) of the rounds q sequences run back to back need, cached per q.

        The CDF is 0 below the offset and 1 past the array. Exact (FFT convolution) up to
        EXACT_SUMS sequences; beyond, the central limit: a normal with q times the mean and variance.
        """
        if q not in self._sums:
            if q <= 1:
                self._sums[q] = (0, self._cdf)
            elif q <= EXACT_SUMS:
                self._sums[q] = (0, np.cumsum(_sum_pmf(self.pmf, q)).clip(max=1.0))
            else:
                r = np.arange(len(self.pmf))
                mean = float(np.sum(r * self.pmf))
                var = float(np.sum((r - mean) ** 2 * self.pmf))
                mu, sd = q * mean, max(math.sqrt(q * var), 1e-9)
                lo, hi = max(0, int(mu - 10 * sd)), int(math.ceil(mu + 10 * sd)) + 1
                z = [(x + 0.5 - mu) / (sd * math.sqrt(2.0)) for x in range(lo, hi)]
                self._sums[q] = (lo, np.array([0.5 * (1.0 + math.erf(v)) for v in z]))
        return self._sums[q]

    def makespan(self, n: int, b: int) -> float:
        """Expected rounds until the last of n sequences finishes on b slots with refill.

        Each slot runs q = n // b sequences back to back (their rounds add: S_q), and the r = n % b
        left over start in the slots that finish their q first (about the r/b quantile of S_q), then
        need one more sequence's rounds: the makespan is the later of the slowest slot with q
        sequences and the slowest of the r late starters. Exact for deterministic rounds (whole
        waves); for random rounds it captures the nearly empty last wave that a fluid model misses.
        """
        if n <= 0:
            return 0.0
        q, r = divmod(int(math.ceil(n)), b)
        if q == 0:
            return self.expected_max(r)
        offset, cdf_q = self.sum_cdf(q)
        slow_full = offset + float(np.sum(1.0 - cdf_q ** (b - r))) if b > r else 0.0
        if r == 0:
            return slow_full
        start = offset + float(np.searchsorted(cdf_q, r / b))  # quantile of S_q: when the r-th slot frees up
        return max(slow_full, start + self.expected_max(r))


def _sum_pmf(pmf: np.ndarray, q: int) -> np.ndarray:
    """pmf of the sum of q i.i.d. copies (repeated squaring, FFT convolution, tiny tails trimmed)."""
    def conv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        n = len(a) + len(b) - 1
        size = 1 << (n - 1).bit_length()
        out = np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(b, size), size)[:n]
        return out.clip(min=0.0)

    result, base = np.array([1.0]), pmf
    while q:
        if q & 1:
            result = conv(result, base)
        q >>= 1
        if q:
            base = conv(base, base)
    return result / result.sum()


def token_distribution(acceptance: tuple[float, ...]) -> list[float]:
    """P(X = j), j = 1..k+1: tokens one verification yields (accepted draft tokens + one from the target)."""
    probs, alive = [], 1.0
    for a in acceptance:
        probs.append(alive * (1.0 - a))
        alive *= a
    probs.append(alive)
    return probs


def expected_tokens(acceptance: tuple[float, ...]) -> float:
    """E[X] = 1 + sum_i prod_{j<=i} a_j; for i.i.d. p this is (1 - p^(k+1)) / (1 - p)."""
    total, alive = 1.0, 1.0
    for a in acceptance:
        alive *= a
        total += alive
    return total


@functools.lru_cache(maxsize=256)
def round_stats(acceptance: tuple[float, ...], gen_len: int) -> RoundStats:
    """Exact distribution of rounds to produce gen_len tokens, each round capped at what is left."""
    if gen_len <= 0:
        return RoundStats(expected_tokens(acceptance), 0.0, (1.0,))
    px = np.array(token_distribution(acceptance))
    mass = np.zeros(gen_len)  # mass[n]: P(n tokens produced so far and not yet done)
    mass[0] = 1.0
    done, cdf, mean = 0.0, [0.0], 0.0
    r = 0
    while done < 1.0 - 1e-12 and r <= gen_len:
        r += 1
        new = np.convolve(mass, px)  # index n + j - 1 for X = j: shift by one below
        new = np.concatenate(([0.0], new))
        finished = float(new[gen_len:].sum())
        mass = new[:gen_len]
        done += finished
        mean += r * finished
        cdf.append(min(done, 1.0))
    return RoundStats(expected_tokens(acceptance), mean, tuple(cdf))
