"""The schedule's rules, stated once: refill admission, the order of draft and verification, and the
interleave. The runtime's engine (runtime/engine/engine.py `Engine.run`) executes these steps with real
work; the simulator (planner/sim) turns them into tasks. Pure Python, no torch.

A schedule is a generator of `Step`s over a `ScheduleView` (which batches have live sequences, whether
prompts wait). It is lazy: the executor asks for the next step only after doing the last one, so each
decision sees the outcome of the verification before it (which sequences finished). Steps:

- `refill g`: admit waiting prompts into batch g's free rows (`admit_count`: whole chunks while the
  batch has work), prefilled in chunks of the plan's prefill batch (`prefill_chunks`); each chunk is
  one weight sweep. With a fused plan (`Plan.fuse_prefill`, one batch only) a refill admits at most
  one chunk, and its prefill does not get a sweep of its own while the batch has live sequences
  (`defer_prefill`): the chunk rides in the next verification's weight sweep (the fused pass: each
  streamed layer, once copied, runs the verification's rows and then the chunk's prompts), and its
  sequences join the batch when that pass ends, before the draft round that follows it. With nothing
  live the one chunk is prefilled at once, on its own sweep (the start, or a batch that drained):
  so a fused batch ramps up a chunk per sweep and its sequences finish, and free rows, staggered.
- `draft g`: the draft round for batch g's live sequences (survivors and newcomers). It must finish
  before g's next verification. If another batch is verified first, the round runs alongside that
  verification: the engine launches its steps between the target's layers (`draft_step_layers`), the
  simulator issues its tasks at lower priority than the target's.
- `verify g`: one verification of batch g's live sequences (the decode step).

`RoundRobin` is the schedule of every policy today: one batch (offload-only: no draft steps;
serial-spec: draft then verify) or two batches (interleaved: while one batch verifies, the other's
draft round runs). A new schedule is a new `Schedule` subclass, chosen in `schedule_for`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

REFILL, DRAFT, VERIFY = "refill", "draft", "verify"


@dataclass(frozen=True)
class Step:
    op: str  # REFILL, DRAFT or VERIFY
    batch: int

    def __str__(self) -> str:
        return f"{self.op} {self.batch}"


class ScheduleView(Protocol):
    """What a schedule reads of the executor's state when it decides the next step."""

    def live(self, batch: int) -> bool:
        """Batch `batch` holds sequences still generating."""

    def waiting(self) -> bool:
        """Prompts wait for admission."""


LOG_STEPS = 100_000  # an executor's schedule_log keeps the first this many steps (a long run takes millions)


def log_step(log: list, op: str, batch: int, sequences: int) -> None:
    """Append (op, batch, sequences) to an executor's step log, up to LOG_STEPS entries."""
    if len(log) < LOG_STEPS:
        log.append((op, batch, sequences))


def admit_count(free: int, waiting: int, prefill_batch: int, live: bool, capacity: int = 0,
                fused: bool = False) -> int:
    """How many waiting prompts a batch of `capacity` rows with `free` of them free admits now.

    An idle batch takes all it can, and so does a batch whose free rows take all the prompts left.
    A batch that still has work takes whole prefill chunks (a multiple of prefill_batch), so no
    chunk's weight sweep is spent on a few prompts: the remainder waits for the rows freed next.
    (Admitting the remainder too made a short chunk at most refills: with speculation, where rows free
    a few at a time, 62% more prefill sweeps than whole chunks on Mixtral-8x7B, 20000 x 512.)
    Where a whole chunk cannot come soon (prefill_batch above a quarter of the batch: rows would sit
    empty while it fills, and a chunk larger than the batch would wait for the batch to drain), a
    quarter of the batch's rows is enough for one chunk. A quarter: refilling at T free rows trades one
    sweep per refill against T/2 empty rows while they gather; with a sweep about a decode step,
    E tokens kept per verification and G generated per sequence, the best T is about
    b * sqrt(2E/G), 0.12-0.25 of the batch for E in 1..4 and G = 128. `capacity` 0: no such cap.
    `fused` (a fused plan): the same rule, capped at one chunk (prefill_batch) per refill, idle or not."""
    bp = max(1, prefill_batch)
    want = min(free, waiting)
    if fused:
        want = min(want, bp)
    if want == 0 or not live or want == waiting:
        return want
    if want >= bp:
        return (want // bp) * bp
    enough = refill_rows(capacity) if capacity > 0 else bp
    return want if want >= enough else 0


def defer_prefill(fused: bool, live: bool) -> bool:
    """Whether a refill's admitted chunk waits for the next verification's sweep (the fused pass) instead
    of being prefilled now on a sweep of its own: in a fused plan, while the batch has live sequences
    (so a verification of it comes next). The chunk's sequences join the batch when that pass ends."""
    return fused and live


def refill_rows(capacity: int) -> int:
    """Free rows that are enough for a refill of a batch of `capacity` rows whose prefill batch is
    larger (a quarter of the batch: see `admit_count`). The planner gives speculative plans no prefill
    batch above it, so their refills are whole chunks, as its closed form counts them."""
    return max(1, capacity // 4)


def prefill_chunks(n: int, prefill_batch: int) -> list[tuple[int, int]]:
    """[start, end) of the prefill chunks that admit n prompts: prefill_batch at a time."""
    bp = max(1, prefill_batch)
    return [(s, min(n, s + bp)) for s in range(0, n, bp)]


def draft_step_layers(n_layers: int, draft_len: int) -> int:
    """The interleave: one draft step is launched before every this many target layers (layer j with
    j % result == 0), so a round's draft_len steps spread over one verification."""
    return max(1, n_layers // max(1, draft_len))


class Schedule:
    """The order of refills, draft rounds and verifications for a plan's batches."""

    name = "schedule"

    def __init__(self, num_batches: int, draft_len: int):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, found {num_batches}")
        self.num_batches, self.draft_len = num_batches, draft_len

    def steps(self, view: ScheduleView) -> Iterator[Step]:
        raise NotImplementedError


class RoundRobin(Schedule):
    """Fill every batch, then verify them in turn. After a verification of batch x: refill x and issue
    its draft round; the next verification is of the following batch if it has work (an idle one is
    refilled on its turn when prompts wait), else of x again. Nothing live and nothing waiting ends it."""

    name = "round-robin"

    def _admit(self, g: int) -> Iterator[Step]:
        yield Step(REFILL, g)
        if self.draft_len:
            yield Step(DRAFT, g)

    def steps(self, view: ScheduleView) -> Iterator[Step]:
        nb = self.num_batches
        for g in range(nb):
            yield from self._admit(g)
        x = 0
        while True:
            while not view.live(x):  # nothing to verify: idle batches take what waits
                if not view.waiting():
                    return
                for g in range(nb):
                    if not view.live(g):
                        yield from self._admit(g)
                x = next((g for g in range(nb) if view.live(g)), x)
            yield Step(VERIFY, x)
            yield from self._admit(x)
            nxt = x
            if nb > 1:
                other = (x + 1) % nb
                if not view.live(other) and view.waiting():
                    yield from self._admit(other)
                if view.live(other):
                    nxt = other
            x = nxt


def schedule_for(num_batches: int, draft_len: int) -> Schedule:
    """The schedule a plan runs: today one rule for every policy (see RoundRobin)."""
    return RoundRobin(num_batches, draft_len)
