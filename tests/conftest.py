"""Shared test set-up: hypothesis profiles, the `gpu` marker's skip rule, and the emulated device."""
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
# In CI the emulator is the only evidence about the GPU path there is: there, a missing compiler
# fails the emulated tests instead of skipping them (.ci/run installs g++).
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def pytest_collection_modifyitems(config, items):
    if GPU_PROBLEM is None:
        return
    skip_gpu = pytest.mark.skip(reason=f"no usable GPU: {GPU_PROBLEM}")
    for item in items:
        # the marker itself: item.keywords also holds folder names, and a checkout in a folder
        # called "gpu" would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def require_device(device):
    """Make sure `device` ("gpu" or "emulated") can run, else skip; an emulator that cannot run
    (no C++ compiler) fails under CI."""
    try:
        backend.resolve_device(device)
    except backend.DeviceError as error:
        if device == "emulated" and IN_CI:
            pytest.fail(f"the emulated device cannot run in CI: {error}")
        pytest.skip(str(error))
    return device


def tf32():
    """True when CuPy runs float32 matmuls in TF32 (CUPY_TF32=1): 10 mantissa bits, ~5e-4
    relative rounding of every product's inputs (the emulator rounds them the same way)."""
    return os.environ.get("CUPY_TF32", "0") not in ("", "0")


# A device parameter for the tests that run ninpy's GPU code path: the real GPU (skipped without
# one) and the emulator (everywhere g++ is).
GPU_PATHS = [pytest.param("gpu", marks=pytest.mark.gpu), "emulated"]
# ... and the emulator rounding float32 products to TF32, for tolerances that depend on TF32.
GPU_PATHS_AND_TF32 = GPU_PATHS + ["emulated-tf32"]


def use_device(name, monkeypatch):
    """The device of a GPU_PATHS_AND_TF32 parameter, ready; "emulated-tf32" sets CUPY_TF32=1."""
    if name == "emulated-tf32":
        monkeypatch.setenv("CUPY_TF32", "1")
        name = "emulated"
    return require_device(name)
