"""The prefill pass as tasks, and admission (refill): prompts enter a batch's free rows in chunks of
prefill_batch, each chunk its own weight sweep (a fused plan's chunk admitted while the batch is live
waits for the next verification's sweep instead: fused_pass.py). Methods of `Simulation`.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..schedule import admit_count, defer_prefill, prefill_chunks
from ..trace_names import SPAN_HIDDEN, SPAN_KV, SPAN_PREFILL
from .engine import Task
from .state import BULK, TARGET, _Batch, _Pass, _prio


class PrefillPasses:
    """Admit prompts and build each prefill chunk's per-layer tasks."""

    def _prefill_pass(self, batch: _Batch, slots: np.ndarray) -> _Pass:
        """Admit the next len(slots) prompts into `slots` and prefill them as one chunk (one sweep).

        The prefill's logits give each sequence its first token; one asking for a single token is done
        when the chunk is."""
        p = self._new_pass("prefill")
        n = len(slots)
        p.batch, p.slots, p.n_prompts = batch.index, slots, n
        p.tokens = float(n * self.P)
        batch.seq[slots] = np.arange(self.queue_next, self.queue_next + n)
        batch.gen[slots] = 1
        batch.active[slots] = self.G > 1
        self.queue_next += n
        self._kv_take(batch, slots, np.full(n, self.P, dtype=np.int64), f"prompts of {n} admitted sequences")
        self.prefill_queue.append(p)
        if len(self.prefill_queue) == 1:  # chunks run one at a time: the first admitted holds the staging
            self._staging(p, True)
        self._build_prefill(p)
        batch.pending.append(p.gate)
        return p

    def _build_prefill(self, p: _Pass) -> None:
        eng, cm, L = self.eng, self.cm, self.L
        knobs = replace(self.knobs, prefill_batch=p.n_prompts)
        terms = cm.prefill_terms(knobs)
        gpu = terms["gpu"].at(self.placement)
        d2h = terms["d2h"].at(self.placement)
        resident = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": self.placement["kv_gpu"]}
        hidden_in = terms["h2d"].at(resident)  # the non-weight part: hidden states back from host
        micro, _ = cm.prefill_split(knobs)
        groups = max(1, min(micro, self.opt.prefill_groups))
        g_dur, o_dur, i_dur = gpu / (L * groups), d2h / (L * groups), hidden_in / (L * groups)
        o_q = cm.d2h_seconds(self._chunk) if o_dur > cm.d2h_seconds(self._chunk) else 0.0
        i_q = cm.h2d_seconds(self._chunk) if i_dur > cm.h2d_seconds(self._chunk) else 0.0
        n, traced = p.index, self._traced(p.index)
        end = Task("prefill done", None, None, 0.0, pass_index=n, on_done=lambda now, p=p: self._prefill_done(p, now))
        p.gate = end
        prev_gpu: list[Task | None] = [None] * groups
        prev_out: list[Task | None] = [None] * groups
        for j in range(L):
            release = self._layer_release(p, j)
            gpus, layer_tasks = [], []
            for g in range(groups):
                first = None
                if micro > 1 and i_dur > 0:
                    first = Task(SPAN_HIDDEN, "h2d", self.h2d, i_dur, priority=_prio(TARGET, n, j, g),
                                 quantum=i_q, layer=j,
                                 micro_batch=g, pass_index=n, traced=traced)
                    eng.depend(prev_out[g], first)
                    layer_tasks.append(first)
                comp = Task(SPAN_PREFILL, "gpu", self.gpu, g_dur, priority=_prio(TARGET, n, j, g), layer=j, micro_batch=g,
                            pass_index=n, traced=traced)
                eng.depend(first if first is not None else prev_gpu[g], comp)
                out = Task(SPAN_KV, "d2h", self.d2h, o_dur, priority=_prio(BULK, n, j, g), quantum=o_q,
                           layer=j,
                           micro_batch=g, pass_index=n, traced=traced)
                eng.depend(comp, out)
                eng.depend(comp, release)
                eng.depend(out, end)
                layer_tasks += [comp, out]
                gpus.append(comp)
                prev_gpu[g], prev_out[g] = comp, (out if micro > 1 else None)
            self._wire_weights(p, j, gpus, gpus)
            for task in layer_tasks:
                eng.arm(task)
            eng.arm(release)
        for g in range(groups):
            eng.depend(prev_gpu[g], end)
        eng.arm(end)
        self._pump()

    def _prefill_done(self, p: _Pass, now: float) -> None:
        p.done = True
        self.generated += p.n_prompts  # the first token of each sequence
        if p in self.prefill_queue:
            head = self.prefill_queue[0] is p
            self.prefill_queue.remove(p)
            if head:
                self._staging(p, False)
                if self.prefill_queue:
                    self._staging(self.prefill_queue[0], True)
        if self.G <= 1:
            self.finished += p.n_prompts
            self.batches[p.batch].seq[p.slots] = -1
            self._kv_free(self.batches[p.batch], p.slots)
        else:
            self._kv_take(self.batches[p.batch], p.slots, np.ones(p.n_prompts, dtype=np.int64),
                          "first tokens after prefill")
        start = self.last_end
        self._segment("prefill", now)
        self.prefill_log.append((p.index, p.batch, start, now, p.n_prompts))
        if self.finished >= self.N:
            self.makespan = now
            self.eng.stopped = True

    def _refill(self, batch: _Batch) -> None:
        """Admit waiting prompts into the batch's free slots, in prefill chunks (the schedule's rule,
        planner/schedule.py: only when a whole chunk's worth can go in, or the batch is idle)."""
        free = batch.free_slots()
        if self.deferred is not None and self.deferred.batch == batch.index:  # rows already taken, not yet live
            free = np.setdiff1d(free, self.deferred.slots)
        live = bool(batch.active.any())
        want = admit_count(len(free), self.N - self.queue_next, self.plan.prefill_batch, live,
                           self.plan.decode_batch, fused=self.fused)
        if want and defer_prefill(self.fused, live):  # a fused plan: the chunk rides in the next verification
            self._defer_chunk(batch, free[:want])
            return
        for start, end in prefill_chunks(want, self.plan.prefill_batch):
            self._prefill_pass(batch, free[start:end])
