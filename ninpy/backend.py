"""Devices and array modules: which library holds a tensor's numbers.

A tensor lives on "cpu" (a NumPy array) or on "gpu" (a CuPy array). Everything above this file asks
`array_module(array)` for the right library instead of importing CuPy itself, so the CPU path never
needs a GPU, and CuPy is imported only when the GPU is asked for.
"""
import sys

import numpy as np

DEVICES = ("cpu", "gpu")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


_cupy = None  # the imported cupy module, once the GPU has been found usable

# The CUDA libraries ninpy needs beyond the driver: cuBLAS for the GEMMs of the convolutions, NVRTC
# to compile kernels/*.cu and CuPy's own element-wise kernels, and the CUDA runtime's headers those
# kernels include. NVIDIA ships them as wheels; `cuda-toolkit[...]` installs the matching ones.
CUDA_WHEELS = "cuda-toolkit[cublas,cudart,nvrtc]"

# The smallest kernel that proves NVRTC can compile: loading libnvrtc is not enough.
_PROBE_KERNEL = 'extern "C" __global__ void ninpy_probe(float* x) { x[threadIdx.x] *= 2.0f; }\n'


def _import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise DeviceError(
            f"device 'gpu' needs CuPy, which cannot be imported ({_first_line(error)}); install it "
            f"with `pip install cupy-cuda12x \"{CUDA_WHEELS}==12.*\"`, or use --device cpu") from None
    return cupy


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def cuda_install_command():
    """The pip command that installs the CUDA libraries matching the installed CuPy wheel."""
    from importlib.metadata import packages_distributions
    import re

    names = packages_distributions().get("cupy", [])
    major = next((m[1] for m in map(re.compile(r"cupy-cuda(\d+)x$").match, names) if m), "12")
    return f"pip install \"{CUDA_WHEELS}=={major}.*\""


def load_cublas():
    """Load cuBLAS through CuPy (no GPU needed); ImportError/OSError name the missing library."""
    from cupy.cuda import cublas
    return cublas


def compile_probe_kernel():
    """Compile a one-line kernel with NVRTC (no GPU needed); raises when NVRTC cannot."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(_PROBE_KERNEL, "ninpy_probe.cu", (), ())
    try:
        nvrtc.compileProgram(program, ())
    finally:
        nvrtc.destroyProgram(program)


def cuda_library_problem():
    """None when cuBLAS loads and NVRTC compiles a kernel, else what is missing and the fix.

    Both run without a GPU, so a machine without one can check (and test) its install.
    """
    for what, check in (("cuBLAS cannot be loaded", load_cublas),
                        ("NVRTC cannot compile a kernel", compile_probe_kernel)):
        try:
            check()
        except Exception as error:  # ImportError, OSError, RuntimeError (NVRTCError)
            return (f"device 'gpu': {what} ({_first_line(error)}); install the CUDA libraries "
                    f"with `{cuda_install_command()}`, or use --device cpu")
    return None


def gpu_problem():
    """Return None when a GPU is usable, else one sentence saying what is missing and how to fix it.

    Usable, not only present: CuPy imports, a driver is loaded, a GPU is visible, cuBLAS loads and
    NVRTC compiles a kernel. `cupy.is_available()` swallows the reason, so each is checked in turn.
    """
    try:
        cupy = _import_cupy()
    except DeviceError as error:
        return str(error)
    return _driver_problem(cupy) or cuda_library_problem()


def _driver_problem(cupy):
    """None when the driver is loaded and sees a GPU, else the problem and its fix."""
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception as error:  # CUDARuntimeError or a missing libcuda
        return (f"device 'gpu': no NVIDIA driver is loaded ({_first_line(error)}); install the "
                "driver, or use --device cpu")
    if driver == 0:
        return "device 'gpu': no NVIDIA driver is loaded; install the driver, or use --device cpu"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return (f"device 'gpu': the driver sees no usable GPU ({_first_line(error)}); check "
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
    if name == "auto":  # once a GPU has been found usable, it is not checked again
        return "gpu" if _cupy is not None or gpu_available() else "cpu"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; expected one of 'auto', 'cpu', 'gpu'")
    if name == "gpu":
        require_gpu()
    return name


def _loaded_cupy():
    """The cupy module once anything has imported it (a CuPy array exists only then), else None.

    A library user may make CuPy arrays before ninpy has looked for a GPU (require_gpu), so the
    module is taken from sys.modules too; that never imports CuPy."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def is_gpu_array(array):
    """True for a CuPy array; never imports CuPy just to answer no."""
    cupy = _loaded_cupy()
    return cupy is not None and isinstance(array, cupy.ndarray)


def array_module(array):
    """numpy or cupy, whichever holds `array`."""
    return _loaded_cupy() if is_gpu_array(array) else np


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


# ---------------------------------------------------------------------------------------------
# Errors raised by CuPy during a run, turned into one line for a command's user.

def is_cuda_error(error):
    """True for an exception raised by CuPy (CUDA runtime, driver, cuBLAS, NVRTC, GPU memory);
    decided by the type's module, so no CuPy import is needed to answer."""
    return type(error).__module__.split(".")[0] in ("cupy", "cupy_backends")


def cuda_error_line(error):
    """One line for a CuPy error naming the ninpy operation it came from, else None."""
    if not is_cuda_error(error):
        return None
    return (f"CUDA error in {_operation(error)}: {type(error).__name__}: {_first_line(error)}; "
            "--device cpu runs without the GPU")


def _operation(error):
    """"function (ninpy/FILE.py:LINE)" of the innermost ninpy frame the error passed through."""
    import traceback
    from pathlib import Path

    package = Path(__file__).resolve().parent
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = Path(frame.filename).resolve()
        if package in path.parents:
            return f"{frame.name} ({path.relative_to(package.parent)}:{frame.lineno})"
    return "the GPU code"
