"""Plain-NumPy reference kernels: the readable oracle for cpu_kernels.py (Numba) and gpu_kernels.py (CUDA).

Every function here is written to be read, not to be fast: vectorised over the batch, the channels
and the output positions with slicing, and a Python loop over the kh*kw offsets of the window.
The fast versions in `cpu_kernels` and `gpu_kernels` have the same names and signatures and are
tested against these.

im2col layout. A convolution with weight w (F, C, kh, kw) becomes ONE matrix product over the whole
batch, out = w.reshape(F, C*kh*kw) @ col, when col has one ROW per weight entry (c, i, j) and one
COLUMN per output position (n, y, x):

    col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j]   (0 outside)

so col is (C*kh*kw, N*oh*ow) and the product is (F, N*oh*ow), which the caller reshapes to
(F, N, oh, ow) and transposes to (N, F, oh, ow). col2im is the adjoint (the transpose) of im2col:
each input element receives the SUM of every col entry that was copied from it, which is exactly the
gradient of the input given the gradient of col.

Pooling windows: output (oy, ox) looks at rows oy*sh - ph .. oy*sh - ph + kh - 1 and the matching
columns. Max pooling pads with -inf (only real elements compete; argmax is the flat index h*W + w of
the winner inside its image plane, first one in row-major order on ties). Average pooling divides by
Caffe's window size (= PyTorch's count_include_pad=True): the window clipped to the PADDED image,
counted before clipping to the real image. With ceil_mode the last window may hang past the padded
edge; the caller guarantees every window still holds at least one real element.
"""
import numpy as np


def _window_rows(start, stride, count):
    """Slice picking element start + o*stride for o = 0..count-1 (one window offset, every window)."""
    return slice(start, start + stride * (count - 1) + 1, stride)


def _pad(x, value, kh, kw, sh, sw, ph, pw, oh, ow):
    """Pad (N, C, H, W) by ph/pw on the top/left and enough on the bottom/right for oh x ow windows."""
    H, W = x.shape[2:]
    bottom = max(ph, (oh - 1) * sh + kh - H - ph)
    right = max(pw, (ow - 1) * sw + kw - W - pw)
    return np.pad(x, ((0, 0), (0, 0), (ph, bottom), (pw, right)), constant_values=value)


def im2col(x, kh, kw, sh, sw, ph, pw):
    """col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] = x[n, c, y*sh - ph + i, x*sw - pw + j], 0 outside."""
    N, C, H, W = x.shape
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    col = np.empty((C, kh, kw, N, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]  # (N, C, oh, ow)
            col[:, i, j] = patch.transpose(1, 0, 2, 3)
    return col.reshape(C * kh * kw, N * oh * ow)


def col2im(col, x_shape, kh, kw, sh, sw, ph, pw):
    """dx[n, c, h, w] = sum of col[(c*kh + i)*kw + j, (n*oh + y)*ow + x] over y*sh - ph + i = h, x*sw - pw + j = w."""
    N, C, H, W = x_shape
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    col = col.reshape(C, kh, kw, N, oh, ow)
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=col.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)] += \
                col[:, i, j].transpose(1, 0, 2, 3)
    return np.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])


def max_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """y[n, c, oy, ox] = max of x[n, c, h, w] over the window's real elements; argmax = h*W + w of the first max."""
    N, C, H, W = x.shape
    xp = _pad(x, -np.inf, kh, kw, sh, sw, ph, pw, oh, ow)   # -inf: padding never wins
    y = np.full((N, C, oh, ow), -np.inf, dtype=x.dtype)
    argmax = np.full((N, C, oh, ow), -1)
    for i in range(kh):
        for j in range(kw):
            value = xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]
            h = np.arange(oh)[:, None] * sh - ph + i          # image row and column of this offset,
            w = np.arange(ow)[None, :] * sw - pw + j          # one per window
            better = value > y                                # strict: the first maximum wins ties
            y = np.where(better, value, y)
            argmax = np.where(better, h * W + w, argmax)
    return y, argmax.astype(np.int32)


def max_pool_backward(dy, argmax, x_shape, kh, kw, sh, sw, ph, pw):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] over the windows whose argmax is h*W + w."""
    N, C, H, W = x_shape
    dx = np.zeros((N * C, H * W), dtype=dy.dtype)
    plane = np.arange(N * C)[:, None]
    np.add.at(dx, (plane, argmax.reshape(N * C, -1)), dy.reshape(N * C, -1))  # add.at: repeats add up
    return dx.reshape(N, C, H, W)


def _avg_pool_divisor(H, W, kh, kw, sh, sw, ph, pw, oh, ow):
    """Caffe's window size (oh, ow): the window clipped to the padded image [-p, size + p)."""
    hstart = np.arange(oh) * sh - ph
    wstart = np.arange(ow) * sw - pw
    rows = np.minimum(hstart + kh, H + ph) - hstart
    cols = np.minimum(wstart + kw, W + pw) - wstart
    return rows[:, None] * cols[None, :]


def avg_pool_forward(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """y[n, c, oy, ox] = (sum of the window's real elements) / Caffe's size (padding counted, overhang not)."""
    N, C, H, W = x.shape
    xp = _pad(x, 0, kh, kw, sh, sw, ph, pw, oh, ow)
    total = np.zeros((N, C, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            total += xp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)]
    return total / _avg_pool_divisor(H, W, kh, kw, sh, sw, ph, pw, oh, ow).astype(x.dtype)


def avg_pool_backward(dy, x_shape, kh, kw, sh, sw, ph, pw):
    """dx[n, c, h, w] = sum of dy[n, c, oy, ox] / size(oy, ox) over the windows covering (h, w)."""
    N, C, H, W = x_shape
    oh, ow = dy.shape[2:]
    share = dy / _avg_pool_divisor(H, W, kh, kw, sh, sw, ph, pw, oh, ow).astype(dy.dtype)
    dxp = _pad(np.zeros(x_shape, dtype=dy.dtype), 0, kh, kw, sh, sw, ph, pw, oh, ow)  # padded image gradient
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, _window_rows(i, sh, oh), _window_rows(j, sw, ow)] += share
    return np.ascontiguousarray(dxp[:, :, ph:ph + H, pw:pw + W])


def cross_entropy_forward(logits, labels):
    """losses[n] = logsumexp(logits[n]) - logits[n, labels[n]], with the row max subtracted for stability."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    return np.log(np.exp(shifted).sum(axis=1)) - shifted[rows, labels]


def cross_entropy_backward(logits, labels, scale):
    """dlogits[n, k] = scale * (softmax(logits[n])[k] - (k == labels[n]))."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    dlogits = e / e.sum(axis=1, keepdims=True)
    dlogits[np.arange(logits.shape[0]), labels] -= 1
    dlogits *= scale  # in place: a 0-d float64 scale keeps a float32 result float32
    return dlogits


def _per_channel(bias, out):
    """bias (C,) shaped to broadcast against out (N, C, ...)."""
    return bias.reshape((1, -1) + (1,) * (out.ndim - 2))


def bias_relu_(out, bias):
    """out = max(out + bias[c], 0), in place; returns out."""
    out += _per_channel(bias, out)
    np.maximum(out, 0, out=out)
    return out


def add_bias_(out, bias):
    """out = out + bias[c], in place; returns out."""
    out += _per_channel(bias, out)
    return out


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0."""
    return dy * (y > 0)
