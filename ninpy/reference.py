"""The plain path in plain NumPy: the reference kernels, and the network's operators built on them.

Two parts. First the kernels: the readable oracle for cpu_kernels.py (Numba) and gpu_kernels.py
(CUDA). Then, at the end of the file, every operator NIN uses as an autograd Function (Conv2d, ReLU,
the poolings, dropout, the loss), which `ninpy.use_kernels("reference")` runs instead of the fast
path: the whole network in (N, C, H, W), with no memory pool, no fused operators and no layout
tricks (docs/design.md, "Array layouts", says what the fast path changes and why).

Every function here is written to be read, not to be fast: vectorised over the batch, the channels
and the output positions with slicing, and a Python loop over the kh*kw offsets of the window.
The fast versions in `cpu_kernels` and `gpu_kernels` have the same names and signatures and are
tested against these.

im2col layout. A convolution with weight w (F, C, kh, kw) becomes ONE matrix product over the whole
batch, out = w.reshape(F, C*kh*kw) @ col, when col has one ROW per weight entry (c, i, j) and one
COLUMN per output position (n, y, x):

    col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j]   (0 outside)

so col is (C*kh*kw, N*oh*ow) and the product is (F, N*oh*ow): the output in the (F, N, oh, ow)
layout, channels first (CNHW). ninpy's convolution works in that layout (functional.Conv2d), so
im2col and col2im also take and give x in it (layout="CNHW"); here that is one transpose away from
the (N, C, H, W) code. col2im is the adjoint (the transpose) of im2col:
each input element receives the SUM of every col entry that was copied from it, which is exactly the
gradient of the input given the gradient of col.

Pooling windows: output (oy, ox) looks at rows oy*sh - ph .. oy*sh - ph + kh - 1 and the matching
columns (ninpy/shapes.py derives the window arithmetic once). Max pooling: only real elements
compete (padding acts as -inf); each window starts from its first real element and scans the rest in
row-major order, replacing the best when an element is greater or is NaN, as PyTorch does. So ties go
to the first maximum, a NaN anywhere in the window wins (the last NaN, in row-major order), and a
window of -inf reports -inf at its first real element. argmax is the flat index h*W + w of the winner
inside its image plane (int32). Average pooling divides by `shapes.avg_pool_divisor`: with
count_include_pad (the default, Caffe's rule) the window clipped to the PADDED image, else the real
elements only. With ceil_mode the last window may hang past the padded edge; the caller guarantees
every window still holds at least one real element. docs/design.md states this contract for all three
implementations.
"""
import numpy as np

from .autograd import Function
from .shapes import avg_pool_divisor, check_pool_output, conv_output_size, pair


def _window_rows(start, stride, count):
    """Slice picking element start + o*stride for o = 0..count-1 (one window offset, every window)."""
    return slice(start, start + stride * (count - 1) + 1, stride)


def _pad(x, value, kh, kw, sh, sw, ph, pw, oh, ow):
    """Pad (N, C, H, W) by ph/pw on the top/left and enough on the bottom/right for oh x ow windows."""
    H, W = x.shape[2:]   # the last window ends before (oh - 1)*sh - ph + kh (window starts: shapes.py)
    bottom = max(ph, (oh - 1) * sh + kh - H - ph)
    right = max(pw, (ow - 1) * sw + kw - W - pw)
    return np.pad(x, ((0, 0), (0, 0), (ph, bottom), (pw, right)), constant_values=value)


def im2col(x, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j], 0 outside.
    x is (N, C, H, W), or (C, N, H, W) with layout="CNHW" (docs/design.md, "Array layouts"); col
    is the same for both."""
    if layout == "CNHW":
        x = x.transpose(1, 0, 2, 3)
    N, C, H, W = x.shape
    oh, ow = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    col = np.empty((C, kh, kw, N, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]  # (N, C, oh, ow)
            col[:, i, j] = patch.transpose(1, 0, 2, 3)
    return col.reshape(C * kh * kw, N * oh * ow)


def col2im(col, x_shape, kh, kw, sh, sw, ph, pw, layout="NCHW"):
    """dx[n, c, h, w] = sum of col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] over y*sh - ph + i = h, x*sw - pw + j = w.
    x_shape and dx are (N, C, H, W), or (C, N, H, W) with layout="CNHW".
    A scatter, one window offset (i, j) at a time; Numba and CUDA gather (cpu_kernels' docstring:
    three algorithms)."""
    if layout == "CNHW":
        dx = col2im(col, (x_shape[1], x_shape[0]) + tuple(x_shape[2:]), kh, kw, sh, sw, ph, pw)
        return np.ascontiguousarray(dx.transpose(1, 0, 2, 3))
    N, C, H, W = x_shape
    oh, ow = conv_output_size(H, kh, sh, ph), conv_output_size(W, kw, sw, pw)
    col = col.reshape(C, kh, kw, N, oh, ow)
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)] += \
                col[:, i, j].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])


def max_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """y[n, c, oy, ox] = max of x[n, c, h, w] over the window's real elements (NaN wins); argmax = h*W + w of it.
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    N, C, H, W = x.shape
    h0 = np.maximum(np.arange(oh) * sh - ph, 0)[:, None]   # each window's first real element
    w0 = np.maximum(np.arange(ow) * sw - pw, 0)[None, :]
    y = x[:, :, h0, w0]                                    # (N, C, oh, ow): the starting best
    argmax = np.broadcast_to(h0 * W + w0, y.shape)
    xp = _pad(x, -np.inf, kh, kw, sh, sw, ph, pw, oh, ow)   # -inf: padding never wins
    for i in range(kh):                                    # offsets in row-major order = each
        for j in range(kw):                                # window's elements in row-major order
            value = xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]
            h = np.arange(oh)[:, None] * sh - ph + i          # image row and column of this offset,
            w = np.arange(ow)[None, :] * sw - pw + j          # one per window
            better = (value > y) | np.isnan(value)            # strict: the first maximum wins ties
            y = np.where(better, value, y)
            argmax = np.where(better, h * W + w, argmax)
    return y, argmax.astype(np.int32)


def max_pool_backward(dy, argmax, x_shape, kh, kw, sh, sw, ph, pw):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the windows whose argmax is h*W + w.
    A scatter in one np.add.at; Numba scatters within the plane each iteration owns, and CUDA
    gathers through the covering windows (cpu_kernels' docstring: three algorithms)."""
    check_pool_output(x_shape, kh, kw, sh, sw, ph, pw, *dy.shape[2:])
    N, C, H, W = x_shape
    windows = dy.shape[2] * dy.shape[3]                   # not -1: an empty batch must reshape too
    dx = np.zeros((N * C, H * W), dtype=dy.dtype)
    plane = np.arange(N * C)[:, None]
    np.add.at(dx, (plane, argmax.reshape(N * C, windows)), dy.reshape(N * C, windows))  # repeats add up
    return dx.reshape(N, C, H, W)


def _avg_pool_divisors(H, W, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad):
    """(oh, ow): the number each window's sum is divided by (shapes.avg_pool_divisor per axis)."""
    rows = [avg_pool_divisor(oy, kh, sh, ph, H, count_include_pad) for oy in range(oh)]
    cols = [avg_pool_divisor(ox, kw, sw, pw, W, count_include_pad) for ox in range(ow)]
    return np.outer(rows, cols)


def avg_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad=True):
    """y[n, c, oy, ox] = (sum of the window's real elements) / divisor(oy, ox) (padding counted if count_include_pad).
    x (N, C, H, W) or channels first (C, N, H, W): a stack of (H, W) planes either way."""
    check_pool_output(x.shape, kh, kw, sh, sw, ph, pw, oh, ow)
    N, C, H, W = x.shape
    xp = _pad(x, 0, kh, kw, sh, sw, ph, pw, oh, ow)
    total = np.zeros((N, C, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            total += xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]
    divisors = _avg_pool_divisors(H, W, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad)
    return total / divisors.astype(x.dtype)


def avg_pool_backward(dy, x_shape, kh, kw, sh, sw, ph, pw, count_include_pad=True):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] / divisor(oy, ox) over the windows covering (h, w).
    Planes in either layout. A scatter, one window offset at a time; Numba scatters within the
    plane an iteration owns, CUDA gathers (cpu_kernels' docstring: three algorithms)."""
    check_pool_output(x_shape, kh, kw, sh, sw, ph, pw, *dy.shape[2:])
    N, C, H, W = x_shape
    oh, ow = dy.shape[2:]
    divisors = _avg_pool_divisors(H, W, kh, kw, sh, sw, ph, pw, oh, ow, count_include_pad)
    share = dy / divisors.astype(dy.dtype)
    dxp = _pad(np.zeros(x_shape, dtype=dy.dtype), 0, kh, kw, sh, sw, ph, pw, oh, ow)  # padded image gradient
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)] += share
    return np.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])


def _kept_rows(labels, ignore_index):
    """(kept, labels): which rows count (label not ignore_index), and the labels with an ignored
    row's label replaced by 0, so that it can be read like any other (its result is zeroed after)."""
    kept = labels != ignore_index
    return kept, np.where(kept, labels, 0)


def cross_entropy_forward(logits, labels, label_smoothing=0.0, ignore_index=-100):
    """losses[n] = logsumexp(z[n]) - (1 - eps) z[n, labels[n]] - eps mean_k z[n, k]: the cross-entropy
    against the target (1 - eps) onehot + eps / K (PyTorch's label_smoothing), row max subtracted;
    0 where labels[n] is ignore_index."""
    kept, labels = _kept_rows(labels, ignore_index)
    shifted = logits - logits.max(axis=1, keepdims=True)  # the max cancels: the target sums to 1
    rows = np.arange(logits.shape[0])
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    losses = log_sum - shifted[rows, labels]
    if label_smoothing:   # as PyTorch adds them: a -inf logit gives inf, not inf - inf
        eps = logits.dtype.type(label_smoothing)
        losses = (1 - eps) * losses + eps * (log_sum - shifted.mean(axis=1))
    return np.where(kept, losses, logits.dtype.type(0))


def cross_entropy_mean(logits, labels, label_smoothing=0.0, ignore_index=-100):
    """(loss, count): the mean of cross_entropy_forward's losses over the rows whose label is not
    ignore_index, and the number of those rows, as 0-d arrays of the logits' dtype (the loss is NaN
    when no row counts, as in PyTorch)."""
    losses = cross_entropy_forward(logits, labels, label_smoothing, ignore_index)
    count = np.count_nonzero(labels != ignore_index)
    with np.errstate(invalid="ignore"):   # 0 / 0: no row counts
        loss = losses.sum() / count
    return np.asarray(loss, dtype=logits.dtype), np.asarray(count, dtype=logits.dtype)


def cross_entropy_backward(logits, labels, scale, label_smoothing=0.0, ignore_index=-100,
                           divisor=None):
    """dlogits[n, k] = g_n * (softmax(logits[n])[k] - (1 - eps) (k == labels[n]) - eps / K), with
    g_n = 0 where labels[n] is ignore_index, else scale, or scale / divisor (cross_entropy_mean's
    count)."""
    kept, labels = _kept_rows(labels, ignore_index)
    logits = np.ascontiguousarray(logits)   # so dlogits is C-contiguous, like every kernel's output
    t = logits.dtype.type                   # NumPy scalars of the logits' dtype keep float32 float32
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    dlogits = e / e.sum(axis=1, keepdims=True)
    dlogits[np.arange(logits.shape[0]), labels] -= t(1) - t(label_smoothing)
    if label_smoothing:
        dlogits -= t(label_smoothing) / t(logits.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):   # a divisor of 0: every row is ignored
        g = scale if divisor is None else scale / divisor
    # an ignored row: 0 times its terms, as in PyTorch (so a NaN logit there still gives NaN)
    dlogits *= np.where(kept, g, t(0))[:, None]   # in place: float32 stays float32
    return dlogits


def global_avg_pool_forward(x, layout="NCHW"):
    """y[n, c] = mean of the (H, W) plane of (n, c); x (N, C, H, W), or (C, N, H, W) with
    layout="CNHW"; y (N, C) either way."""
    y = x.mean(axis=(2, 3))
    return np.ascontiguousarray(y.T if layout == "CNHW" else y)


def global_avg_pool_backward(dy, x_shape, layout="NCHW"):
    """dx = dy[n, c] / (H*W) at every position of the plane of (n, c); dx has x_shape, (N, C, H, W)
    or (C, N, H, W) with layout="CNHW"; dy is (N, C)."""
    h, w = x_shape[2:]
    share = dy / (h * w)
    planes = share.T if layout == "CNHW" else share
    return np.broadcast_to(planes[:, :, None, None], tuple(x_shape)).copy()


def _per_channel(bias, out):
    """bias (C,) shaped to broadcast against out (N, C, ...)."""
    return bias.reshape((1, -1) + (1,) * (out.ndim - 2))


def bias_relu_(out, bias):
    """out = max(out + bias[c], 0), in place; returns out. out (N, C, ...), or channels first as (1, C, L)."""
    out += _per_channel(bias, out)
    np.maximum(out, 0, out=out)
    return out


def add_bias_(out, bias):
    """out = out + bias[c], in place; returns out. out (N, C, ...), or channels first as (1, C, L)."""
    out += _per_channel(bias, out)
    return out


def relu_backward(dy, y):
    """dx = 0 where y <= 0, else dy (a NaN y passes its gradient on, as in PyTorch)."""
    return np.where(y <= 0, dy.dtype.type(0), dy)


def relu_bias_backward(dy, y):
    """dx = relu_backward(dy, y) and db[c] = sum of dx[:, c] (the bias gradient of y = relu(z + b[c])).
    dy, y (N, C, ...); a channels-first (C, N*H*W) gradient is passed as (1, C, N*H*W)."""
    dx = relu_backward(dy, y)
    return dx, dx.sum(axis=(0,) + tuple(range(2, dx.ndim)))


def sgd_update_(param, grad, buf, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD (dampening 0) in place: g = grad + wd*param; buf = m*buf + g;
    param -= lr * (g + m*buf if nesterov else buf). Returns param."""
    t = param.dtype.type                    # NumPy scalars of param's dtype keep float32 float32
    g = grad + t(weight_decay) * param if weight_decay else grad
    buf *= t(momentum)
    buf += g
    step = g + t(momentum) * buf if nesterov else buf
    param -= t(lr) * step
    return param


def sgd_update_many_(params, grads, bufs, settings):
    """sgd_update_(params[t], grads[t], bufs[t], *settings[t]) for every t, settings[t] =
    (lr, momentum, weight_decay, nesterov). Returns params."""
    for param, grad, buf, (lr, momentum, weight_decay, nesterov) in zip(params, grads, bufs, settings):
        sgd_update_(param, grad, buf, lr, momentum, weight_decay, nesterov)
    return params


# =================================================================================================
# The plain path: every operator NIN uses, forward and backward, in plain NumPy.
#
# `ninpy.use_kernels("reference")` (or NINPY_KERNELS=reference, or train.py --kernels reference)
# makes ninpy.functional apply these Functions instead of its fast ones, so a whole training step
# runs here: in the public (N, C, H, W) layout throughout, every array a fresh NumPy array (no
# memory pool), every operator on its own (no fused bias and ReLU), on the CPU only. Step through
# one with a debugger; tests/test_reference_path.py trains NIN on both paths and compares them.
# The fast path (functional.py) computes the same numbers faster; docs/design.md, "Array layouts", says
# what it changes and why.
# =================================================================================================

class Conv2d(Function):
    """y = w * x + b (cross-correlation);  dw = dy2 @ col^T, db = sum of dy, dx = col2im(w2^T @ dy2).

    x (N, C, H, W), w (F, C, kh, kw), b (F,) or None; y (N, F, oh, ow). col = im2col(x) holds every
    window as a column, so the convolution is ONE matrix product w2 @ col with w2 = w as
    (F, C*kh*kw); its result is (F, N*oh*ow), i.e. y with the batch and channel axes exchanged,
    which is why forward ends, and backward begins, with a transpose. dy2 is dy in that shape.
    """

    def forward(self, x, w, b, stride, padding):
        (sh, sw), (ph, pw) = pair(stride, "stride"), pair(padding, "padding")
        n, _, h, width = x.shape
        f, _, kh, kw = w.shape
        oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(width, kw, sw, pw)
        self.col = im2col(x, kh, kw, sh, sw, ph, pw)                 # (C*kh*kw, N*oh*ow)
        self.x_shape, self.w, self.window = x.shape, w, (kh, kw, sh, sw, ph, pw)
        y2 = w.reshape(f, -1) @ self.col                             # (F, N*oh*ow)
        if b is not None:
            y2 = y2 + b[:, None]
        return y2.reshape(f, n, oh, ow).transpose(1, 0, 2, 3).copy()   # (N, F, oh, ow)

    def backward(self, dy):
        f = self.w.shape[0]
        dy2 = dy.transpose(1, 0, 2, 3).reshape(f, -1)                # (F, N*oh*ow)
        dw = (dy2 @ self.col.T).reshape(self.w.shape)
        db = dy2.sum(axis=1) if self.needs_input_grad[2] else None
        dx = None
        if self.needs_input_grad[0]:                                 # not for the input images
            dx = col2im(self.w.reshape(f, -1).T @ dy2, self.x_shape, *self.window)
        return dx, dw, db


class ReLU(Function):
    """y = max(x, 0);  dx = dy where y > 0, else 0."""

    def forward(self, x):
        self.y = np.maximum(x, 0)
        return self.y

    def backward(self, dy):
        return (relu_backward(dy, self.y),)


class MaxPool2d(Function):
    """y = max over each window (padding never wins, a NaN does);  dx: each dy goes to its window's argmax.

    window = (kh, kw, sh, sw, ph, pw) and out_hw = (oh, ow), from functional.max_pool2d."""

    def forward(self, x, window, out_hw):
        self.x_shape, self.window = x.shape, window
        y, self.argmax = max_pool_forward(x, *window, *out_hw)
        return y

    def backward(self, dy):
        return (max_pool_backward(dy, self.argmax, self.x_shape, *self.window),)


class AvgPool2d(Function):
    """y = sum over each window / divisor;  dx: dy / divisor to every real element of the window."""

    def forward(self, x, window, out_hw, count_include_pad):
        self.x_shape, self.window, self.count_include_pad = x.shape, window, count_include_pad
        return avg_pool_forward(x, *window, *out_hw, count_include_pad)

    def backward(self, dy):
        return (avg_pool_backward(dy, self.x_shape, *self.window, self.count_include_pad),)


class GlobalAvgPool2d(Function):
    """y[n, c] = mean of x[n, c] over H and W;  dx = dy / (H*W) at every position."""

    def forward(self, x):
        self.x_shape = x.shape
        return global_avg_pool_forward(x)

    def backward(self, dy):
        return (global_avg_pool_backward(dy, self.x_shape),)


class Dropout(Function):
    """y = x * mask;  dx = dy * mask. mask (0 or 1/(1-p)) is drawn by functional.dropout, so both
    paths draw the same numbers."""

    def forward(self, x, mask):
        self.mask = mask
        return x * mask

    def backward(self, dy):
        return (dy * self.mask,)


class CrossEntropy(Function):
    """loss = mean_n (logsumexp(z_n) - (1 - eps) z_n[label_n] - eps mean_k z_n[k]);
    dz = (softmax(z) - (1 - eps) onehot(label) - eps / K) / N.  eps = label_smoothing (0: plain)."""

    def forward(self, logits, labels, label_smoothing):
        self.logits, self.labels, self.label_smoothing = logits, labels, label_smoothing
        if logits.shape[0] == 0:   # the mean of no losses is NaN, as in PyTorch
            return np.full((), np.nan, dtype=logits.dtype)
        return cross_entropy_forward(logits, labels, label_smoothing).mean()

    def backward(self, dloss):
        scale = dloss / max(self.logits.shape[0], 1)
        return cross_entropy_backward(self.logits, self.labels, scale, self.label_smoothing), None
