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
from .autograd import Function, Tensor
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


# ---- convolution --------------------------------------------------------------------------------

LAYOUTS = ("NCHW", "CNHW")


def _swapped(array):
    """(N, C, H, W) <-> (C, N, H, W): the batch and channel axes exchanged, as a C-ordered copy."""
    out = memory.pooled_empty_for(array, (array.shape[1], array.shape[0]) + array.shape[2:])
    out[...] = array.transpose(1, 0, 2, 3)
    return out


class SwapBatchAndChannels(Function):
    """y = x with axes 0 and 1 exchanged ((N, C, H, W) <-> (C, N, H, W));  dx = dy exchanged back."""

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
    input, the public layout, is copied to channels first on the way in and the result copied
    back: two copies, the price of a standalone call (docs/design.md, "Array layouts").
    col is recomputed in backward rather than kept: keeping it costs far more memory than the time
    it saves (docs/why-fast.md). reference.Conv2d is the same convolution without any of this.
    """

    def forward(self, x, w, b, stride, padding, relu, layout):
        _check_conv_inputs(x, w, b, layout)
        self.batch_first = layout == "NCHW"
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        (n, _), (h, width) = batch_and_channels(x.shape, layout), x.shape[2:]
        c_out, _, kh, kw = w.shape
        self.out_shape = (c_out, n, conv_output_size(h, kh, self.stride[0], self.padding[0]),
                          conv_output_size(width, kw, self.stride[1], self.padding[1]))
        x = _swapped(x) if self.batch_first else x            # now (C, N, H, W)
        self.kernels = kernels_for(x)
        self.x, self.w, self.has_bias, self.relu = x, w, b is not None, relu
        self.pointwise = (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        y2 = matmul(w.reshape(c_out, -1), self._columns())     # (C_out, N*oh*ow)
        if relu and b is not None:
            self.kernels.bias_relu_(y2[None], b)               # (1, C_out, N*oh*ow): one plane a channel
        elif relu:
            backend.array_module(y2).maximum(y2, 0, out=y2)
        elif b is not None:
            self.kernels.add_bias_(y2[None], b)
        if relu:
            self.y2 = y2
        y = y2.reshape(self.out_shape)
        return _swapped(y) if self.batch_first else y

    def backward(self, grad):
        grad = _swapped(grad) if self.batch_first else grad
        c_out = self.out_shape[0]
        g2, grad_b = self._relu_and_bias_backward(grad.reshape(c_out, -1 if grad.size else 0))
        grad_w = (g2 @ self._columns().T).reshape(self.w.shape)   # col is dropped right after,
        if not self.needs_input_grad[0]:                            # so dcol can take its memory
            return None, grad_w, grad_b
        dcolumns = matmul(self.w.reshape(c_out, -1).T, g2)
        grad_x = dcolumns.reshape(self.x.shape) if self.pointwise else self._col2im(dcolumns)
        return (_swapped(grad_x) if self.batch_first else grad_x), grad_w, grad_b

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
        return self.kernels.im2col(self.x, kh, kw, *self.stride, *self.padding, layout="CNHW")

    def _col2im(self, dcolumns):
        kh, kw = self.w.shape[2:]
        return self.kernels.col2im(dcolumns, self.x.shape, kh, kw, *self.stride, *self.padding,
                                   layout="CNHW")


def _check_conv_inputs(x, w, b, layout):
    _require_4d(x, "conv2d")
    if layout not in LAYOUTS:
        raise ValueError(f"conv2d: layout must be one of {LAYOUTS}, got {layout!r}")
    c_in = x.shape[1] if layout == "NCHW" else x.shape[0]
    if w.ndim != 4 or w.shape[1] != c_in:
        raise ValueError(f"conv2d: weight of shape {w.shape} does not fit input of shape "
                         f"{x.shape} ({layout}); expected (C_out, {c_in}, kh, kw)")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv2d: bias of shape {b.shape}, expected ({w.shape[0]},)")


def _plain_conv2d(x, weight, bias, stride, padding, layout):
    """reference.Conv2d, which works on (N, C, H, W): a channels-first x is exchanged around it."""
    _check_conv_inputs(x, weight, bias, layout)
    if layout == "CNHW":
        x = swap_batch_and_channels(x)
    y = reference.Conv2d.apply(x, weight, bias, stride=stride, padding=padding)
    return swap_batch_and_channels(y) if layout == "CNHW" else y


def conv2d(x, weight, bias=None, stride=1, padding=0, layout="NCHW"):
    """2-D convolution (cross-correlation) of x (N, C, H, W) with weight (C_out, C, kh, kw).
    layout="CNHW": x and the result are channels first, (C, N, H, W)."""
    if _plain(x):
        return _plain_conv2d(x, weight, bias, stride, padding, layout)
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding, relu=False, layout=layout)


def conv2d_relu(x, weight, bias=None, stride=1, padding=0, layout="NCHW"):
    """relu(conv2d(x, weight, bias, stride, padding, layout)) in one Function: bias and ReLU in one
    pass (the plain path runs the two operators one after the other)."""
    if _plain(x):
        return relu(_plain_conv2d(x, weight, bias, stride, padding, layout))
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding, relu=True, layout=layout)


# ---- activation ---------------------------------------------------------------------------------

class ReLU(Function):
    """y = max(x, 0);  dx = dy where y > 0, else 0."""

    def forward(self, x):
        self.y = backend.array_module(x).maximum(x, 0)
        return self.y

    def backward(self, grad):
        return (kernels_for(grad).relu_backward(grad, self.y),)


def relu(x):
    return (reference.ReLU if _plain(x) else ReLU).apply(x)


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


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    window, out_hw = _pool_geometry(x, kernel_size, stride, padding, ceil_mode, "max_pool2d")
    return (reference.MaxPool2d if _plain(x) else MaxPool2d).apply(x, window=window, out_hw=out_hw)


class AvgPool2d(Function):
    """y = sum over each window / divisor;  dx: dy / divisor to every real element of the window.

    The divisor counts the padding (count_include_pad=True, PyTorch's default and Caffe's rule) or
    only the real elements (False); a ceil-mode overhang past the padding never counts
    (shapes.avg_pool_divisor).
    """

    def forward(self, x, window, out_hw, count_include_pad):
        self.geometry = window
        self.kernels, self.x_shape = kernels_for(x), x.shape
        self.count_include_pad = count_include_pad
        return self.kernels.avg_pool_forward(x, *self.geometry, *out_hw, self.count_include_pad)

    def backward(self, grad):
        return (self.kernels.avg_pool_backward(grad, self.x_shape, *self.geometry,
                                               self.count_include_pad),)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    window, out_hw = _pool_geometry(x, kernel_size, stride, padding, ceil_mode, "avg_pool2d")
    return (reference.AvgPool2d if _plain(x) else AvgPool2d).apply(
        x, window=window, out_hw=out_hw, count_include_pad=bool(count_include_pad))


class GlobalAvgPool2d(Function):
    """y[n, c] = mean of x[n, c] over H and W;  dx = dy / (H*W) at every position."""

    def forward(self, x):
        self.x_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, grad):
        xp = backend.array_module(grad)
        n, c, h, w = self.x_shape
        return (xp.broadcast_to((grad / (h * w))[:, :, None, None], self.x_shape).copy(),)


def global_avg_pool2d(x):
    _require_4d(x, "global_avg_pool2d")
    return (reference.GlobalAvgPool2d if _plain(x) else GlobalAvgPool2d).apply(x)


# ---- regularisation -----------------------------------------------------------------------------

class Dropout(Function):
    """y = x * mask, mask = Bernoulli(1 - p) / (1 - p) (inverted dropout);  dx = dy * mask.
    The mask is drawn by `dropout`, so both paths draw the same numbers."""

    def forward(self, x, mask):
        self.mask = mask
        return backend.array_module(x).multiply(x, self.mask, out=memory.pooled_empty_for(x, x.shape))

    def backward(self, grad):
        return (backend.array_module(grad).multiply(grad, self.mask, out=memory.pooled_empty_for(grad, grad.shape)),)


def _dropout_mask(x, p):
    """0 where dropped, 1/(1-p) where kept, drawn from ninpy.random's generators."""
    if p == 1.0:
        return backend.array_module(x).zeros_like(x)
    if backend.is_gpu_array(x):
        seed, offset = random.next_gpu_stream(x.size)
        return kernels_for(x).dropout_mask(x.shape, p, seed, offset, x.dtype, backend.device_of(x))
    keep = random.cpu_generator().random(x.shape, dtype=np.float32) >= p
    return keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p while training; identity in evaluation."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    mask = _dropout_mask(x.data, float(p))
    return (reference.Dropout if _plain(x) else Dropout).apply(x, mask=mask)


# ---- loss ---------------------------------------------------------------------------------------

class CrossEntropy(Function):
    """loss = mean_n (logsumexp(z_n) - (1 - eps) z_n[label_n] - eps mean_k z_n[k]);
    dz = (softmax(z) - (1 - eps) onehot(label) - eps / K) / N.  eps = label_smoothing (0: plain)."""

    def forward(self, logits, labels, label_smoothing):
        self.kernels = kernels_for(logits)
        self.logits, self.labels, self.label_smoothing = logits, labels, label_smoothing
        if logits.shape[0] == 0:   # the mean of no losses is NaN, as in PyTorch (without a warning)
            return backend.array_module(logits).full((), np.nan, dtype=logits.dtype)
        return self.kernels.cross_entropy_forward(logits, labels, label_smoothing).mean()

    def backward(self, grad):
        scale = grad / max(self.logits.shape[0], 1)   # an empty batch has an empty gradient
        return self.kernels.cross_entropy_backward(self.logits, self.labels, scale,
                                                   self.label_smoothing), None


def cross_entropy(logits, labels, *, label_smoothing=0.0):
    """Softmax cross-entropy of logits (N, K) against integer labels (N,), averaged over the batch.

    label_smoothing (PyTorch's): eps in [0, 1]; the target becomes (1 - eps) onehot + eps / K, so the
    loss is (1 - eps) * the plain loss + eps * the mean over the K classes of -log softmax(z)."""
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, K), got shape {logits.shape}")
    label_smoothing = _label_smoothing(label_smoothing)
    label_array = labels.data if isinstance(labels, Tensor) else labels
    xp = backend.array_module(logits.data)
    label_array = backend.to_device(label_array, logits.device)
    if label_array.shape != (logits.shape[0],):
        raise ValueError(f"cross_entropy: labels of shape {label_array.shape} do not match logits "
                         f"of shape {logits.shape}; expected ({logits.shape[0]},)")
    if label_array.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: labels must be integers, got dtype {label_array.dtype}")
    if xp is np and label_array.size and not 0 <= label_array.min() <= label_array.max() < logits.shape[1]:
        raise ValueError(f"cross_entropy: labels must lie in [0, {logits.shape[1]}), got "
                         f"[{label_array.min()}, {label_array.max()}]")
    loss = reference.CrossEntropy if _plain(logits) else CrossEntropy
    return loss.apply(logits, Tensor(xp.ascontiguousarray(label_array)), label_smoothing=label_smoothing)


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
