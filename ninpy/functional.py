"""The operators Network In Network needs, each a Function with its forward and backward together.

Every operator works on both devices: the arrays' own module (NumPy or CuPy) does the cheap
elementwise parts, and the hot parts go to `cpu_kernels` (Numba) or `gpu_kernels` (our CUDA kernels),
which share one contract with the readable NumPy versions in `reference` (docs/design.md, "The
kernel contract").

Shapes follow PyTorch: images NCHW, conv weights (C_out, C_in, kh, kw).
"""
import numpy as np

from . import backend, cpu_kernels, memory, random
from .gemm import matmul
from .autograd import Function, Tensor
from .shapes import conv_output_size, pair, pool_output_size


def kernels_for(array):
    """The kernel module for an array's device: gpu_kernels for CuPy (and emulated) arrays, else
    cpu_kernels."""
    if backend.is_gpu_array(array):
        from . import gpu_kernels  # imported on first GPU use: the CPU path never needs CuPy
        return gpu_kernels
    return cpu_kernels


def _require_4d(x, op):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected an (N, C, H, W) input, got shape {x.shape}")


# ---- convolution --------------------------------------------------------------------------------

LAYOUTS = ("NCHW", "CNHW")


def _swapped(array):
    """(N, C, H, W) <-> (C, N, H, W): the batch and channel axes exchanged, as a C-ordered copy."""
    out = memory.empty_for(array, (array.shape[1], array.shape[0]) + array.shape[2:])
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
    back: two copies, the price of a standalone call.
    col is recomputed in backward rather than kept: keeping it saved about 3% of a NIN step and
    took about 25% more memory (docs/why-fast.md).
    """

    def forward(self, x, w, b, stride, padding, relu, layout):
        _require_4d(x, "conv2d")
        if layout not in LAYOUTS:
            raise ValueError(f"conv2d: layout must be one of {LAYOUTS}, got {layout!r}")
        self.batch_first = layout == "NCHW"
        c_in = x.shape[1] if self.batch_first else x.shape[0]
        if w.ndim != 4 or w.shape[1] != c_in:
            raise ValueError(f"conv2d: weight of shape {w.shape} does not fit input of shape "
                             f"{x.shape} ({layout}); expected (C_out, {c_in}, kh, kw)")
        if b is not None and b.shape != (w.shape[0],):
            raise ValueError(f"conv2d: bias of shape {b.shape}, expected ({w.shape[0]},)")
        x = _swapped(x) if self.batch_first else x            # now (C, N, H, W)
        self.kernels = kernels_for(x)
        self.x, self.w, self.has_bias, self.relu = x, w, b is not None, relu
        self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
        _, n, h, width = x.shape
        c_out, _, kh, kw = w.shape
        self.out_shape = (c_out, n, conv_output_size(h, kh, self.stride[0], self.padding[0]),
                          conv_output_size(width, kw, self.stride[1], self.padding[1]))
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


def conv2d(x, weight, bias=None, stride=1, padding=0, layout="NCHW"):
    """2-D convolution (cross-correlation) of x (N, C, H, W) with weight (C_out, C, kh, kw).
    layout="CNHW": x and the result are channels first, (C, N, H, W)."""
    return Conv2d.apply(x, weight, bias, stride=stride, padding=padding, relu=False, layout=layout)


def conv2d_relu(x, weight, bias=None, stride=1, padding=0, layout="NCHW"):
    """relu(conv2d(x, weight, bias, stride, padding, layout)) in one Function: bias and ReLU in one pass."""
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
    return ReLU.apply(x)


# ---- pooling ------------------------------------------------------------------------------------

def _pool_geometry(x, kernel_size, stride, padding, ceil_mode, op):
    _require_4d(x, op)
    kh, kw = pair(kernel_size, "kernel_size")
    sh, sw = pair(kernel_size if stride is None else stride, "stride")
    ph, pw = pair(padding, "padding")
    oh = pool_output_size(x.shape[2], kh, sh, ph, ceil_mode)
    ow = pool_output_size(x.shape[3], kw, sw, pw, ceil_mode)
    return (kh, kw, sh, sw, ph, pw), (oh, ow)


class MaxPool2d(Function):
    """y = max over each window (padding counts as -inf, a NaN wins);  dx: dy goes to the window's argmax."""

    def forward(self, x, kernel_size, stride, padding, ceil_mode):
        self.geometry, out_hw = _pool_geometry(x, kernel_size, stride, padding, ceil_mode,
                                               "max_pool2d")
        self.kernels, self.x_shape = kernels_for(x), x.shape
        y, self.argmax = self.kernels.max_pool_forward(x, *self.geometry, *out_hw)
        return y

    def backward(self, grad):
        return (self.kernels.max_pool_backward(grad, self.argmax, self.x_shape, *self.geometry),)


def max_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False):
    return MaxPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding,
                           ceil_mode=ceil_mode)


class AvgPool2d(Function):
    """y = sum over each window / divisor;  dx: dy / divisor to every real element of the window.

    The divisor counts the padding (count_include_pad=True, PyTorch's default and Caffe's rule) or
    only the real elements (False); a ceil-mode overhang past the padding never counts
    (shapes.avg_pool_divisor).
    """

    def forward(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad):
        self.geometry, out_hw = _pool_geometry(x, kernel_size, stride, padding, ceil_mode,
                                               "avg_pool2d")
        self.kernels, self.x_shape = kernels_for(x), x.shape
        self.count_include_pad = bool(count_include_pad)
        return self.kernels.avg_pool_forward(x, *self.geometry, *out_hw, self.count_include_pad)

    def backward(self, grad):
        return (self.kernels.avg_pool_backward(grad, self.x_shape, *self.geometry,
                                               self.count_include_pad),)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    return AvgPool2d.apply(x, kernel_size=kernel_size, stride=stride, padding=padding,
                           ceil_mode=ceil_mode, count_include_pad=count_include_pad)


class GlobalAvgPool2d(Function):
    """y[n, c] = mean of x[n, c] over H and W;  dx = dy / (H*W) at every position."""

    def forward(self, x):
        _require_4d(x, "global_avg_pool2d")
        self.x_shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, grad):
        xp = backend.array_module(grad)
        n, c, h, w = self.x_shape
        return (xp.broadcast_to((grad / (h * w))[:, :, None, None], self.x_shape).copy(),)


def global_avg_pool2d(x):
    return GlobalAvgPool2d.apply(x)


# ---- regularisation -----------------------------------------------------------------------------

class Dropout(Function):
    """y = x * mask / (1 - p), mask ~ Bernoulli(1 - p) (inverted dropout);  dx = dy * mask / (1 - p)."""

    def forward(self, x, p):
        self.mask = _dropout_mask(x, p)
        return backend.array_module(x).multiply(x, self.mask, out=memory.empty_for(x, x.shape))

    def backward(self, grad):
        return (backend.array_module(grad).multiply(grad, self.mask, out=memory.empty_for(grad, grad.shape)),)


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
    return Dropout.apply(x, p=float(p))


# ---- loss ---------------------------------------------------------------------------------------

class CrossEntropy(Function):
    """loss = mean_n (logsumexp(z_n) - z_n[label_n]);  dz = (softmax(z) - onehot(label)) / N."""

    def forward(self, logits, labels):
        self.kernels = kernels_for(logits)
        self.logits, self.labels = logits, labels
        if logits.shape[0] == 0:   # the mean of no losses is NaN, as in PyTorch (without a warning)
            return backend.array_module(logits).full((), np.nan, dtype=logits.dtype)
        return self.kernels.cross_entropy_forward(logits, labels).mean()

    def backward(self, grad):
        scale = grad / max(self.logits.shape[0], 1)   # an empty batch has an empty gradient
        return self.kernels.cross_entropy_backward(self.logits, self.labels, scale), None


def cross_entropy(logits, labels):
    """Softmax cross-entropy of logits (N, K) against integer labels (N,), averaged over the batch."""
    if logits.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (N, K), got shape {logits.shape}")
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
    return CrossEntropy.apply(logits, Tensor(xp.ascontiguousarray(label_array)))
