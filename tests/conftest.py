"""Shared test set-up: hypothesis profiles and the `gpu` marker's skip rule."""
import os

import pytest
from hypothesis import HealthCheck, settings

from ninpy import backend

# No deadlines (Numba compiles on first call; CI machines are slow) and printed failing examples, so
# a failure reproduces. CI derandomises so every run draws the same examples.
settings.register_profile("dev", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

GPU_PROBLEM = backend.gpu_problem()


def pytest_collection_modifyitems(config, items):
    if GPU_PROBLEM is None:
        return
    skip_gpu = pytest.mark.skip(reason=f"no usable GPU: {GPU_PROBLEM}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
