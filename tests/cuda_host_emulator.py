"""Run kernels/*.cu on the CPU, to test the kernels' index logic and ninpy.gpu_kernels' launches
without a GPU.

The .cu sources are compiled UNCHANGED by the host C++ compiler (g++ -std=c++20) after a small shim
that defines the CUDA built-ins they use: __global__/__device__, threadIdx/blockIdx/blockDim/gridDim,
min/max, __shfl_xor_sync (a warp is 32 std::threads meeting at a barrier), and __syncthreads with
__shared__ arrays (a block's threads are fibers on one OS thread, switched at each barrier). A launch
runs every block and thread of the grid, so grid-stride loops and the index formulas run as written.

`emulated_cupy()` is a stand-in for the `cupy` module made of NumPy (empty, full, ascontiguousarray,
...) whose `RawModule(...).get_function("kernel<float, int>")` returns a launcher with CuPy's calling
convention `kernel(grid, block, args)`. Before each launch it checks every argument against the
kernel's C parameter list parsed from the source (pointer: an array of the right dtype; scalar: a NumPy
scalar of exactly the C type — a Python int would become long long in CuPy, a float double), then
passes them the way cuLaunchKernel does, as an array of pointers to the values.

What this does NOT show: timing, memory coalescing, real warp scheduling, float rounding of the GPU's
math library (expf/logf), or cuBLAS (CuPy's matmul). Those need tests/test_gpu.py on a GPU.
"""
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

SHIM = r"""
// Host stand-ins for the CUDA built-ins used by kernels/*.cu.
#include <algorithm>
#include <barrier>
#include <functional>
#include <math.h>
#include <memory>
#include <thread>
#include <ucontext.h>
#include <vector>
struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __restrict__
using std::min;
using std::max;
static double warp_slots[32];
static std::barrier<>* warp_barrier = nullptr;
template <typename T> T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const int lane = threadIdx.x % 32;
    warp_barrier->arrive_and_wait();           // everyone has read the previous round
    warp_slots[lane] = (double)v;              // float and double both fit exactly
    warp_barrier->arrive_and_wait();
    return (T)warp_slots[lane ^ lane_mask];
}
// __syncthreads: the threads of a block run as fibers (ucontext) on one OS thread. Each runs until it
// reaches the barrier or ends, then the next one runs; a round ends when all have, so no thread passes
// a barrier before every thread of its block has reached it. __shared__ arrays are static: one per
// kernel instantiation, which the block running at the time owns.
#define __shared__ static
static ucontext_t fiber_scheduler;
static std::vector<ucontext_t> fibers;
static std::vector<char> fiber_finished;
static unsigned fiber_current;
static const std::function<void()>* fiber_body;
static void fiber_start() { (*fiber_body)(); fiber_finished[fiber_current] = 1; }
inline void __syncthreads() { swapcontext(&fibers[fiber_current], &fiber_scheduler); }
static void launch_blocks(unsigned grid, unsigned block, const std::function<void()>& body) {
    gridDim.x = grid;
    blockDim.x = block;
    const size_t stack_size = 64 * 1024;
    std::unique_ptr<char[]> stacks(new char[block * stack_size]);
    fibers.assign(block, ucontext_t{});
    fiber_body = &body;
    for (unsigned b = 0; b < grid; ++b) {
        fiber_finished.assign(block, 0);
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fibers[t]);
            fibers[t].uc_stack.ss_sp = stacks.get() + t * stack_size;
            fibers[t].uc_stack.ss_size = stack_size;
            fibers[t].uc_link = &fiber_scheduler;
            makecontext(&fibers[t], fiber_start, 0);
        }
        for (bool running = true; running;) {  // a round: every unfinished thread to its next barrier
            running = false;
            for (unsigned t = 0; t < block; ++t) {
                if (fiber_finished[t]) continue;
                fiber_current = t;
                blockIdx.x = b;
                threadIdx.x = t;
                swapcontext(&fiber_scheduler, &fibers[t]);
                running = running || !fiber_finished[t];
            }
        }
    }
}
static void launch(unsigned grid, unsigned block, bool warps, const std::function<void()>& body) {
    gridDim.x = grid;
    blockDim.x = block;
    if (!warps) {  // no shuffles: threads one after another
        for (unsigned b = 0; b < grid; ++b)
            for (unsigned t = 0; t < block; ++t) { blockIdx.x = b; threadIdx.x = t; body(); }
        return;
    }
    std::barrier<> bar(32);
    warp_barrier = &bar;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned w = 0; w < block / 32; ++w) {
            std::vector<std::thread> lanes;
            for (unsigned l = 0; l < 32; ++l)
                lanes.emplace_back([=, &body] { blockIdx.x = b; threadIdx.x = w * 32 + l; body(); });
            for (auto& lane : lanes) lane.join();
        }
}
"""

_C_TO_NUMPY = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
               "unsigned long long": np.uint64}
_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.uint64): ctypes.c_uint64}
_KERNEL = re.compile(r"template\s*<([^>]*)>\s*__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)


class EmulatorUnavailable(RuntimeError):
    """This machine cannot run the emulator (no g++): the emulated tests skip."""


class EmulatorBuildFailed(RuntimeError):
    """g++ rejected the kernels: a bug in a .cu file or the shim, so the emulated tests fail."""


def parse_kernels(source):
    """{kernel: (template parameter names, [(C type with T etc. unsubstituted, is_pointer), ...])}."""
    kernels = {}
    for template, name, params in _KERNEL.findall(source):
        names = [p.split()[-1] for p in template.split(",")]
        parsed = []
        for param in params.split(","):
            text = " ".join(param.replace("__restrict__", " ").split())
            pointer = "*" in text
            words = text.replace("*", " ").split()[:-1]  # drop the parameter's name
            base = " ".join(w for w in words if w != "const")
            parsed.append((base, pointer, "const" in words))
        kernels[name] = (names, parsed)
    return kernels


def _split_expression(expression):
    name, args = expression.split("<", 1)
    return name, [a.strip() for a in args.rstrip(">").split(",")]


def _param_types(kernels, expression):
    name, args = _split_expression(expression)
    template_names, params = kernels[name]
    substitute = dict(zip(template_names, args))
    return [(substitute.get(base, base), pointer, const) for base, pointer, const in params]


@functools.lru_cache(maxsize=None)
def _build(sources):
    """Compile the shim + every source + one extern "C" wrapper per name expression; return (lib, names)."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise EmulatorUnavailable("no g++ on PATH (needed to run the CUDA sources on the CPU)")
    parts = [SHIM]
    wrappers = {}
    for path, source, expressions in sources:
        kernels = parse_kernels(source)
        parts.append(f'#include "{Path(path).resolve()}"')
        warps = "__shfl" in source
        launcher = ("launch_blocks(grid, block, " if "__syncthreads" in source
                    else f"launch(grid, block, {str(warps).lower()}, ")
        for expression in expressions:
            wrapper = f"wrap_{len(wrappers)}"
            wrappers[expression] = (wrapper, _param_types(kernels, expression))
            args = ", ".join(f"*reinterpret_cast<{'const ' if const else ''}{base}{'*' if pointer else ''}*>(a[{i}])"
                             for i, (base, pointer, const) in enumerate(_param_types(kernels, expression)))
            parts.append(f'extern "C" void {wrapper}(unsigned grid, unsigned block, void** a) '
                         f'{{ {launcher}[&] {{ {expression}({args}); }}); }}')
    code = "\n".join(parts) + "\n"
    what = code + "".join(s for _, s, _ in sources)
    return _compile_once(compiler, code, what, "emulator"), wrappers


def _compile_once(compiler, code, what, name):
    """g++ `code` into a shared library (ctypes.CDLL), built once per version of `what` (the code
    and the sources it includes) and reused by later processes."""
    digest = hashlib.sha256(what.encode()).hexdigest()[:16]
    workdir = Path(tempfile.gettempdir()) / f"ninpy-cuda-{name}-{digest}"
    workdir.mkdir(exist_ok=True)
    library = workdir / f"{name}.so"
    if not library.exists():  # each process writes its own files, then renames
        source_file = workdir / f"{name}.{os.getpid()}.cpp"
        partial = workdir / f"{name}.{os.getpid()}.so.tmp"
        source_file.write_text(code)
        result = subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread",
                                 "-o", str(partial), str(source_file)], capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorBuildFailed(f"g++ could not build the {name}:\n{result.stderr[-3000:]}")
        partial.replace(library)  # atomic: a concurrent run sees either no library or a whole one
    return ctypes.CDLL(str(library))


def build_probe(path, wrappers):
    """Compile one .cu file with the shim plus `wrappers` (extern "C" functions calling its device
    helpers) into a shared library; return it (ctypes.CDLL). Lets a test call a __device__ helper
    such as pooling.cu's covering_windows directly."""
    compiler = shutil.which("g++")
    if compiler is None:
        raise EmulatorUnavailable("no g++ on PATH (needed to run the CUDA sources on the CPU)")
    code = f'{SHIM}\n#include "{Path(path).resolve()}"\n{wrappers}\n'
    return _compile_once(compiler, code, code + Path(path).read_text(), "probe")


class _Kernel:
    def __init__(self, lib, expression, wrapper, params):
        self.expression = expression
        self.function = getattr(lib, wrapper)
        self.params = params

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and len(block) == 1, "our kernels use 1-D grids"
        if len(args) != len(self.params):
            raise TypeError(f"{self.expression}: {len(args)} arguments for {len(self.params)} parameters")
        keep, pointers = [], []
        for i, (arg, (base, pointer, _)) in enumerate(zip(args, self.params)):
            expected = np.dtype(_C_TO_NUMPY[base])
            if pointer:
                if not isinstance(arg, np.ndarray) or arg.dtype != expected or not arg.flags.c_contiguous:
                    raise TypeError(f"{self.expression}: argument {i} must be a contiguous {expected} "
                                    f"array (for {base}*), got {type(arg).__name__} "
                                    f"{getattr(arg, 'dtype', '')}")
                value = ctypes.c_void_p(arg.ctypes.data)
            else:
                if not isinstance(arg, np.generic) or arg.dtype != expected:
                    raise TypeError(f"{self.expression}: argument {i} must be a numpy {expected} scalar "
                                    f"(for {base}), got {type(arg).__name__} {getattr(arg, 'dtype', '')}")
                value = _CTYPES[expected](arg.item())
            keep.append(value)
            pointers.append(ctypes.cast(ctypes.pointer(value), ctypes.c_void_p))
        array = (ctypes.c_void_p * len(pointers))(*pointers)
        self.function(ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(block[0])), array)


def emulated_cupy(sources):
    """A NumPy-backed stand-in for the cupy module, running `sources` (gpu_kernels.kernel_sources())."""
    lib, wrappers = _build(tuple((str(p), s, tuple(n)) for p, s, n in sources))

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            self.name_expressions = tuple(name_expressions)

        def compile(self):
            pass

        def get_function(self, expression):
            if expression not in self.name_expressions:
                raise KeyError(f"{expression} was not declared as a name expression")
            wrapper, params = wrappers[expression]
            return _Kernel(lib, expression, wrapper, params)

    fake = types.SimpleNamespace(
        ndarray=np.ndarray, empty=np.empty, empty_like=np.empty_like, full=np.full,
        ascontiguousarray=np.ascontiguousarray, asarray=np.asarray, asnumpy=np.asarray,
        RawModule=RawModule)
    return fake


# --- a whole emulated "GPU" for ninpy: arrays that ninpy.backend takes for CuPy arrays -------------

class EmulatedArray(np.ndarray):
    """A NumPy array that ninpy.backend.is_gpu_array() takes for a CuPy array (`.get()` included)."""

    def get(self):
        return np.array(self)


class EmulatorLacks(AttributeError):
    """ninpy asked the emulated cupy for something NumPy does not have (a CuPy-only API)."""


def _to_device(value):
    if isinstance(value, np.ndarray) and not isinstance(value, EmulatedArray):
        return value.view(EmulatedArray)
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value


class EmulatedCupyModule(types.ModuleType):
    """`cupy` made of NumPy: every NumPy function, with array results turned into EmulatedArray, plus
    asnumpy, ndarray and the kernel loader of `emulated_cupy`. Anything CuPy-only raises EmulatorLacks."""

    def __init__(self, sources):
        super().__init__("emulated_cupy")
        self.RawModule = emulated_cupy(sources).RawModule
        self.ndarray = EmulatedArray
        self.asnumpy = np.array

    def __getattr__(self, name):
        try:
            value = getattr(np, name)
        except AttributeError:
            raise EmulatorLacks(f"cupy.{name} has no NumPy counterpart in the host emulator") from None
        if callable(value) and not isinstance(value, type):
            return lambda *args, **kwargs: _to_device(value(*args, **kwargs))
        return value
