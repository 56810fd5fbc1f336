"""Shared test configuration: GPU tests are skipped without CUDA; property tests are reproducible."""
from __future__ import annotations

import os

import pytest
from hypothesis import Phase, settings

# Property tests draw the same examples on every run (a failure is a failure of the code, not of the
# draw); SPECOFFLOAD_HYPOTHESIS=explore draws new ones each run, to hunt for counterexamples.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
# tools/mutation_check.py: the same draws, stopping at the first failure without shrinking it.
settings.register_profile("fail-fast", derandomize=True, phases=[Phase.explicit, Phase.generate])
settings.load_profile(os.environ.get("SPECOFFLOAD_HYPOTHESIS", "reproducible"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: its tests check behaviour, not speed, and on a shared 2-core
    machine a second torch thread waits for a time slice on every op (10-30x slower under load)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
