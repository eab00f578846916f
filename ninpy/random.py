"""The random numbers ninpy draws (dropout masks, initial weights), seeded in one place.

CPU draws come from a NumPy PCG64 generator. GPU dropout masks come from a counter-based hash in a
CUDA kernel: (seed, offset) fixes every draw, so a run is repeatable and resumable without
copying generator state off the GPU. `get_state` / `set_state` give plain JSON-able values so a
checkpoint can store them without pickling.
"""
import numpy as np

_cpu = np.random.default_rng(0)
_gpu_seed = 0
_gpu_offset = 0


def manual_seed(seed):
    """Seed every generator ninpy uses, like torch.manual_seed."""
    global _cpu, _gpu_seed, _gpu_offset
    _cpu = np.random.default_rng(seed)
    _gpu_seed = int(seed) & 0xFFFFFFFF
    _gpu_offset = 0


def cpu_generator():
    """The NumPy generator for CPU draws."""
    return _cpu


def next_gpu_stream(count):
    """Reserve `count` counter values for one GPU kernel; return (seed, first offset)."""
    global _gpu_offset
    start = _gpu_offset
    _gpu_offset += int(count)
    return _gpu_seed, start


def get_state():
    """Everything needed to continue the same random sequence, as JSON-able values."""
    return {"cpu": _cpu.bit_generator.state, "gpu_seed": _gpu_seed, "gpu_offset": _gpu_offset}


def set_state(state):
    global _gpu_seed, _gpu_offset
    _cpu.bit_generator.state = state["cpu"]
    _gpu_seed = int(state["gpu_seed"])
    _gpu_offset = int(state["gpu_offset"])
