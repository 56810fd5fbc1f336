"""The offload engine: executes a Plan on real checkpoints, on CUDA with streams or on the CPU.

Scope: placement, weight streaming, the target's layer loop (CPU attention over the host KV
cache, FFN/MoE on the device, micro-batches), the draft and its KV cache in the plan's mode, the
three schedules (offload-only, draft-then-verify, two batches interleaved), verification, and
continuous refill from a request queue. Input/output files, resume and reports live in run_cli.py.

The loop, per decode slot (interleaved: batch A verifies while the draft drafts for batch B):

    for layer j:  copy the next streamed layers' weights on the copy stream into every free buffer
                  (in sweep order, past the last layer into the next pass)
                  for each micro-batch: QKV on the device -> q, k, v to the host -> attention on the
                  CPU over the host KV cache -> output back -> O-proj + FFN/MoE on the device
                  (a slice of the draft's work for batch B is launched before the CPU attention,
                  so the GPU drafts while the CPU attends)
                  release layer j's buffer (an event on the compute stream); it takes the next copy
    verify A (accept the matching prefix + the target's token), roll caches back, refill free slots.

On CUDA, events order copy, compute and buffer reuse; nothing synchronises the whole device inside
the loop. Without CUDA the same code runs on the CPU: streams and events become no-ops, weights
are used where they lie, and attention and FFN share the one processor.

Files: requests.py (Request, Seq, Finished, EngineError), timeline.py (Timeline, PassRecord: spans named
as planner/trace_names.py declares), streaming.py (Streams, LayerStreamer: weight streaming),
target_kv.py (TargetKV: the device/host KV partition), target.py (Target: the layer loop), draft.py
(Draft), stops.py (StopChecker: EOS, stop ids, stop strings, min_tokens per sequence), engine.py (Engine: admission, prefill, verification, and the steps of the schedule that
planner/schedule.py states for the engine and the simulator alike). A feature draft
(runtime/feature_draft.py) is the other kind of draft the Engine runs.
"""
from .draft import Draft
from .engine import Engine, EngineStats
from .requests import EngineError, Finished, Request, Seq, padded
from .streaming import LayerStreamer, Streams
from .target import Target
from .target_kv import TargetKV
from .timeline import PassRecord, Timeline

__all__ = ["Draft", "Engine", "EngineError", "EngineStats", "Finished", "LayerStreamer", "PassRecord", "Request", "Seq",
           "Streams", "Target", "TargetKV", "Timeline", "padded"]
