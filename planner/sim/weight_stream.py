"""The weight stream: one sweep over the streamed layers per pass, copies issued in order into the
weight buffers, each buffer held until the layer's last compute in that pass.

Methods of `Simulation` (mixed in); the stream's state (streamed, attn_streamed, ffn_streamed,
issued, free_buffers, stream_pos, buffer_taken, ...) is set up by `Simulation.__init__`.
"""
from __future__ import annotations

from ..trace_names import SPAN_WEIGHTS
from .engine import Task
from .state import BULK, _Pass, _prio


class WeightStream:
    """Issue streamed-weight copies as buffers free up and make each layer's users wait for them."""

    def _ffn_copy(self, tokens: float) -> tuple[float, float]:
        """(seconds, bytes) of one layer's streamed FFN copy for `tokens` routed tokens."""
        if tokens not in self._ffn_copy_cache:
            nbytes = self.cm.ffn_streamed_bytes(tokens)
            self._ffn_copy_cache[tokens] = (self.cm.h2d_seconds(nbytes), nbytes)
        return self._ffn_copy_cache[tokens]

    def _quantum(self, seconds: float, nbytes: float) -> float:
        return seconds * self._chunk / nbytes if nbytes > self._chunk else 0.0

    def _sweep_allowed(self, n: int) -> bool:
        if n < len(self.passes):
            return True
        return n == len(self.passes) and self.finished < self.N

    def _pump(self) -> None:
        layers = self.streamed
        if not layers:
            return
        while self.free_buffers > 0 and not self.eng.stopped:
            n, idx = divmod(self.stream_pos, len(layers))
            if not self._sweep_allowed(n):
                return
            j = layers[idx]
            need = self._buffer_need(n, j)
            if need > self.free_buffers * (1 + 1e-12):
                return
            self._issue(n, j, need)
            self.free_buffers -= need
            self.stream_pos += 1

    def _buffer_need(self, n: int, j: int) -> float:
        if not self.by_bytes:
            return 1
        tokens = self.passes[n].tokens if n < len(self.passes) else self.default_tokens
        return ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))

    def _issue(self, n: int, j: int, need: float) -> None:
        eng = self.eng
        p = self.passes[n] if n < len(self.passes) else None
        tokens = p.tokens if p is not None else self.default_tokens
        traced = self._traced(n)
        attn = ffn = None
        if self.attn_streamed[j]:
            attn = Task(SPAN_WEIGHTS, "h2d", self.h2d, self._attn_copy, priority=_prio(BULK, n, j, 0),
                        quantum=self._quantum(self._attn_copy, self.t.attn_bytes_per_layer), layer=j, pass_index=n,
                        traced=traced)
        if self.ffn_streamed[j]:
            secs, nbytes = self._ffn_copy(tokens)
            ffn = Task(SPAN_WEIGHTS, "h2d", self.h2d, secs, priority=_prio(BULK, n, j, 1),
                       quantum=self._quantum(secs, nbytes),
                       layer=j, pass_index=n, traced=traced)
        self.issued[(n, j)] = (attn, ffn, tokens, need)
        if self.buffer_bytes:  # the bytes this layer's copy puts in its buffer, until the layer is done
            nbytes = ((self.t.attn_bytes_per_layer if self.attn_streamed[j] else 0.0)
                      + (self._ffn_copy(tokens)[1] if self.ffn_streamed[j] else 0.0))
            self.buffer_taken[(n, j)] = nbytes
            self._alloc("gpu", nbytes, f"weight buffer: layer {j} for pass {n}")
        for task in (attn, ffn):
            if task is not None:
                eng.arm(task)
        if p is not None and j in p.waiting_weights:
            attn_users, ffn_users = p.waiting_weights.pop(j)
            if attn is not None:
                for u in attn_users:
                    eng.attach(attn, u)
            if ffn is not None:
                for u in ffn_users:
                    eng.attach(ffn, u)

    def _release_buffer(self, n: int, j: int) -> None:
        got = self.issued.pop((n, j), None)
        taken = self.buffer_taken.pop((n, j), 0.0)
        if taken:
            self._free("gpu", taken)
        self.free_buffers += got[3] if got is not None else (0 if self.by_bytes else 1)
        self._pump()

    def _wire_weights(self, p: _Pass, j: int, attn_users: list[Task], ffn_users: list[Task]) -> None:
        """Make layer j's users wait for its streamed weights in pass p's sweep."""
        eng = self.eng
        attn_streamed, ffn_streamed = self.attn_streamed[j], self.ffn_streamed[j]
        if not (attn_streamed or ffn_streamed):
            return
        got = self.issued.get((p.index, j))
        if got is None:  # not issued yet: hold the users until the stream issues the copy
            for u in attn_users if attn_streamed else ():
                eng.hold(u)
            for u in ffn_users if ffn_streamed else ():
                eng.hold(u)
            p.waiting_weights[j] = (attn_users, ffn_users)
            return
        attn, ffn, tokens, _ = got
        for u in attn_users:
            eng.depend(attn, u)
        for u in ffn_users:
            eng.depend(ffn, u)
        if ffn_streamed and p.tokens != tokens:
            need, _ = self._ffn_copy(p.tokens)
            have, _ = self._ffn_copy(tokens)
            if need > have * (1 + 1e-9):  # prefetched for fewer routed experts than this pass touches
                top = Task(SPAN_WEIGHTS, "h2d", self.h2d, need - have, priority=_prio(BULK, p.index, j, 2), layer=j,
                           pass_index=p.index, traced=self._traced(p.index))
                for u in ffn_users:
                    eng.depend(top, u)
                eng.arm(top)

    def _layer_release(self, p: _Pass, j: int) -> Task:
        """A join after layer j's last compute in pass p: frees the layer's buffer."""
        streamed = self.attn_streamed[j] or self.ffn_streamed[j]

        def done(now: float, p=p, j=j, streamed=streamed) -> None:
            p.layers_done = max(p.layers_done, j + 1)
            if streamed:
                self._release_buffer(p.index, j)

        return Task("release", None, None, 0.0, on_done=done, layer=j, pass_index=p.index)
