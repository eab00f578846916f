"""CPU kernels with Numba: the same functions, names and signatures as `reference.py`, made fast.

Each public function is a thin Python wrapper that allocates the output
(memory.pooled_empty: ninpy/memory.py explains the pool; the kernel writes every element) and calls
one Numba kernel,
`@_compiled(parallel=True)` (njit, cached on disk), whose outer loop is a `prange` over independent
work: the N*C image planes, or the rows of col for im2col.
No two iterations write the same element, so there are no races and no atomics. In the backward
kernels (col2im, pooling) the iteration that owns an image plane computes each of its elements as a
sum, in a fixed order, of what reaches it, so results are deterministic: col2im gathers one image
row at a time (the row sums the window rows that cover it, long contiguous inner loops); the
pooling backwards zero the plane and add each window's share in (oy, ox) order, which touches each
window once instead of testing every window against every row.

Layouts (docs/design.md, "Array layouts"). im2col and col2im take x as (N, C, H, W) or, with
layout="CNHW", as (C, N, H, W), the layout NIN's convolutions work in; `_plane` is the one place
the two differ. The pooling and bias kernels see an array as a stack of (H, W) planes and never ask
which axis is the batch, so they take (N, C, H, W) and (C, N, H, W) alike: their docstrings write
(N, C, H, W), and NIN hands them (C, N, H, W).

Three algorithms for one function. The backward passes are scatters by nature (each output sends
its gradient to the inputs it read). reference.py writes them as scatters (col2im adds each window
offset's slice in turn; max_pool_backward is one np.add.at): the shortest code to read. Here each
prange iteration must own what it writes, so col2im gathers (each image row sums the window rows
that cover it) and the pooling backwards scatter within the one plane they own. The CUDA kernels
(kernels/*.cu) have thousands of threads and no atomics, so every backward there is a gather: one
thread per input element sums the outputs whose windows cover it (shapes.covering_windows).

Numba compiles one version per dtype (float32 and float64) and keeps the machine code on disk (in
`__pycache__`) between processes, keyed to every source a kernel compiles in (`_compiled` below);
the first call in a fresh checkout compiles (seconds).
Index formulas are those of `reference.py` (see its docstring for the im2col layout and the pooling
windows); the window arithmetic comes from `ninpy/shapes.py`, compiled here by Numba. The comment on
each kernel says which elements each iteration owns. Inputs may have any strides: each wrapper makes
them C-contiguous first (a copy only when they are not), because the kernels index flat planes and
write through reshaped views, as the kernel contract in docs/design.md says.
"""
import hashlib
import os

import numba
import numpy as np
from numba import njit, prange
from numba.core.caching import FunctionCache

from ninpy import memory, shapes
from ninpy.reference import (cross_entropy_backward, cross_entropy_forward,  # noqa: F401 (re-exported)
                             cross_entropy_mean, global_avg_pool_backward, global_avg_pool_forward,
                             sgd_update_, sgd_update_many_)

# Threads. NumPy's GEMMs run on OpenBLAS's thread pool and these kernels on Numba's; with Numba's
# default OpenMP layer both pools spin-wait between calls and take the cores from each other (on
# 2 cores a NIN step ran slower with 2 threads than with 1: docs/why-fast.md). Numba's workqueue
# layer puts its threads to sleep between kernels. Its one limit: two Python threads must not
# launch kernels at the same time (Numba stops the process if they do). Setting
# NUMBA_THREADING_LAYER chooses another layer instead.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# cross_entropy_forward / cross_entropy_mean / cross_entropy_backward: the reference NumPy code is
# used as is. The logits are (batch, classes), a few thousand numbers; NumPy's vectorised exp/sum is
# already as fast as a kernel would be, and the time is nothing next to one convolution.
# global_avg_pool_forward / global_avg_pool_backward: the reference too: one NumPy mean over NIN's
# last maps (batch x classes x 8 x 8) and one broadcast copy back, already a single pass each.
# sgd_update_ and sgd_update_many_: the reference too. It is a handful of whole-array NumPy
# operations on each parameter (about a million numbers for NIN), a few milliseconds next to a
# training step's seconds; on the CPU a call costs no launch, so many tensors need no kernel of their own.


# ---- compiling ----------------------------------------------------------------------------------
# Numba's on-disk cache (cache=True) keys a kernel's machine code to the file the kernel is written
# in (its modification time and size) and to the kernel's own bytecode. But a kernel also compiles
# in the shapes.py functions it calls, and Numba does not look at shapes.py: after an edit to it (or
# an upgrade of ninpy that changed only shapes.py) the cached kernels would keep the old
# arithmetic. So the key here also holds a hash of both files, and whether the code is
# bounds-checked (the same source, other machine code).

def _digest_of_sources():
    digest = hashlib.sha256()
    for source in (shapes.__file__, __file__):
        with open(source, "rb") as file:
            digest.update(file.read())
    digest.update(f"boundscheck={numba.config.BOUNDSCHECK}".encode())
    return digest.hexdigest()


class _SourcesKeyedCache(FunctionCache):
    """Numba's cache of one function, under Numba's key (signature, CPU, bytecode) plus the digest."""
    sources = _digest_of_sources()

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (self.sources,)


# Bounds checking (NUMBA_BOUNDSCHECK=1, the memory-safety pass of .ci/run) turns an index past an
# array into an IndexError instead of a read or write of memory that is not the array's. Numba
# drops an exception raised inside a parallel loop (its worker threads cannot pass it on), so a
# bounds-checked build runs the prange loops serially: slower, but every IndexError is raised.
BOUNDS_CHECKED = bool(numba.config.BOUNDSCHECK)


def _compiled(parallel=False, **options):
    """@njit(parallel=..., cache=True, **options), with the cache keyed as above."""
    def compile_function(function):
        dispatcher = njit(parallel=parallel and not BOUNDS_CHECKED, **options)(function)
        dispatcher._cache = _SourcesKeyedCache(function)   # where cache=True puts Numba's own
        return dispatcher
    return compile_function


# The window arithmetic of shapes.py, compiled for use inside the kernels below.
_covering = _compiled()(shapes.covering_windows)
_divisor = _compiled()(shapes.avg_pool_divisor)
_contiguous = np.ascontiguousarray


# Shapes are checked in the wrappers (an argmax's values, in its kernel): Numba does not test
# indices, so a kernel handed arrays that do not fit each other reads and writes past them.
def _expect_shape(op, name, shape, expected, source=""):
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{op}: {name} has shape {tuple(shape)}, expected {tuple(expected)}{source}")


def _expect_image(op, name, shape):
    if len(shape) != 4:
        raise ValueError(f"{op}: {name} must be (N, C, H, W), got shape {tuple(shape)}")


def _expect_layout(op, layout):
    if layout not in ("NCHW", "CNHW"):
        raise ValueError(f"{op}: layout must be 'NCHW' or 'CNHW', got {layout!r}")


@_compiled()
def _plane(n, c, N, C, channels_first):
    """The index of image (n, c)'s plane among the N*C planes: n*C + c, or c*N + n in (C, N, H, W)
    (channels first: docs/design.md, "Array layouts")."""
    return c * N + n if channels_first else n * C + c


@_compiled(parallel=True)
def _im2col_kernel(xp, col, N, C, channels_first, kh, kw, sh, sw, oh, ow):
    # xp (N*C, Hp, Wp) is x's planes zero-padded by ph, pw (so no bounds tests). One iteration = one
    # row (c, i, j) of col, i.e. one weight entry, over the whole batch: for each (n, oy) it copies
    # ow elements. (Slicing a 1-D view first lets LLVM vectorise the copy: indexing with ox from 0.)
    for row in prange(C * kh * kw):
        c = row // (kh * kw)
        i = (row // kw) % kh
        j = row % kw
        for n in range(N):
            plane = _plane(n, c, N, C, channels_first)
            for oy in range(oh):
                dst = col[row, (n * oh + oy) * ow:(n * oh + oy + 1) * ow]
                src = xp[plane, oy * sh + i]
                if sw == 1:
                    src = src[j:j + ow]
                    for ox in range(ow):
                        dst[ox] = src[ox]
                else:
                    for ox in range(ow):
                        dst[ox] = src[ox * sw + j]


def im2col(x, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j], 0 outside.
    x is (N, C, H, W), or (C, N, H, W) with layout="CNHW"; col is the same for both.
    A copy, one col row per iteration; the reference copies one window offset at a time."""
    _expect_image("im2col", "x", x.shape)
    _expect_layout("im2col", layout)
    x = _contiguous(x)
    N, C = shapes.batch_and_channels(x.shape, layout)
    H, W = x.shape[2:]
    oh, ow = shapes.conv_output_size(H, kh, sh, ph), shapes.conv_output_size(W, kw, sw, pw)
    if ph or pw:   # one padded copy of x (kh*kw times smaller than col) saves a bounds test per element
        xp = memory.pooled_empty((N * C, H + 2 * ph, W + 2 * pw), dtype=x.dtype)
        xp.fill(0)
        xp[:, ph:ph + H, pw:pw + W] = x.reshape(N * C, H, W)
    else:
        xp = x.reshape(N * C, H, W)
    col = memory.pooled_empty((C * kh * kw, N * oh * ow), dtype=x.dtype)
    _im2col_kernel(xp, col, N, C, layout == "CNHW", kh, kw, sh, sw, oh, ow)
    return col


@_compiled(parallel=True)
def _col2im_kernel(col, dx, N, C, channels_first, kh, kw, sh, sw, ph, pw, oh, ow):
    # dx (N*C, H, W): the planes. One iteration = one image plane (n, c) of dx, a gather. For each
    # image row h, each window row oy covering it (shapes.covering_windows) holds h at kernel row i = h + ph - oy*sh, and
    # gives kw col segments of ow elements, summed into `acc`, one row of the padded image (its
    # columns -pw .. span - pw - 1); then acc's real columns are copied into dx. Every dx element
    # is summed in (oy, j) order by one thread: deterministic.
    H, W = dx.shape[1], dx.shape[2]
    span = (ow - 1) * sw + kw                                 # padded columns that windows reach
    for p in prange(N * C):
        n = p // C
        c = p % C
        plane = _plane(n, c, N, C, channels_first)
        acc = np.empty(span, dtype=dx.dtype)
        for h in range(H):
            acc[:] = 0
            oy0, oy1 = _covering(h, kh, sh, ph, oh)
            for oy in range(oy0, oy1):
                i = h + ph - oy * sh
                base = (n * oh + oy) * ow
                for j in range(kw):
                    src = col[(c * kh + i) * kw + j, base:base + ow]
                    if sw == 1:
                        dst = acc[j:j + ow]
                        for ox in range(ow):
                            dst[ox] += src[ox]
                    else:
                        for ox in range(ow):
                            acc[ox * sw + j] += src[ox]
            for w in range(W):                                # columns no window reaches get 0
                dx[plane, h, w] = acc[w + pw] if w + pw < span else 0


def col2im(col, x_shape, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """dx[n, c, h, w] = sum of col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] over y*sh - ph + i = h, x*sw - pw + j = w.
    x_shape and dx are (N, C, H, W), or (C, N, H, W) with layout="CNHW".
    A gather, one image plane per iteration (which owns it); the reference scatters one window
    offset at a time, CUDA gathers one element per thread (module docstring: three algorithms)."""
    _expect_image("col2im", "x_shape", x_shape)
    _expect_layout("col2im", layout)
    N, C = shapes.batch_and_channels(x_shape, layout)
    H, W = x_shape[2:]
    oh, ow = shapes.conv_output_size(H, kh, sh, ph), shapes.conv_output_size(W, kw, sw, pw)
    _expect_shape("col2im", "col", col.shape, (C * kh * kw, N * oh * ow))
    col = _contiguous(col)
    dx = memory.pooled_empty(tuple(x_shape), dtype=col.dtype)
    _col2im_kernel(col, dx.reshape(N * C, H, W), N, C, layout == "CNHW", kh, kw, sh, sw, ph, pw,
                   oh, ow)
    return dx


@_compiled(parallel=True)
def _max_pool_forward_kernel(x, y, argmax, kh, kw, sh, sw, ph, pw):
    # x (P, H, W), y and argmax (P, oh, ow) with P = N*C. One iteration = one image plane; each
    # window starts from its first real element and scans its real elements in row-major order.
    # The update is written as two selects, not an `if`: on random data the branch is
    # unpredictable, and the selects are faster (docs/why-fast.md).
    H, W = x.shape[1], x.shape[2]
    for p in prange(x.shape[0]):
        for oy in range(y.shape[1]):
            h0 = max(oy * sh - ph, 0)
            h1 = min(oy * sh - ph + kh, H)
            for ox in range(y.shape[2]):
                w0 = max(ox * sw - pw, 0)
                w1 = min(ox * sw - pw + kw, W)
                best = x[p, h0, w0]                           # the first real element starts
                where = h0 * W + w0
                for h in range(h0, h1):
                    for w in range(w0, w1):
                        v = x[p, h, w]                        # strict >: the first maximum wins
                        take = (v > best) | (v != v)          # ties; a NaN always wins (PyTorch)
                        best = v if take else best
                        where = (h * W + w) if take else where
                y[p, oy, ox] = best
                argmax[p, oy, ox] = where


def max_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """y[n, c, oy, ox] = max of x[n, c, h, w] over the window's real elements (NaN wins); argmax = h*W + w of it.
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    shapes.check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    x = _contiguous(x)
    N, C, H, W = x.shape
    y = memory.pooled_empty((N, C, oh, ow), dtype=x.dtype)
    argmax = memory.pooled_empty((N, C, oh, ow), dtype=np.int32)
    _max_pool_forward_kernel(x.reshape(N * C, H, W), y.reshape(N * C, oh, ow),
                             argmax.reshape(N * C, oh, ow), kh, kw, sh, sw, ph, pw)
    return y, argmax


@_compiled(parallel=True)
def _max_pool_backward_kernel(dy, argmax, dx, stray):
    # dy and argmax (P, oh*ow), dx (P, H*W). One iteration = one image plane, which it owns: it
    # zeroes the plane, then each window adds its dy at its argmax, in (oy, ox) order. One thread
    # per plane and a fixed order: no races, and every dx element sums its windows in that order.
    # An argmax outside the plane (not one max_pool_forward gave) is not followed but marked in
    # stray[p]: a bound test here costs nothing measurable, a separate pass over argmax would.
    for p in prange(dx.shape[0]):
        dx[p] = 0
        for k in range(dy.shape[1]):
            where = argmax[p, k]
            if 0 <= where < dx.shape[1]:
                dx[p, where] += dy[p, k]
            else:
                stray[p] = True


def max_pool_backward(dy, argmax, x_shape, kh, kw, sh, sw, ph, pw):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the windows whose argmax is h*W + w.
    Planes in either layout. A scatter within the plane an iteration owns, windows in (oy, ox)
    order; the reference is one np.add.at, CUDA a gather through the covering windows."""
    shapes.check_pool_gradient("max_pool_backward", dy.shape, x_shape, kh, kw, sh, sw, ph, pw)
    N, C, H, W = x_shape
    _expect_shape("max_pool_backward", "argmax", argmax.shape, dy.shape, " (the shape of dy)")
    if argmax.dtype.kind not in "iu":
        raise ValueError(f"max_pool_backward: argmax must hold integers, got dtype {argmax.dtype}")
    dy, argmax = _contiguous(dy), _contiguous(argmax)
    P, oh, ow = N * C, dy.shape[2], dy.shape[3]
    dx = memory.pooled_empty(x_shape, dtype=dy.dtype)
    stray = np.zeros(P, dtype=np.bool_)
    _max_pool_backward_kernel(dy.reshape(P, oh * ow), argmax.reshape(P, oh * ow), dx.reshape(P, H * W),
                              stray)
    if stray.any():
        raise ValueError(f"max_pool_backward: argmax holds positions outside the {H}x{W} plane "
                         f"(valid: 0 to {H * W - 1}); pass the argmax max_pool_forward returned")
    return dx


@_compiled(parallel=True)
def _avg_pool_forward_kernel(x, y, kh, kw, sh, sw, ph, pw, count_include_pad):
    # x (P, H, W), y (P, oh, ow). One iteration = one image plane; each window sums its real
    # elements and divides by shapes.avg_pool_divisor of its rows times that of its columns.
    H, W = x.shape[1], x.shape[2]
    for p in prange(x.shape[0]):
        for oy in range(y.shape[1]):
            hstart = oy * sh - ph
            rows = _divisor(oy, kh, sh, ph, H, count_include_pad)
            for ox in range(y.shape[2]):
                wstart = ox * sw - pw
                cols = _divisor(ox, kw, sw, pw, W, count_include_pad)
                total = 0.0
                for h in range(max(hstart, 0), min(hstart + kh, H)):
                    for w in range(max(wstart, 0), min(wstart + kw, W)):
                        total += x[p, h, w]
                y[p, oy, ox] = total / (rows * cols)


def avg_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad=True):
    """y[n, c, oy, ox] = (sum of the window's real elements) / divisor(oy, ox) (padding counted if count_include_pad).
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    shapes.check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    x = _contiguous(x)
    N, C, H, W = x.shape
    y = memory.pooled_empty((N, C, oh, ow), dtype=x.dtype)
    _avg_pool_forward_kernel(x.reshape(N * C, H, W), y.reshape(N * C, oh, ow), kh, kw, sh, sw, ph, pw,
                             bool(count_include_pad))
    return y


@_compiled(parallel=True)
def _avg_pool_backward_kernel(dy, dx, kh, kw, sh, sw, ph, pw, count_include_pad):
    # dy (P, oh, ow), dx (P, H, W). One iteration = one image plane, which it owns: it zeroes the
    # plane, then each window, in (oy, ox) order, adds dy / divisor to its real elements. One
    # thread per plane and a fixed order: every dx element sums its windows in (oy, ox) order.
    H, W = dx.shape[1], dx.shape[2]
    for p in prange(dx.shape[0]):
        dx[p] = 0
        for oy in range(dy.shape[1]):
            hstart = oy * sh - ph
            rows = _divisor(oy, kh, sh, ph, H, count_include_pad)
            for ox in range(dy.shape[2]):
                wstart = ox * sw - pw
                share = dy[p, oy, ox] / (rows * _divisor(ox, kw, sw, pw, W, count_include_pad))
                for h in range(max(hstart, 0), min(hstart + kh, H)):
                    for w in range(max(wstart, 0), min(wstart + kw, W)):
                        dx[p, h, w] += share


def avg_pool_backward(dy, x_shape, kh, kw, sh, sw, ph, pw, count_include_pad=True):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] / divisor(oy, ox) over the windows covering (h, w).
    Planes in either layout. A scatter within the plane an iteration owns, windows in (oy, ox)
    order; the reference adds one window offset at a time, CUDA gathers through covering windows."""
    shapes.check_pool_gradient("avg_pool_backward", dy.shape, x_shape, kh, kw, sh, sw, ph, pw)
    N, C, H, W = x_shape
    dy = _contiguous(dy)
    P, oh, ow = N * C, dy.shape[2], dy.shape[3]
    dx = memory.pooled_empty(x_shape, dtype=dy.dtype)
    _avg_pool_backward_kernel(dy.reshape(P, oh, ow), dx.reshape(P, H, W), kh, kw, sh, sw, ph, pw,
                              bool(count_include_pad))
    return dx


@_compiled(parallel=True)
def _bias_kernel(out, bias, relu):
    # one iteration = one (n, c) plane of out viewed as (N*C, L): one pass over memory, in place
    C = bias.shape[0]
    for p in prange(out.shape[0]):
        b = bias[p % C]
        for k in range(out.shape[1]):
            v = out[p, k] + b
            if relu and v < 0:                               # `v < 0`, not `v <= 0`: NaN stays NaN
                out[p, k] = 0
            else:
                out[p, k] = v


def _planes(out, bias, op):
    if out.ndim < 2:
        raise ValueError(f"{op}: out must be (N, C, ...), got shape {out.shape}")
    _expect_shape(op, "bias", bias.shape, out.shape[1:2])
    if not out.flags.c_contiguous:
        raise ValueError("bias_relu_/add_bias_ work in place and need a C-contiguous `out`; "
                         "pass np.ascontiguousarray(out)")
    planes, pixels = out.shape[0] * out.shape[1], int(np.prod(out.shape[2:]))
    return out.reshape(planes, pixels)                       # a view, so the kernel writes into out


def bias_relu_(out, bias):
    """out = max(out + bias[c], 0), in place; returns out. out (N, C, ...); a channels-first
    (C, N*H*W) output is passed as (1, C, N*H*W) (functional.Conv2d)."""
    _bias_kernel(_planes(out, bias, "bias_relu_"), bias.astype(out.dtype, copy=False), True)
    return out


def add_bias_(out, bias):
    """out = out + bias[c], in place; returns out. out (N, C, ...), or channels first as (1, C, L)."""
    _bias_kernel(_planes(out, bias, "add_bias_"), bias.astype(out.dtype, copy=False), False)
    return out


@_compiled(parallel=True)
def _relu_backward_kernel(dy, y, dx):
    # one iteration = one element of the flattened arrays
    for k in prange(dx.shape[0]):
        if y[k] <= 0:                                        # `<=`, not `not >`: a NaN y passes dy
            dx[k] = 0
        else:
            dx[k] = dy[k]


def relu_backward(dy, y):
    """dx = 0 where y <= 0, else dy (a NaN y passes its gradient on, as in PyTorch)."""
    _expect_shape("relu_backward", "dy", dy.shape, y.shape, " (the shape of y)")
    dy, y = _contiguous(dy), _contiguous(y)
    dx = memory.pooled_empty(dy.shape, dtype=dy.dtype)              # C order, so reshape(-1) is a view
    _relu_backward_kernel(dy.reshape(-1), y.reshape(-1), dx.reshape(-1))
    return dx


@_compiled(parallel=True, fastmath={"reassoc"})
def _relu_bias_backward_kernel(dy, y, dx, db):
    # dy, y, dx (N, C, L). One iteration = one channel c: it writes dx[:, c] and sums it into db[c]
    # in float64, in the same pass (one read of dy and y instead of two). "reassoc" lets LLVM keep
    # the sum in several vector lanes, added up at the end: a fixed order for a given build, so
    # runs repeat exactly; without it the sum is one chain of dependent adds, 4x slower.
    for c in prange(dy.shape[1]):
        total = 0.0
        for n in range(dy.shape[0]):
            for k in range(dy.shape[2]):
                v = dy[n, c, k]
                if y[n, c, k] <= 0:                          # as relu_backward: a NaN y passes dy
                    v = 0
                dx[n, c, k] = v
                total += v
        db[c] = total


def relu_bias_backward(dy, y):
    """dx = relu_backward(dy, y) and db[c] = sum of dx[:, c] (the bias gradient of y = relu(z + b[c])).
    dy, y (N, C, ...); a channels-first (C, N*H*W) gradient is passed as (1, C, N*H*W)."""
    _expect_shape("relu_bias_backward", "dy", dy.shape, y.shape, " (the shape of y)")
    if dy.ndim < 2:
        raise ValueError(f"relu_bias_backward: dy must be (N, C, ...), got shape {dy.shape}")
    dy, y = _contiguous(dy), _contiguous(y)
    planes = (dy.shape[0], dy.shape[1], int(np.prod(dy.shape[2:])))   # explicit: a batch may be empty
    dx = memory.pooled_empty(dy.shape, dtype=dy.dtype)
    db = np.empty(dy.shape[1], dtype=dy.dtype)
    _relu_bias_backward_kernel(dy.reshape(planes), y.reshape(planes), dx.reshape(planes), db)
    return dx, db
