"""specoffload-profile's engine: measure this machine (probes, fit) and a model pair's acceptance.

- :mod:`.fit`: pure numerics (medians and spreads, curves from points, the CPU-attention NNLS fit).
- :mod:`.probes`: the Profiler, which runs the probes and assembles the HardwareProfile (:func:`run_profile`);
  the probes themselves, by what they measure: :mod:`.link` (host<->device transfers, memcpy, memory
  bandwidth), :mod:`.device` (host memory, matmul, per-op fixed cost, device memory), :mod:`.attention`
  (the runtime's CPU attention over a grid), :mod:`.in_engine` (the Engine itself: overheads fitted from
  its own spans); their plumbing in :mod:`.config` (ProfileConfig), :mod:`.timing` (clocks, medians) and
  :mod:`.machine` (CPU, memory, names).
- :mod:`.acceptance`: the per-position acceptance vector of a (target, draft, prompts) triple.
"""
from .fit import AttentionFit, AttentionPoint, Stats, curve_points, fit_attention, nnls
from .probes import ALL_PROBES, FORCE_FAIL_ENV, ProfileConfig, ProfileResult, attention_call, run_profile

__all__ = ["ALL_PROBES", "FORCE_FAIL_ENV", "AttentionFit", "AttentionPoint", "ProfileConfig", "ProfileResult",
           "Stats", "attention_call", "curve_points", "fit_attention", "nnls", "run_profile"]
