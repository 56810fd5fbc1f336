"""SpecOffload: offloaded batch inference with speculative decoding.

    from specoffload import LLM, SamplingParams

    llm = LLM("tiny-pair")  # an HF model folder (and draft=...), or the shipped tiny pair
    for out in llm.generate(["def fib(n):", "import os"], SamplingParams(max_tokens=32)):
        print(out.text, out.finish_reason, out.usage)

Subpackages: specoffload.planner (plans, cost model, simulator; no torch), specoffload.runtime (the engine, the
profiler, the commands), specoffload.profiles (shipped hardware profiles). LLM and SamplingParams live in
specoffload.runtime.api and are imported on first use, so `import specoffload.planner` needs no torch.
"""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput"]


def __getattr__(name: str):
    if name in __all__:
        from specoffload.runtime import api

        return getattr(api, name)
    raise AttributeError(f"module 'specoffload' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
