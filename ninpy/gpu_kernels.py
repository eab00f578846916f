"""GPU kernels: launch the CUDA sources in `kernels/*.cu` on CuPy arrays.

Same names and signatures as `ninpy.reference` (the readable NumPy oracle) and `ninpy.cpu_kernels`,
plus the GPU-only `dropout_apply` and the pooling functions' `dropout=` (dropout drawn and applied
in the pooling's own launch); the kernel contract in docs/design.md lists them all. The
convolutions' GEMMs are CuPy's own 2-D matmul (ninpy/gemm.py). Every function takes and returns CuPy arrays of any strides (inputs are made C-contiguous,
because a raw kernel ignores strides), allocates its outputs with `cupy.empty`, launches on the
current stream and never waits for the GPU or copies to the host.

Each `.cu` file is one concern with `template <typename T, ...>` kernels; its float and double
versions (and an int / long long index type where sizes can pass 2**31) are named as C++ name
expressions such as "im2col_kernel<float, int>", compiled together by NVRTC through
`cupy.RawModule` the first time a kernel of that file is used (and cached by CuPy on disk), so
importing this module needs no GPU. A `.cu` file may `#include "name.cuh"` from kernels/ (the
dropout draws, shared): `kernel_sources` puts the header's text in its place, so NVRTC needs no
include path and CuPy's cache, which keys on the text, sees a changed header. A compile error is
raised as `KernelCompileError` naming the `.cu` file (or header) and line. `compile_with_nvrtc`
compiles a source for a given architecture without any GPU, through the same error path;
tests/test_kernels_compile.py uses it so a broken kernel fails CI.

Scalars go to the kernels as NumPy scalars of the exact C type (`numpy.int32`, the array's float
type): CuPy would turn a Python int into `long long` and a float into `double`.

A launch, step by step (every public function below does this, in `_launch`):
1. `_c_type`: the array's dtype -> "float" or "double" (anything else is a clear TypeError);
2. `_index`: "int" if every flat index into the arguments fits in 31 bits, else "long long" (the
   kernels index with it);
   arguments marked `_Index(...)` are converted to that type, since it is only known here;
3. `_function`: the compiled kernel "name<float, int>", compiling its .cu file on first use;
4. call it with `_grid(count)` blocks of `_BLOCK` threads (grid-stride loops cover the rest).
Cross-entropy launches one warp per row instead, so it builds its grid in `_row_launch` (and its
mean one warp in all);
`relu_bias_backward` one block per channel (its threads then add up the channel's sum together);
`sgd_update_many_` passes up to 32 tensors' addresses to one launch in a struct (`_sgd_launch`).
"""
import math
import re
from pathlib import Path

import numpy as np

from ninpy import backend
from ninpy.shapes import (batch_and_channels, check_pool_gradient, check_pool_output,
                          conv_output_size)


def _kernel_dir():
    """`kernels/` next to this file when installed (package data), else at the checkout's root."""
    installed = Path(__file__).parent / "kernels"
    if installed.is_dir():
        return installed
    return Path(__file__).parents[1] / "kernels"


KERNEL_DIR = _kernel_dir()
OPTIONS = ("-std=c++14",)
# What cupy.RawModule adds to OPTIONS when it compiles (CuPy 14: cupy/cuda/compiler.py):
# -ftz=true flushes float32 subnormals to zero (docs/design.md, "Subnormals"), and
# --device-as-default-execution-space. compile_with_nvrtc adds them too, so that what the compile
# tests accept is what runs.
CUPY_RUNTIME_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")
FLOATS = ("float", "double")          # the first template argument, T
# The second template argument is an integer type, one of these two. For most kernels it is Index,
# the type of flat indices, chosen per launch by size (`_index`); for cross-entropy it is Label, the
# C type of the labels array (int32 -> int, int64 -> long long).
INTEGERS = ("int", "long long")

# file -> {kernel: the integer types its second template argument is instantiated with}
_KERNELS = {
    "im2col.cu": {"im2col_kernel": INTEGERS, "col2im_kernel": INTEGERS},
    "pooling.cu": {"max_pool_forward_kernel": INTEGERS, "max_pool_backward_kernel": INTEGERS,
                   "avg_pool_forward_kernel": INTEGERS, "avg_pool_backward_kernel": INTEGERS},
    "cross_entropy.cu": {"cross_entropy_forward_kernel": INTEGERS, "cross_entropy_mean_kernel": INTEGERS,
                         "cross_entropy_backward_kernel": INTEGERS},
    "global_avg_pool.cu": {"global_avg_pool_forward_kernel": INTEGERS,
                           "global_avg_pool_backward_kernel": INTEGERS},
    "elementwise.cu": {"bias_relu_kernel": INTEGERS, "add_bias_kernel": INTEGERS,
                       "relu_backward_kernel": INTEGERS, "dropout_kernel": INTEGERS},
    "relu_bias_backward.cu": {"relu_bias_backward_kernel": INTEGERS},
    "sgd.cu": {"sgd_update_kernel": INTEGERS, "sgd_update_many_kernel": INTEGERS},
}

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_WARP = 32            # threads that run in lockstep on NVIDIA GPUs; cross_entropy.cu reduces a row
                      # across one warp with __shfl_xor_sync, so a block must hold whole warps
_BLOCK = 256          # threads per block: a multiple of _WARP, and a common size that keeps enough
                      # blocks resident per multiprocessor for these memory-bound kernels
_MAX_BLOCKS = 1 << 20  # cap on the grid: a million blocks of 256 threads is already more than a GPU
                      # runs at once; larger arrays are covered by the kernels' grid-stride loops
                      # (each thread takes elements e, e + grid size, ...), so the cap only bounds
                      # the grid, never what is computed
_INT32_MAX = 2 ** 31 - 1


def _expression(kernel, *template_args):
    """The C++ name expression of one instantiation, e.g. "im2col_kernel<float, int>"."""
    return f"{kernel}<{', '.join(template_args)}>"


def _name_expressions(filename):
    return [_expression(kernel, t, extra)
            for kernel, extras in _KERNELS[filename].items() for t in FLOATS for extra in extras]


def kernel_sources():
    """[(path, source text, [name expressions for float and double])] for every kernels/*.cu file,
    its headers' text in place of its `#include "name.cuh"` lines."""
    sources = []
    for filename in _KERNELS:
        path = _kernel_file(filename)
        sources.append((path, _with_headers(path, path.read_text()), _name_expressions(filename)))
    return sources


def _kernel_file(filename):
    path = KERNEL_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"CUDA source {path} is missing; reinstall ninpy (`pip install .`) "
                                "so that kernels/*.cu and *.cuh are installed as package data")
    return path


_INCLUDE = re.compile(r'^#include "(?P<name>[\w.]+\.cuh)"[ \t]*$', re.M)


def _with_headers(path, source):
    """source with each `#include "name.cuh"` line replaced by kernels/NAME.cuh's text, between
    #line directives: NVRTC then names the header's file and lines in an error, and the .cu
    file's own lines keep their numbers."""
    def header(match):
        line = source.count("\n", 0, match.start()) + 1
        text = _kernel_file(match["name"]).read_text()
        return f'#line 1 "{match["name"]}"\n{text}\n#line {line + 1} "{Path(path).name}"'
    return _INCLUDE.sub(header, source)


# --- compile errors -------------------------------------------------------------------------------

class KernelCompileError(RuntimeError):
    """A kernels/*.cu file does not compile; the message names the file and line of each error."""


_LOG_LINE = re.compile(r"^(?P<file>.*?)\((?P<line>\d+)\): (?P<message>.*)$")


def format_compile_error(path, log):
    """Turn NVRTC's log ("anything.cu(LINE): error: ...") into "path:LINE: error: ..." lines.

    The log names NVRTC's own (temporary) file name; the line numbers are those of `path`, whose text
    is compiled unchanged.
    """
    lines = []
    for raw in log.splitlines():
        match = _LOG_LINE.match(raw.strip())
        if match and "error" in match["message"]:
            where = Path(match["file"]).name
            where = Path(path).with_name(where) if where.endswith(".cuh") else path  # an included header
            lines.append(f"{where}:{match['line']}: {match['message']}")
    if not lines:  # an error without a position (bad option, missing name expression): keep it all
        lines = [f"{path}: {log.strip() or 'NVRTC failed without a log'}"]
    return f"CUDA kernel source {path} failed to compile (NVRTC):\n  " + "\n  ".join(lines)


def compile_with_nvrtc(path, source, name_expressions, arch, options=OPTIONS + CUPY_RUNTIME_OPTIONS):
    """Compile `source` with NVRTC for `arch` (e.g. "sm_90") with no GPU, with the options CuPy
    compiles with at run time; return {expression: lowered name}.

    Raises KernelCompileError (file and line) on a compile error; ImportError/OSError when NVRTC
    cannot be loaded.
    """
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(source, Path(path).name, (), ())
    try:
        for expression in name_expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, tuple(options) + (f"--gpu-architecture={arch}",))
        except nvrtc.NVRTCError:
            raise KernelCompileError(format_compile_error(path, nvrtc.getProgramLog(program))) from None
        return {expression: nvrtc.getLoweredName(program, expression)
                for expression in name_expressions}
    finally:
        nvrtc.destroyProgram(program)


# --- loading and launching ------------------------------------------------------------------------

_modules = {}    # (array module name, filename) -> compiled RawModule (CuPy caches the binary per device)
_functions = {}  # (array module name, filename, name expression) -> compiled kernel


def _function(xp, filename, kernel, *template_args):
    """The compiled `kernel<template_args>` of the file `filename` in kernels/ (compiled on first use)
    for the array module `xp`: cupy (NVRTC, for the GPU) or the emulator's (g++, for the CPU)."""
    expression = _expression(kernel, *template_args)
    key = (xp.__name__, filename, expression)
    function = _functions.get(key)
    if function is None:
        module = _modules.get(key[:2])
        if module is None:
            path, source, expressions = next(entry for entry in kernel_sources()
                                             if entry[0].name == filename)
            module = xp.RawModule(code=source, options=OPTIONS, name_expressions=expressions)
            _compile(module, path)
            _modules[key[:2]] = module
        function = _functions[key] = module.get_function(expression)
    return function


def _compile(module, path):
    """module.compile(), with NVRTC's errors as KernelCompileError naming the .cu file and line."""
    try:
        module.compile()
    except Exception as error:
        if type(error).__name__ != "CompileException":  # cupy.cuda.compiler's, without importing it
            raise
        raise KernelCompileError(format_compile_error(path, error.get_message())) from None


def _c_type(dtype):
    c_type = _C_TYPES.get(np.dtype(dtype))
    if c_type is None:
        raise TypeError(f"GPU kernels take float32 or float64 arrays, got {np.dtype(dtype)}; "
                        "cast with .astype(numpy.float32)")
    return c_type


def _grid(count):
    return min((count + _BLOCK - 1) // _BLOCK, _MAX_BLOCKS)


def _index(count, args):
    """(C type, NumPy type) of the flat index: int while every index into the arrays among `args`,
    and every thread number plus the grid, fits in int32."""
    largest = max([count] + [getattr(a, "size", 0) for a in args]) + _grid(count) * _BLOCK
    return ("int", np.int32) if largest <= _INT32_MAX else ("long long", np.int64)


def _launch(filename, kernel, dtype, count, args):
    """Launch kernel<dtype, index> over `count` threads (grid-stride); args receive the index type.
    The first argument is a device array: its module (cupy or the emulator's) runs the kernel."""
    c_type = _c_type(dtype)
    if count == 0:
        return
    index_c, index_np = _index(count, args)
    args = tuple(index_np(a.value) if isinstance(a, _Index) else a for a in args)
    function = _function(backend.array_module(args[0]), filename, kernel, c_type, index_c)
    function((_grid(count),), (_BLOCK,), args)


class _Index:
    """Marks a kernel argument of the index type (int or long long, chosen at launch)."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = int(value)


def _contiguous(array):
    return backend.array_module(array).ascontiguousarray(array)


def _require_contiguous(array, name):
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous to be updated in place (got strides "
                         f"{array.strides}); pass a contiguous array")


def _i32(*values):
    return tuple(np.int32(v) for v in values)


# --- im2col / col2im ------------------------------------------------------------------------------

def im2col(x, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j], 0 outside.
    x is (N, C, H, W), or (C, N, H, W) with layout="CNHW" (docs/design.md, "Array layouts"); col is the
    same for both."""
    cupy = backend.array_module(x)
    x = _contiguous(x)
    N, C = batch_and_channels(x.shape, layout)
    H, W = x.shape[2:]
    oh, ow = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    col = cupy.empty((C * kh * kw, N * oh * ow), dtype=x.dtype)
    _launch("im2col.cu", "im2col_kernel", x.dtype, C * N * oh * ow,
            (x, col) + _i32(N, C, layout == "CNHW", H, W, kh, kw, sh, sw, ph, pw, oh, ow))
    return col


def col2im(col, x_shape, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """dx[n, c, h, w] = sum of the col entries im2col copied from x[n, c, h, w].
    x_shape and dx are (N, C, H, W), or (C, N, H, W) with layout="CNHW".
    A gather, one thread per dx element (no atomics); the reference scatters one window offset at
    a time, Numba gathers one image plane per iteration (cpu_kernels: three algorithms)."""
    cupy = backend.array_module(col)
    col = _contiguous(col)
    N, C = batch_and_channels(x_shape, layout)
    H, W = x_shape[2:]
    oh, ow = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    if col.shape != (C * kh * kw, N * oh * ow):
        raise ValueError(f"col has shape {col.shape}, expected {(C * kh * kw, N * oh * ow)} for "
                         f"x_shape {tuple(x_shape)} ({layout}) and kernel {kh}x{kw}")
    dx = cupy.empty(tuple(x_shape), dtype=col.dtype)
    _launch("im2col.cu", "col2im_kernel", col.dtype, dx.size,
            (col, dx) + _i32(N, C, layout == "CNHW", H, W, kh, kw, sh, sw, ph, pw, oh, ow))
    return dx


# --- pooling --------------------------------------------------------------------------------------
# Each pooling function also takes dropout=(p, seed, offset) (GPU only; None: no dropout): forward
# then gives dropout_apply(y, p, seed, offset), the dropout after the pooling drawn and applied in
# the pooling's own launch, and backward the gradient of that, dy * mask pooled back
# (kernels/pooling.cu); the same numbers as the two operators one after the other, one launch fewer.

def max_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow, *, dropout=None):
    """y = max over each window's real elements (NaN wins); argmax (int32) = h*W + w of the winner.
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    cupy = backend.array_module(x)
    x = _contiguous(x)
    N, C, H, W = x.shape
    y = cupy.empty((N, C, oh, ow), dtype=x.dtype)
    argmax = cupy.empty((N, C, oh, ow), dtype=np.int32)
    _launch("pooling.cu", "max_pool_forward_kernel", x.dtype, y.size,
            (x, y, argmax, _Index(y.size)) + _i32(H, W, kh, kw, sh, sw, ph, pw, oh, ow)
            + _dropout_args(dropout, x.dtype))
    return y, argmax


def max_pool_backward(dy, argmax, x_shape, kh, kw, sh, sw, ph, pw, *, dropout=None):
    """dx[n, c, h, w] = sum of dy over the windows whose argmax is h*W + w. Planes in either layout.
    A gather through the covering windows, one thread per dx element; the reference scatters with
    np.add.at, Numba within the plane an iteration owns."""
    check_pool_gradient("max_pool_backward", dy.shape, x_shape, kh, kw, sh, sw, ph, pw)
    if argmax.shape != dy.shape:
        raise ValueError(f"max_pool_backward: argmax has shape {tuple(argmax.shape)}, expected "
                         f"{tuple(dy.shape)} (the shape of dy)")
    cupy = backend.array_module(dy)
    dy = _contiguous(dy)
    argmax = _contiguous(argmax).astype(np.int32, copy=False)
    N, C, H, W = x_shape
    oh, ow = dy.shape[2:]
    dx = cupy.empty((N, C, H, W), dtype=dy.dtype)
    _launch("pooling.cu", "max_pool_backward_kernel", dy.dtype, dx.size,
            (dy, argmax, dx, _Index(dx.size)) + _i32(H, W, kh, kw, sh, sw, ph, pw, oh, ow)
            + _dropout_args(dropout, dy.dtype))
    return dx


def avg_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad=True, *, dropout=None):
    """y = sum of each window's real elements / divisor (padding counted if count_include_pad).
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    cupy = backend.array_module(x)
    x = _contiguous(x)
    N, C, H, W = x.shape
    y = cupy.empty((N, C, oh, ow), dtype=x.dtype)
    _launch("pooling.cu", "avg_pool_forward_kernel", x.dtype, y.size,
            (x, y, _Index(y.size)) + _i32(H, W, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad)
            + _dropout_args(dropout, x.dtype))
    return y


def avg_pool_backward(dy, x_shape, kh, kw, sh, sw, ph, pw, count_include_pad=True, *, dropout=None):
    """dx[n, c, h, w] = sum over the windows covering (h, w) of dy / divisor. Planes in either layout.
    A gather, one thread per dx element; the reference and Numba scatter (cpu_kernels: three
    algorithms)."""
    check_pool_gradient("avg_pool_backward", dy.shape, x_shape, kh, kw, sh, sw, ph, pw)
    cupy = backend.array_module(dy)
    dy = _contiguous(dy)
    N, C, H, W = x_shape
    oh, ow = dy.shape[2:]
    dx = cupy.empty((N, C, H, W), dtype=dy.dtype)
    _launch("pooling.cu", "avg_pool_backward_kernel", dy.dtype, dx.size,
            (dy, dx, _Index(dx.size)) + _i32(H, W, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad)
            + _dropout_args(dropout, dy.dtype))
    return dx


# --- softmax cross-entropy ------------------------------------------------------------------------

def _labels(labels):
    """Labels as int32 or int64 (other integer dtypes are widened to int64)."""
    labels = _contiguous(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be int32 or int64, got {labels.dtype}; cast with .astype(numpy.int64)")
    if labels.dtype not in (np.int32, np.int64):
        labels = labels.astype(np.int64)
    return labels


def _cross_entropy_function(kernel, logits, labels):
    """The compiled cross-entropy `kernel` for these logits and labels, once their shapes are checked."""
    N, K = logits.shape
    if labels.shape != (N,):
        raise ValueError(f"labels has shape {labels.shape}, expected ({N},) for logits {logits.shape}")
    if K == 0:
        raise ValueError(f"logits of shape {logits.shape} have no classes; expected (N, K) with K >= 1")
    label_type = "int" if labels.dtype == np.int32 else "long long"
    return _function(backend.array_module(logits), "cross_entropy.cu", kernel,
                     _c_type(logits.dtype), label_type)


def _row_launch(kernel, logits, labels, args):
    """Launch `kernel` with one warp per row of the logits."""
    function = _cross_entropy_function(kernel, logits, labels)
    N, K = logits.shape
    if N == 0:
        return
    warps_per_block = _BLOCK // _WARP
    grid = min((N + warps_per_block - 1) // warps_per_block, _MAX_BLOCKS)
    function((grid,), (_BLOCK,), args + _i32(N, K))


def cross_entropy_forward(logits, labels, label_smoothing=0.0, ignore_index=-100):
    """losses[n] = logsumexp(z[n]) - (1 - eps) z[n, labels[n]] - eps mean_k z[n, k] (row max
    subtracted), eps = label_smoothing; 0 where labels[n] is ignore_index, NaN for another label
    outside [0, K)."""
    cupy = backend.array_module(logits)
    logits = _contiguous(logits)
    labels = _labels(labels)
    losses = cupy.empty((logits.shape[0],), dtype=logits.dtype)
    eps = logits.dtype.type(label_smoothing)
    _row_launch("cross_entropy_forward_kernel", logits, labels,
                (logits, labels, losses, eps, np.int64(ignore_index)))
    return losses


def cross_entropy_mean(logits, labels, label_smoothing=0.0, ignore_index=-100):
    """(loss, count): the mean of cross_entropy_forward's losses over the rows whose label is not
    ignore_index, and the number of those rows, as 0-d arrays of the logits' dtype (the loss is NaN
    when no row counts, as in PyTorch). One launch of one warp; count stays on the device for
    cross_entropy_backward's divisor."""
    cupy = backend.array_module(logits)
    logits = _contiguous(logits)
    labels = _labels(labels)
    loss = cupy.empty((), dtype=logits.dtype)
    count = cupy.empty((), dtype=logits.dtype)
    function = _cross_entropy_function("cross_entropy_mean_kernel", logits, labels)
    function((1,), (_WARP,), (logits, labels, loss, count, logits.dtype.type(label_smoothing),
                              np.int64(ignore_index)) + _i32(*logits.shape))
    return loss, count


def cross_entropy_backward(logits, labels, scale, label_smoothing=0.0, ignore_index=-100,
                           divisor=None):
    """dlogits[n, k] = g_n * (softmax(logits[n])[k] - (1 - eps) (k == labels[n]) - eps / K), with
    g_n = 0 where labels[n] is ignore_index, else scale, or scale / divisor (cross_entropy_mean's
    count); NaN for another label outside [0, K).
    scale: 0-d array or float; divisor: None or a 0-d array, read on the device (no host sync)."""
    cupy = backend.array_module(logits)
    logits = _contiguous(logits)
    labels = _labels(labels)
    if isinstance(scale, cupy.ndarray):
        scale = scale.astype(logits.dtype, copy=False).reshape(())  # stays on the device: no sync
    else:
        scale = cupy.full((), float(scale), dtype=logits.dtype)  # a fill kernel, no host copy
    by_divisor = divisor is not None
    divisor = divisor.astype(logits.dtype, copy=False).reshape(()) if by_divisor else scale
    dlogits = cupy.empty_like(logits)
    eps = logits.dtype.type(label_smoothing)
    _row_launch("cross_entropy_backward_kernel", logits, labels,
                (logits, labels, scale, divisor, dlogits, eps, np.int64(ignore_index),
                 np.int32(by_divisor)))
    return dlogits


# --- global average pooling -----------------------------------------------------------------------

def global_avg_pool_forward(x, layout="NCHW"):
    """y[n, c] = mean of the (H, W) plane of (n, c); x (N, C, H, W), or (C, N, H, W) with
    layout="CNHW"; y (N, C) either way (kernels/global_avg_pool.cu)."""
    cupy = backend.array_module(x)
    x = _contiguous(x)
    N, C = batch_and_channels(x.shape, layout)
    y = cupy.empty((N, C), dtype=x.dtype)
    _launch("global_avg_pool.cu", "global_avg_pool_forward_kernel", x.dtype, y.size,
            (x, y, _Index(y.size)) + _i32(N, C, layout == "CNHW") + (_Index(x.shape[2] * x.shape[3]),))
    return y


def global_avg_pool_backward(dy, x_shape, layout="NCHW"):
    """dx = dy[n, c] / (H*W) at every position of the plane of (n, c); dx has x_shape, (N, C, H, W)
    or (C, N, H, W) with layout="CNHW"; dy is (N, C)."""
    cupy = backend.array_module(dy)
    N, C = batch_and_channels(x_shape, layout)
    if dy.shape != (N, C):
        raise ValueError(f"global_avg_pool_backward: dy has shape {tuple(dy.shape)}, expected "
                         f"{(N, C)} for x_shape {tuple(x_shape)} ({layout})")
    dy = _contiguous(dy)
    dx = cupy.empty(tuple(x_shape), dtype=dy.dtype)
    _launch("global_avg_pool.cu", "global_avg_pool_backward_kernel", dy.dtype, dx.size,
            (dy, dx, _Index(dx.size)) + _i32(N, C, layout == "CNHW") + (_Index(x_shape[2] * x_shape[3]),))
    return dx


# --- elementwise ----------------------------------------------------------------------------------

def _bias(kernel, out, bias):
    _require_contiguous(out, "out")
    if out.ndim < 2 or bias.shape != (out.shape[1],):
        raise ValueError(f"bias has shape {bias.shape}, expected ({out.shape[1] if out.ndim > 1 else '?'},) "
                         f"for out of shape {out.shape} (N, C, ...)")
    bias = _contiguous(bias).astype(out.dtype, copy=False)
    C = out.shape[1]
    L = math.prod(out.shape[2:])
    _launch("elementwise.cu", kernel, out.dtype, out.size,
            (out, bias, _Index(out.size), np.int32(C), _Index(L)))
    return out


def bias_relu_(out, bias):
    """out = max(out + bias[c], 0), in place; returns out. out (N, C, ...), or channels first as (1, C, L)."""
    return _bias("bias_relu_kernel", out, bias)


def add_bias_(out, bias):
    """out = out + bias[c], in place; returns out. out (N, C, ...), or channels first as (1, C, L)."""
    return _bias("add_bias_kernel", out, bias)


def relu_backward(dy, y):
    """dx = 0 where y <= 0, else dy (a NaN y passes its gradient on, as in PyTorch)."""
    cupy = backend.array_module(dy)
    dy = _contiguous(dy)
    y = _contiguous(y)
    if dy.shape != y.shape or dy.dtype != y.dtype:
        raise ValueError(f"dy ({dy.shape}, {dy.dtype}) and y ({y.shape}, {y.dtype}) must have one "
                         "shape and dtype")
    dx = cupy.empty_like(dy)
    _launch("elementwise.cu", "relu_backward_kernel", dy.dtype, dy.size, (dy, y, dx, _Index(dy.size)))
    return dx


def relu_bias_backward(dy, y):
    """dx = relu_backward(dy, y) and db[c] = sum of dx[:, c], in one launch: a block per channel
    sums its part of dx as it writes it (kernels/relu_bias_backward.cu)."""
    cupy = backend.array_module(dy)
    dy = _contiguous(dy)
    y = _contiguous(y)
    if dy.shape != y.shape or dy.dtype != y.dtype or dy.ndim < 2:
        raise ValueError(f"dy ({dy.shape}, {dy.dtype}) and y ({y.shape}, {y.dtype}) must have one "
                         "shape (N, C, ...) and dtype")
    N, C = dy.shape[:2]
    L = math.prod(dy.shape[2:])
    dx = cupy.empty_like(dy)
    db = cupy.empty((C,), dtype=dy.dtype)
    if C == 0:
        return dx, db
    index_c, index_np = _index(dy.size, (dy,))
    threads = _threads_for(N * L)
    function = _function(cupy, "relu_bias_backward.cu", "relu_bias_backward_kernel",
                         _c_type(dy.dtype), index_c)
    function((min(C, _MAX_BLOCKS),), (threads,),
             (dy, y, dx, db, np.int32(C), index_np(L), index_np(N * L)))
    return dx, db


def _threads_for(per_block):
    """Threads of a block that reduces `per_block` elements: a power of two from one warp to 1024,
    about one thread for every 16 elements (a few loads in flight each, none left idle)."""
    threads = _WARP
    while threads < 1024 and threads * 16 < per_block:
        threads *= 2
    return threads


def dropout_apply(x, p, seed, offset):
    """y = x * mask, mask[e] = 1/(1-p) where the counter-based uniform u(seed, offset + e) >= p,
    else 0 (kernels/dropout_draw.cuh): inverted dropout, the mask drawn as it is applied and never
    stored. Its gradient is dropout_apply(dy, p, seed, offset): the same mask, drawn again."""
    cupy = backend.array_module(x)
    x = _contiguous(x)
    y = cupy.empty_like(x)
    _launch("elementwise.cu", "dropout_kernel", x.dtype, x.size,
            (x, y, _Index(x.size)) + _dropout_args((p, seed, offset), x.dtype))
    return y


def _dropout_args(dropout, dtype):
    """The kernels' dropout arguments (seed, offset, p, scale) for dropout = (p, seed, offset), or
    None for no dropout (p = 0: nothing drawn)."""
    p, seed, offset = (0.0, 0, 0) if dropout is None else dropout
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p={p} must be in [0, 1]")
    scalar = np.dtype(dtype).type
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return (np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF), np.uint64(int(offset) & 0xFFFFFFFFFFFFFFFF),
            scalar(p), scalar(scale))


# --- optimiser ------------------------------------------------------------------------------------

def _check_sgd_arrays(param, grad, buf):
    _require_contiguous(param, "param")
    _require_contiguous(buf, "buf")
    if grad.shape != param.shape or buf.shape != param.shape:
        raise ValueError(f"param {param.shape}, grad {grad.shape} and buf {buf.shape} must have one shape")
    if grad.dtype != param.dtype or buf.dtype != param.dtype:
        raise TypeError(f"param ({param.dtype}), grad ({grad.dtype}) and buf ({buf.dtype}) must share a dtype")


def sgd_update_(param, grad, buf, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD (dampening 0) in place: g = grad + wd*param; buf = m*buf + g;
    param -= lr * (g + m*buf if nesterov else buf)."""
    _check_sgd_arrays(param, grad, buf)
    grad = _contiguous(grad)
    scalar = param.dtype.type
    _launch("sgd.cu", "sgd_update_kernel", param.dtype, param.size,
            (param, grad, buf, _Index(param.size), scalar(lr), scalar(momentum),
             scalar(weight_decay), np.int32(bool(nesterov))))
    return param


_SGD_TENSORS = 32  # kernels/sgd.cu's SGD_TENSORS: the tensors one sgd_update_many_kernel launch takes


def _sgd_tensors_type(dtype):
    """The NumPy twin of sgd.cu's `SgdTensors<T>` (the same fields, C's alignment)."""
    n = _SGD_TENSORS
    return np.dtype([("param", np.uint64, n), ("grad", np.uint64, n), ("buf", np.uint64, n),
                     ("end", np.int64, n), ("lr", dtype, n), ("momentum", dtype, n),
                     ("weight_decay", dtype, n), ("nesterov", np.int32, n)], align=True)


def sgd_update_many_(params, grads, bufs, settings):
    """sgd_update_(params[t], grads[t], bufs[t], *settings[t]) for every t, settings[t] =
    (lr, momentum, weight_decay, nesterov): one launch for up to 32 tensors of one dtype, which
    receives their addresses and settings as an argument (kernels/sgd.cu). Returns params."""
    if not (len(params) == len(grads) == len(bufs) == len(settings)):
        raise ValueError(f"{len(params)} params, {len(grads)} grads, {len(bufs)} bufs and "
                         f"{len(settings)} settings: expected one of each per tensor")
    grads = [_contiguous(g) for g in grads]
    for param, grad, buf in zip(params, grads, bufs):
        _check_sgd_arrays(param, grad, buf)
        if param.dtype != params[0].dtype:
            raise TypeError(f"sgd_update_many_: every tensor must share one dtype, got "
                            f"{params[0].dtype} and {param.dtype}; update each dtype in its own call")
    for start in range(0, len(params), _SGD_TENSORS):
        chunk = slice(start, start + _SGD_TENSORS)
        _sgd_launch(params[chunk], grads[chunk], bufs[chunk], settings[chunk])
    return params


def _sgd_launch(params, grads, bufs, settings):
    dtype = params[0].dtype
    tensors = np.zeros(1, _sgd_tensors_type(dtype))   # CuPy passes a 1-element record array by value
    count = len(params)
    ends = np.cumsum([p.size for p in params])
    for field, values in (("param", params), ("grad", grads), ("buf", bufs)):
        tensors[field][0, :count] = [_address(a) for a in values]
    tensors["end"][0, :count] = ends
    for i, field in enumerate(("lr", "momentum", "weight_decay", "nesterov")):
        tensors[field][0, :count] = [s[i] for s in settings]
    total = int(ends[-1])
    if total == 0:
        return
    index_c, index_np = _index(total, params)
    function = _function(backend.array_module(params[0]), "sgd.cu", "sgd_update_many_kernel",
                         _c_type(dtype), index_c)
    function((_grid(total),), (_BLOCK,), (tensors, index_np(total)))


def _address(array):
    """The device address of an array's first element (CuPy: .data.ptr; the emulator's NumPy
    arrays: their ctypes address)."""
    data = array.data
    return data.ptr if hasattr(data, "ptr") else array.ctypes.data
