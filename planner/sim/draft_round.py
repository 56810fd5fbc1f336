"""The draft round as tasks: `CostModel.draft_round` for the live sequences of a batch.

GPU-only rounds (draft KV on the GPU, or recomputed) are one GPU task preemptible at each draft
layer step; host-KV rounds are a chain of pieces gpu -> d2h -> cpu -> h2d. Methods of `Simulation`.
"""
from __future__ import annotations

import math

from ..trace_names import SPAN_DRAFT_ATTN, SPAN_DRAFT_ATTN_OUT, SPAN_DRAFT_QKV, SPAN_DRAFT_STEP
from .engine import Task
from .state import DRAFT, _prio


class DraftRounds:
    """Build one draft round's tasks."""

    def _draft_round(self, batch: int, n_seqs: int, deps: list[Task], n_ref: int) -> Task | None:
        """A draft round proposing k tokens for n_seqs sequences; returns its final join."""
        if not self.k or n_seqs <= 0:
            return None
        eng = self.eng
        dr = self.cm.draft_round(self.knobs, n_seqs)
        traced = self._traced(n_ref)
        end = Task("draft done", None, None, 0.0, batch=batch, pass_index=n_ref)
        Ld = self.d.num_layers
        if dr["cpu"] <= 0 and dr["d2h"] <= 0 and dr["h2d"] <= 0:
            # Preemptible at each draft layer of each forward (per sub-batch when the context is recomputed):
            # the granularity at which the runtime launches draft work; stream priorities are finer still.
            subs = math.ceil(n_seqs / min(self.plan.draft_sub_batch, n_seqs)) if self.plan.draft_kv == "recompute" else 1
            steps = self.k * Ld * subs
            g = Task(SPAN_DRAFT_STEP, "gpu", self.gpu, dr["gpu"], priority=_prio(DRAFT, n_ref),
                     quantum=dr["gpu"] / steps, batch=batch,
                     pass_index=n_ref, traced=traced)
            for dep in deps:
                eng.depend(dep, g)
            eng.depend(g, end)
            eng.arm(g)
        else:
            pieces = max(1, min(self.opt.draft_pieces, self.k * Ld))
            prev = None
            for i in range(pieces):
                chain = []
                for kind, label, res in ((SPAN_DRAFT_STEP, "gpu", self.gpu), (SPAN_DRAFT_QKV, "d2h", self.d2h),
                                         (SPAN_DRAFT_ATTN, "cpu", self.cpu), (SPAN_DRAFT_ATTN_OUT, "h2d", self.h2d)):
                    dur = dr[label] / pieces
                    if dur <= 0:
                        continue
                    task = Task(kind, label, res, dur, priority=_prio(DRAFT, n_ref, 0, i), batch=batch, pass_index=n_ref,
                                traced=traced)
                    if prev is None:
                        for dep in deps:
                            eng.depend(dep, task)
                    else:
                        eng.depend(prev, task)
                    chain.append(task)
                    prev = task
                for task in chain:
                    eng.arm(task)
            eng.depend(prev, end)
        eng.arm(end)
        return end
