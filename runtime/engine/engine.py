"""The engine: admission, prefill, verification, and the schedule's steps (planner/schedule.py)."""
from __future__ import annotations

import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from specoffload.planner.acceptance import AcceptanceCounts
from specoffload.planner.schedule import (DRAFT, REFILL, admit_count, defer_prefill, draft_step_layers, log_step,
                                          schedule_for)
from specoffload.planner.schema import Plan

from ..config import load_args
from ..host_attention import backend_note as attention_backend_note, clamp_threads, set_threads
from ..verify import accept_best, draw, processed_probs, sampling_accept, sampling_tensors
from .draft import Draft
from .requests import EngineError, Finished, Request, Seq, padded
from .stops import StopChecker
from .target import Target
from .timeline import Timeline


@dataclass
class EngineStats:
    generated_tokens: int = 0  # committed tokens, each sequence capped at its max_tokens
    prefill_tokens: int = 0
    sequences: int = 0  # finished sequences
    slots: int = 0  # verifications of one batch
    prefill_passes: int = 0  # prefill chunks on sweeps of their own (weight sweeps for prompts)
    fused_passes: int = 0  # prefill chunks that rode in a verification's sweep (plan.fuse_prefill)
    slot_times: list[float] = field(default_factory=list)
    slot_windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end), perf_counter clock
    prefill_seconds: float = 0.0  # the prefill sweeps of their own (a fused chunk's time is its verification's)
    decode_seconds: float = 0.0
    acceptance: AcceptanceCounts = field(default_factory=AcceptanceCounts)
    # The disk tier (plan.disk_layers > 0): tensor bytes of disk layers the passes used, and bytes read
    # from the checkpoint (the latter also counts reads ahead for a pass that never ran).
    disk_used_bytes: int = 0
    disk_read_bytes: int = 0

    @property
    def sweeps(self) -> int:
        """Weight sweeps: each verification and each prefill chunk on its own runs every layer once (a fused
        chunk adds none)."""
        return self.slots + self.prefill_passes

    @property
    def disk_bytes_per_sweep(self) -> float:
        return self.disk_used_bytes / self.sweeps if self.sweeps else 0.0


class Engine:
    """Runs requests through a plan. `run(requests, on_finish)` calls on_finish as each sequence ends."""

    def __init__(self, plan: Plan, target_dir: str | Path, draft_dir: str | Path | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_len: int | None = None, trace: bool = False, synthetic_acceptance: float | None = None,
                 threads: int | None = None):
        """plan: the Plan contract (planner/schema.py) this engine executes. The engine reads draft_len,
        num_batches, decode_batch, prefill_batch, policy and workload (max_context_tokens sizes the KV
        cache; max_prompt_len and gen_len_tokens name it in errors); the target reads the placement
        (gpu_attn_layers, gpu_ffn_layers, gpu_kv_sequences, weight_buffers) and micro_batches; the draft
        reads draft_kv and draft_sub_batch. fuse_prefill: refills of a live batch prefill their chunk in the next
        verification's sweep (`run`). Nothing else of the plan (its prediction, fingerprints) is used.
        synthetic_acceptance: TIMING MODE ONLY. Keep each draft token with this probability whatever
        it is (for random-weight models, which accept nothing); outputs are then not the target's.
        threads: CPU threads for host attention (torch's intra-op pool); None keeps the process's setting
        (the CLIs choose it with host_attention.set_threads: usable cores less one), lowered to the cores
        this process may use if it is above them."""
        self.threads = set_threads(threads) if threads is not None else clamp_threads()
        self.attention_path = attention_backend_note()  # builds the kernel now (once per machine), not mid-run
        self.plan = plan
        self.synthetic = synthetic_acceptance
        self._synthetic_rng = torch.Generator().manual_seed(0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # The dtype asked for, else the plan's (specoffload-plan --dtype), else fp32 on the CPU (exactness) and
        # bf16 on the GPU, as the checkpoints are.
        planned = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(getattr(plan, "dtype", ""))
        self.dtype = dtype or planned or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.k = plan.draft_len
        self.num_batches = plan.num_batches
        self.batch = plan.decode_batch
        self.n_slots = plan.decode_batch * plan.num_batches
        self.timeline = Timeline(enabled=trace)
        args = load_args(target_dir)
        # KV cache per sequence: what the plan was made for (its longest prompt, its generation length and
        # the verification's k + 1), not the model's whole context: the cache is allocated up front.
        self.model_len = args.max_position_embeddings
        self.planned_len = plan.workload.max_context_tokens + self.k + 1
        self.max_len = min(max_len or self.planned_len, self.model_len)
        self.target = Target(target_dir, plan, self.device, self.dtype, self.n_slots, self.max_len, self.timeline)
        self.draft = None
        if self.k > 0:
            if draft_dir is None:
                raise EngineError(f"plan policy {plan.policy} drafts {self.k} tokens but no draft model was given")
            from ..feature_draft import FeatureDraft, FeatureHeadError, is_feature_head

            if is_feature_head(draft_dir):  # an EAGLE-style head over the target's hidden states
                try:
                    self.draft = FeatureDraft(draft_dir, plan, self.target, self.device, self.dtype, self.n_slots,
                                              self.max_len, self.timeline)
                except FeatureHeadError as e:
                    raise EngineError(str(e)) from None
            else:
                self.draft = Draft(draft_dir, plan, self.device, self.dtype, self.n_slots, self.max_len,
                                   self.timeline)
            if self.draft.args.vocab_size != self.target.args.vocab_size:
                raise EngineError(f"draft vocabulary ({self.draft.args.vocab_size}) differs from the target's "
                                  f"({self.target.args.vocab_size}); the pair must share a tokenizer")
        # EOS: config.json's ids and generation_config.json's (an instruct model's end of turn is often only there).
        from ..generation_config import GenerationConfigError, load_generation_config

        try:
            self.eos = set(self.target.args.eos_token_id) | set(load_generation_config(target_dir).eos_token_ids)
        except GenerationConfigError as exc:
            raise EngineError(str(exc)) from None
        self.stats = EngineStats()
        # the schedule's steps taken: (op, batch, sequences), the first planner.schedule.LOG_STEPS of them
        self.schedule_log: list[tuple[str, int, int]] = []

    def host_tensor_bytes(self) -> float:
        """Bytes of the engine's own host tensors: weights held on the host (pinned or not) and KV caches.
        What the cost model's host (and, on a CUDA machine, pinned) memory pools hold; the process's RSS
        adds the interpreter, torch and libraries on top."""
        seen: dict[int, int] = {}

        def add(t: Tensor | None) -> None:
            if t is not None and t.device.type == "cpu" and t.numel():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        models = [self.target.w] + ([self.draft.w] if self.draft is not None else [])
        for w in models:
            for t in w.flat().values():
                add(t)
        caches = [self.target.kv.host, self.target.kv.dev]
        if self.draft is not None:
            caches.append(self.draft.kv)
        for c in caches:
            if c is not None:
                for t in c.k + c.v:
                    add(t)
        staging = self.target.disk.staging_bytes if self.target.disk is not None else 0  # the disk tier's buffers
        return float(sum(seen.values()) + staging)

    # -- admission ----------------------------------------------------------------------------
    def check(self, req: Request) -> None:
        """A request this engine cannot run is an error naming it and the fix."""
        if not req.prompt:
            raise EngineError(f"request {req.id!r}: empty prompt")
        if req.max_tokens < 1:
            raise EngineError(f"request {req.id!r}: max_tokens must be >= 1, got {req.max_tokens}")
        need = len(req.prompt) + req.max_tokens + self.k + 1
        what = (f"request {req.id!r}: prompt of {len(req.prompt)} tokens + max_tokens {req.max_tokens} "
                f"(+{self.k + 1} for verification)")
        if need > self.model_len:
            raise EngineError(f"{what} exceeds the model's context of {self.model_len} tokens; shorten the prompt "
                              "or lower max_tokens")
        if need > self.max_len:
            w = self.plan.workload
            raise EngineError(f"{what} exceeds the {self.max_len} tokens of KV cache per sequence this engine holds "
                              f"(the plan's workload: prompts up to {w.max_prompt_len} tokens, {w.gen_len_tokens} "
                              "generated); re-plan with a workload that covers it (specoffload-plan --workload from "
                              "these prompts, or --prompt-len/--gen-len), or size the cache for it (specoffload-run "
                              "--force)")
        if req.temperature < 0 or not 0 < req.top_p <= 1:
            raise EngineError(f"request {req.id!r}: temperature must be >= 0 and top_p in (0, 1]")
        if not 0 <= req.min_p <= 1:
            raise EngineError(f"request {req.id!r}: min_p must be in [0, 1], got {req.min_p}")
        if not 0 <= req.min_tokens <= req.max_tokens:
            raise EngineError(f"request {req.id!r}: min_tokens must be in [0, max_tokens={req.max_tokens}], got "
                              f"{req.min_tokens}")
        if req.stop and req.detokenize is None:
            raise EngineError(f"request {req.id!r}: stop strings need the tokenizer (Request.detokenize); build "
                              "requests with runtime/requests_io.py")
        if any(not s for s in req.stop):
            raise EngineError(f"request {req.id!r}: an empty stop string would stop at once; remove it")

    def _prefill(self, seqs: list[Seq]) -> list[Seq]:
        """Prompts into the caches, in chunks of the plan's prefill batch; returns those still running."""
        running = []
        bp = max(1, self.plan.prefill_batch)
        for c in range(0, len(seqs), bp):
            chunk = seqs[c:c + bp]
            t0 = time.perf_counter()
            slots = [s.slot for s in chunk]
            self.target.kv.reset(slots)
            n_new = torch.tensor([len(s.req.prompt) for s in chunk])
            tokens = padded([s.req.prompt for s in chunk])
            logits = self.target.forward(slots, tokens, n_new, prefill=True, logits_at="last")
            running += self._first_tokens(chunk, logits, n_new, self.target.last_hidden)
            self.stats.prefill_passes += 1
            self.stats.prefill_seconds += time.perf_counter() - t0
        return running

    def _first_tokens(self, chunk: list[Seq], logits: Tensor, n_new: Tensor, hidden: Tensor | None) -> list[Seq]:
        """After a chunk's prefill (its last-position logits [B, V], the target's hidden states of its prompts
        when kept): first tokens, the draft's prefill, the counts; returns the sequences still running."""
        first = self._pick(chunk, logits)
        if self.draft is not None:
            self.draft.prefill(chunk, [s.req.prompt for s in chunk], hidden=hidden)
        self.stats.prefill_tokens += int(n_new.sum())
        running = []
        for s, tok in zip(chunk, first):
            if self._commit(s, [tok]):
                s.pending = [tok]
                running.append(s)
        return running

    def _pick(self, seqs: list[Seq], logits: Tensor) -> list[int]:
        """The next token per row from logits [B, V]: argmax, or a draw at the request's temperature/top-p."""
        out = logits.argmax(-1).cpu().tolist()
        for i, s in enumerate(seqs):
            if s.req.temperature > 0:
                p = processed_probs(logits[i:i + 1], *sampling_tensors([s.req]))
                out[i] = int(draw(p, [s.generator])[0])
        return out

    def _commit(self, s: Seq, tokens: list[int]) -> bool:
        """Append committed tokens, one at a time, up to max_tokens and the first that stops the sequence
        (EOS, a stop id, a stop string completed: engine/stops.py); nothing after it is committed or counted.
        False once the sequence is done."""
        if s.stops is None:
            s.stops = StopChecker(s.req, self.eos)
        for t in tokens:
            if s.remaining <= 0:
                break
            s.out.append(t)
            self.stats.generated_tokens += 1
            if s.stops.step(s.out):
                return False
        return s.remaining > 0

    # -- one verification of a batch ----------------------------------------------------------
    def _verify(self, seqs: list[Seq], between: Callable[[int], None] | None = None,
                chunk: list[Seq] | None = None) -> tuple[list[Seq], list[Seq]]:
        """Target pass over [last, d1..dk] for each sequence; accept; roll caches back. Returns the unfinished,
        and of `chunk` (admitted sequences whose prompts ride in this pass's sweep: the fused pass) those
        still running after their first token (the chunk is prefilled after the verification's layer work,
        and its first tokens are taken after the verification's tokens are committed)."""
        k = self.k if self.draft is not None else 0
        t_start = time.perf_counter()
        slots = [s.slot for s in seqs]
        base = self.target.kv.lengths(slots)
        tokens = torch.tensor([s.last for s in seqs], dtype=torch.long)[:, None]  # one tensor op, not one per row
        if k:
            tokens = torch.cat((tokens, torch.stack([s.drafted for s in seqs])), dim=1)
        n_new = torch.full((len(seqs),), k + 1, dtype=torch.long)
        if chunk:
            c_slots = [s.slot for s in chunk]
            self.target.kv.reset(c_slots)
            c_new = torch.tensor([len(s.req.prompt) for s in chunk])
            part = (c_slots, padded([s.req.prompt for s in chunk]), c_new)
            logits, c_logits = self.target.forward(slots, tokens, n_new, between=between, chunk=part)
        else:
            logits = self.target.forward(slots, tokens, n_new, between=between)  # [B, k+1, V]
        sampling = [s.req.temperature > 0 for s in seqs]
        drafted = tokens[:, 1:]
        best = logits.argmax(-1)  # [B, k+1]: the target's own tokens, scanned once
        n_acc, nxt = accept_best(drafted.to(logits.device), best)
        n_acc, nxt = n_acc.cpu(), nxt.cpu()
        if any(sampling):
            rows = [i for i, f in enumerate(sampling) if f]
            ss = [seqs[i] for i in rows]
            p = processed_probs(logits[rows], *sampling_tensors([s.req for s in ss])).cpu()
            if k:
                q = torch.stack([s.draft_probs for s in ss])
                a2, n2 = sampling_accept(drafted[rows], q, p, [s.generator for s in ss])
            else:
                a2 = torch.zeros(len(rows), dtype=torch.long)
                n2 = draw(p[:, 0], [s.generator for s in ss])
            n_acc[rows], nxt[rows] = a2, n2
        if self.synthetic is not None and k:
            # Timing mode: position i kept with the given probability, then the target's own token there.
            keep = torch.rand(len(seqs), k, generator=self._synthetic_rng) < self.synthetic
            n_acc = keep.long().cumprod(dim=1).sum(dim=1)
            nxt = best.cpu().gather(1, n_acc[:, None])[:, 0]
        self.stats.acceptance.record_rounds(n_acc, k)  # k = 0 too: one token per round
        n_list, nxt_list = n_acc.tolist(), nxt.tolist()
        news = [drafted[i, :a].tolist() + [nxt_list[i]] for i, a in enumerate(n_list)]
        keep = [b + 1 + a for b, a in zip(base.tolist(), n_list)]  # last + accepted drafts are now in the KV
        self.target.kv.rollback(slots, keep)
        if self.draft is not None:
            self.draft.commit(seqs, n_list, k, news)
        running = []
        for s, new in zip(seqs, news):
            s.drafted, s.draft_probs = None, None
            if self._commit(s, new):
                running.append(s)
        joined = []
        if chunk:
            joined = self._first_tokens(chunk, c_logits, c_new, self.target.chunk_hidden)
            self.stats.fused_passes += 1
        self.stats.slots += 1
        t_end = time.perf_counter()
        self.stats.slot_times.append(t_end - t_start)
        self.stats.slot_windows.append((t_start, t_end))
        return running, joined

    # -- the schedules --------------------------------------------------------------------------
    @torch.inference_mode()  # no autograd bookkeeping: ~8% per-op overhead on small models
    def run(self, requests: list[Request], on_finish: Callable[[Finished], None],
            progress: Callable[[int], None] | None = None,
            more: Callable[[], list[Request]] | None = None) -> EngineStats:
        """Generate every request; on_finish is called once per request, as soon as it is done.
        `more`, if given, is asked for further requests whenever slots are free and the queue is short
        (a stream of work: the run ends when it has none and every sequence is done).

        A fused plan (plan.fuse_prefill, one batch): a refill admits at most one prefill chunk; while the
        batch has live sequences the chunk's prompts wait (their slots taken) and ride in the next
        verification's sweep, and the sequences that did not end at their first token join the batch
        when it ends, before the draft round that follows (planner/schedule.py `defer_prefill`)."""
        for r in requests:
            self.check(r)
        queue = deque(requests)
        groups: list[list[Seq]] = [[] for _ in range(self.num_batches)]
        free: list[list[int]] = [list(range(g * self.batch, (g + 1) * self.batch)) for g in range(self.num_batches)]
        fused = self.plan.fuse_prefill
        chunks: dict[int, list[Seq]] = {}  # batch -> admitted sequences whose prompts ride in its next verification

        def finish(s: Seq) -> None:
            st = s.stops
            self.target.kv.reset([s.slot])
            if self.draft is not None:
                self.draft.release([s.slot])
            free[s.slot // self.batch].append(s.slot)
            self.stats.sequences += 1
            if st is not None and st.stopped:
                on_finish(Finished(s.req, list(s.out), st.finish_reason, st.stop_reason, st.stop_text))
            else:
                on_finish(Finished(s.req, list(s.out), "length"))
            if progress:
                progress(len(s.out))

        def take_more() -> None:
            if more is not None:
                for r in more():
                    self.check(r)
                    queue.append(r)

        def refill(g: int) -> int:
            """Admit queued requests into batch g's free slots, a prefill chunk at a time (the schedule's
            admission rule); returns how many were admitted. Fused: one chunk, deferred to the next
            verification while the batch is live (and none while a chunk already waits for it)."""
            if g in chunks:
                return 0
            if len(queue) < len(free[g]):
                take_more()
            want = admit_count(len(free[g]), len(queue), self.plan.prefill_batch, bool(groups[g]),
                               self.plan.decode_batch, fused=fused)
            if want == 0:
                return 0
            new = []
            for _ in range(want):
                req = queue.popleft()
                seed = zlib.crc32(f"{req.seed}:{req.id}".encode())  # per request: independent of batching
                new.append(Seq(req, free[g].pop(0), generator=torch.Generator().manual_seed(seed)))
            if defer_prefill(fused, bool(groups[g])):
                chunks[g] = new
                return want
            alive = self._prefill(new)
            for s in new:
                if s not in alive:
                    finish(s)
            groups[g].extend(alive)
            return want

        def verify(g: int, between: Callable[[int], None] | None = None) -> None:
            chunk = chunks.pop(g, [])
            running, joined = self._verify(groups[g], between, chunk)
            done = [s for s in groups[g] if s not in running] + [s for s in chunk if s not in joined]
            groups[g] = running + joined
            for s in done:
                finish(s)

        class View:  # what the schedule reads (planner/schedule.py ScheduleView)
            @staticmethod
            def live(g: int) -> bool:
                return bool(groups[g])

            @staticmethod
            def waiting() -> bool:  # a stream of work (`more`) is asked when the queue is empty
                if not queue:
                    take_more()
                return bool(queue)

        # The schedule's steps (planner/schedule.py; the simulator follows the same ones). A draft round is
        # created when its step comes and run lazily: in full before its own batch's verification, or, when
        # another batch is verified first (interleaved), one draft step every `every` target layers.
        pending: dict[int, Iterator[None]] = {}
        every = draft_step_layers(self.target.args.n_layers, self.k)

        def interleave(steps: Iterator[None]) -> Callable[[int], None]:
            def between(j: int) -> None:
                if j % every == 0:
                    next(steps, None)
            return between

        def drain(g: int) -> None:
            for _ in pending.pop(g, ()):
                pass

        disk = self.target.disk
        disk_at_start = (disk.used_bytes, disk.read_bytes) if disk is not None else (0, 0)
        t_start = time.perf_counter()
        for step in schedule_for(self.num_batches, self.k).steps(View):
            g = step.batch
            if step.op == REFILL:
                drain(g)
                log_step(self.schedule_log, step.op, g, refill(g))
            elif step.op == DRAFT:
                drain(g)
                log_step(self.schedule_log, step.op, g, len(groups[g]))
                if self.draft is not None:
                    pending[g] = self.draft.propose(groups[g], self.k)
            else:
                drain(g)
                log_step(self.schedule_log, step.op, g, len(groups[g]))
                others = [b for b in pending if b != g]
                verify(g, interleave(pending[others[0]]) if others else None)
                for b in others:  # what the layers did not absorb
                    drain(b)
        if chunks:  # the schedule verifies a batch after every refill that deferred a chunk
            raise AssertionError(f"prompts admitted but never prefilled (batches {sorted(chunks)})")
        self.stats.decode_seconds = time.perf_counter() - t_start - self.stats.prefill_seconds
        if disk is not None:  # this run's share (an engine may run several times)
            self.stats.disk_used_bytes += disk.used_bytes - disk_at_start[0]
            self.stats.disk_read_bytes += disk.read_bytes - disk_at_start[1]
        return self.stats
