"""The verification pass as tasks, acceptance drawn per sequence, and the order of passes: the steps
of the schedule (planner/schedule.py, the rules the runtime's engine follows too) turned into tasks.
Methods of `Simulation`.
"""
from __future__ import annotations

import numpy as np

from ..schedule import DRAFT, REFILL, log_step
from ..trace_names import SPAN_ATTN, SPAN_ATTN_OUT, SPAN_FFN, SPAN_LM_HEAD, SPAN_QKV
from .engine import Task
from .state import TARGET, _Batch, _Pass, _prio


class VerifyPasses:
    """Build each verification's per-layer, per-micro-batch tasks; apply its outcome; pick the next."""

    def _draft_for(self, batch: _Batch) -> None:
        """Issue the batch's draft round (after its pending prefills); the next verification waits for it."""
        live = int(batch.active.sum())
        if self.k and live:
            dj = self._draft_round(batch.index, live, batch.pending, len(self.passes))
            if dj is not None:
                batch.pending = [dj]

    def _advance(self) -> None:
        """Follow the schedule (planner/schedule.py) up to its next verification, issuing the refills and
        draft rounds before it; the verification's end (`_verify_done`) resumes it."""
        for step in self._steps:
            batch = self.batches[step.batch]
            if step.op == REFILL:
                before = self.queue_next
                self._refill(batch)
                log_step(self.schedule_log, step.op, step.batch, self.queue_next - before)
            elif step.op == DRAFT:
                log_step(self.schedule_log, step.op, step.batch, int(batch.active.sum()))
                self._draft_for(batch)
            else:
                live = np.flatnonzero(batch.active)
                log_step(self.schedule_log, step.op, step.batch, len(live))
                self._verify_pass(batch, live)
                return

    def live(self, batch: int) -> bool:  # the ScheduleView the schedule reads
        return bool(self.batches[batch].active.any())

    def waiting(self) -> bool:
        return self.queue_next < self.N

    def _verify_pass(self, batch: _Batch, live: np.ndarray) -> None:
        eng, cm, t = self.eng, self.cm, self.t
        p = self._new_pass("verify")
        p.batch, p.slots = batch.index, live
        k1 = self.k + 1
        p.tokens = float(len(live) * k1)
        verify_tokens = p.tokens
        fz = fstate = None
        chunk = self.deferred
        if chunk is not None and chunk.batch == batch.index:  # the fused pass (fused_pass.py)
            self.deferred = None
            fz, fstate = self._fused_start(p, chunk)
        n, traced, X = p.index, self._traced(p.index), batch.index
        gate = Task("gate", None, None, 0.0, batch=X, pass_index=n)
        for dep in batch.pending:
            eng.depend(dep, gate)
        batch.pending = []
        p.gate = gate
        # Per micro-batch durations (contexts do not change within a verification).
        mbs = []
        m = self.m
        for i in range(m):
            idx = live[live % m == i]
            if not len(idx):
                continue
            on_gpu = idx[idx < self.gpu_kv]
            on_cpu = idx[idx >= self.gpu_kv]
            tok = len(idx) * k1
            q = cm.qkv_seconds(t, tok)
            if len(on_gpu):
                q += len(on_gpu) * cm.gpu_attention_seconds(t, 1, k1, self._ctx(batch, on_gpu))
            f = cm.ffn_seconds(t, tok)
            if len(on_cpu):
                down, up = cm.attention_io_bytes(t, len(on_cpu) * k1)
                io = (cm.d2h_seconds(down), cm.cpu_attention_seconds(t, len(on_cpu), k1, self._ctx(batch, on_cpu, host=True)),
                      cm.h2d_seconds(up))
            else:
                io = None
            mbs.append((i, q, io, f))
        gpu, cpu, d2h, h2d = self.gpu, self.cpu, self.d2h, self.h2d
        depend = eng.depend
        prev = {i: gate for i, *_ in mbs}
        base_n = _prio(TARGET, n)
        chunk_before: list[Task] = []  # CPU-only fused pass: the chunk's previous layer, before this one
        for j in range(self.L):
            release = self._layer_release(p, j)
            attn_users, ffn_users, layer_tasks = [], [], []
            comps: list[Task] = []
            base = base_n | (min(j, 255) << 8)
            for i, q, io, f in mbs:
                prio = base | i
                where = dict(priority=prio, layer=j, micro_batch=i, batch=X, pass_index=n, traced=traced)
                Q = Task(SPAN_QKV, "gpu", gpu, q, **where)
                depend(prev[i], Q)
                for c in chunk_before:
                    depend(c, Q)
                layer_tasks.append(Q)
                last = Q
                if io is not None:  # host attention: q/k/v down, attention on the CPU pool, output up
                    D = Task(SPAN_QKV, "d2h", d2h, io[0], **where)
                    C = Task(SPAN_ATTN, "cpu", cpu, io[1], **where)
                    U = Task(SPAN_ATTN_OUT, "h2d", h2d, io[2], **where)
                    depend(Q, D)
                    depend(D, C)
                    depend(C, U)
                    layer_tasks += (D, C, U)
                    last = U
                F = Task(SPAN_FFN, "gpu", gpu, f, **where)
                depend(last, F)
                if fz is not None and not self.cpu_only and not comps:
                    # The chunk's layer, launched on its own stream once the first micro-batch's qkv is issued:
                    # beside this layer's work (whose FFN does not wait for it), before the next layer's.
                    comps = self._fused_layer(fz, p, j, [Q], fstate)
                    layer_tasks += fstate["tasks"]
                depend(F, release)
                layer_tasks.append(F)
                attn_users.append(Q)
                ffn_users.append(F)
                prev[i] = F
            if fz is not None and self.cpu_only:  # one device: the chunk's layer after the verification's
                comps = self._fused_layer(fz, p, j, ffn_users, fstate)
                layer_tasks += fstate["tasks"]
            chunk_before = comps  # the next layer's work waits for the chunk's (the runtime's stream wait)
            for c in comps:
                depend(c, release)
            attn_users += comps
            ffn_users += comps
            self._wire_weights(p, j, attn_users, ffn_users)
            for task in layer_tasks:
                eng.arm(task)
            eng.arm(release)
        # The LM head, then the runtime's bookkeeping for the pass (verify, roll back, commit: host time).
        lm = Task(SPAN_LM_HEAD, "gpu", gpu, cm.lm_head_seconds(t, verify_tokens) + cm.host_pass_seconds(len(p.slots)),
                  priority=_prio(TARGET, n, self.L, 0), batch=X, pass_index=n, traced=traced)
        for task in prev.values():
            eng.depend(task, lm)
        for task in chunk_before:
            eng.depend(task, lm)
        end = Task("verified", None, None, 0.0, batch=X, pass_index=n,
                   on_done=lambda now, p=p: self._verify_done(p, now))
        eng.depend(lm, end)
        if fz is not None:  # the chunk's LM head and the draft's prefill of it, then the pass ends
            self._fused_tail(fz, p, lm, fstate, end)
        eng.arm(lm)
        eng.arm(end)
        eng.arm(gate)
        self._pump()

    def _verify_done(self, p: _Pass, now: float) -> None:
        p.done = True
        batch = self.batches[p.batch]
        idx = p.slots
        n = len(idx)
        k = self.k
        if k:
            accepted = (self.rng.random((n, k)) < self.acc).cumprod(axis=1).sum(axis=1)
        else:
            accepted = np.zeros(n, dtype=np.int64)
        self.acceptance.record_rounds(accepted, k)
        tokens = accepted + 1
        kept = np.minimum(tokens, self.G - batch.gen[idx])
        batch.gen[idx] += kept
        self.kept_sum += float(kept.sum())
        self.generated += int(kept.sum())
        self._kv_take(batch, idx, kept, "tokens kept by a verification")
        done = idx[batch.gen[idx] >= self.G]
        if len(done):
            batch.active[done] = False
            batch.seq[done] = -1
            self.finished += len(done)
            self._kv_free(batch, done)  # the slot's KV is freed at finish, ready for a refill
        if p.chunk is not None:  # a fused pass: the chunk's sequences join now, to be drafted next round
            self._fused_join(p, p.chunk)
        start = self.last_end
        self._segment("decode", now)
        self.step_log.append((p.index, p.batch, start, now, n))
        if self.finished >= self.N:
            self.makespan = now
            self.eng.stopped = True
            self._advance()  # the schedule's closing steps: nothing waits, nothing is live, so no tasks
            return
        self._advance()
        self._pump()
