"""What a profiling run measures and how hard: the configuration, the failure type, the test hook."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from specoffload.planner.models import ModelSpec, load_model_spec



GiB, MiB, KiB = 2**30, 2**20, 2**10
FORCE_FAIL_ENV = "SPECOFFLOAD_PROFILE_FAIL"  # comma-separated probe names: a test hook
KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WARMUP_MAX_S = 0.25  # warm-up of one measurement stops after this long (one call at least)


class ProbeFailure(RuntimeError):
    """A probe could not produce its figures (the message says why)."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how hard. `quick()`, `full()` and `tiny()` (tests) are the presets."""

    mode: str
    reps: int  # samples per measurement
    warmup: int  # calls before timing
    min_sample_s: float  # each sample averages calls until it lasts this long
    transfer_sizes: tuple[int, ...]  # bytes
    bandwidth_bytes: int  # buffer size of the memory-bandwidth copy
    matmul_tokens: tuple[int, ...]
    attn_batches: tuple[int, ...]
    attn_queries: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    attn_max_kv_tokens: int  # grid points with batch * context above this are skipped
    attn_rotate_bytes: int = 256 * MiB  # KV pool the attention calls rotate over (defeats the CPU caches)
    attn_kv_dtype: str | None = None  # host KV dtype the attention probe uses ("bf16", "fp32"); None: the engine's
    cpu_matmul_max_tokens: int = 1024  # on the CPU the rate plateaus long before; bigger GEMMs take seconds
    model: ModelSpec | None = None  # reference shapes (matmul: FFN; attention: heads); None: mixtral-8x7b
    op_overhead_shape: tuple[int, int, int, int, int] = (64, 4, 2, 16, 128)  # dim, heads, kv heads, Dh, ffn
    force_fail: frozenset[str] = frozenset()  # test hook: these probes raise ProbeFailure
    # The in-engine run (CPU device): the runtime's Engine on random weights of a narrow model of the reference's kind.
    engine_batches: tuple[int, ...] = (1, 4, 16, 64)
    engine_draft_lens: tuple[int, ...] = (0, 1, 3)  # 0: one token per row; k: k + 1 (a draft of one layer proposes)
    engine_prompt_len: int = 16
    engine_gen_len: int = 24
    engine_reps: int = 2  # timed runs of each (batch, draft length), after one warm-up run
    # The fit runs a narrow model of the reference's kind (op_overhead_shape widths, the reference's experts
    # and top-k), where the fixed costs it fits are most of each layer's time; False: the reference's widths.
    engine_narrow: bool = True
    engine_max_layers: int = 8  # layers of the probe model run (the costs are per layer; more only take longer)
    engine_max_bytes: int = 512 * MiB  # fp32 weights of the reference layers run; fewer layers, then narrower, if over
    engine_overhead_reps: int = 0  # engine runs per point of the engine_overhead probe (0: max(3, reps))
    cpu_mem_margin_fraction: float = 0.05  # host memory kept free: this fraction of MemTotal ...
    cpu_mem_margin_min_bytes: int = GiB  # ... but at least this
    pinned_fraction: float = 0.9  # CUDA: share of usable host memory the planner may page-lock
    gpu_alloc_chunk_bytes: int = GiB  # CUDA memory probe: first chunk size, halved down to ...
    gpu_alloc_min_chunk_bytes: int = 64 * MiB  # ... this granularity

    @classmethod
    def quick(cls, **kw) -> "ProfileConfig":
        base = dict(mode="quick", reps=11, warmup=2, min_sample_s=0.005,
                    transfer_sizes=(64 * KiB, MiB, 16 * MiB, 128 * MiB), bandwidth_bytes=256 * MiB,
                    matmul_tokens=(1, 4, 16, 64, 256), attn_batches=(1, 4, 16, 64), attn_queries=(1, 5, 9),
                    attn_contexts=(16, 64, 512, 2048), attn_max_kv_tokens=16 * 2048, attn_rotate_bytes=256 * MiB,
                    # in-engine fit: 9 timed runs of a reference layer scaled to 128 MiB (seconds, not minutes)
                    engine_batches=(1, 4, 16), engine_draft_lens=(0, 1, 3), engine_reps=1, engine_gen_len=16,
                    engine_max_bytes=128 * MiB, engine_overhead_reps=3)
        base.update(kw)
        return cls(**base)

    @classmethod
    def full(cls, **kw) -> "ProfileConfig":
        base = dict(mode="full", reps=11, warmup=3, min_sample_s=0.005,
                    transfer_sizes=(4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB,
                                    256 * MiB, GiB),
                    bandwidth_bytes=GiB,
                    matmul_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                    attn_batches=(1, 2, 4, 8, 16, 32, 64), attn_queries=(1, 2, 5, 9),
                    attn_contexts=(16, 64, 256, 1024, 2048, 4096), attn_max_kv_tokens=64 * 1024,
                    attn_rotate_bytes=GiB, engine_batches=(1, 4, 16, 64, 128), engine_draft_lens=(0, 1, 3))
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> "ProfileConfig":
        """Tests: every probe runs, on sizes that take milliseconds (figures are not meaningful)."""
        spec = ModelSpec(name="profile-test", family="mistral", num_layers=2, hidden_size=64, num_heads=4,
                         num_kv_heads=2, head_dim=16, intermediate_size=128, num_experts=0, experts_per_token=0,
                         vocab_size=128, tie_word_embeddings=False, max_position_embeddings=512)
        base = dict(mode="test", reps=3, warmup=1, min_sample_s=0.0005,
                    transfer_sizes=(4 * KiB, 64 * KiB), bandwidth_bytes=MiB, matmul_tokens=(1, 8),
                    attn_batches=(1, 4), attn_queries=(1, 5), attn_contexts=(16, 64), attn_max_kv_tokens=256,
                    attn_rotate_bytes=MiB, engine_batches=(1, 2, 4), engine_draft_lens=(0, 1, 2), engine_reps=1,
                    engine_prompt_len=8, engine_gen_len=6, model=spec)
        base.update(kw)
        return cls(**base)

    @property
    def spec(self) -> ModelSpec:
        return self.model if self.model is not None else load_model_spec("mixtral-8x7b")


def forced_failures(cfg: ProfileConfig) -> frozenset[str]:
    env = {p.strip() for p in os.environ.get(FORCE_FAIL_ENV, "").split(",") if p.strip()}
    return frozenset(cfg.force_fail) | env
