"""Devices and array modules: which library holds a tensor's numbers.

A tensor lives on "cpu" (a NumPy array) or on "gpu" (a CuPy array). Everything above this file asks
`array_module(array)` for the right library instead of importing CuPy itself, so the CPU path never
needs a GPU, and CuPy is imported only when the GPU is asked for.
"""
import numpy as np

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


_cupy = None  # the imported cupy module, once the GPU has been found usable


def _import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise DeviceError(
            f"device 'gpu' needs CuPy, which cannot be imported ({error}); "
            "install it with `pip install cupy-cuda12x`, or use --device cpu") from None
    return cupy


def gpu_problem():
    """Return None when a GPU is usable, else one sentence saying what is missing and how to fix it.

    `cupy.is_available()` swallows the reason, so the import, the driver and the device count are
    checked one by one.
    """
    try:
        cupy = _import_cupy()
    except DeviceError as error:
        return str(error)
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception as error:  # CUDARuntimeError or a missing libcuda
        return (f"device 'gpu': no NVIDIA driver is loaded ({error}); install the driver, "
                "or use --device cpu")
    if driver == 0:
        return "device 'gpu': no NVIDIA driver is loaded; install the driver, or use --device cpu"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return (f"device 'gpu': the driver sees no usable GPU ({error}); check "
                "CUDA_VISIBLE_DEVICES and `nvidia-smi`, or use --device cpu")
    if count == 0:
        return ("device 'gpu': the driver sees no GPU; check CUDA_VISIBLE_DEVICES and `nvidia-smi`, "
                "or use --device cpu")
    return None


def gpu_available():
    """True when CuPy imports, a driver is loaded and at least one GPU is visible."""
    return gpu_problem() is None


def require_gpu():
    """Return the cupy module, or raise DeviceError saying exactly why the GPU cannot be used."""
    global _cupy
    if _cupy is None:
        problem = gpu_problem()
        if problem is not None:
            raise DeviceError(problem)
        _cupy = _import_cupy()
    return _cupy


def resolve_device(device):
    """Turn "auto" / "cpu" / "gpu" (or "cuda") into "cpu" or "gpu"; check that a GPU is usable."""
    name = "gpu" if device == "cuda" else device
    if name == "auto":
        return "gpu" if gpu_available() else "cpu"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; expected one of 'auto', 'cpu', 'gpu'")
    if name == "gpu":
        require_gpu()
    return name


def is_gpu_array(array):
    """True for a CuPy array; never imports CuPy just to answer no."""
    return _cupy is not None and isinstance(array, _cupy.ndarray)


def array_module(array):
    """numpy or cupy, whichever holds `array`."""
    return _cupy if is_gpu_array(array) else np


def device_of(array):
    return "gpu" if is_gpu_array(array) else "cpu"


def to_device(array, device):
    """Copy an array to "cpu" or "gpu" (no copy when it is already there)."""
    device = resolve_device(device)
    if device == "gpu":
        return require_gpu().asarray(array)
    if is_gpu_array(array):
        return array.get()
    return np.asarray(array)


def synchronize(device):
    """Wait for queued GPU work (a no-op on the CPU); benchmarks call it before reading a clock."""
    if device == "gpu":
        require_gpu().cuda.get_current_stream().synchronize()
