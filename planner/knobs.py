"""The integer choices the planner enumerates (what the LP does not choose)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Knobs:
    """The integer choices the planner enumerates."""

    policy: str  # offload-only | serial-spec | interleaved
    decode_batch: int
    prefill_batch: int
    draft_len: int
    micro_batches: int
    draft_kv: str = "gpu"  # gpu | host | recompute
    draft_sub_batch: int = 1  # sequences per draft forward when recomputing the context
    weight_buffers: int = 2  # 0: everything resident, nothing streamed
    fuse_prefill: bool = False  # refill chunks ride in the next verification's sweep (one batch only)

    @property
    def num_batches(self) -> int:
        return 2 if self.policy == "interleaved" else 1

    @property
    def speculative(self) -> bool:
        return self.draft_len > 0
