"""Devices and array modules: which library holds a tensor's numbers.

A tensor lives on "cpu" (a NumPy array), on "gpu" (a CuPy array) or on "emulated" (ninpy/emulator.py:
the GPU code path run on the CPU, NumPy standing in for CuPy and the host C++ compiler for NVRTC).
Everything above this file asks `array_module(array)` for the right library instead of importing
CuPy itself, so the CPU path never needs a GPU, and CuPy is imported only when the GPU is asked for.
"gpu" and "emulated" arrays both go through gpu_kernels (`is_gpu_array` is True for both).
"""
import sys

import numpy as np

DEVICES = ("cpu", "gpu", "emulated")


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


_cupy = None  # the imported cupy module, once the GPU has been found usable
_emulated = None  # the emulator's cupy stand-in, once "emulated" has been asked for

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


def require_emulator():
    """Return the emulator's cupy stand-in, or raise DeviceError (no C++ compiler: what to install)."""
    global _emulated
    if _emulated is None:
        from . import emulator, gpu_kernels

        _emulated = emulator.load(gpu_kernels.kernel_sources())
    return _emulated


def resolve_device(device):
    """Turn "auto" / "cpu" / "gpu" (or "cuda") / "emulated" into a device of DEVICES; check that it
    is usable. "auto" never picks "emulated": that is for learning and testing, and asked by name."""
    name = "gpu" if device == "cuda" else device
    if name == "auto":  # once a GPU has been found usable, it is not checked again
        return "gpu" if _cupy is not None or gpu_available() else "cpu"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; expected one of 'auto', 'cpu', 'gpu', 'emulated'")
    module_of_device(name)
    return name


def module_of_device(device):
    """The array module of a resolved device: numpy, cupy or the emulator's stand-in."""
    if device == "gpu":
        return require_gpu()
    if device == "emulated":
        return require_emulator()
    return np


def _loaded_cupy():
    """The cupy module once anything has imported it (a CuPy array exists only then), else None.

    A library user may make CuPy arrays before ninpy has looked for a GPU (require_gpu), so the
    module is taken from sys.modules too; that never imports CuPy."""
    return _cupy if _cupy is not None else sys.modules.get("cupy")


def _is_emulated_array(array):
    emulator = sys.modules.get("ninpy.emulator")  # no emulated array exists before it is imported
    return emulator is not None and isinstance(array, emulator.EmulatedArray)


def _is_cupy_array(array):
    cupy = _loaded_cupy()
    return cupy is not None and isinstance(array, cupy.ndarray)


def is_gpu_array(array):
    """True for an array of the GPU code path: CuPy's, or the emulator's; never imports CuPy just
    to answer no."""
    return _is_cupy_array(array) or _is_emulated_array(array)


def array_module(array):
    """numpy, cupy or the emulator's stand-in, whichever holds `array`."""
    if _is_emulated_array(array):
        return require_emulator()
    return _loaded_cupy() if _is_cupy_array(array) else np


def device_of(array):
    """"cpu", "gpu" or "emulated": where `array` lives."""
    if _is_emulated_array(array):
        return "emulated"
    return "gpu" if _is_cupy_array(array) else "cpu"


def to_device(array, device):
    """Copy an array to "cpu", "gpu" or "emulated" (no copy when it is already there)."""
    device = resolve_device(device)
    if device == "cpu":
        return array.get() if is_gpu_array(array) else np.asarray(array)
    if is_gpu_array(array) and device_of(array) != device:
        array = array.get()  # from the GPU to the emulator (or back) through the host
    return module_of_device(device).asarray(array)


def synchronize(device):
    """Wait for queued GPU work (a no-op on the CPU); benchmarks call it before reading a clock."""
    if device in ("gpu", "emulated"):
        module_of_device(device).cuda.get_current_stream().synchronize()


# ---------------------------------------------------------------------------------------------
# Errors raised by CuPy during a run, turned into one line for a command's user.

def is_cuda_error(error):
    """True for an exception raised by CuPy (CUDA runtime, driver, cuBLAS, NVRTC, GPU memory);
    decided by the type's module, so no CuPy import is needed to answer."""
    return type(error).__module__.split(".")[0] in ("cupy", "cupy_backends")


# Out of GPU memory, as each library says it: cuBLAS (CUBLAS_STATUS_ALLOC_FAILED), the runtime
# (cudaErrorMemoryAllocation) and the driver (CUDA_ERROR_OUT_OF_MEMORY); CuPy's own pool raises
# OutOfMemoryError, a MemoryError.
_OUT_OF_MEMORY = {"CUBLASError": 3, "CUDARuntimeError": 2, "CUDADriverError": 2}
# Faults of a kernel, which CUDA reports at a later call (asynchronously): illegal address, launch
# timeout, device assert, hardware stack error, illegal instruction, misaligned address, invalid
# address space, invalid PC, launch failure. Runtime and driver number them alike.
_KERNEL_FAULTS = {700, 702, 710, 714, 715, 716, 717, 718, 719}


def is_out_of_memory(error):
    """True for running out of GPU memory, whichever CUDA library noticed it (or of host memory)."""
    if isinstance(error, MemoryError):
        return True
    return is_cuda_error(error) and getattr(error, "status", None) == _OUT_OF_MEMORY.get(
        type(error).__name__)


def cuda_error_line(error):
    """One line for a CuPy error naming the ninpy operation it came from, else None."""
    if not is_cuda_error(error):
        return None
    line = f"CUDA error in {_operation(error)}: {type(error).__name__}: {_first_line(error)}; "
    if getattr(error, "status", None) in _KERNEL_FAULTS:
        line += ("CUDA reports a kernel's fault at a later call, so the failing launch may be "
                 "earlier than this operation: rerun with CUDA_LAUNCH_BLOCKING=1 to find it; ")
    return line + "--device cpu runs without the GPU"


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
