"""train.py on the GPU path never shows a traceback: each failure is one line and a non-zero exit.

No GPU is needed: the GPU check is monkeypatched, and the errors are CuPy's real exception types
raised where a training run would meet them (Trainer stands in for the run).
"""
import importlib.util
from pathlib import Path

import numpy as np
import pytest

import ninpy
from ninpy import backend, gpu_kernels, training

# train.py is a script, not a module on the path: load it from the checkout.
_spec = importlib.util.spec_from_file_location(
    "train", Path(__file__).resolve().parents[1] / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

MNIST = ["--dataset", "mnist", "--out", "unused"]


def run(capsys, *args):
    code = train.main([*MNIST, *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def raising_trainer(error):
    class Trainer:
        def __init__(self, config, **kwargs):
            raise error
    return Trainer


def device_recording_trainer(seen):
    """A Trainer that notes the device train.py chose, then stops the run."""
    class Trainer:
        def __init__(self, config, **kwargs):
            seen["device"] = config.device
            raise training.TrainingError("stop here")
    return Trainer


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_device_gpu_without_a_usable_gpu_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "gpu_problem",
                        lambda: "device 'gpu': cuBLAS cannot be loaded (x); install ... `pip install y`")
    code, out, err = run(capsys, "--device", "gpu")
    assert code == train.EXIT_ERROR
    assert "cuBLAS cannot be loaded" in one_line(err)


def test_device_auto_falls_back_to_the_cpu_saying_why(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(backend, "gpu_problem", lambda: "device 'gpu': no NVIDIA driver is loaded")
    monkeypatch.setattr(training, "Trainer", device_recording_trainer(seen))
    code, out, err = run(capsys, "--device", "auto")
    assert seen["device"] == "cpu"
    notes = [line for line in out.splitlines() if "CPU" in line]
    assert notes == ["note: training on the CPU; device 'gpu': no NVIDIA driver is loaded"]


def test_device_auto_takes_a_usable_gpu(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(backend, "gpu_problem", lambda: None)
    monkeypatch.setattr(training, "Trainer", device_recording_trainer(seen))
    code, out, err = run(capsys)
    assert seen["device"] == "gpu" and "note" not in out


def test_gpu_out_of_memory_names_the_setting_to_lower(monkeypatch, capsys):
    memory = pytest.importorskip("cupy.cuda.memory")
    monkeypatch.setattr(training, "Trainer",
                        raising_trainer(memory.OutOfMemoryError(1 << 30, 1 << 33, 1 << 34)))
    code, out, err = run(capsys, "--device", "cpu", "--batch-size", "512")
    assert code == train.EXIT_ERROR
    line = one_line(err)
    assert "GPU ran out of memory" in line and "lower --batch-size (now 512)" in line


class _StandInCublasError(RuntimeError):
    """cuBLAS's exception type (its name, module and status), where libcublas cannot be loaded."""
    __module__ = "cupy_backends.cuda.libs.cublas"

    def __init__(self, status):
        super().__init__("CUBLAS_STATUS_ALLOC_FAILED")
        self.status = status


_StandInCublasError.__name__ = _StandInCublasError.__qualname__ = "CUBLASError"


@pytest.mark.parametrize("library, status", [("cublas", 3), ("runtime", 2)])
def test_out_of_memory_from_cublas_or_the_runtime_gets_the_same_advice(monkeypatch, capsys, library,
                                                                        status):
    """cuBLAS (CUBLAS_STATUS_ALLOC_FAILED) and the CUDA runtime (cudaErrorMemoryAllocation) say
    "out of memory" in their own exception types; the advice is the same as for CuPy's pool."""
    if library == "cublas":
        try:
            from cupy_backends.cuda.libs.cublas import CUBLASError
        except ImportError:  # that module loads libcublas: without it, a type of the same name
            CUBLASError = _StandInCublasError
        error = CUBLASError(status)
    else:
        error = pytest.importorskip("cupy_backends.cuda.api.runtime").CUDARuntimeError(status)
    monkeypatch.setattr(training, "Trainer", raising_trainer(error))
    code, out, err = run(capsys, "--device", "cpu", "--batch-size", "256")
    assert code == train.EXIT_ERROR
    line = one_line(err)
    assert "GPU ran out of memory" in line and "lower --batch-size (now 256)" in line, line


def test_an_asynchronous_kernel_fault_says_the_launch_may_be_earlier(monkeypatch, capsys):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    monkeypatch.setattr(training, "Trainer", raising_trainer(runtime.CUDARuntimeError(700)))
    code, out, err = run(capsys, "--device", "cpu")
    line = one_line(err)
    assert "illegal memory access" in line and "may be earlier" in line
    assert "CUDA_LAUNCH_BLOCKING=1" in line
    # an error that is not a kernel's fault does not get the note
    assert "CUDA_LAUNCH_BLOCKING" not in backend.cuda_error_line(runtime.CUDARuntimeError(1))


def test_device_emulated_without_a_compiler_is_one_line_naming_the_package(monkeypatch, capsys):
    monkeypatch.setattr(backend, "_emulated", None)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    code, out, err = run(capsys, "--device", "emulated")
    assert code == train.EXIT_ERROR
    line = one_line(err)
    assert "no-such-c++-compiler is not on PATH" in line and "apt-get install g++" in line, line
    with pytest.raises(backend.DeviceError, match="build-essential"):
        ninpy.Tensor([1.0], device="emulated")


def test_device_emulated_is_taken_by_name_only(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(backend, "gpu_problem", lambda: "device 'gpu': no NVIDIA driver is loaded")
    monkeypatch.setattr(training, "Trainer", device_recording_trainer(seen))
    run(capsys, "--device", "auto")
    assert seen["device"] == "cpu"  # auto never picks the emulator
    run(capsys, "--device", "emulated")
    assert seen["device"] == "emulated"


def test_kernel_compile_error_names_file_and_line(monkeypatch, capsys):
    log = 'kernel.cu(12): error: identifier "undefined_name" is undefined'
    error = gpu_kernels.KernelCompileError(
        gpu_kernels.format_compile_error(gpu_kernels.KERNEL_DIR / "im2col.cu", log))
    monkeypatch.setattr(training, "Trainer", raising_trainer(error))
    code, out, err = run(capsys, "--device", "cpu")
    assert code == train.EXIT_ERROR
    line = one_line(err)
    assert "kernels/im2col.cu:12: error: identifier" in line and str(gpu_kernels.KERNEL_DIR) not in line


def test_other_cuda_errors_are_one_line_naming_the_operation(monkeypatch, capsys):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")

    class Device:  # the GPU's CuPy, failing on the first copy to the device
        @staticmethod
        def asarray(array):
            raise runtime.CUDARuntimeError(700)  # cudaErrorIllegalAddress

    class Trainer:
        def __init__(self, config, **kwargs):
            backend.to_device(np.zeros(3), "gpu")

    monkeypatch.setattr(backend, "require_gpu", lambda: Device)
    monkeypatch.setattr(training, "Trainer", Trainer)
    code, out, err = run(capsys, "--device", "cpu")
    assert code == train.EXIT_ERROR
    line = one_line(err)
    assert "CUDA error in to_device (ninpy/backend.py:" in line
    assert "CUDARuntimeError" in line and "illegal" in line.lower()


def test_errors_that_are_not_cuda_errors_still_raise(monkeypatch, capsys):
    monkeypatch.setattr(training, "Trainer", raising_trainer(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        train.main([*MNIST, "--device", "cpu"])
    assert backend.cuda_error_line(ZeroDivisionError()) is None
