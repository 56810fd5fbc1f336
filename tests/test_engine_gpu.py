"""The engine on CUDA: streamed weights (pinned host -> device buffers on a copy stream), CPU attention
over the host KV cache, a GPU-KV partition, routed-only expert copies. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from specoffload.runtime.engine import Engine, Request
from specoffload.runtime.generate import generate
from specoffload.runtime.model import Transformer
from specoffload.runtime.tiny_pair import tiny_pair_paths, tiny_pair_tokenizer

from test_engine import TEXTS, make_plan  # tests/ is on sys.path (pytest rootdir-relative imports)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("resident,gpu_kv,policy,k", [
    (0, 0, "offload-only", 0),  # every layer streamed
    (2, 1, "interleaved", 3),  # half resident (spread), one sequence per batch with its KV on the GPU
    (0, 0, "serial-spec", 4),
])
def test_cuda_engine_fp32_equals_reference_greedy(resident, gpu_kv, policy, k):
    t_dir, d_dir = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(t).ids for t in TEXTS]
    ref = generate(Transformer.from_pretrained(t_dir), prompts, 20)
    plan = make_plan(policy, 3, k, 2, "gpu", 1, 2).replace(gpu_attn_layers=resident, gpu_ffn_layers=resident,
                                                            gpu_kv_sequences=gpu_kv)
    eng = Engine(plan, t_dir, d_dir, device="cuda", dtype=torch.float32)
    outs = {}
    eng.run([Request(str(i), p, 20) for i, p in enumerate(prompts)], lambda f: outs.__setitem__(f.request.id, f.tokens))
    for i, r in enumerate(ref):
        assert outs[str(i)] == r.tokens
    if resident < 4:
        assert eng.target.streamer.copied_bytes > 0  # weights really streamed
        assert eng.target.streamer.pinned_bytes() > 0


@pytest.mark.parametrize("disk,resident", [(2, 0), (1, 2)])
def test_cuda_engine_with_disk_layers_equals_reference_greedy(disk, resident):
    """The disk tier on CUDA: disk layers read into pinned staging buffers each pass, copied to the GPU."""
    t_dir, d_dir = tiny_pair_paths()
    tok = tiny_pair_tokenizer()
    prompts = [tok.encode(t).ids for t in TEXTS]
    ref = generate(Transformer.from_pretrained(t_dir), prompts, 20)
    plan = make_plan("serial-spec", 3, 3, 1, "gpu", 1, 2).replace(gpu_attn_layers=resident, gpu_ffn_layers=resident,
                                                                   disk_layers=disk)
    eng = Engine(plan, t_dir, d_dir, device="cuda", dtype=torch.float32)
    outs = {}
    stats = eng.run([Request(str(i), p, 20) for i, p in enumerate(prompts)],
                    lambda f: outs.__setitem__(f.request.id, f.tokens))
    for i, r in enumerate(ref):
        assert outs[str(i)] == r.tokens
    assert len(eng.target.disk.layers) == disk and stats.disk_bytes_per_sweep > 0
