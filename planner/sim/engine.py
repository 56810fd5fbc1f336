"""The discrete-event core: immutable events, one heap loop, resources that serve tasks, memory pools.

Nothing here knows about models or plans. A `Task` is a piece of work on one `Resource` (or a
zero-time join when it has none) that becomes ready when all its predecessors are done. A resource
serves one task at a time, highest priority first (lowest number). A task may be *preemptible at
quantum boundaries*: a weight copy split into chunks, the draft's layers on the GPU. When a task of
higher priority arrives, the running one is cut at its next boundary and its remainder re-queued,
which costs events only when there is contention (not one event per chunk).

Events are immutable `Event` records ordered by (time, seq). The loop pops one, hands it to the
resource it names, and pushes whatever events that returns; task completions cascade through
successor lists (joins complete in the same instant, without an event). Simulated time never goes
backwards: the loop checks each popped event against the current time and raises SimulationError.
"""
from __future__ import annotations

import heapq
import itertools
import math
from typing import Callable, NamedTuple

DONE = 0  # the running piece on `resource` finishes (stale when `token` no longer matches)
PREEMPT = 1  # the running piece on `resource` is cut here to serve a higher-priority task


class Event(NamedTuple):
    time: float
    seq: int
    kind: int
    resource: int
    token: int


_event = tuple.__new__  # builds an Event from a tuple without the keyword-argument __new__ (hot path)


class Task:
    """One unit of work. Mutable bookkeeping (waiting count, successors) is owned by the EventLoop: wire
    dependencies with `EventLoop.depend` (or `hold` + `attach`), never by editing `successors`."""

    __slots__ = ("kind", "label", "resource", "duration", "remaining", "quantum", "priority", "waiting",
                 "successors", "done", "on_done", "layer", "micro_batch", "batch", "pass_index", "traced")

    def __init__(self, kind: str, label: str | None, resource: "Resource | None", duration: float, *,
                 priority: int = 0, quantum: float = 0.0, layer: int = -1, micro_batch: int = -1,
                 batch: int = -1, pass_index: int = -1, on_done: Callable[[float], None] | None = None,
                 traced: bool = False):
        self.kind = kind  # what it is: a span kind of planner/trace_names.py ("qkv", "ffn", "weights", ...)
        self.label = label  # resource class for accounting: gpu | cpu | h2d | d2h (None: a join)
        self.resource = resource
        self.duration = duration
        self.remaining = duration
        self.quantum = quantum  # > 0: may be cut every `quantum` seconds of service
        self.priority = priority
        self.waiting = 1  # a construction hold, dropped by EventLoop.arm()
        self.successors: list[Task] = []
        self.done = False
        self.on_done = on_done
        self.layer, self.micro_batch, self.batch, self.pass_index = layer, micro_batch, batch, pass_index
        self.traced = traced

    def __repr__(self) -> str:
        where = "".join(f" {k}{v}" for k, v in (("L", self.layer), ("mb", self.micro_batch), ("B", self.batch),
                                                 ("pass", self.pass_index)) if v >= 0)
        return f"<{self.kind}{where}>"


class Resource:
    """A server (GPU compute, a copy engine, the CPU attention pool): one task at a time."""

    def __init__(self, name: str, index: int, seq: Callable[[], int],
                 record: Callable[[Task, float, float], None] | None = None):
        self.name = name
        self.index = index
        self._seq = seq
        self._record = record  # called with (task, start, end) for each served piece (trace)
        self._queue: list[tuple[int, int, Task]] = []
        self._running: Task | None = None
        self._run_start = 0.0
        self._run_end = 0.0
        self._token = 0
        self._cut_pending = False
        self.busy: dict[str, float] = {}  # label -> seconds served

    @property
    def idle(self) -> bool:
        return self._running is None

    def queued(self) -> int:
        return len(self._queue)

    def running(self) -> Task | None:
        return self._running

    def _start(self, task: Task, now: float) -> Event:
        self._running = task
        self._run_start = now
        end = self._run_end = now + task.remaining
        token = self._token = self._token + 1
        self._cut_pending = False
        return _event(Event, (end, self._seq(), DONE, self.index, token))

    def submit(self, task: Task, now: float) -> Event | None:
        """A ready task arrives; returns the event that starts or cuts service, if any."""
        running = self._running
        if running is None:
            return self._start(task, now)
        heapq.heappush(self._queue, (task.priority, self._seq(), task))
        if running.quantum > 0.0 and task.priority < running.priority and not self._cut_pending:
            q = running.quantum
            served = now - self._run_start
            boundary = self._run_start + math.ceil(served / q - 1e-9) * q
            if boundary < self._run_end - 1e-12:
                self._token += 1  # the scheduled DONE is now stale
                self._cut_pending = True
                return Event(boundary, self._seq(), PREEMPT, self.index, self._token)
        return None

    def _account(self, task: Task, end: float) -> None:
        served = end - self._run_start
        busy = self.busy
        label = task.label
        if label in busy:
            busy[label] += served
        else:
            busy[label] = served
        if self._record is not None and task.traced and served > 0:
            self._record(task, self._run_start, end)

    def finish(self, token: int, now: float) -> tuple[Task | None, Event | None]:
        """The running piece ends; returns (the task if it is complete, the event starting the next)."""
        task = self._running
        if token != self._token or task is None:
            return None, None  # stale: the piece was cut
        # _account and _start, inlined (once per task: the hottest path).
        served = now - self._run_start
        busy, label = self.busy, task.label
        if label in busy:
            busy[label] += served
        else:
            busy[label] = served
        if self._record is not None and task.traced and served > 0:
            self._record(task, self._run_start, now)
        task.remaining = 0.0
        if not self._queue:
            self._running = None
            return task, None
        nxt = self._running = heapq.heappop(self._queue)[2]
        self._run_start = now
        end = self._run_end = now + nxt.remaining
        token = self._token = token + 1
        self._cut_pending = False
        return task, _event(Event, (end, self._seq(), DONE, self.index, token))

    def cut(self, token: int, now: float) -> Event | None:
        """Preempt the running task at a quantum boundary: re-queue its remainder, serve the best."""
        if token != self._token or self._running is None:
            return None
        task = self._running
        self._account(task, now)
        task.remaining = self._run_end - now
        self._running = None
        heapq.heappush(self._queue, (task.priority, self._seq(), task))
        return self._start(heapq.heappop(self._queue)[2], now)

    def busy_until(self, t: float) -> dict[str, float]:
        """Busy seconds per label, counting the running piece only up to time t."""
        out = dict(self.busy)
        if self._running is not None and t > self._run_start:
            label = self._running.label
            out[label] = out.get(label, 0.0) + min(t, self._run_end) - self._run_start
        return out


class SimulationError(RuntimeError):
    """An invariant of the event loop broke (a bug in the simulator, not in the plan)."""


class Overflow(NamedTuple):
    pool: str
    time: float
    task: str
    need_bytes: float  # what was in use after the allocation
    capacity_bytes: float

    @property
    def excess_bytes(self) -> float:
        return self.need_bytes - self.capacity_bytes


class MemoryPool:
    """GPU, pinned host or host memory: allocations and releases over time, the peak, the first overflow."""

    def __init__(self, name: str, capacity: float, record: Callable[[str, float, float], None] | None = None):
        self.name = name
        self.capacity = capacity
        self._used = 0.0
        self.peak = 0.0
        self.peak_time = 0.0
        self.overflow: Overflow | None = None
        self._record = record
        self.history: list[tuple[float, float]] = [(0.0, 0.0)]  # (time, bytes in use) after each change

    def _log(self, now: float) -> None:
        self.history.append((now, self._used))  # same-instant entries kept: a peak may last no time

    @property
    def used(self) -> float:
        return self._used

    def alloc(self, nbytes: float, now: float, task: str) -> Overflow | None:
        if nbytes <= 0:
            return None
        self._used += nbytes
        if self._used > self.peak:
            self.peak, self.peak_time = self._used, now
        self._log(now)
        if self._record is not None:
            self._record(self.name, now, self._used)
        if self._used > self.capacity * (1 + 1e-9) + 1.0 and self.overflow is None:
            self.overflow = Overflow(self.name, now, task, self._used, self.capacity)
            return self.overflow
        return None

    def free(self, nbytes: float, now: float) -> None:
        if nbytes <= 0:
            return
        self._used = max(0.0, self._used - nbytes)
        self._log(now)
        if self._record is not None:
            self._record(self.name, now, self._used)


class EventLoop:
    """The heap loop and the dependency bookkeeping (the only code that touches waiting counts).

    Everything a handler causes (tasks made ready, cascaded completions) is collected as new events
    and returned to the loop; setup code run outside the loop queues its events for the first pop.
    """

    def __init__(self):
        self._counter = itertools.count()
        self.seq = self._counter.__next__
        self.resources: list[Resource] = []
        self.now = 0.0
        self.events = 0
        self.stopped = False
        self._heap: list[Event] = []
        self._out: list[Event] = []  # where _ready/_complete put new events (setup: queued for the loop)

    def resource(self, name: str, record=None) -> Resource:
        res = Resource(name, len(self.resources), self.seq, record)
        self.resources.append(res)
        return res

    # --- the graph ---------------------------------------------------------------------------------
    @staticmethod
    def depend(pred: Task | None, succ: Task) -> None:
        """succ waits for pred (nothing if pred is None or already done). Call before arm(succ)."""
        if pred is not None and not pred.done:
            pred.successors.append(succ)
            succ.waiting += 1

    @staticmethod
    def hold(task: Task) -> None:
        """An extra wait, turned into a dependency later by `attach` (its predecessor does not exist yet)."""
        task.waiting += 1

    def arm(self, task: Task) -> None:
        """Drop the construction hold: the task runs once its predecessors are done."""
        self.release(task)

    def release(self, task: Task) -> None:
        task.waiting -= 1
        if task.waiting == 0:
            self._ready(task)

    def attach(self, pred: Task, succ: Task) -> None:
        """Convert a `hold` on succ into a dependency on pred."""
        if pred.done:
            self.release(succ)
        else:
            pred.successors.append(succ)

    def _ready(self, task: Task) -> None:
        if task.resource is None or task.remaining <= 0.0:
            self._complete(task)
            return
        ev = task.resource.submit(task, self.now)
        if ev is not None:
            self._out.append(ev)

    def _complete(self, task: Task) -> None:
        out = self._out
        now = self.now
        stack = [task]
        while stack:
            t = stack.pop()
            t.done = True
            if t.on_done is not None:
                t.on_done(now)
                out = self._out
            succ = t.successors
            if succ:
                t.successors = ()
                for s in succ:
                    s.waiting -= 1
                    if s.waiting == 0:
                        if s.resource is None or s.remaining <= 0.0:
                            stack.append(s)
                        else:
                            ev = s.resource.submit(s, now)
                            if ev is not None:
                                out.append(ev)

    # --- the loop ----------------------------------------------------------------------------------
    def handle(self, ev: Event) -> list[Event]:
        """Apply one event; returns the new events."""
        res = self.resources[ev.resource]
        if ev.kind == PREEMPT:
            nxt = res.cut(ev.token, ev.time)
            return [nxt] if nxt is not None else []
        task, nxt = res.finish(ev.token, ev.time)
        if task is None:
            return []
        out = [nxt] if nxt is not None else []
        self._out = out
        try:
            self._complete(task)
        finally:
            self._out = []
        return out

    def run(self, check: Callable[[float, int], None] | None = None, check_every: int = 8192) -> bool:
        """Pop events until a handler sets `stopped` or none are left. Returns `stopped`."""
        heap = self._heap
        for ev in self._out:
            heapq.heappush(heap, ev)
        self._out = []
        pop, push = heapq.heappop, heapq.heappush
        resources = self.resources
        complete = self._complete
        n = self.events
        now = self.now
        while heap and not self.stopped:
            # The body of handle(), inlined: the loop runs once per event.
            ev = pop(heap)
            if ev[0] < now:
                raise SimulationError(f"simulated time went backwards: event at t={ev[0]!r} after t={now!r} "
                                      f"({n} events in)")
            now = self.now = ev[0]
            res = resources[ev[3]]
            if ev[2] == PREEMPT:
                nxt = res.cut(ev[4], now)
                if nxt is not None:
                    push(heap, nxt)
            else:
                task, nxt = res.finish(ev[4], now)
                if task is not None:
                    self._out = [nxt] if nxt is not None else []
                    complete(task)
                    for new in self._out:
                        push(heap, new)
                    self._out = []
            n += 1
            if check is not None and n % check_every == 0:
                self.events = n
                check(now, n)
        self.events = n
        return self.stopped

    def pending(self) -> int:
        return len(self._heap)


Engine = EventLoop  # the name this class had before; the runtime's Engine is a different thing
