"""The fused prefill (a plan with `fuse_prefill`): a refill's chunk of prompts rides in the next
verification's weight sweep instead of a sweep of its own (planner/schedule.py `defer_prefill`).
Methods of `Simulation`; `VerifyPasses._verify_pass` calls them while it builds a verification.

- Admission (`_defer_chunk`): the chunk's rows are taken and hold their prompts' KV from admission, but
  its sequences are not live: the verification that comes next does not verify them, and the draft
  round before it does not draft them.
- The pass (`_fused_layer`, `_fused_tail`): per streamed layer j, once its weights are on the device, the
  chunk's layer-j work (qkv, the prompt attention, o-proj/router/FFN on the gpu; its KV down on d2h;
  with micro-chunks the hidden states back from host memory on h2d, in up to `prefill_groups` groups as
  a stand-alone chunk has them). On a GPU it runs on a stream of its own (the runtime's chunk stream),
  launched once the first micro-batch's qkv is issued, after the chunk's previous layer, beside the
  verification's layer j (whose FFN does not wait for it; the two share the GPU, preemptible every
  CHUNK_QUANTUM) and ahead of the verification's layer j + 1 (same priority as layer j's work): it fills the
  GPU time the verification leaves idle while it attends on the CPU, and the layer's weight buffer, freed
  after both, is not held while the next layer runs (with two buffers that would stall the copies). On a CPU-only machine everything is one device: the chunk's layer after the
  verification's, and the verification's next layer after the chunk's. The layer's buffer is
  released after both. No weight copy or disk read of its own; the routed experts the stream copies
  count the chunk's tokens too. Durations: `CostModel.prefill_terms` for a chunk of this size,
  split into the target's per-layer part, its LM head over the chunk's last positions, and the draft's
  prefill (the difference to the same chunk without a draft); the disk tier's per-sweep costs are not
  charged (no extra sweep).
- After the verification's LM head: the chunk's LM head, then the draft's prefill of the chunk (gpu; a
  host draft KV's copy down on d2h), serially. The pass ends after them and after the chunk's last KV
  copy; then the chunk's sequences join the batch with their first token (`_fused_join`) and are drafted
  in the next round.
- Memory: the chunk's host staging while the pass runs, as a stand-alone chunk takes it; and on the
  device both working sets at once: what that needs beyond what the plan counted
  (`memory.fused_extra_bytes`) is taken for the pass, so a plan that did not count it overflows with
  that part named.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..trace_names import SPAN_DRAFT_PREFILL, SPAN_HIDDEN, SPAN_KV, SPAN_LM_HEAD, SPAN_PREFILL
from .engine import Task
from .memory import fused_extra_bytes
from .state import BULK, TARGET, _Batch, _Chunk, _Pass, _prio


CHUNK_QUANTUM = 1e-3  # seconds: how soon a verification's kernel gets the GPU from a running chunk's kernels


@dataclass(frozen=True)
class _FusedFigures:
    """Seconds of one fused chunk's parts (a chunk of n prompts)."""

    groups: int  # pipelined groups of its micro-chunks per layer
    gpu: float  # one group's target work in one layer
    kv_out: float  # one group's d2h in one layer (its KV; with micro-chunks, the hidden states out)
    hidden_in: float  # one group's hidden states back from host memory in one layer (0: none)
    kv_quantum: float
    in_quantum: float
    lm_head: float  # the target's LM head over the chunk's last positions
    draft_gpu: float  # the draft's prefill of the chunk
    draft_d2h: float  # its KV down to the host (draft KV on the host)
    extra_bytes: float  # device working set beyond what the plan counts (memory.fused_extra_bytes)


class FusedPasses:
    """Defer a refill's chunk and build its tasks inside the next verification."""

    def _defer_chunk(self, batch: _Batch, slots: np.ndarray) -> None:
        """Admit the next len(slots) prompts into `slots`; their prefill rides in the next verification."""
        n = len(slots)
        batch.seq[slots] = np.arange(self.queue_next, self.queue_next + n)
        batch.gen[slots] = 0
        batch.active[slots] = False
        self.queue_next += n
        self._kv_take(batch, slots, np.full(n, self.P, dtype=np.int64), f"prompts of {n} admitted sequences")
        self.deferred = _Chunk(batch.index, slots)

    def _fused_figures(self, n: int) -> _FusedFigures:
        got = self._fused_cache.get(n)
        if got is not None:
            return got
        cm, L = self.cm, self.L
        knobs = replace(self.knobs, prefill_batch=n)
        at = {**self.placement, "disk": 0.0}  # no sweep of its own: no disk reads or conversions
        spec = cm.prefill_terms(knobs)
        base = cm.prefill_terms(replace(knobs, draft_len=0)) if self.k else spec
        gpu_target = base["gpu"].at(at)
        lm = cm.lm_head_seconds(self.t, n)
        resident = {"attn_gpu": 1.0, "ffn_gpu": 1.0, "kv_gpu": self.placement["kv_gpu"], "disk": 0.0}
        micro, _ = cm.prefill_split(knobs)
        groups = max(1, min(micro, self.opt.prefill_groups))
        g_dur = max(0.0, gpu_target - lm) / (L * groups)
        o_dur = base["d2h"].at(at) / (L * groups)
        i_dur = base["h2d"].at(resident) / (L * groups) if micro > 1 else 0.0
        chunk = self._chunk
        got = _FusedFigures(
            groups=groups, gpu=g_dur, kv_out=o_dur, hidden_in=i_dur,
            kv_quantum=cm.d2h_seconds(chunk) if o_dur > cm.d2h_seconds(chunk) else 0.0,
            in_quantum=cm.h2d_seconds(chunk) if i_dur > cm.h2d_seconds(chunk) else 0.0,
            lm_head=lm,
            draft_gpu=max(0.0, spec["gpu"].at(at) - gpu_target),
            draft_d2h=max(0.0, spec["d2h"].at(at) - base["d2h"].at(at)),
            extra_bytes=fused_extra_bytes(cm, self.knobs, self.placement, n))
        self._fused_cache[n] = got
        return got

    def _fused_start(self, p: _Pass, chunk: _Chunk) -> tuple[_FusedFigures, dict]:
        """Attach the deferred chunk to verification p: its tokens in the sweep, its memory for the pass.
        Returns its figures and the state `_fused_layer` carries across layers."""
        p.chunk = chunk
        p.tokens += float(chunk.n_prompts * self.P)  # the routed experts the sweep copies count them too
        self._staging(chunk, True)
        fz = self._fused_figures(chunk.n_prompts)
        if fz.extra_bytes > 0:
            chunk.extra_bytes = fz.extra_bytes
            self._alloc("host" if self.cpu_only else "gpu", fz.extra_bytes,
                        f"fused pass working set: a prefill chunk of {chunk.n_prompts} prompts beside the "
                        f"verification (the plan holds the larger of the two only)")
        return fz, {"gpu": [None] * fz.groups, "out": [None] * fz.groups, "outs": [], "tasks": []}

    def _fused_layer(self, fz: _FusedFigures, p: _Pass, j: int, after: list[Task], state: dict) -> list[Task]:
        """The chunk's layer-j tasks (not armed), each group's compute after `after`; returns them.
        `state` carries each group's previous compute and output across layers, and the outputs."""
        eng, n, traced = self.eng, p.index, self._traced(p.index)
        prev_gpu, prev_out = state["gpu"], state["out"]
        tasks, comps = [], []
        # Beside a GPU the chunk runs on a stream of its own, beside the verification's layer j (sharing the
        # GPU: preemptible at CHUNK_QUANTUM) and before its layer j + 1 (the runtime's compute stream waits for
        # the chunk's layer before the next one): its priority is layer j's. On a CPU-only machine it is the
        # device's work in line with the verification's.
        prio = _prio(TARGET, n, j, 0)
        quantum = 0.0 if self.cpu_only else CHUNK_QUANTUM
        for g in range(fz.groups):
            first = None
            if fz.hidden_in > 0:
                first = Task(SPAN_HIDDEN, "h2d", self.h2d, fz.hidden_in, priority=prio, quantum=fz.in_quantum,
                             layer=j, micro_batch=g, pass_index=n, traced=traced)
                eng.depend(prev_out[g], first)
                tasks.append(first)
            comp = Task(SPAN_PREFILL, "gpu", self.gpu, fz.gpu, priority=prio, quantum=quantum, layer=j,
                        micro_batch=g, pass_index=n, traced=traced)
            eng.depend(first if first is not None else prev_gpu[g], comp)
            for a in after:
                eng.depend(a, comp)
            out = Task(SPAN_KV, "d2h", self.d2h, fz.kv_out, priority=_prio(BULK, n, j, g), quantum=fz.kv_quantum,
                       layer=j, micro_batch=g, pass_index=n, traced=traced)
            eng.depend(comp, out)
            tasks += [comp, out]
            comps.append(comp)
            state["outs"].append(out)
            prev_gpu[g], prev_out[g] = comp, (out if fz.hidden_in > 0 else None)
        state["tasks"] = tasks
        return comps

    def _fused_tail(self, fz: _FusedFigures, p: _Pass, lm: Task, state: dict, end: Task) -> None:
        """After the verification's LM head: the chunk's LM head, then the draft's prefill; `end` waits
        for them and for the chunk's KV copies."""
        eng, n, traced = self.eng, p.index, self._traced(p.index)
        head = Task(SPAN_LM_HEAD, "gpu", self.gpu, fz.lm_head, priority=_prio(TARGET, n, self.L, 1),
                    pass_index=n, traced=traced)
        eng.depend(lm, head)
        for g in state["gpu"]:
            eng.depend(g, head)
        last = head
        tail = [head]
        # The draft's prefill of the chunk, then its KV down to the host (draft KV on the host), in order.
        for kind, resource, pool, seconds, prio in (
                (SPAN_DRAFT_PREFILL, "gpu", self.gpu, fz.draft_gpu, _prio(TARGET, n, self.L, 2)),
                (SPAN_KV, "d2h", self.d2h, fz.draft_d2h, _prio(BULK, n, self.L, 0))):
            if seconds > 0:
                task = Task(kind, resource, pool, seconds, priority=prio, pass_index=n, traced=traced)
                eng.depend(last, task)
                tail.append(task)
                last = task
        eng.depend(last, end)
        for out in state["outs"]:
            eng.depend(out, end)
        state["outs"] = []
        for task in tail:
            eng.arm(task)

    def _fused_join(self, p: _Pass, chunk: _Chunk) -> None:
        """Fused pass p ended: the chunk's sequences join the batch with their first token."""
        batch = self.batches[chunk.batch]
        slots, n = chunk.slots, chunk.n_prompts
        self.fused_passes += 1
        self.fused_log.append((p.index, n))
        self.generated += n  # the first token of each sequence
        self._staging(chunk, False)
        if chunk.extra_bytes:
            self._free("host" if self.cpu_only else "gpu", chunk.extra_bytes)
        batch.gen[slots] = 1
        if self.G <= 1:
            self.finished += n
            batch.seq[slots] = -1
            self._kv_free(batch, slots)
        else:
            batch.active[slots] = True
            self._kv_take(batch, slots, np.ones(n, dtype=np.int64), "first tokens after prefill")
