"""The "emulated" device: ninpy's GPU code path on the CPU, with NumPy standing in for CuPy.

`--device emulated` (or `Tensor(..., device="emulated")`, `model.to("emulated")`) runs exactly what
`--device gpu` runs above CuPy: functional.py's GPU branches, every launcher in gpu_kernels.py and
the unchanged kernels/*.cu. The .cu sources are compiled by the host C++ compiler (g++ -std=c++20)
after a small shim that defines the CUDA built-ins they use: __global__/__device__,
threadIdx/blockIdx/blockDim/gridDim, min/max, __shfl_xor_sync (a warp is 32 std::threads meeting
at a barrier), and __syncthreads with __shared__ arrays (a block's threads are fibers on one OS
thread, switched at each barrier). A launch runs every block and every thread of the grid, one after
another, so grid-stride loops and the index formulas run as written.

`EmulatedCupy` is the stand-in for the `cupy` module: NumPy's functions, with array results turned
into `EmulatedArray` (a NumPy array that backend.py takes for a device array), and a `RawModule`
whose `get_function("kernel<float, int>")` returns a launcher with CuPy's calling convention
`kernel(grid, block, args)`. Before each launch it checks every argument against the kernel's C
parameter list parsed from the source (pointer: a contiguous array of the right dtype; scalar: a
NumPy scalar of exactly the C type; a Python int would become long long in CuPy, a float double;
a struct passed by value: a 1-element NumPy record array of the struct's size, as CuPy takes one),
then passes them the way cuLaunchKernel does, as an array of pointers to the values. As on a GPU,
a host (NumPy) array handed to a device function is refused, and reading a device value on the host
(`.get()`, `float()`, `.item()`) is a synchronisation, which `forbid_synchronize()` turns into an
error.

What this does NOT show: races between threads (each thread runs to completion in turn), timing,
memory coalescing, real warp scheduling, the GPU's math library (expf/logf rounding, float32
subnormals flushed to zero under CuPy's -ftz=true) or cuBLAS (CuPy's matmul: NumPy's here; under
CUPY_TF32=1 its float32 inputs are rounded to TF32 first, as tensor cores do, so tolerances that
depend on TF32 can be checked without a GPU).
docs/emulator.md shows how to use it, and to step into a kernel with gdb.

NINPY_EMULATOR_SANITIZE=address builds the kernels with AddressSanitizer, so a kernel that reads or
writes past an array stops the process with a report naming the .cu line. The Python process must
load the sanitizer's runtime first: LD_PRELOAD=$(g++ -print-file-name=libasan.so) and
ASAN_OPTIONS=detect_leaks=0 (Python itself keeps memory until exit).
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types
from pathlib import Path

import numpy as np

from .backend import DeviceError

SHIM = r"""
// Host stand-ins for the CUDA built-ins used by kernels/*.cu.
#include <algorithm>
#include <barrier>
#include <cstdio>
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
// kernel instantiation, owned by the block running at the time.
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

SANITIZE_ENV = "NINPY_EMULATOR_SANITIZE"
DEBUG_ENV = "NINPY_EMULATOR_DEBUG"
# What to install when no C++ compiler is found (the shim needs C++20's <barrier>: g++ 11 or later).
INSTALL_HINT = ("install g++ 11 or later (Debian/Ubuntu: `apt-get install g++`, or build-essential; "
                "Fedora: `dnf install gcc-c++`; macOS: `brew install gcc` and set CXX=g++-14)")

_C_TO_NUMPY = {"float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64,
               "unsigned long long": np.uint64}
_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
           np.dtype(np.uint64): ctypes.c_uint64}
_KERNEL = re.compile(r"template\s*<([^>]*)>\s*__global__\s+void\s+(\w+)\s*\(([^)]*)\)", re.S)


class EmulatorUnavailable(DeviceError):
    """This machine cannot run the emulator (no C++ compiler); the message names what to install."""


class EmulatorBuildFailed(RuntimeError):
    """g++ rejected the kernels: a bug in a .cu file or the shim."""


class EmulatorLacks(AttributeError):
    """ninpy asked the emulated cupy for something NumPy does not have (a CuPy-only API)."""


class DeviceSynchronized(RuntimeError):
    """A device value was read on the host inside `forbid_synchronize()`."""


def compiler():
    """The C++ compiler the emulator uses ($CXX, else g++), or raise EmulatorUnavailable."""
    name = os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise EmulatorUnavailable(f"device 'emulated' compiles kernels/*.cu with a C++ compiler, and "
                                  f"{name} is not on PATH; {INSTALL_HINT}, or use --device cpu")
    return path


def sanitizer():
    """The -fsanitize= value asked for by NINPY_EMULATOR_SANITIZE ("" for none)."""
    value = os.environ.get(SANITIZE_ENV, "").strip()
    if value not in ("", "address"):
        raise EmulatorUnavailable(f"{SANITIZE_ENV}={value!r}: the emulator knows only 'address' "
                                  "(AddressSanitizer); unset it to build without")
    return value


def _require_asan_runtime():
    """A sanitized library loaded into Python needs libasan loaded before everything else."""
    try:
        ctypes.CDLL(None).__asan_init
    except AttributeError:
        raise EmulatorUnavailable(
            f"{SANITIZE_ENV}=address needs AddressSanitizer's runtime loaded first: run Python with "
            "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0") from None


# --- building the .cu files into one shared library -----------------------------------------------

def parse_kernels(source):
    """{kernel: (template parameter names, [(C type with T etc. unsubstituted, is_pointer, is_const)])}."""
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


def _param_types(kernels, expression):
    name, args = expression.split("<", 1)
    args = [a.strip() for a in args.rstrip(">").split(",")]
    template_names, params = kernels[name]
    substitute = dict(zip(template_names, args))
    return [(re.sub(r"\b\w+\b", lambda word: substitute.get(word[0], word[0]), base), pointer, const)
            for base, pointer, const in params]  # T alone, and inside a struct's type: Table<T>


def calls(source, name):
    """Whether CUDA `source` uses `name` in its code: a comment that mentions it does not count
    (a comment naming __syncthreads would otherwise run every kernel of the file on fibers)."""
    return name in re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.S)


@functools.lru_cache(maxsize=None)
def _build(sources, sanitize):
    """Compile the shim + every source + one extern "C" wrapper per name expression; return (lib, wrappers)."""
    parts = [SHIM]
    wrappers = {}
    for path, source, expressions in sources:
        kernels = parse_kernels(source)
        parts.append(f'#include "{Path(path).resolve()}"')
        warps = calls(source, "__shfl")
        launcher = ("launch_blocks(grid, block, " if calls(source, "__syncthreads")
                    else f"launch(grid, block, {str(warps).lower()}, ")
        for expression in expressions:
            wrapper = f"wrap_{len(wrappers)}"
            params = _param_types(kernels, expression)
            wrappers[expression] = (wrapper, params)
            args = ", ".join(f"*reinterpret_cast<{'const ' if const else ''}{base}{'*' if pointer else ''}*>(a[{i}])"
                             for i, (base, pointer, const) in enumerate(params))
            parts.append(f'extern "C" void {wrapper}(unsigned grid, unsigned block, void** a) '
                         f'{{ {launcher}[&] {{ {expression}({args}); }}); }}')
            for i, (base, pointer, _) in enumerate(params):  # a struct passed by value: its size
                if not pointer and base not in _C_TO_NUMPY:
                    parts.append(f'extern "C" unsigned long long {wrapper}_sizeof_{i}() '
                                 f'{{ return sizeof({base}); }}')
    code = "\n".join(parts) + "\n"
    what = code + "".join(s for _, s, _ in sources)
    return compile_once(code, what, "emulator", sanitize), wrappers


def compile_once(code, what, name, sanitize=""):
    """g++ `code` into a shared library (ctypes.CDLL), built once per version of `what` (the code
    and the sources it includes) and reused by later processes."""
    flags = ["-std=c++20", "-g", "-shared", "-fPIC", "-pthread"]
    # -O1 keeps a build of every kernel to seconds; NINPY_EMULATOR_DEBUG=1 keeps every line and
    # variable for a debugger (-O0); a sanitized build keeps frames for its reports
    flags += ["-O0"] if os.environ.get(DEBUG_ENV, "0") not in ("", "0") else ["-O1"]
    if sanitize:
        flags += ["-fno-omit-frame-pointer", f"-fsanitize={sanitize}"]
    if sanitize:
        _require_asan_runtime()
    digest = hashlib.sha256((what + " ".join(flags)).encode()).hexdigest()[:16]
    workdir = Path(tempfile.gettempdir()) / f"ninpy-cuda-{name}-{digest}"
    workdir.mkdir(exist_ok=True)
    library = workdir / f"{name}.so"
    if not library.exists():  # each process writes its own files, then renames
        source_file = workdir / f"{name}.{os.getpid()}.cpp"
        partial = workdir / f"{name}.{os.getpid()}.so.tmp"
        source_file.write_text(code)
        result = subprocess.run([compiler(), *flags, "-o", str(partial), str(source_file)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise EmulatorBuildFailed(f"g++ could not build the {name}:\n{result.stderr[-3000:]}")
        partial.replace(library)  # atomic: a concurrent run sees either no library or a whole one
    return ctypes.CDLL(str(library))


def build_probe(path, wrappers):
    """Compile one .cu file with the shim plus `wrappers` (extern "C" functions calling its device
    helpers) into a shared library; return it (ctypes.CDLL). Lets a test call a __device__ helper
    such as pooling.cu's covering_windows directly."""
    code = f'{SHIM}\n#include "{Path(path).resolve()}"\n{wrappers}\n'
    return compile_once(code, code + Path(path).read_text(), "probe", sanitizer())


class Kernel:
    """One compiled kernel instantiation, called as CuPy calls a RawKernel: kernel(grid, block, args)."""

    def __init__(self, lib, expression, wrapper, params):
        self.expression = expression
        self.lib, self.wrapper = lib, wrapper
        self.function = getattr(lib, wrapper)
        self.params = params

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and len(block) == 1, "our kernels use 1-D grids"
        if len(args) != len(self.params):
            raise TypeError(f"{self.expression}: {len(args)} arguments for {len(self.params)} parameters")
        keep, pointers = [], []
        for i, (arg, (base, pointer, _)) in enumerate(zip(args, self.params)):
            if not pointer and base not in _C_TO_NUMPY:
                value = self._struct(i, arg, base)
                keep.append(value)
                pointers.append(ctypes.cast(value, ctypes.c_void_p))
                continue
            expected = np.dtype(_C_TO_NUMPY[base])
            if pointer:
                if not isinstance(arg, EmulatedArray) or arg.dtype != expected or not arg.flags.c_contiguous:
                    raise TypeError(f"{self.expression}: argument {i} must be a contiguous {expected} "
                                    f"device array (for {base}*), got {type(arg).__name__} "
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
        launches.append(self.expression)
        self.function(ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(block[0])), array)

    def _struct(self, i, arg, base):
        """A struct passed by value, as CuPy passes one: a 1-element NumPy record array (host
        memory) whose dtype has the struct's fields and size; a pointer to a copy of its bytes."""
        size = getattr(self.lib, f"{self.wrapper}_sizeof_{i}")
        size.restype = ctypes.c_ulonglong
        if (not isinstance(arg, np.ndarray) or isinstance(arg, EmulatedArray) or arg.size != 1
                or arg.dtype.names is None or arg.dtype.itemsize != size()):
            raise TypeError(f"{self.expression}: argument {i} must be a 1-element NumPy record array "
                            f"of {size()} bytes (for the struct {base}), got {type(arg).__name__} "
                            f"{getattr(arg, 'dtype', '')}")
        return ctypes.create_string_buffer(arg.tobytes(), size())


# Every launch made in this process, by name expression ("sgd_update_kernel<float, int>"): what a
# benchmark counts. Cleared by whoever counts.
launches = []


def raw_module_class(sources):
    """cupy.RawModule for `sources` (gpu_kernels.kernel_sources()): all of them are built into one
    library the first time any module is compiled."""
    key = tuple((str(p), s, tuple(n)) for p, s, n in sources)

    class RawModule:
        def __init__(self, code, options=(), name_expressions=()):
            self.name_expressions = tuple(name_expressions)

        def compile(self):
            _build(key, sanitizer())

        def get_function(self, expression):
            if expression not in self.name_expressions:
                raise KeyError(f"{expression} was not declared as a name expression")
            lib, wrappers = _build(key, sanitizer())
            wrapper, params = wrappers[expression]
            return Kernel(lib, expression, wrapper, params)

    return RawModule


# --- device arrays and the cupy stand-in ----------------------------------------------------------

_sync = threading.local()


@contextlib.contextmanager
def forbid_synchronize():
    """Inside, reading a device value on the host raises DeviceSynchronized (as a GPU would wait)."""
    before = getattr(_sync, "forbidden", False)
    _sync.forbidden = True
    try:
        yield
    finally:
        _sync.forbidden = before


def _synchronize(what):
    if getattr(_sync, "forbidden", False):
        raise DeviceSynchronized(f"{what} reads a device value on the host: on a GPU it waits for "
                                 "every queued kernel")


def _host(value):
    """Plain NumPy views of EmulatedArray values (in lists and tuples too)."""
    if isinstance(value, EmulatedArray):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_host(v) for v in value)
    return value


def _refuse_host_arrays(name, values):
    """CuPy refuses NumPy arrays where it wants device arrays; so does the emulator."""
    for value in values:
        if isinstance(value, (list, tuple)):
            _refuse_host_arrays(name, value)
        elif isinstance(value, np.ndarray) and not isinstance(value, EmulatedArray):
            raise TypeError(f"{name}: a NumPy (host) array where a device array is needed; move it "
                            "to the device first (cupy.asarray): CuPy refuses it the same way")


def tf32_enabled():
    """CuPy reads CUPY_TF32=1 as: float32 matrix products in TF32 on GPUs that have it."""
    return os.environ.get("CUPY_TF32", "0") not in ("", "0")


def round_to_tf32(array):
    """float32 values rounded to TF32's 10 mantissa bits (to nearest, ties to even), as tensor
    cores round a product's inputs; the products are then summed in float32."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    dropped = np.uint32(0x1FFF)
    rounded = (bits + (dropped >> np.uint32(1)) + ((bits >> np.uint32(13)) & np.uint32(1))) & ~dropped
    finite = np.isfinite(array)
    return np.where(finite, rounded.view(np.float32), array).astype(np.float32)


def _products_in_tf32(inputs):
    """The inputs of a float32 matmul, rounded to TF32 under CUPY_TF32=1 (else as they are)."""
    if tf32_enabled() and all(getattr(a, "dtype", None) == np.float32 for a in inputs):
        return tuple(round_to_tf32(a) for a in inputs)
    return inputs


class EmulatedArray(np.ndarray):
    """A NumPy array that ninpy.backend takes for a device array: `.get()` copies it to the host,
    results stay device arrays (0-d too, as CuPy's), and mixing in a host array is refused."""

    def __array_wrap__(self, array, context=None, return_scalar=False):
        return super().__array_wrap__(array, context, False)  # a 0-d device array, not a scalar

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host_arrays(f"cupy.{ufunc.__name__}", inputs + tuple(kwargs.get("out", ())))
        if "out" in kwargs:
            kwargs["out"] = _host(kwargs["out"])
        inputs = _host(inputs)
        if ufunc is np.matmul:
            inputs = _products_in_tf32(inputs)
        return _to_device(getattr(ufunc, method)(*inputs, **kwargs))

    def __getitem__(self, index):
        return _to_device(super().__getitem__(_host(index)))

    def __setitem__(self, index, value):
        _refuse_host_arrays("cupy.ndarray.__setitem__", (value,))
        super().__setitem__(_host(index), _host(value))

    def get(self):
        _synchronize(".get()")
        return np.array(self.view(np.ndarray))

    def item(self, *args):
        _synchronize(".item()")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        _synchronize(".tolist()")
        return self.view(np.ndarray).tolist()

    def __float__(self):
        _synchronize("float()")
        return float(self.view(np.ndarray))

    def __int__(self):
        _synchronize("int()")
        return int(self.view(np.ndarray))

    def __bool__(self):
        _synchronize("bool()")
        return bool(self.view(np.ndarray))

    def __index__(self):
        _synchronize("an index")
        return self.view(np.ndarray).__index__()


def _to_device(value):
    if isinstance(value, np.ndarray) and not isinstance(value, EmulatedArray):
        return value.view(EmulatedArray)
    if isinstance(value, np.generic):
        return np.asarray(value).view(EmulatedArray)  # CuPy gives 0-d arrays, never NumPy scalars
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    return value


class _Stream:
    def synchronize(self):
        _synchronize("synchronize()")


# Functions that take host data by design (they copy it to the device), as in CuPy.
_FROM_HOST = {"array", "asarray", "asanyarray", "ascontiguousarray"}


def _from_host(name, data, *args, **kwargs):
    """cupy.array copies; asarray and ascontiguousarray copy host data and keep a device array that
    already fits (the same object, as CuPy does)."""
    if isinstance(data, EmulatedArray) and name != "array":
        plain = data.view(np.ndarray)
        result = getattr(np, name)(plain, *args, **kwargs)
        return data if result is plain else _to_device(result)
    return _to_device(np.array(_host(data), *args, **{"copy": True, **kwargs}))


class EmulatedCupy(types.ModuleType):
    """`cupy` made of NumPy: every NumPy function, with array results turned into EmulatedArray, plus
    asnumpy, ndarray, cuda.get_current_stream() and the kernel loader. Anything CuPy-only raises
    EmulatorLacks."""

    def __init__(self, sources):
        super().__init__("emulated_cupy")
        self.RawModule = raw_module_class(sources)
        self.ndarray = EmulatedArray
        self.cuda = types.SimpleNamespace(get_current_stream=_Stream)

    @staticmethod
    def asnumpy(array):
        return array.get() if isinstance(array, EmulatedArray) else np.asarray(array)

    def __getattr__(self, name):
        try:
            value = getattr(np, name)
        except AttributeError:
            raise EmulatorLacks(f"cupy.{name} has no NumPy counterpart in the host emulator") from None
        if not callable(value) or isinstance(value, type):
            return value
        if isinstance(value, np.ufunc):
            return value  # EmulatedArray.__array_ufunc__ refuses host arrays and wraps results

        def on_device(*args, **kwargs):
            if name in _FROM_HOST:
                return _from_host(name, *args, **kwargs)
            _refuse_host_arrays(f"cupy.{name}", args + tuple(kwargs.values()))
            args = _host(args)
            if name in ("dot", "tensordot", "inner"):  # cuBLAS products, as matmul
                args = _products_in_tf32(args[:2]) + args[2:]
            return _to_device(value(*args, **{k: _host(v) for k, v in kwargs.items()}))
        return on_device


def load(sources):
    """The cupy stand-in running `sources` (gpu_kernels.kernel_sources()); raises EmulatorUnavailable
    when no C++ compiler is installed. The kernels are built on first use (seconds, then cached)."""
    compiler()
    sanitizer()
    return EmulatedCupy(sources)
