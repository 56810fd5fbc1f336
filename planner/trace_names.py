"""Track and span names: the one vocabulary of the runtime's timeline, the simulator's trace, the profiler's
in-engine fit and the run report (pure Python; the runtime imports it, never the reverse).

Tracks are the resources work runs on. Spans are named `slice_name(kind, layer, micro_batch, batch)`,
e.g. "qkv L3 mb1": a kind below, then the layer, micro-batch and batch where they apply. The profiler
selects the engine's spans by `layer_prefix(kind)` ("qkv L"), so a kind renamed here is renamed for
both the engine that writes it and the fit that reads it.
"""
from __future__ import annotations

# -- tracks -----------------------------------------------------------------------------------------
TRACK_GPU = "gpu"  # device compute
TRACK_H2D = "h2d"  # host -> device copies (streamed weights, attention outputs)
TRACK_D2H = "d2h"  # device -> host copies (q, k, v for host attention; prompt keys/values)
TRACK_CPU_ATTN = "cpu-attn"  # attention on the CPU over the host KV cache
TRACK_DISK = "disk"  # the disk tier: layers read from the checkpoint into staging buffers

# Resource keys as the cost model and the reports name them -> track names in traces and timelines.
TRACKS = {"gpu": TRACK_GPU, "h2d": TRACK_H2D, "d2h": TRACK_D2H, "cpu": TRACK_CPU_ATTN, "disk": TRACK_DISK}
TRACK_ORDER = ("gpu", "h2d", "d2h", "cpu", "disk")  # resource keys, in the order traces show them
RESOURCE_OF_TRACK = {track: resource for resource, track in TRACKS.items()}

# -- span kinds the engine records --------------------------------------------------------------------
SPAN_QKV = "qkv"  # gpu: a layer's QKV projections per micro-batch; d2h: q, k, v down to the host
SPAN_ATTN = "attn"  # cpu-attn (host KV) or gpu (device KV partition): a layer's attention
SPAN_ATTN_OUT = "attn-out"  # h2d: the host attention's output back to the device
SPAN_FFN = "ffn"  # gpu: output projection + FFN/MoE of a layer per micro-batch
SPAN_KV = "kv"  # d2h: a prompt's keys/values into the host KV cache (prefill)
SPAN_WEIGHTS = "weights"  # h2d: a streamed layer's weights
SPAN_LM_HEAD = "lm_head"  # gpu: final norm and LM head of a target pass
SPAN_DISK_READ = "disk read"  # disk: a disk-tier layer read into a staging buffer
SPAN_DISK_CONVERT = "disk convert"  # gpu (CPU-only machine): a staged layer converted to the compute dtype
SPAN_DISK_READ_CPU = "disk read cpu"  # gpu (CPU-only) or cpu-attn: the host compute a disk-tier read takes (simulator)
SPAN_DRAFT_ATTN = "draft attn"  # cpu-attn: the draft's attention over a host KV cache
SPAN_DRAFT_PREFILL = "draft prefill"  # gpu: the draft over the prompts
SPAN_DRAFT_STEP = "draft step"  # gpu: one draft step, "draft step 2"

ENGINE_SPANS = (SPAN_QKV, SPAN_ATTN, SPAN_ATTN_OUT, SPAN_FFN, SPAN_KV, SPAN_WEIGHTS, SPAN_LM_HEAD, SPAN_DRAFT_ATTN,
                SPAN_DRAFT_PREFILL, SPAN_DRAFT_STEP)

# -- the simulator's tasks ------------------------------------------------------------------------------
# The simulator names its tasks with the kinds above, so a simulated and a measured trace lie side by side:
# qkv, attn, attn-out, ffn and lm_head of a verification; kv (a prompt's keys/values down); weights (a
# streamed layer's copy: its attention and FFN halves are two tasks, the engine copies a layer in one
# span); draft step (a draft round's device work: one task preemptible at each step, or pieces of a
# host-KV round) and draft attn. Where it models more coarsely, or work the engine does inside another
# span, it uses the kinds below.
SPAN_PREFILL = "prefill"  # gpu: one layer of a prefill chunk (a group of its micro-chunks), target and draft
SPAN_HIDDEN = "hidden"  # h2d: a long prefill chunk's hidden states back from host memory (the engine keeps them)
SPAN_DRAFT_QKV = "draft qkv"  # d2h: a host-KV draft round's q, k, v down (in the engine: inside `draft attn`)
SPAN_DRAFT_ATTN_OUT = "draft attn-out"  # h2d: ... and its attention output back up (likewise)

SIM_SPANS = (SPAN_QKV, SPAN_ATTN, SPAN_ATTN_OUT, SPAN_FFN, SPAN_KV, SPAN_WEIGHTS, SPAN_LM_HEAD, SPAN_DRAFT_ATTN,
             SPAN_DRAFT_STEP, SPAN_PREFILL, SPAN_HIDDEN, SPAN_DRAFT_QKV, SPAN_DRAFT_ATTN_OUT)
# The engine writes "prefill" too, for a fused pass's prompt chunk: its half of each layer per micro-batch
# ("prefill L3 mb0"; the verification's spans stay qkv/attn/ffn) and its LM head ("prefill").
ENGINE_SPANS += (SPAN_PREFILL,)
# What the engine writes for the work one simulator kind stands for (kinds the simulator does not name itself).
SIM_COVERS = {
    SPAN_PREFILL: (SPAN_QKV, SPAN_ATTN, SPAN_FFN, SPAN_DRAFT_PREFILL),  # a prefill pass: the same layer spans
    SPAN_HIDDEN: (),
    SPAN_DRAFT_QKV: (SPAN_DRAFT_ATTN,),
    SPAN_DRAFT_ATTN_OUT: (SPAN_DRAFT_ATTN,),
}


def span_kind(name: str) -> str:
    """The kind of a span or slice name: 'qkv L3 mb1 B0' -> 'qkv', 'draft step 2' -> 'draft step'."""
    parts = name.split(" ")
    while len(parts) > 1 and (parts[-1].isdigit() or (parts[-1][:1] in "LB" and parts[-1][1:].isdigit())
                              or (parts[-1][:2] == "mb" and parts[-1][2:].isdigit())):
        parts.pop()
    return " ".join(parts)


def engine_kinds(sim_kinds) -> set[str]:
    """The span kinds the engine writes for the work of these simulator kinds."""
    out = set()
    for kind in sim_kinds:
        out.update(SIM_COVERS.get(kind, (kind,)))
    return out


def track_name(resource: str) -> str:
    """The trace track of a resource key (gpu, h2d, d2h, cpu); other names pass through."""
    return TRACKS.get(resource, resource)


def resource_of(track: str) -> str:
    """The resource key of a track name (cpu-attn -> cpu); other names pass through."""
    return RESOURCE_OF_TRACK.get(track, track)


def slice_name(task: str, layer: int = -1, micro_batch: int = -1, batch: int = -1) -> str:
    """'qkv L3 mb1 B0': task, then layer, micro-batch and batch where they apply (negative: omitted)."""
    parts = [task]
    if layer >= 0:
        parts.append(f"L{layer}")
    if micro_batch >= 0:
        parts.append(f"mb{micro_batch}")
    if batch >= 0:
        parts.append(f"B{batch}")
    return " ".join(parts)


def layer_prefix(kind: str) -> str:
    """What every per-layer span of `kind` starts with: 'qkv L' (then the layer number)."""
    return f"{kind} L"


# What the profiler's in-engine fit reads from the engine's spans: device work per layer, host attention.
FIT_LAYER_PREFIXES = (layer_prefix(SPAN_QKV), layer_prefix(SPAN_FFN))
FIT_ATTN_PREFIXES = (layer_prefix(SPAN_ATTN),)
