"""The NumPy reference kernels against independent oracles.

- forward kernels against brute force written here with plain Python loops over every output element;
- col2im against im2col through the adjoint identity <im2col(x), c> == <x, col2im(c)>;
- pooling backward against finite differences of the reference forward (float64);
- cross entropy against its textbook formula;
- ninpy/shapes.py's window arithmetic against its definition, counted out element by element;
- and, when torch is installed, pooling and im2col against torch.nn.functional.

The brute-force functions below (`brute_im2col`, `brute_max_pool`, `brute_avg_pool`) are the
definitions written as plain loops over every output element: the place to start when a kernel
and the reference disagree.
"""
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings

from hypothesis import strategies as st

from ninpy import reference as R
from ninpy import shapes
from strategies import (conv_geometries, dtypes, make_geometry, pool_geometries, random_array,
                        random_labels, seeds)

# ---------------------------------------------------------------- brute force, one element at a time


def brute_im2col(x, g):
    col = np.zeros((g.c * g.kh * g.kw, g.n * g.oh * g.ow), dtype=x.dtype)
    for n, c, i, j, y, x_ in itertools.product(range(g.n), range(g.c), range(g.kh), range(g.kw),
                                               range(g.oh), range(g.ow)):
        h, w = y * g.sh - g.ph + i, x_ * g.sw - g.pw + j
        if 0 <= h < g.h and 0 <= w < g.w:
            col[(c * g.kh + i) * g.kw + j, (n * g.oh + y) * g.ow + x_] = x[n, c, h, w]
    return col


def window(g, oy, ox, count_include_pad=True):
    """The real (h, w) of window (oy, ox) in row-major order, and the average's divisor: the cells
    of the window inside the padded image (count_include_pad), or only the real cells."""
    hstart, wstart = oy * g.sh - g.ph, ox * g.sw - g.pw
    cells = [(h, w) for h in range(hstart, hstart + g.kh) for w in range(wstart, wstart + g.kw)
             if 0 <= h < g.h and 0 <= w < g.w]
    padded = [(h, w) for h in range(hstart, hstart + g.kh) for w in range(wstart, wstart + g.kw)
              if -g.ph <= h < g.h + g.ph and -g.pw <= w < g.w + g.pw]
    return cells, len(padded) if count_include_pad else len(cells)


def brute_max_pool(x, g):
    """Start from the window's first real element; take any later one that is greater or NaN."""
    y = np.zeros(g.y_shape, dtype=x.dtype)
    argmax = np.zeros(g.y_shape, dtype=np.int32)
    for n, c, oy, ox in itertools.product(range(g.n), range(g.c), range(g.oh), range(g.ow)):
        cells, _ = window(g, oy, ox)
        assert cells, "the geometry strategy must only produce windows holding a real element"
        best = None
        for h, w in cells:
            value = x[n, c, h, w]
            if best is None or value > best or np.isnan(value):
                best, where = value, h * g.w + w
        y[n, c, oy, ox], argmax[n, c, oy, ox] = best, where
    return y, argmax


def brute_avg_pool(x, g, count_include_pad=True):
    y = np.zeros(g.y_shape, dtype=np.float64)
    for n, c, oy, ox in itertools.product(range(g.n), range(g.c), range(g.oh), range(g.ow)):
        cells, size = window(g, oy, ox, count_include_pad)
        y[n, c, oy, ox] = sum(float(x[n, c, h, w]) for h, w in cells) / size
    return y


def numeric_vjp(forward, x, dy, eps=1e-6):
    """Central differences of <forward(x), dy> in every coordinate of x (float64).

    All 2*x.size perturbed inputs are stacked along the batch axis, so this is two forward calls.
    """
    m = x.size
    bumps = eps * np.eye(m).reshape((m,) + x.shape)
    stacked = lambda sign: (x + sign * bumps).reshape((m * x.shape[0],) + x.shape[1:])
    plus = forward(stacked(+1)).reshape((m,) + dy.shape)
    minus = forward(stacked(-1)).reshape((m,) + dy.shape)
    return ((plus - minus) * dy).reshape(m, dy.size).sum(axis=1).reshape(x.shape) / (2 * eps)


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)


# A few geometries every test sees: batch 1 / channel 1, NIN's 3x3 stride 2 ceil-mode pool whose last
# window hangs past the edge, windows that overlap, stride larger than the kernel, odd sizes.
POOL_EXAMPLES = [make_geometry(1, 1, 7, 7, 3, 2, 0, True), make_geometry(2, 3, 8, 5, 3, 2, 1, True),
                 make_geometry(1, 2, 9, 6, (2, 3), (3, 1), (1, 0), False),
                 make_geometry(1, 1, 5, 5, 4, 3, 2, True)]
CONV_EXAMPLES = [make_geometry(2, 3, 8, 8, 5, 1, 2), make_geometry(1, 1, 7, 5, 3, 2, 1),
                 make_geometry(1, 2, 4, 9, (1, 4), (3, 2), (0, 2))]


def with_examples(examples):
    def decorate(test):
        for g in examples:
            test = example(g=g, dtype=np.float64, seed=0)(test)
        return test
    return decorate


# --------------------------------------------------------------------------------------- im2col


@settings(max_examples=40)
@with_examples(CONV_EXAMPLES)
@given(g=conv_geometries(), dtype=dtypes, seed=seeds)
def test_im2col_matches_brute_force(g, dtype, seed):
    x = random_array(seed, g.x_shape, dtype)
    col = R.im2col(x, *g.window)
    assert col.dtype == dtype and col.flags.c_contiguous
    np.testing.assert_array_equal(col, brute_im2col(x, g))


@settings(max_examples=40)
@with_examples(CONV_EXAMPLES)
@given(g=conv_geometries(), dtype=dtypes, seed=seeds)
def test_col2im_is_the_adjoint_of_im2col(g, dtype, seed):
    x = random_array(seed, g.x_shape, np.float64)
    c = random_array(seed + 1, (g.c * g.kh * g.kw, g.n * g.oh * g.ow), np.float64)
    dx = R.col2im(c, g.x_shape, *g.window)
    assert dx.shape == g.x_shape and dx.flags.c_contiguous
    np.testing.assert_allclose(np.vdot(R.im2col(x, *g.window), c), np.vdot(x, dx), rtol=1e-12, atol=1e-12)
    assert R.col2im(c.astype(dtype), g.x_shape, *g.window).dtype == dtype


# -------------------------------------------------------------------------------------- pooling


@settings(max_examples=40)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_max_pool_forward_matches_brute_force(g, dtype, seed):
    x = random_array(seed, g.x_shape, dtype, distinct=True)
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    expected_y, expected_argmax = brute_max_pool(x, g)
    assert y.dtype == dtype and argmax.dtype == np.int32
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)


def test_max_pool_ties_pick_the_first_in_row_major_order():
    g = make_geometry(1, 1, 4, 4, 3, 1, 1, False)
    x = np.zeros(g.x_shape)  # every window is all ties (padding must not win: -inf, not 0)
    x[0, 0, 3, 3] = -1.0
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    expected_y, expected_argmax = brute_max_pool(x, g)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)
    assert argmax[0, 0, 0, 0] == 0 and argmax[0, 0, 3, 3] == 2 * 4 + 2


def edge_values(seed, shape, dtype):
    """Distinct values with NaN, +inf and -inf sprinkled in, and some planes entirely -inf."""
    x = random_array(seed, shape, dtype, distinct=True)
    rng = np.random.default_rng(seed)
    picks = rng.random(shape)
    x[picks < 0.1] = np.nan
    x[(picks >= 0.1) & (picks < 0.2)] = -np.inf
    x[(picks >= 0.2) & (picks < 0.25)] = np.inf
    if shape[0] * shape[1] > 1:
        x[0, 0] = -np.inf                        # windows with no finite element
    return x


@settings(max_examples=40)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_max_pool_with_nan_and_infinities_matches_brute_force(g, dtype, seed):
    x = edge_values(seed, g.x_shape, dtype)
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    expected_y, expected_argmax = brute_max_pool(x, g)
    np.testing.assert_array_equal(y, expected_y)
    np.testing.assert_array_equal(argmax, expected_argmax)


def test_max_pool_window_of_minus_infinity_points_at_its_first_real_element():
    """Not at -1 (which would send the gradient to the plane's last pixel)."""
    g = make_geometry(1, 1, 4, 4, 2, 2, 0, False)
    x = np.arange(16.0).reshape(g.x_shape)
    x[0, 0, :2, :2] = -np.inf
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    assert y[0, 0, 0, 0] == -np.inf and argmax[0, 0, 0, 0] == 0
    dx = R.max_pool_backward(np.ones(g.y_shape), argmax, g.x_shape, *g.window)
    assert dx[0, 0, 0, 0] == 1 and dx[0, 0, 3, 3] == 1 and dx.sum() == 4


def test_max_pool_nan_wins_the_window():
    x = np.array([[[[1.0, np.nan, 3.0, np.nan, 2.0]]]])
    y, argmax = R.max_pool_forward(x, 1, 5, 1, 1, 0, 0, 1, 1)
    assert np.isnan(y).all() and argmax.item() == 3      # the last NaN, as PyTorch picks


def test_max_pool_pads_with_minus_infinity():
    g = make_geometry(1, 1, 3, 3, 3, 2, 1, True)
    x = -np.arange(1.0, 10.0).reshape(g.x_shape)   # all negative: zero padding would win
    y, _ = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    np.testing.assert_array_equal(y, brute_max_pool(x, g)[0])
    assert (y < 0).all()


@settings(max_examples=40)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_avg_pool_forward_matches_brute_force_with_caffe_divisor(g, dtype, seed):
    x = random_array(seed, g.x_shape, dtype)
    y = R.avg_pool_forward(x, *g.window, g.oh, g.ow)
    assert y.dtype == dtype and y.shape == g.y_shape
    np.testing.assert_allclose(y, brute_avg_pool(x, g), **tolerance(dtype))


@settings(max_examples=40)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_avg_pool_without_padding_in_the_count_matches_brute_force(g, dtype, seed):
    x = random_array(seed, g.x_shape, dtype)
    y = R.avg_pool_forward(x, *g.window, g.oh, g.ow, count_include_pad=False)
    np.testing.assert_allclose(y, brute_avg_pool(x, g, count_include_pad=False), **tolerance(dtype))


@settings(max_examples=25)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_max_pool_backward_is_the_vjp_of_forward(g, dtype, seed):
    x = random_array(seed, g.x_shape, np.float64, distinct=True)
    dy = random_array(seed + 1, g.y_shape, np.float64)
    _, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    dx = R.max_pool_backward(dy, argmax, g.x_shape, *g.window)
    expected = numeric_vjp(lambda v: R.max_pool_forward(v, *g.window, g.oh, g.ow)[0], x, dy)
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-8)
    assert R.max_pool_backward(dy.astype(dtype), argmax, g.x_shape, *g.window).dtype == dtype


@settings(max_examples=25)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_avg_pool_backward_is_the_vjp_of_forward(g, dtype, seed):
    x = random_array(seed, g.x_shape, np.float64)
    dy = random_array(seed + 1, g.y_shape, np.float64)
    count_include_pad = seed % 2 == 0
    dx = R.avg_pool_backward(dy, g.x_shape, *g.window, count_include_pad)
    expected = numeric_vjp(lambda v: R.avg_pool_forward(v, *g.window, g.oh, g.ow, count_include_pad),
                           x, dy)
    np.testing.assert_allclose(dx, expected, rtol=1e-6, atol=1e-8)
    assert R.avg_pool_backward(dy.astype(dtype), g.x_shape, *g.window).dtype == dtype


# -------------------------------------------------------------------------------- cross entropy


@settings(max_examples=30)
@given(dtype=dtypes, seed=seeds)
def test_cross_entropy_forward_matches_the_formula(dtype, seed):
    n, k = 1 + seed % 5, 1 + seed % 7
    logits = random_array(seed, (n, k), dtype, low=-5, high=5)
    labels = random_labels(seed, n, k).astype(np.int32 if seed % 2 else np.int64)
    losses = R.cross_entropy_forward(logits, labels)
    z = logits.astype(np.float64)
    expected = [-np.log(np.exp(z[i, labels[i]]) / np.exp(z[i]).sum()) for i in range(n)]
    assert losses.shape == (n,) and losses.dtype == dtype
    np.testing.assert_allclose(losses, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@settings(max_examples=30)
@given(seed=seeds)
def test_cross_entropy_backward_is_the_gradient_of_scaled_losses(seed):
    n, k = 1 + seed % 5, 2 + seed % 7
    logits = random_array(seed, (n, k), np.float64, low=-5, high=5)
    labels = random_labels(seed, n, k)
    scale = 1.0 / n
    dlogits = R.cross_entropy_backward(logits, labels, scale)
    expected = numeric_vjp(lambda z: R.cross_entropy_forward(z.reshape(-1, k), np.tile(labels, n * k)),
                           logits, np.full(n, scale))
    np.testing.assert_allclose(dlogits, expected, rtol=1e-6, atol=1e-9)


@settings(max_examples=30)
@given(dtype=dtypes, seed=seeds, label_smoothing=st.sampled_from([0.05, 0.1, 0.5, 1.0]))
def test_label_smoothed_cross_entropy_is_the_cross_entropy_against_the_smoothed_target(
        dtype, seed, label_smoothing):
    """PyTorch's label_smoothing: the target is (1 - eps) onehot + eps / K, the loss its cross-entropy
    with softmax(z) (computed here from that definition, in float64)."""
    n, k = 1 + seed % 5, 1 + seed % 7
    logits = random_array(seed, (n, k), dtype, low=-5, high=5)
    labels = random_labels(seed, n, k)
    losses = R.cross_entropy_forward(logits, labels, label_smoothing)
    z = logits.astype(np.float64)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    target = (1 - label_smoothing) * np.eye(k)[labels] + label_smoothing / k
    assert losses.shape == (n,) and losses.dtype == dtype
    np.testing.assert_allclose(losses, -(target * log_p).sum(axis=1),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@settings(max_examples=30)
@given(seed=seeds, label_smoothing=st.sampled_from([0.05, 0.1, 0.5, 1.0]))
def test_label_smoothed_backward_is_the_gradient_of_scaled_losses(seed, label_smoothing):
    n, k = 1 + seed % 5, 2 + seed % 7
    logits = random_array(seed, (n, k), np.float64, low=-5, high=5)
    labels = random_labels(seed, n, k)
    scale = 1.0 / n
    dlogits = R.cross_entropy_backward(logits, labels, scale, label_smoothing)
    expected = numeric_vjp(lambda z: R.cross_entropy_forward(z.reshape(-1, k), np.tile(labels, n * k),
                                                             label_smoothing),
                           logits, np.full(n, scale))
    np.testing.assert_allclose(dlogits, expected, rtol=1e-6, atol=1e-9)


def test_label_smoothing_keeps_float32():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    labels = np.array([1, 2])
    losses = R.cross_entropy_forward(logits, labels, 0.1)
    assert losses.dtype == np.float32 and np.isfinite(losses).all()
    dlogits = R.cross_entropy_backward(logits, labels, np.array(0.5), 0.1)
    assert dlogits.dtype == np.float32 and np.isfinite(dlogits).all()


def test_cross_entropy_is_stable_and_keeps_float32():
    logits = np.array([[1000.0, 0.0, -1000.0], [-1e4, -1e4, -1e4]], dtype=np.float32)
    labels = np.array([1, 2])
    losses = R.cross_entropy_forward(logits, labels)
    np.testing.assert_allclose(losses, [1000.0, np.log(3.0)], rtol=1e-6)
    dlogits = R.cross_entropy_backward(logits, labels, np.array(0.5))   # 0-d float64 scale
    assert dlogits.dtype == np.float32 and np.isfinite(dlogits).all()
    np.testing.assert_allclose(dlogits, [[0.5, -0.5, 0.0], [1 / 6, 1 / 6, -1 / 3]], atol=1e-7)


# --------------------------------------------------------------------------------- bias and relu


@settings(max_examples=20)
@given(dtype=dtypes, seed=seeds)
def test_bias_relu_and_relu_backward(dtype, seed):
    shape = (1 + seed % 3, 1 + seed % 4, 1 + seed % 5, 1 + seed % 6)
    out = random_array(seed, shape, dtype, away_from_zero=True)
    bias = random_array(seed + 1, shape[1:2], dtype)
    with_bias = out + bias[None, :, None, None]
    relu_in = out.copy()
    assert R.bias_relu_(relu_in, bias) is relu_in
    np.testing.assert_allclose(relu_in, np.maximum(with_bias, 0), **tolerance(dtype))
    flat = out.reshape(shape[0], shape[1], -1).copy()          # the (N, C, L) form
    assert R.add_bias_(flat, bias) is flat
    np.testing.assert_allclose(flat, with_bias.reshape(flat.shape), **tolerance(dtype))
    dy = random_array(seed + 2, shape, dtype)
    dx = R.relu_backward(dy, out)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(dx, np.where(out > 0, dy, 0))
    nan_y = np.array([np.nan, -1.0, 0.0, 2.0], dtype)
    np.testing.assert_array_equal(R.relu_backward(np.full(4, 3.0, dtype), nan_y), [3.0, 0, 0, 3.0])


# ------------------------------------------------------------------------------ against PyTorch


@settings(max_examples=25)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_pooling_matches_torch(g, dtype, seed):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x = random_array(seed, g.x_shape, dtype, distinct=True)
    dy = random_array(seed + 1, g.y_shape, dtype)
    args = dict(kernel_size=(g.kh, g.kw), stride=(g.sh, g.sw), padding=(g.ph, g.pw), ceil_mode=g.ceil_mode)
    tol = tolerance(dtype)

    tx = torch.tensor(x, requires_grad=True)
    ty, tindex = F.max_pool2d(tx, return_indices=True, **args)
    ty.backward(torch.tensor(dy))
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_array_equal(argmax, tindex.numpy())
    np.testing.assert_allclose(R.max_pool_backward(dy, argmax, g.x_shape, *g.window), tx.grad.numpy(), **tol)

    for count_include_pad in (True, False):
        tx = torch.tensor(x, requires_grad=True)
        ty = F.avg_pool2d(tx, count_include_pad=count_include_pad, **args)
        ty.backward(torch.tensor(dy))
        np.testing.assert_allclose(R.avg_pool_forward(x, *g.window, g.oh, g.ow, count_include_pad),
                                   ty.detach().numpy(), **tol)
        np.testing.assert_allclose(R.avg_pool_backward(dy, g.x_shape, *g.window, count_include_pad),
                                   tx.grad.numpy(), **tol)


@settings(max_examples=25)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds)
def test_max_pool_with_nan_and_infinities_matches_torch(g, dtype, seed):
    torch = pytest.importorskip("torch")
    x = edge_values(seed, g.x_shape, dtype)
    args = dict(kernel_size=(g.kh, g.kw), stride=(g.sh, g.sw), padding=(g.ph, g.pw), ceil_mode=g.ceil_mode)
    ty, tindex = torch.nn.functional.max_pool2d(torch.tensor(x), return_indices=True, **args)
    y, argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    np.testing.assert_array_equal(y, ty.numpy())
    np.testing.assert_array_equal(argmax, tindex.numpy())


@settings(max_examples=25)
@with_examples(CONV_EXAMPLES)
@given(g=conv_geometries(), dtype=dtypes, seed=seeds)
def test_im2col_matches_torch_unfold(g, dtype, seed):
    torch = pytest.importorskip("torch")
    x = random_array(seed, g.x_shape, dtype)
    unfolded = torch.nn.functional.unfold(torch.tensor(x), (g.kh, g.kw), padding=(g.ph, g.pw),
                                          stride=(g.sh, g.sw)).numpy()    # (N, C*kh*kw, oh*ow)
    expected = unfolded.transpose(1, 0, 2).reshape(g.c * g.kh * g.kw, g.n * g.oh * g.ow)
    np.testing.assert_array_equal(R.im2col(x, *g.window), expected)


# --------------------------------------------------------------------- the window arithmetic


@settings(max_examples=200)
@given(size=st.integers(1, 12), kernel=st.integers(1, 5), stride=st.integers(1, 4),
       padding=st.integers(0, 2), ceil_mode=st.booleans())
def test_window_arithmetic_matches_its_definition(size, kernel, stride, padding, ceil_mode):
    """shapes.py's formulas against the windows counted out one by one: output o looks at
    o*stride - padding .. o*stride - padding + kernel - 1."""
    padding = min(padding, kernel // 2)
    if size + 2 * padding < kernel:
        return
    out = shapes.pool_output_size(size, kernel, stride, padding, ceil_mode)
    starts = [o * stride - padding for o in range(out)]
    assert all(start < size for start in starts)        # every window holds a real element
    if not ceil_mode:
        assert out == shapes.conv_output_size(size, kernel, stride, padding)
        assert starts[-1] + kernel <= size + padding     # ... and ends inside the padding
    for position in range(size):
        lo, hi = shapes.covering_windows(position, kernel, stride, padding, out)
        covering = [o for o, start in enumerate(starts) if start <= position < start + kernel]
        assert list(range(lo, hi)) == covering
    for o, start in enumerate(starts):
        cells = range(start, start + kernel)
        padded = sum(1 for t in cells if -padding <= t < size + padding)
        real = sum(1 for t in cells if 0 <= t < size)
        assert shapes.avg_pool_divisor(o, kernel, stride, padding, size, True) == padded
        assert shapes.avg_pool_divisor(o, kernel, stride, padding, size, False) == real
