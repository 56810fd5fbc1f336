"""specoffload-profile's engine: measure this machine (probes, fit) and a model pair's acceptance.

- :mod:`.fit`: pure numerics (medians and spreads, curves from points, the CPU-attention NNLS fit).
- :mod:`.probes`: the measurements and the HardwareProfile they make (:func:`run_profile`).
- :mod:`.acceptance`: the per-position acceptance vector of a (target, draft, prompts) triple.
"""
from .fit import AttentionFit, AttentionPoint, Stats, curve_points, fit_attention, nnls
from .probes import ALL_PROBES, FORCE_FAIL_ENV, ProfileConfig, ProfileResult, attention_call, run_profile

__all__ = ["ALL_PROBES", "FORCE_FAIL_ENV", "AttentionFit", "AttentionPoint", "ProfileConfig", "ProfileResult",
           "Stats", "attention_call", "curve_points", "fit_attention", "nnls", "run_profile"]
