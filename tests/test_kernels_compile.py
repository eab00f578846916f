"""Every CUDA source in kernels/*.cu compiles, with no GPU needed.

NVRTC (the CUDA runtime compiler, shipped as the nvidia-cuda-nvrtc-cu12 wheel) compiles for a named
architecture without a device, so a broken kernel fails CI on any machine. Each source is compiled
for sm_80 (A100) and sm_90 (H100) with every name expression (float and double, int and long long
indices) instantiated, through `gpu_kernels.compile_with_nvrtc`, which shares its error formatting
with the runtime path (`cupy.RawModule`) and compiles with the options CuPy adds at run time
(-ftz=true, --device-as-default-execution-space).
"""
import subprocess
import sys
from pathlib import Path

import pytest

from ninpy import gpu_kernels

ARCHS = ("sm_80", "sm_90")


def _nvrtc_problem():
    """None when NVRTC can be loaded, else why not."""
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as error:  # ImportError (no CuPy), OSError / RuntimeError (no libnvrtc)
        return f"{type(error).__name__}: {error}"
    return None


NVRTC_PROBLEM = _nvrtc_problem()
needs_nvrtc = pytest.mark.skipif(
    NVRTC_PROBLEM is not None,
    reason=f"NVRTC cannot be loaded ({NVRTC_PROBLEM}); `pip install cupy-cuda12x nvidia-cuda-nvrtc-cu12`")

SOURCES = gpu_kernels.kernel_sources()


def test_every_kernel_file_is_compiled_by_these_tests():
    on_disk = sorted(p.name for p in gpu_kernels.KERNEL_DIR.glob("*.cu"))
    listed = sorted(path.name for path, _, _ in SOURCES)
    assert on_disk == listed, "a kernels/*.cu file is missing from gpu_kernels._KERNELS (or vice versa)"


@pytest.mark.parametrize("path, source, names", SOURCES, ids=[p.name for p, _, _ in SOURCES])
def test_sources_document_their_mapping_and_cover_both_dtypes(path, source, names):
    assert source.lstrip().startswith("//"), f"{path} must start with a comment giving its thread mapping"
    assert "template <typename T" in source, f"{path}: float and double must come from one template"
    assert "atomicAdd" not in source, f"{path}: kernels must be deterministic (no atomics)"
    assert any("<float" in n for n in names) and any("<double" in n for n in names)


@pytest.mark.parametrize("filename", ["im2col.cu", "pooling.cu"])
def test_window_arithmetic_names_its_derivation(filename):
    """Kernels that find covering windows repeat ninpy/shapes.py in C and must say so (the formulas
    are held to shapes.py by tests/test_gpu.py)."""
    source = (gpu_kernels.KERNEL_DIR / filename).read_text()
    assert "ninpy/shapes.py" in source and "covering_windows" in source


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path, source, names", SOURCES, ids=[p.name for p, _, _ in SOURCES])
def test_kernel_compiles(path, source, names, arch):
    from cupy_backends.cuda.libs import nvrtc

    if int(arch[3:]) not in nvrtc.getSupportedArchs():
        pytest.skip(f"this NVRTC ({nvrtc.getVersion()}) cannot target {arch}")
    lowered = gpu_kernels.compile_with_nvrtc(path, source, names, arch)
    assert sorted(lowered) == sorted(names)
    for name, mangled in lowered.items():
        kernel = name.split("<")[0]
        assert kernel in mangled, f"{name} lowered to {mangled!r}"


@needs_nvrtc
def test_compiled_with_the_options_cupy_uses_at_run_time(monkeypatch):
    """cupy.RawModule adds -ftz=true (float32 subnormals flushed to zero) and
    --device-as-default-execution-space to our OPTIONS; a compile test without them could pass a
    kernel that the run-time compile treats otherwise."""
    import inspect

    from cupy.cuda import compiler
    from cupy_backends.cuda.libs import nvrtc

    cupy_source = inspect.getsource(compiler)
    for option in gpu_kernels.CUPY_RUNTIME_OPTIONS:  # still what this CuPy adds
        assert f"'{option}'" in cupy_source, f"CuPy no longer adds {option}: update CUPY_RUNTIME_OPTIONS"
    seen = []
    real = nvrtc.compileProgram
    monkeypatch.setattr(nvrtc, "compileProgram", lambda program, options: (seen.append(options),
                                                                           real(program, options)))
    path, source, names = SOURCES[0]
    gpu_kernels.compile_with_nvrtc(path, source, names[:1], "sm_80")
    assert set(gpu_kernels.OPTIONS + gpu_kernels.CUPY_RUNTIME_OPTIONS) <= set(seen[0])


BROKEN = """// a kernel with a typo on line 4
template <typename T>
__global__ void broken_kernel(T* x) {
    x[0] = undefined_name;
}
"""


@needs_nvrtc
def test_compile_error_names_file_and_line():
    path = Path("kernels/broken.cu")
    with pytest.raises(gpu_kernels.KernelCompileError) as error:
        gpu_kernels.compile_with_nvrtc(path, BROKEN, ["broken_kernel<float>"], "sm_80")
    message = str(error.value)
    assert f"{path}:4:" in message, message
    assert "undefined_name" in message, message


BROKEN_AFTER_A_HEADER = """// a kernel with a typo on line 5, after an included header
#include "dropout_draw.cuh"

template <typename T> __global__ void broken_kernel(T* x) {
    x[0] = dropout_at(x[0], 1ULL, 2ULL, T(0.5), T(2)) + undefined_name;
}
"""


@needs_nvrtc
def test_a_header_is_compiled_in_place_and_lines_keep_their_numbers():
    """A .cu file's `#include "name.cuh"` is replaced by the header's text (NVRTC gets no include
    path; CuPy's cache sees the text), and an error after it still names the .cu file's own line."""
    path = gpu_kernels.KERNEL_DIR / "broken.cu"
    source = gpu_kernels._with_headers(path, BROKEN_AFTER_A_HEADER)
    assert "dropout_mask_value" in source
    assert not [line for line in source.splitlines() if line.startswith("#include")]
    with pytest.raises(gpu_kernels.KernelCompileError) as error:
        gpu_kernels.compile_with_nvrtc(path, source, ["broken_kernel<float>"], "sm_80")
    assert f"{path}:5:" in str(error.value) and "undefined_name" in str(error.value)


def test_an_error_in_a_header_names_the_header():
    log = 'dropout_draw.cuh(31): error: identifier "golden" is undefined\n'
    message = gpu_kernels.format_compile_error("kernels/pooling.cu", log)
    assert 'kernels/dropout_draw.cuh:31: error: identifier "golden"' in message


def test_format_compile_error_uses_our_path_not_nvrtcs():
    log = ('/tmp/tmpa1b2/5f3c9e.cu(12): error: identifier "foo" is undefined\n'
           '/tmp/tmpa1b2/5f3c9e.cu(30): warning #177-D: variable "y" was declared but never referenced\n'
           '\n1 error detected in the compilation of "/tmp/tmpa1b2/5f3c9e.cu".\n')
    message = gpu_kernels.format_compile_error("kernels/pooling.cu", log)
    assert 'kernels/pooling.cu:12: error: identifier "foo" is undefined' in message
    assert ":30:" not in message  # warnings are not errors


def test_format_compile_error_without_a_position_keeps_the_log():
    message = gpu_kernels.format_compile_error("kernels/sgd.cu", "nvrtc: error: invalid value for --gpu-architecture")
    assert "kernels/sgd.cu" in message and "invalid value" in message


def test_runtime_compile_error_goes_through_the_same_formatter(monkeypatch):
    """The cupy.RawModule path (needs a GPU for real) re-raises CompileException the same way."""
    cupy = pytest.importorskip("cupy")
    from cupy.cuda import compiler

    log = '/root/.cupy/kernel_cache/abc.cu(7): error: expected a ";"'

    class FailingModule:
        def __init__(self, code, options, name_expressions):
            self.code = code

        def compile(self):
            raise compiler.CompileException(log, self.code, "abc.cu", ())

    monkeypatch.setattr(cupy, "RawModule", FailingModule)
    monkeypatch.setattr(gpu_kernels, "_modules", {})
    monkeypatch.setattr(gpu_kernels, "_functions", {})
    with pytest.raises(gpu_kernels.KernelCompileError) as error:
        gpu_kernels._function(cupy, "sgd.cu", "sgd_update_kernel", "float", "int")
    assert "sgd.cu:7: error: expected a \";\"" in str(error.value)


def test_import_needs_no_gpu_and_no_cupy():
    code = "import sys, ninpy.gpu_kernels; assert 'cupy' not in sys.modules, 'cupy imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
