"""ninpy.backend on a machine without a GPU: what gpu_problem() checks and says, CuPy arrays made
before ninpy looked for a GPU, and the GPU data path's freedom from host-device syncs.

CuPy stands in as small fakes: a module whose driver and device count can be set, and an array type
that, like a CuPy array, refuses every implicit read back to the host.
"""
import ast
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from ninpy import Tensor, backend, data


def fake_cupy(driver=12080, devices=1):
    runtime = types.SimpleNamespace(driverGetVersion=lambda: driver, getDeviceCount=lambda: devices)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime))


@pytest.fixture
def with_fake_cupy(monkeypatch):
    """gpu_problem() sees a CuPy with a driver and one GPU, and working CUDA libraries."""
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake_cupy())
    monkeypatch.setattr(backend, "load_cublas", lambda: None)
    monkeypatch.setattr(backend, "compile_probe_kernel", lambda: None)
    return monkeypatch


def test_gpu_problem_is_none_when_everything_works(with_fake_cupy):
    assert backend.gpu_problem() is None


def _missing_cublas():
    raise ImportError('Failure finding "libcublasLt.so.12": No such file: libcublasLt.so.12')


def test_a_driver_only_host_is_told_to_install_cublas(with_fake_cupy):
    with_fake_cupy.setattr(backend, "load_cublas", _missing_cublas)
    problem = backend.gpu_problem()
    assert "cuBLAS" in problem and "libcublasLt.so.12" in problem
    assert 'pip install "cuda-toolkit[cublas,cudart,nvrtc]==' in problem and "--device cpu" in problem


def test_nvrtc_that_cannot_compile_is_named(with_fake_cupy):
    def fails():
        raise RuntimeError("NVRTC_ERROR_BUILTIN_OPERATION_FAILURE")
    with_fake_cupy.setattr(backend, "compile_probe_kernel", fails)
    problem = backend.gpu_problem()
    assert "NVRTC cannot compile a kernel" in problem and "NVRTC_ERROR_BUILTIN" in problem
    assert "pip install" in problem


@pytest.mark.parametrize("driver, devices, fragment", [(0, 1, "no NVIDIA driver"),
                                                       (12080, 0, "sees no GPU")])
def test_no_driver_or_no_device_is_named_before_the_libraries(monkeypatch, driver, devices, fragment):
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake_cupy(driver, devices))
    monkeypatch.setattr(backend, "load_cublas", _missing_cublas)
    problem = backend.gpu_problem()
    assert fragment in problem and "cuBLAS" not in problem


def test_no_cupy_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    problem = backend.gpu_problem()
    assert "needs CuPy" in problem and "pip install cupy-cuda12x" in problem


def test_the_install_command_follows_the_cupy_wheel(monkeypatch):
    import importlib.metadata
    monkeypatch.setattr(importlib.metadata, "packages_distributions",
                        lambda: {"cupy": ["cupy-cuda13x"]})
    assert backend.cuda_install_command() == 'pip install "cuda-toolkit[cublas,cudart,nvrtc]==13.*"'


def _nvrtc_problem():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.skipif(_nvrtc_problem() is not None, reason=f"NVRTC cannot be loaded: {_nvrtc_problem()}")
def test_the_probe_kernel_really_compiles(monkeypatch):
    backend.compile_probe_kernel()  # no GPU needed
    monkeypatch.setattr(backend, "_PROBE_KERNEL", 'extern "C" __global__ void k() { undefined; }\n')
    with pytest.raises(Exception):
        backend.compile_probe_kernel()
    monkeypatch.setattr(backend, "load_cublas", lambda: None)
    assert "NVRTC cannot compile" in backend.cuda_library_problem()


_CUBLAS_PROBE = r"""
import ctypes, re
from ninpy import backend

def mapped():
    with open("/proc/self/maps") as maps:
        return sorted(set(re.findall(r"\S*/libcublas\.so[.\d]*", maps.read())))

before = mapped()
backend.load_cublas()
after = mapped()
major = ctypes.c_int()
status = ctypes.CDLL(after[0]).cublasGetProperty(0, ctypes.byref(major)) if after else None
print(repr((before, after, status, major.value)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_cublas_is_really_loaded():
    """In a fresh process, load_cublas() is what maps libcublas into memory (it was not mapped
    before), and the library it mapped answers a call (cublasGetProperty: no GPU needed). CuPy
    is installed with cuBLAS by requirements.txt, so where CuPy is, cuBLAS must load."""
    pytest.importorskip("cupy")
    result = subprocess.run([sys.executable, "-c", _CUBLAS_PROBE], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    before, after, status, major = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert before == [] and after, f"libcublas mapped before: {before}, after load_cublas: {after}"
    assert status == 0 and major >= 11, (status, major)


# ---------------------------------------------------------------------------------------------
# A CuPy array made before ninpy looked for a GPU (require_gpu never ran).

class FakeCupyArray:
    """Like a CuPy array: not a NumPy array, and refuses implicit conversion to one."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float32)
        self.shape, self.dtype = self.values.shape, self.values.dtype

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed")


def test_tensor_takes_a_cupy_array_before_require_gpu(monkeypatch):
    cupy = types.ModuleType("cupy")
    cupy.ndarray = FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", cupy)  # the user imported CuPy, ninpy did not
    monkeypatch.setattr(backend, "_cupy", None)
    array = FakeCupyArray([1.0, 2.0])
    assert backend.is_gpu_array(array) and backend.array_module(array) is cupy
    assert backend.device_of(array) == "gpu"
    assert Tensor(array).data is array
    assert not backend.is_gpu_array(np.zeros(2))


@pytest.mark.gpu
def test_tensor_takes_a_real_cupy_array_in_a_fresh_process():
    import subprocess
    code = ("import cupy, ninpy; t = ninpy.Tensor(cupy.arange(3, dtype=cupy.float32)); "
            "assert t.device == 'gpu', t.device; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# The GPU data path waits for nothing: no read back to the host while preprocessing a batch.

class HostReadError(AssertionError):
    """A device array was read back to the host (on a GPU, a sync)."""


class NoSyncArray(np.ndarray):
    """A NumPy array standing for a device array: any implicit read back to the host raises, as
    does assigning through a boolean mask (CuPy reads the mask's count back to size the result)."""

    def _refuse(self, *args, **kwargs):
        raise HostReadError("an implicit device-to-host read (a sync on a GPU)")

    __bool__ = __int__ = __float__ = __index__ = item = tolist = _refuse

    def __setitem__(self, key, value):
        if isinstance(key, np.ndarray) and key.dtype == bool:
            self._refuse()
        super().__setitem__(key, value)


class NoSyncCupy(types.ModuleType):
    """`cupy` made of NumPy whose array results are NoSyncArray."""

    ndarray = NoSyncArray

    def __init__(self):
        super().__init__("cupy")

    def __getattr__(self, name):
        value = getattr(np, name)
        if callable(value) and not isinstance(value, type):
            def on_device(*args, **kwargs):
                result = value(*args, **kwargs)
                return result.view(NoSyncArray) if isinstance(result, np.ndarray) else result
            return on_device
        return value


@pytest.fixture
def no_sync_device(monkeypatch):
    module = NoSyncCupy()
    monkeypatch.setattr(backend, "_cupy", module)
    return module


def test_the_fake_device_catches_a_boolean_mask_assignment(no_sync_device):
    norm = no_sync_device.ones(3)
    with pytest.raises(HostReadError):
        norm[norm < 2] = 1.0  # what gcn did: the check the fix is tested with can fail


def test_gcn_on_the_device_reads_nothing_back(no_sync_device):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 3, 8, 8)).astype(np.uint8)
    x[1] = 7  # a flat image: its norm is 0 and the divisor falls back to 1
    on_device = data.gcn(x.view(NoSyncArray))
    assert isinstance(on_device, NoSyncArray)
    expected = data.gcn(x)
    np.testing.assert_allclose(np.asarray(on_device), expected, rtol=1e-6)
    assert np.all(expected[1] == 0)


def test_gcn_zca_batches_read_nothing_back(no_sync_device):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (32, 3, 4, 4)).astype(np.uint8)
    transform = data.fit_gcn_zca(x)
    on_device = transform(x[:8].view(NoSyncArray))
    np.testing.assert_allclose(np.asarray(on_device), transform(x[:8]), rtol=1e-5, atol=1e-5)
