"""The operators Network In Network needs, each a Function with its forward and backward together.

Every operator works on both devices: the arrays' own module (NumPy or CuPy) does the cheap
elementwise parts, and the hot parts go to `cpu_kernels` (Numba) or `gpu_kernels` (our CUDA kernels),
which share one contract with the readable NumPy versions in `reference` (docs/design.md, "The
kernel contract").

Shapes follow PyTorch: images NCHW, conv weights (C_out, C_in, kh, kw).

Two paths. By default ("fast") the operators are this module's Functions on the Numba and CUDA
kernels, with the convolution channels first and its big arrays from ninpy.memory's pool
(docs/design.md, "Array layouts"). `use_kernels("reference")` (or NINPY_KERNELS=reference) makes each
operator's function here apply the plain NumPy Function of the same name in `reference` instead: the
whole network in one readable file, in the public layout, on the CPU.
"""
import os

import numpy as np

from . import backend, cpu_kernels, memory, random, reference
from .gemm import matmul
from .autograd import Function, Tensor, refuse_unimplemented
from .notices import warn
from .shapes import batch_and_channels, conv_output_size, pair, pool_output_size

# ---- which kernels: the fast path or the plain path ---------------------------------------------

KERNEL_SETS = ("fast", "reference")


def _kernel_set_from_environment():
    name = os.environ.get("NINPY_KERNELS", "").strip() or "fast"
    if name not in KERNEL_SETS:
        warn(f"NINPY_KERNELS={name!r} is not one of {KERNEL_SETS}; using 'fast'")
        return "fast"
    return name


_kernel_set = _kernel_set_from_environment()


class use_kernels:
    """Choose the kernels every operator runs from now on: "fast" (Numba on the CPU, CUDA on the
    GPU; the default) or "reference" (reference.py's plain NumPy, CPU only). Also a with-block,
    which puts the previous choice back at its end:

        ninpy.use_kernels("reference")              # from here on
        with ninpy.use_kernels("reference"): ...     # inside the block only
    """

    def __init__(self, name):
        global _kernel_set
        if name not in KERNEL_SETS:
            raise ValueError(f"use_kernels: {name!r} is not one of {KERNEL_SETS}")
        self.previous, _kernel_set = _kernel_set, name

    def __enter__(self):
        return self

    def __exit__(self, *error):
        global _kernel_set
        _kernel_set = self.previous


def kernel_set():
    """"fast" or "reference": what use_kernels (or NINPY_KERNELS) chose."""
    return _kernel_set


def _plain(x):
    """True when x's operator runs on the plain path (reference.py); the GPU has no plain path."""
    if _kernel_set != "reference":
        return False
    if backend.is_gpu_array(x.data):
        raise backend.DeviceError("the reference kernels run on the CPU only; move the tensors to "
                                  "'cpu', or use_kernels('fast') for the GPU")
    return True


def working_layout():
    """The layout NIN keeps between its layers: "CNHW" (channels first) on the fast path, where
    it saves the convolutions' layout copies; "NCHW" on the plain path (docs/design.md, "Array layouts")."""
    return "NCHW" if _kernel_set == "reference" else "CNHW"


def kernels_for(array):
    """The kernel module for an array: gpu_kernels for CuPy (and emulated) arrays, else
    cpu_kernels; reference under use_kernels("reference") (CPU arrays only)."""
    if backend.is_gpu_array(array):
        if _kernel_set == "reference":
            raise backend.DeviceError("the reference kernels run on the CPU only; move the tensors "
                                      "to 'cpu', or use_kernels('fast') for the GPU")
        from . import gpu_kernels  # imported on first GPU use: the CPU path never needs CuPy
        return gpu_kernels
    return reference if _kernel_set == "reference" else cpu_kernels


def _require_4d(x, op):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected an (N, C, H, W) input, got shape {x.shape}")


# The dtype contract (docs/design.md, "The kernel contract"): what every path computes in.
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _require_kernel_dtypes(op, *tensors):
    """The one dtype check of every operator, made by its public function before it picks a path
    (reference, Numba or CUDA): float32 or float64, all of one dtype. Anything else (float16,
    integers, bool, a float32 input with a float64 weight) is a TypeError naming the cast, so no
    path computes in a dtype another refuses."""
    dtypes = [t.dtype for t in tensors if t is not None]
    for dtype in dtypes:
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: {dtype} input is not supported: ninpy's operators compute in "
                            "float32 or float64; cast it first, e.g. Tensor(a.astype(np.float32))")
    if len(set(dtypes)) > 1:
        raise TypeError(f"{op}: inputs of different dtypes ({', '.join(map(str, dtypes))}); cast "
                        "them to one dtype first (PyTorch refuses this too)")


# ---- convolution --------------------------------------------------------------------------------

LAYOUTS = ("NCHW", "CNHW")


def _swapped(array):
    """(N, C, H, W) <-> (C, N, H, W): the batch and channel axes exchanged, as a C-ordered copy."""
    out = memory.pooled_empty_for(array, (array.shape[1], array.shape[0]) + array.shape[2:])
    out[...] = array.transpose(1, 0, 2, 3)
    return out


class SwapBatchAndChannels(Function):
    """y = x with axes 0 and 1 exchanged ((N, C, H, W) <-> (C, N, H, W));  dx = dy exchanged back."""

    saved_inputs = ()

    def forward(self, x):
        _require_4d(x, "swap_batch_and_channels")
        return _swapped(x)

    def backward(self, grad):
        return (_swapped(grad),)


def swap_batch_and_channels(x):
    """(N, C, H, W) -> (C, N, H, W) and back: in and out of the layout NIN keeps between layers."""
    return SwapBatchAndChannels.apply(x)


class Conv2d(Function):
    """y = W * x + b (cross-correlation), optionally followed by ReLU in the same pass.

    The work is done channels first, on x as (C, N, H, W), where each channel of the whole batch
    lies in one block, so that every product is ONE GEMM and needs no layout copy
    (W2 = W as (C_out, C*kh*kw), dy2 = dy as (C_out, N*oh*ow)):
    - a general kernel: col = im2col(x) (C*kh*kw, N*oh*ow), y = W2 @ col, which already is y as
      (C_out, N, oh, ow);  dW = dy2 @ col^T, dcol = W2^T @ dy2, dx = col2im(dcol);
    - a 1x1 kernel with stride 1 and no padding: x as (C, N*H*W) already is the column matrix:
      y = W2 @ x;  dW = dy2 @ x^T, dx = W2^T @ dy2.
    models.NIN keeps its activations channels first between layers (layout="CNHW"). An (N, C, H, W)
    input, the public layout, is read as it is by im2col (which takes either layout), and copied
    to channels first only for a 1x1 kernel; the result is copied back to (N, C_out, oh, ow) unless
    out_layout="CNHW" asks for it channels first (NIN's first convolution, on the images:
    docs/design.md, "Array layouts").
    On the CPU col is recomputed in backward rather than kept: there keeping it cost about 25% more
    memory for about 3% of a step (docs/why-fast.md). On the GPU (and the emulated device, which
    runs its code) it is kept from forward to backward: there a step's floor is the host's time to
    launch its kernels, and recomputing costs one im2col launch per convolution with a k x k kernel
    (3 a NIN step), while keeping costs memory the GPU has: for CIFAR-10 NIN at batch 128, the
    three columns hold 102,629,376 values, 410.5 MB in float32, from forward to their backward
    (docs/gpu-launches.md). backward drops them once dW is made, and the graph's release after
    backward drops them in any case. reference.Conv2d is the same convolution without any of this.
    """

    saved_inputs = (0, 1)   # x and the weight (torch's convolution saves both)

    def forward(self, x, w, b, stride, padding, relu, layout, out_layout):
        _check_conv_inputs(x, w, b, layout, out_layout)
        self.batch_first_out = out_layout == "NCHW"
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        (n, _), (h, width) = batch_and_channels(x.shape, layout), x.shape[2:]
        c_out, _, kh, kw = w.shape
        self.out_shape = (c_out, n, conv_output_size(h, kh, self.stride[0], self.padding[0]),
                          conv_output_size(width, kw, self.stride[1], self.padding[1]))
        self.pointwise = (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        # a 1x1 kernel multiplies x as (C, N*H*W): only that case copies an (N, C, H, W) x
        self.x_swapped = layout == "NCHW" and self.pointwise
        x = _swapped(x) if self.x_swapped else x
        self.x_layout = "CNHW" if self.x_swapped else layout
        self.kernels = kernels_for(x)
        self.x, self.w, self.has_bias, self.relu = x, w, b is not None, relu
        columns = self._columns()
        # kept for backward on the GPU only: one launch fewer there, memory saved on the CPU
        self.kept_columns = columns if backend.is_gpu_array(x) else None
        y2 = matmul(w.reshape(c_out, -1), columns)             # (C_out, N*oh*ow)
        if relu and b is not None:
            self.kernels.bias_relu_(y2[None], b)               # (1, C_out, N*oh*ow): one plane a channel
        elif relu:
            backend.array_module(y2).maximum(y2, 0, out=y2)
        elif b is not None:
            self.kernels.add_bias_(y2[None], b)
        if relu:
            self.y2 = y2
        y = y2.reshape(self.out_shape)
        return _swapped(y) if self.batch_first_out else y

    def backward(self, grad):
        grad = _swapped(grad) if self.batch_first_out else grad
        c_out = self.out_shape[0]
        g2, grad_b = self._relu_and_bias_backward(grad.reshape(c_out, -1 if grad.size else 0))
        columns = self._columns() if self.kept_columns is None else self.kept_columns
        grad_w = (g2 @ columns.T).reshape(self.w.shape)
        del columns                              # col is dropped here (kept or recomputed),
        self.kept_columns = None                 # so that dcol can take its memory
        if not self.needs_input_grad[0]:
            return None, grad_w, grad_b
        dcolumns = matmul(self.w.reshape(c_out, -1).T, g2)
        grad_x = dcolumns.reshape(self.x.shape) if self.pointwise else self._col2im(dcolumns)
        return (_swapped(grad_x) if self.x_swapped else grad_x), grad_w, grad_b

    def _relu_and_bias_backward(self, g2):
        """dy2 through the fused ReLU, and the bias gradient db[c] = sum of row c of it:
        one kernel reads the gradient once for both when both are needed."""
        if self.relu and self.has_bias:
            dz, grad_b = self.kernels.relu_bias_backward(g2[None], self.y2[None])
            return dz[0], grad_b
        if self.relu:
            return self.kernels.relu_backward(g2, self.y2), None
        return g2, g2.sum(axis=1) if self.has_bias else None

    def _columns(self):
        """The GEMM's right-hand matrix: x as (C, N*H*W) for a 1x1 kernel, else im2col(x)."""
        if self.pointwise:
            c, n, h, w = self.x.shape
            return self.x.reshape(c, n * h * w)              # explicit: a batch may be empty
        kh, kw = self.w.shape[2:]
        return self.kernels.im2col(self.x, kh, kw, *self.stride, *self.padding, layout=self.x_layout)

    def _col2im(self, dcolumns):
        kh, kw = self.w.shape[2:]
        return self.kernels.col2im(dcolumns, self.x.shape, kh, kw, *self.stride, *self.padding,
                                   layout=self.x_layout)


def _check_conv_inputs(x, w, b, layout, out_layout=None):
    _require_4d(x, "conv2d")
    for name, value in (("layout", layout), ("out_layout", out_layout or layout)):
        if value not in LAYOUTS:
            raise ValueError(f"conv2d: {name} must be one of {LAYOUTS}, got {value!r}")
    c_in = x.shape[1] if layout == "NCHW" else x.shape[0]
    if w.ndim != 4 or w.shape[1] != c_in:
        raise ValueError(f"conv2d: weight of shape {w.shape} does not fit input of shape "
                         f"{x.shape} ({layout}); expected (C_out, {c_in}, kh, kw)")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv2d: bias of shape {b.shape}, expected ({w.shape[0]},)")


def _plain_conv2d(x, weight, bias, stride, padding, layout, out_layout=None):
    """reference.Conv2d, which works on (N, C, H, W): a channels-first x (or result) is exchanged
    around it."""
    out_layout = out_layout or layout
    _check_conv_inputs(x, weight, bias, layout, out_layout)
    if layout == "CNHW":
        x = swap_batch_and_channels(x)
    y = reference.Conv2d.apply(x, weight, bias, stride=stride, padding=padding)
    return swap_batch_and_channels(y) if out_layout == "CNHW" else y


def _conv_padding(padding, weight, stride, dilation, groups, op):
    """PyTorch's conv options: dilation and groups only at 1; padding a number, a pair, "valid"
    (none) or "same" (odd kernels at stride 1: k // 2 on each side)."""
    refuse_unimplemented(op, dilation=(pair(dilation, "dilation"), (1, 1)), groups=(groups, 1))
    if padding == "valid":
        return 0
    if padding == "same":
        kh, kw = weight.shape[2:]
        if pair(stride, "stride") != (1, 1) or kh % 2 == 0 or kw % 2 == 0:
            raise NotImplementedError(f"{op}: padding='same' is implemented for stride 1 and odd "
                                      f"kernels only, got stride={stride}, kernel ({kh}, {kw})")
        return kh // 2, kw // 2
    if isinstance(padding, str):
        raise ValueError(f"{op}: invalid padding string {padding!r}, should be one of "
                         "{'valid', 'same'}")
    return padding


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, layout="NCHW"):
    """2-D convolution (cross-correlation) of input (N, C, H, W) with weight (C_out, C, kh, kw),
    as torch.nn.functional.conv2d (dilation and groups only 1).
    layout="CNHW" (ninpy's): input and result are channels first, (C, N, H, W)."""
    _require_kernel_dtypes("conv2d", input, weight, bias)
    padding = _conv_padding(padding, weight, stride, dilation, groups, "conv2d")
    if _plain(input):
        return _plain_conv2d(input, weight, bias, stride, padding, layout)
    return Conv2d.apply(input, weight, bias, stride=stride, padding=padding, relu=False,
                        layout=layout, out_layout=layout)


def conv2d_relu(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
                layout="NCHW", out_layout=None):
    """relu(conv2d(input, weight, bias, ...)) in one Function: bias and ReLU in one pass (the
    plain path runs the two operators one after the other).
    out_layout: the result's layout, when it is not the input's (None: layout). NIN's first
    convolution reads the (N, C, H, W) images and gives (C_out, N, oh, ow) with no copy of either."""
    _require_kernel_dtypes("conv2d_relu", input, weight, bias)
    padding = _conv_padding(padding, weight, stride, dilation, groups, "conv2d_relu")
    if _plain(input):
        return relu(_plain_conv2d(input, weight, bias, stride, padding, layout, out_layout))
    return Conv2d.apply(input, weight, bias, stride=stride, padding=padding, relu=True,
                        layout=layout, out_layout=out_layout or layout)


# ---- activation ---------------------------------------------------------------------------------

class ReLU(Function):
    """y = max(x, 0);  dx = dy where y > 0, else 0."""

    saved_inputs = ()   # backward reads y, which nothing changes in place

    def forward(self, x):
        self.y = backend.array_module(x).maximum(x, 0)
        return self.y

    def backward(self, grad):
        dx = kernels_for(grad).relu_backward(grad, self.y)
        return (dx.reshape(grad.shape),)   # the compiled kernels give a 0-d input back as (1,)


def relu(input, inplace=False):
    """max(input, 0), as torch.nn.functional.relu (not in place)."""
    refuse_unimplemented("relu", inplace=(inplace, False))
    _require_kernel_dtypes("relu", input)
    return (reference.ReLU if _plain(input) else ReLU).apply(input)


# ---- pooling ------------------------------------------------------------------------------------

def _pool_geometry(x, kernel_size, stride, padding, ceil_mode, op):
    """The window (kh, kw, sh, sw, ph, pw) and the output size (oh, ow) of a pooling of x."""
    _require_4d(x, op)
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(kernel_size if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    oh = pool_output_size(x.shape[2], kh, sh, ph, ceil_mode)
    ow = pool_output_size(x.shape[3], kw, sw, pw, ceil_mode)
    return (kh, kw, sh, sw, ph, pw), (oh, ow)


class MaxPool2d(Function):
    """y = max over each window (padding counts as -inf, a NaN wins);  dx: dy goes to the window's argmax."""

    def forward(self, x, window, out_hw):
        self.geometry = window
        self.kernels, self.x_shape = kernels_for(x), x.shape
        y, self.argmax = self.kernels.max_pool_forward(x, *self.geometry, *out_hw)
        return y

    def backward(self, grad):
        return (self.kernels.max_pool_backward(grad, self.argmax, self.x_shape, *self.geometry),)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max pooling of input (N, C, H, W), as torch.nn.functional.max_pool2d (dilation only 1).
    return_indices: also each window's argmax, the flat index h*W + w in its plane (int64)."""
    refuse_unimplemented("max_pool2d", dilation=(pair(dilation, "dilation"), (1, 1)))
    _require_kernel_dtypes("max_pool2d", input)
    window, out_hw = _pool_geometry(input, kernel_size, stride, padding, ceil_mode, "max_pool2d")
    y = (reference.MaxPool2d if _plain(input) else MaxPool2d).apply(input, window=window,
                                                                    out_hw=out_hw)
    if not return_indices:
        return y
    _, argmax = kernels_for(input.data).max_pool_forward(input.data, *window, *out_hw)
    return y, Tensor(argmax.astype(np.int64))   # the argmax again: a rare option, kept simple


class AvgPool2d(Function):
    """y = sum over each window / divisor;  dx: dy / divisor to every real element of the window.

    The divisor counts the padding (count_include_pad=True, PyTorch's default and Caffe's rule) or
    only the real elements (False); a ceil-mode overhang past the padding never counts
    (shapes.avg_pool_divisor).
    """

    saved_inputs = ()   # backward needs only the shape

    def forward(self, x, window, out_hw, count_include_pad):
        self.geometry = window
        self.kernels, self.x_shape = kernels_for(x), x.shape
        self.count_include_pad = count_include_pad
        return self.kernels.avg_pool_forward(x, *self.geometry, *out_hw, self.count_include_pad)

    def backward(self, grad):
        return (self.kernels.avg_pool_backward(grad, self.x_shape, *self.geometry,
                                               self.count_include_pad),)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Average pooling of input (N, C, H, W), as torch.nn.functional.avg_pool2d (no divisor_override)."""
    refuse_unimplemented("avg_pool2d", divisor_override=(divisor_override, None))
    _require_kernel_dtypes("avg_pool2d", input)
    window, out_hw = _pool_geometry(input, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    return (reference.AvgPool2d if _plain(input) else AvgPool2d).apply(
        input, window=window, out_hw=out_hw, count_include_pad=bool(count_include_pad))


class GlobalAvgPool2d(Function):
    """y[n, c] = mean of the (H, W) plane of (n, c);  dx = dy[n, c] / (H*W) at every position of it.
    x (N, C, H, W), or channels first (C, N, H, W) with layout="CNHW" (NIN's last maps: no swap
    back before the classifier); y (N, C) either way. One kernel each way on the GPU."""

    saved_inputs = ()

    def forward(self, x, layout):
        self.kernels, self.x_shape, self.layout = kernels_for(x), x.shape, layout
        return self.kernels.global_avg_pool_forward(x, layout)

    def backward(self, grad):
        return (self.kernels.global_avg_pool_backward(grad, self.x_shape, self.layout),)


def global_avg_pool2d(input, *, layout="NCHW"):
    """(N, C, H, W) -> (N, C): torch's adaptive_avg_pool2d(input, 1).flatten(1), NIN's classifier.
    layout="CNHW" (ninpy's): input channels first, (C, N, H, W); the result is (N, C) still."""
    _require_kernel_dtypes("global_avg_pool2d", input)
    _require_4d(input, "global_avg_pool2d")
    if layout not in LAYOUTS:
        raise ValueError(f"global_avg_pool2d: layout must be one of {LAYOUTS}, got {layout!r}")
    if _plain(input):
        batch_first = input if layout == "NCHW" else swap_batch_and_channels(input)
        return reference.GlobalAvgPool2d.apply(batch_first)
    return GlobalAvgPool2d.apply(input, layout=layout)


# ---- regularisation -----------------------------------------------------------------------------

class Dropout(Function):
    """y = x * mask, mask = Bernoulli(1 - p) / (1 - p) (inverted dropout);  dx = dy * mask.
    The CPU's dropout: `dropout` draws the mask from ninpy.random's NumPy generator, and the
    plain path's reference.Dropout takes the same mask."""

    saved_inputs = ()

    def forward(self, x, mask):
        self.mask = mask
        return backend.array_module(x).multiply(x, self.mask, out=memory.pooled_empty_for(x, x.shape))

    def backward(self, grad):
        return (backend.array_module(grad).multiply(grad, self.mask, out=memory.pooled_empty_for(grad, grad.shape)),)


class CounterDropout(Function):
    """y = x * mask, mask[e] = (u(seed, offset + e) >= p) / (1 - p);  dx = dy * mask.
    The GPU's dropout: u is the counter-based uniform of ninpy.random's GPU stream, which the
    kernel draws as it multiplies (gpu_kernels.dropout_apply). backward draws the same mask again
    from (seed, offset) instead of keeping it: one launch each way, as a kept mask would take, and
    no mask in memory (docs/gpu-launches.md)."""

    saved_inputs = ()

    def forward(self, x, draw):
        self.kernels, self.draw = kernels_for(x), draw
        return self.kernels.dropout_apply(x, *draw)

    def backward(self, grad):
        return (self.kernels.dropout_apply(grad, *self.draw),)


def _dropout_mask(x, p):
    """The CPU's mask: 0 where dropped, 1/(1-p) where kept, drawn from ninpy.random's generator."""
    if p == 1.0:
        return np.zeros_like(x)
    keep = random.cpu_generator().random(x.shape, dtype=np.float32) >= p
    return keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))


def _gpu_dropout_draw(count, p):
    """(p, seed, offset) for a GPU dropout of `count` elements: `count` counters reserved from
    ninpy.random's GPU stream. p = 1 drops everything and draws nothing (the stream stays put)."""
    if p == 1.0:
        return p, 0, 0
    return (p, *random.next_gpu_stream(count))


def dropout(input, p=0.5, training=True, inplace=False):
    """Zero each element with probability p while training and scale the rest by 1/(1 - p);
    identity in evaluation (the same tensor, as in PyTorch)."""
    refuse_unimplemented("dropout", inplace=(inplace, False))
    _check_dropout_probability(p)
    if not training or p == 0.0:   # p = 0 keeps every element: the values torch returns, no draw
        return input
    _require_kernel_dtypes("dropout", input)
    if _plain(input):
        return reference.Dropout.apply(input, mask=_dropout_mask(input.data, float(p)))
    if backend.is_gpu_array(input.data):
        return CounterDropout.apply(input, draw=_gpu_dropout_draw(input.data.size, float(p)))
    return Dropout.apply(input, mask=_dropout_mask(input.data, float(p)))


def _check_dropout_probability(p):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


# ---- pooling followed by dropout ----------------------------------------------------------------

class PoolDropout(Function):
    """y = pool(x) * mask (max or average pooling, then dropout), mask[o] = (u(seed, offset + o) >= p)
    / (1 - p) for each element o of the pooled output, as CounterDropout draws it;
    dx = pool's backward of dy * mask.

    The GPU's pair: NIN follows each pooling with dropout. Here the pooling kernels draw the mask
    and multiply by it as they write y, and their backward draws it again and reads dy * mask where
    they read dy (kernels/pooling.cu), so the pair is one launch each way instead of two; the
    numbers are those of CounterDropout after MaxPool2d or AvgPool2d, bit for bit (the same draws,
    the same products).
    """

    def forward(self, x, pool, window, out_hw, count_include_pad, draw):
        self.kernels, self.x_shape, self.geometry = kernels_for(x), x.shape, window
        self.pool, self.count_include_pad, self.draw = pool, count_include_pad, draw
        if pool == "max":
            y, self.argmax = self.kernels.max_pool_forward(x, *window, *out_hw, dropout=draw)
            return y
        return self.kernels.avg_pool_forward(x, *window, *out_hw, count_include_pad, dropout=draw)

    def backward(self, grad):
        if self.pool == "max":
            return (self.kernels.max_pool_backward(grad, self.argmax, self.x_shape, *self.geometry,
                                                   dropout=self.draw),)
        return (self.kernels.avg_pool_backward(grad, self.x_shape, *self.geometry,
                                               self.count_include_pad, dropout=self.draw),)


def max_pool2d_dropout(input, kernel_size, stride=None, padding=0, ceil_mode=False, *, p=0.5,
                       training=True):
    """dropout(max_pool2d(input, kernel_size, stride, padding, ceil_mode=ceil_mode), p, training):
    NIN's max pooling and the dropout after it, one operator (PoolDropout) on the GPU while
    training, the two one after the other elsewhere. ninpy's own (torch has no such function)."""
    return _pool_then_dropout("max", input, kernel_size, stride, padding, ceil_mode, True, p,
                              training)


def avg_pool2d_dropout(input, kernel_size, stride=None, padding=0, ceil_mode=False,
                       count_include_pad=True, *, p=0.5, training=True):
    """dropout(avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad), p,
    training), as max_pool2d_dropout."""
    return _pool_then_dropout("avg", input, kernel_size, stride, padding, ceil_mode,
                              count_include_pad, p, training)


def _pool_then_dropout(pool, input, kernel_size, stride, padding, ceil_mode, count_include_pad, p,
                       training):
    _check_dropout_probability(p)
    fused = training and p > 0.0 and _kernel_set == "fast" and backend.is_gpu_array(input.data)
    if not fused:   # the CPU, evaluation, p = 0: the two operators (the CPU draws after pooling)
        if pool == "max":
            pooled = max_pool2d(input, kernel_size, stride, padding, ceil_mode=ceil_mode)
        else:
            pooled = avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
        return dropout(pooled, p, training)
    op = f"{pool}_pool2d_dropout"
    _require_kernel_dtypes(op, input)
    window, out_hw = _pool_geometry(input, kernel_size, stride, padding, ceil_mode, op)
    pooled_size = input.shape[0] * input.shape[1] * out_hw[0] * out_hw[1]
    return PoolDropout.apply(input, pool=pool, window=window, out_hw=out_hw,
                             count_include_pad=bool(count_include_pad),
                             draw=_gpu_dropout_draw(pooled_size, float(p)))


# ---- loss ---------------------------------------------------------------------------------------

class CrossEntropy(Function):
    """loss_n = logsumexp(z_n) - (1 - eps) z_n[label_n] - eps mean_k z_n[k] (0 where label_n is
    ignore_index; eps = label_smoothing), then reduced;
    dz_n = (softmax(z_n) - (1 - eps) onehot(label_n) - eps / K) * (d loss / d loss_n: 1, or
    1/count for the mean), 0 for an ignored row.
    The kernels skip the ignored rows and count the others themselves, so the mean is one kernel
    and its backward one more, with the count kept on the device (no host sync)."""

    saved_inputs = (0,)

    def forward(self, logits, labels, ignore_index, reduction, label_smoothing):
        self.kernels, self.logits, self.labels = kernels_for(logits), logits, labels
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing
        if reduction == "mean":   # over the rows counted; NaN when none is, as in PyTorch
            loss, self.count = self.kernels.cross_entropy_mean(logits, labels, label_smoothing,
                                                               ignore_index)
            return loss
        losses = self.kernels.cross_entropy_forward(logits, labels, label_smoothing, ignore_index)
        return losses if reduction == "none" else losses.sum()

    def backward(self, grad):
        arguments = (self.logits, self.labels)
        if self.reduction == "none":   # one scale per row: grad[n]
            one = self.logits.dtype.type(1)
            dz = self.kernels.cross_entropy_backward(*arguments, one, self.label_smoothing,
                                                     self.ignore_index)
            return dz * grad[:, None], None
        divisor = self.count if self.reduction == "mean" else None   # every row ignored: 0 rows
        return self.kernels.cross_entropy_backward(*arguments, grad, self.label_smoothing,
                                                   self.ignore_index, divisor), None


def _legacy_reduction(size_average, reduce, reduction):
    """PyTorch's deprecated size_average/reduce, as it reads them: either given overrides reduction."""
    if size_average is None and reduce is None:
        return reduction
    reduce = True if reduce is None else reduce
    size_average = True if size_average is None else size_average
    return "none" if not reduce else "mean" if size_average else "sum"


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """Softmax cross-entropy of logits input (N, K) (or (K,)) against class indices target (N,)
    (or 0-d), as torch.nn.functional.cross_entropy: rows whose target is ignore_index count
    nothing; reduction "mean" (over the rows counted), "sum" or "none" (one loss per row).

    label_smoothing: eps in [0, 1]; the target becomes (1 - eps) onehot + eps / K, so the loss is
    (1 - eps) * the plain loss + eps * the mean over the K classes of -log softmax(z)."""
    refuse_unimplemented("cross_entropy", weight=(weight, None))
    label_smoothing = _label_smoothing(label_smoothing)
    _require_kernel_dtypes("cross_entropy", input)
    reduction = _legacy_reduction(size_average, reduce, reduction)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    label_array = target.data if isinstance(target, Tensor) else target
    xp = backend.array_module(input.data)
    label_array = backend.to_device(xp.asarray(label_array), input.device)
    if input.ndim == 1:                                   # one example without a batch axis
        loss = cross_entropy(input.reshape(1, -1), Tensor(label_array.reshape(1)),
                             ignore_index=ignore_index, reduction=reduction,
                             label_smoothing=label_smoothing)
        return loss.reshape(()) if reduction == "none" else loss
    if input.ndim != 2:
        raise NotImplementedError(f"cross_entropy: input of shape {input.shape} is not implemented; "
                                  "ninpy takes logits (N, K) or (K,)")
    if label_array.dtype.kind == "f" and label_array.shape == input.shape:
        raise NotImplementedError("cross_entropy: class-probability targets are not implemented; "
                                  "pass class indices (N,)")
    if label_array.shape != (input.shape[0],):
        raise ValueError(f"cross_entropy: target of shape {label_array.shape} does not match input "
                         f"of shape {input.shape}; expected ({input.shape[0]},)")
    if label_array.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must hold integer class indices, got dtype "
                        f"{label_array.dtype}; cast it with .astype(np.int64)")
    _check_labels(label_array, input.shape[1], ignore_index)
    labels = Tensor(xp.ascontiguousarray(label_array))
    if _plain(input) and reduction == "mean" and not (label_array == ignore_index).any():
        return reference.CrossEntropy.apply(input, labels, label_smoothing=label_smoothing)
    # (Under use_kernels("reference") this Function runs reference's loss functions as well.)
    return CrossEntropy.apply(input, labels, ignore_index=int(ignore_index), reduction=reduction,
                              label_smoothing=label_smoothing)


def _check_labels(labels, classes, ignore_index):
    """On the CPU: every label in [0, classes) or ignore_index (the GPU kernel writes NaN instead
    of waiting for the device to check)."""
    if backend.is_gpu_array(labels) or not labels.size:
        return
    bad = labels[(labels != ignore_index) & ((labels < 0) | (labels >= classes))]
    if bad.size:
        raise ValueError(f"cross_entropy: target {bad[0]} is out of bounds: class indices must lie "
                         f"in [0, {classes}) or be ignore_index ({ignore_index})")


def _label_smoothing(value):
    """label_smoothing as a float in [0, 1]. PyTorch refuses values above 1 and silently reads a
    negative or NaN one as 0; here those are refused too, since they are mistakes."""
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"cross_entropy: label_smoothing must be a number in [0, 1], got "
                        f"{value!r}") from None
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be between 0.0 and 1.0, got {value!r}")
    return eps
