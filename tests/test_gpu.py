"""GPU kernels (ninpy.gpu_kernels, kernels/*.cu) against the NumPy reference, and a whole NIN training
step on the GPU against the CPU.

Every test runs on two devices of ninpy's GPU code path:
- "gpu": the real thing, marked `gpu` (skipped by conftest.py without a usable GPU);
- "emulated": the same .cu sources compiled by g++ and run on the CPU through ninpy/emulator.py,
  with gpu_kernels' launches checked argument by argument against the kernels' C signatures. It runs
  everywhere g++ (C++20) is found (in CI it must), so index formulas and launch arguments are
  tested even on machines without a GPU. It cannot show GPU rounding, races, speed or cuBLAS.
"""
import contextlib
import ctypes
import gc
import math
import os
import types
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GPU_PATHS, IN_CI, require_device, tf32
from ninpy import backend, emulator, functional, gpu_kernels
from ninpy import reference as R
from strategies import (conv_geometries, dtypes, in_layout, layouts, pool_geometries, random_array,
                        random_labels, seeds)
from test_cpu_kernels import INCONSISTENT_CALLS
from test_reference import edge_values

BACKENDS = GPU_PATHS
DTYPES = [np.float32, np.float64]
EXAMPLES = settings(max_examples=25, deadline=None)


class Device:
    """put: NumPy -> device array (in a memory layout of strategies.LAYOUTS); get: device -> NumPy."""

    def __init__(self, name):
        self.name, self.xp = name, backend.module_of_device(name)

    def put(self, array, layout="c_order"):
        return in_layout(backend.to_device(array, self.name), layout, self.xp)

    @staticmethod
    def get(array):
        return backend.to_device(array, "cpu")


@contextlib.contextmanager
def kernels_on(device):
    """Yield a Device for "gpu" or "emulated" (skipped when it cannot run; in CI the emulator must)."""
    yield Device(require_device(device))


def tolerance(dtype):
    return dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)


# Strategies (small geometries: windows that overlap, skip pixels and hang over the edge; dtypes;
# integer seeds from which arrays are built) come from tests/strategies.py, shared with the CPU tests.


# --- im2col / col2im ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(g=conv_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_im2col_col2im_match_reference(where, g, dtype, seed, layout):
    shape, geometry = g.x_shape, g.window
    rng = np.random.default_rng(seed)
    x = random_array(seed, shape, dtype)
    with kernels_on(where) as dev:
        col = gpu_kernels.im2col(dev.put(x, layout), *geometry)
        expected = R.im2col(x, *geometry)
        assert col.dtype == dtype
        np.testing.assert_array_equal(dev.get(col), expected)  # a copy: exact
        dcol = rng.standard_normal(expected.shape).astype(dtype)
        dx = gpu_kernels.col2im(dev.put(dcol, layout), shape, *geometry)
        assert dx.shape == shape and dx.dtype == dtype
        np.testing.assert_allclose(dev.get(dx), R.col2im(dcol, shape, *geometry), **tolerance(dtype))
        channels_first = np.ascontiguousarray(x.transpose(1, 0, 2, 3))   # what functional.Conv2d uses
        col = gpu_kernels.im2col(dev.put(channels_first, layout), *geometry, layout="CNHW")
        np.testing.assert_array_equal(dev.get(col), expected)
        swapped = channels_first.shape
        dx = gpu_kernels.col2im(dev.put(dcol), swapped, *geometry, layout="CNHW")
        assert dx.shape == swapped
        np.testing.assert_allclose(dev.get(dx), R.col2im(dcol, swapped, *geometry, layout="CNHW"),
                                   **tolerance(dtype))


# --- pooling --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts,
       values=st.sampled_from(["ties", "nan_and_infinities"]))
def test_max_pool_matches_reference_ties_and_edge_values_included(where, g, dtype, seed, layout, values):
    shape, geometry, out = g.x_shape, g.window, (g.oh, g.ow)
    rng = np.random.default_rng(seed)
    if values == "ties":
        x = rng.integers(-3, 4, shape).astype(dtype)  # few distinct values: ties go to the first maximum
    else:
        x = edge_values(seed, shape, dtype)           # NaN wins; a window of -inf: its first element
    with kernels_on(where) as dev:
        y, argmax = gpu_kernels.max_pool_forward(dev.put(x, layout), *geometry, *out)
        ry, rargmax = R.max_pool_forward(x, *geometry, *out)
        assert argmax.dtype == np.int32 and y.dtype == dtype
        np.testing.assert_array_equal(dev.get(y), ry)
        np.testing.assert_array_equal(dev.get(argmax), rargmax)
        dy = rng.standard_normal(ry.shape).astype(dtype)
        dx = gpu_kernels.max_pool_backward(dev.put(dy, layout), dev.put(rargmax, layout), shape, *geometry)
        np.testing.assert_allclose(dev.get(dx), R.max_pool_backward(dy, rargmax, shape, *geometry),
                                   **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts, count_include_pad=st.booleans())
def test_avg_pool_matches_reference(where, g, dtype, seed, layout, count_include_pad):
    shape, geometry, out = g.x_shape, g.window, (g.oh, g.ow)
    rng = np.random.default_rng(seed)
    x = random_array(seed, shape, dtype)
    with kernels_on(where) as dev:
        y = gpu_kernels.avg_pool_forward(dev.put(x, layout), *geometry, *out, count_include_pad)
        ry = R.avg_pool_forward(x, *geometry, *out, count_include_pad)
        np.testing.assert_allclose(dev.get(y), ry, **tolerance(dtype))
        dy = rng.standard_normal(ry.shape).astype(dtype)
        dx = gpu_kernels.avg_pool_backward(dev.put(dy, layout), shape, *geometry, count_include_pad)
        np.testing.assert_allclose(dev.get(dx), R.avg_pool_backward(dy, shape, *geometry, count_include_pad),
                                   **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
@settings(max_examples=15, deadline=None)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts, count_include_pad=st.booleans(),
       p=st.sampled_from([0.3, 0.5, 1.0]))
def test_pooling_with_dropout_is_dropout_after_the_pooling_bit_for_bit(where, g, dtype, seed, layout,
                                                                       count_include_pad, p):
    """The pooling kernels with dropout=(p, seed, offset): forward = the reference pooling times
    dropout's mask (kernels/dropout_draw.cuh's formula) and exactly dropout_apply of the plain
    pooling; backward = the reference pooling's backward of dy * mask, and exactly the plain
    backward of dropout_apply(dy). Edge values (NaN, infinities) included."""
    shape, geometry, out = g.x_shape, g.window, (g.oh, g.ow)
    rng = np.random.default_rng(seed)
    x = edge_values(seed, shape, dtype)
    draw = (p, seed, 1000 + seed)
    with kernels_on(where) as dev:
        y, argmax = gpu_kernels.max_pool_forward(dev.put(x, layout), *geometry, *out)
        a = gpu_kernels.avg_pool_forward(dev.put(x, layout), *geometry, *out, count_include_pad)
        mask = _splitmix_mask(y.size, p, seed, 1000 + seed, dtype).reshape(y.shape)
        dy = rng.standard_normal(y.shape).astype(dtype)
        fused_y, fused_argmax = gpu_kernels.max_pool_forward(dev.put(x, layout), *geometry, *out,
                                                             dropout=draw)
        fused_a = gpu_kernels.avg_pool_forward(dev.put(x, layout), *geometry, *out, count_include_pad,
                                               dropout=draw)
        with np.errstate(invalid="ignore"):
            ry = R.max_pool_forward(x, *geometry, *out)[0] * mask
        np.testing.assert_array_equal(dev.get(fused_y), ry)
        np.testing.assert_array_equal(dev.get(fused_argmax), dev.get(argmax))
        for fused, plain in ((fused_y, y), (fused_a, a)):
            np.testing.assert_array_equal(dev.get(fused), dev.get(gpu_kernels.dropout_apply(plain, *draw)))
        dropped_dy = dev.get(gpu_kernels.dropout_apply(dev.put(dy), *draw))
        np.testing.assert_array_equal(dropped_dy, dy * mask)
        dx = gpu_kernels.max_pool_backward(dev.put(dy, layout), argmax, shape, *geometry, dropout=draw)
        np.testing.assert_allclose(dev.get(dx), R.max_pool_backward(dy * mask, dev.get(argmax), shape,
                                                                    *geometry), **tolerance(dtype))
        np.testing.assert_array_equal(dev.get(dx), dev.get(gpu_kernels.max_pool_backward(
            dev.put(dropped_dy), argmax, shape, *geometry)))
        dx = gpu_kernels.avg_pool_backward(dev.put(dy, layout), shape, *geometry, count_include_pad,
                                           dropout=draw)
        np.testing.assert_allclose(dev.get(dx), R.avg_pool_backward(dy * mask, shape, *geometry,
                                                                    count_include_pad),
                                   **tolerance(dtype))
        np.testing.assert_array_equal(dev.get(dx), dev.get(gpu_kernels.avg_pool_backward(
            dev.put(dropped_dy), shape, *geometry, count_include_pad)))


def test_pooling_cu_window_arithmetic_agrees_with_shapes_py():
    """kernels/pooling.cu repeats ninpy/shapes.py's covering_windows and avg_pool_divisor in C (a
    kernel cannot import Python): call its device helpers on the host for every small case."""
    from ninpy import shapes

    wrappers = """
    extern "C" void probe_covering(int p, int k, int s, int out, int* range) {
        covering_windows(p, k, s, out, &range[0], &range[1]);
    }
    extern "C" int probe_divisor(int start, int k, int size, int pad, int include) {
        return avg_pool_divisor(start, k, size, pad, include);
    }
    """
    require_device("emulated")
    probe = emulator.build_probe(gpu_kernels.KERNEL_DIR / "pooling.cu", wrappers)
    window = (ctypes.c_int * 2)()
    for size in range(1, 9):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for padding in range(0, kernel // 2 + 1):
                    if size + 2 * padding < kernel:
                        continue
                    out = shapes.pool_output_size(size, kernel, stride, padding, ceil_mode=True)
                    for position in range(size):
                        probe.probe_covering(position + padding, kernel, stride, out, window)
                        assert tuple(window) == shapes.covering_windows(position, kernel, stride,
                                                                         padding, out)
                    for o in range(out):
                        for include in (True, False):
                            assert probe.probe_divisor(o * stride - padding, kernel, size, padding,
                                                       int(include)) == \
                                shapes.avg_pool_divisor(o, kernel, stride, padding, size, include)


# --- softmax cross-entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(N=st.integers(1, 12), K=st.integers(1, 75), dtype=dtypes, label_dtype=st.sampled_from([np.int32, np.int64, np.uint8]),
       spread=st.sampled_from([1.0, 30.0]), scale_on_device=st.booleans(), seed=seeds, layout=layouts,
       label_smoothing=st.sampled_from([0.0, 0.1, 1.0]))
def test_cross_entropy_matches_reference(where, N, K, dtype, label_dtype, spread, scale_on_device, seed,
                                         layout, label_smoothing):
    rng = np.random.default_rng(seed)
    logits = (spread * rng.standard_normal((N, K))).astype(dtype)
    labels = random_labels(seed, N, K).astype(label_dtype)
    with kernels_on(where) as dev:
        losses = gpu_kernels.cross_entropy_forward(dev.put(logits, layout), dev.put(labels, layout),
                                                   label_smoothing)
        assert losses.shape == (N,) and losses.dtype == dtype
        np.testing.assert_allclose(dev.get(losses), R.cross_entropy_forward(logits, labels, label_smoothing),
                                   **tolerance(dtype))
        scale = 1.0 / N
        device_scale = dev.put(np.array(scale, dtype=dtype)) if scale_on_device else scale
        d = gpu_kernels.cross_entropy_backward(dev.put(logits), dev.put(labels), device_scale,
                                               label_smoothing)
        assert d.shape == (N, K) and d.dtype == dtype
        np.testing.assert_allclose(dev.get(d), R.cross_entropy_backward(logits, labels, dtype(scale),
                                                                        label_smoothing),
                                   **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
def test_cross_entropy_bad_label_gives_nan_not_a_wild_read(where):
    logits = np.zeros((3, 4), np.float32)
    labels = np.array([0, 4, -1], np.int64)
    with kernels_on(where) as dev:
        losses = dev.get(gpu_kernels.cross_entropy_forward(dev.put(logits), dev.put(labels)))
        assert np.isclose(losses[0], math.log(4)) and np.isnan(losses[1]) and np.isnan(losses[2])
        d = dev.get(gpu_kernels.cross_entropy_backward(dev.put(logits), dev.put(labels), 1.0))
        assert np.isfinite(d[0]).all() and np.isnan(d[1:]).all()


@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(N=st.integers(0, 40), K=st.integers(1, 40), dtype=dtypes,
       label_dtype=st.sampled_from([np.int32, np.int64, np.uint8]),
       ignore_index=st.sampled_from([-100, 0, 3]), ignored=st.sampled_from(["none", "some", "all"]),
       scale_on_device=st.booleans(), seed=seeds, label_smoothing=st.sampled_from([0.0, 0.1]))
def test_cross_entropy_mean_and_ignored_rows_match_reference(where, N, K, dtype, label_dtype,
                                                             ignore_index, ignored, scale_on_device,
                                                             seed, label_smoothing):
    """The mean in one warp (rows past 32 per lane included), its count, the backward dividing by
    that count on the device, and rows at ignore_index (negative ones too) counting nothing."""
    if label_dtype == np.uint8 and ignore_index < 0:
        label_dtype = np.int64                  # a uint8 label cannot be -100
    rng = np.random.default_rng(seed)
    logits = (3 * rng.standard_normal((N, K))).astype(dtype)
    labels = random_labels(seed, N, K)
    if ignored != "none":
        labels[rng.random(N) < 0.5 if ignored == "some" else slice(None)] = ignore_index
    labels = labels.astype(label_dtype)
    expected_loss, expected_count = R.cross_entropy_mean(logits, labels, label_smoothing, ignore_index)
    with kernels_on(where) as dev:
        loss, count = gpu_kernels.cross_entropy_mean(dev.put(logits), dev.put(labels),
                                                     label_smoothing, ignore_index)
        assert loss.shape == count.shape == () and loss.dtype == count.dtype == dtype
        assert dev.get(count) == expected_count == np.count_nonzero(labels != ignore_index)
        np.testing.assert_allclose(dev.get(loss), expected_loss, **tolerance(dtype))  # NaN if none
        losses = gpu_kernels.cross_entropy_forward(dev.put(logits), dev.put(labels), label_smoothing,
                                                   ignore_index)
        np.testing.assert_allclose(dev.get(losses), R.cross_entropy_forward(
            logits, labels, label_smoothing, ignore_index), **tolerance(dtype))
        scale = np.array(0.5, dtype)
        d = gpu_kernels.cross_entropy_backward(dev.put(logits), dev.put(labels),
                                               dev.put(scale) if scale_on_device else 0.5,
                                               label_smoothing, ignore_index, divisor=count)
        expected = R.cross_entropy_backward(logits, labels, scale, label_smoothing, ignore_index,
                                            divisor=expected_count)
        np.testing.assert_allclose(dev.get(d), expected, **tolerance(dtype))
        assert not dev.get(d)[labels == ignore_index].any()


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_honours_the_default_ignore_index_on_the_device(where, reduction):
    """F.cross_entropy with a -100 label (PyTorch's default ignore_index) on the device: that row is
    ignored, loss and gradient as on the CPU, not a NaN."""
    import ninpy.functional as F
    from ninpy import Tensor

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 4))
    labels = np.array([1, -100, 3, 0, -100])
    results = []
    for device in ("cpu", require_device(where)):
        z = Tensor(logits, device=device, requires_grad=True)
        loss = F.cross_entropy(z, backend.to_device(labels, device), reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        results.append([backend.to_device(a, "cpu") for a in (loss.data, z.grad)])
    (cpu_loss, cpu_grad), (device_loss, device_grad) = results
    assert np.isfinite(device_loss).all() and np.isfinite(device_grad).all()
    np.testing.assert_allclose(device_loss, cpu_loss, **tolerance(np.float64))
    np.testing.assert_allclose(device_grad, cpu_grad, **tolerance(np.float64))


# --- global average pooling -----------------------------------------------------------------------

@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(shape=st.sampled_from([(2, 3, 4, 5), (1, 1, 1, 1), (3, 10, 8, 8), (0, 2, 3, 3), (2, 0, 3, 3),
                              (33, 2, 1, 3)]),
       dtype=dtypes, seed=seeds, layout=layouts, channels_first=st.booleans())
def test_global_avg_pool_matches_reference(where, shape, dtype, seed, layout, channels_first):
    """Both layouts of x (channels first: NIN's last maps, read with no swap), logits (N, C) either way."""
    x = random_array(seed, shape, dtype)
    y_layout = "CNHW" if channels_first else "NCHW"
    rng = np.random.default_rng(seed)
    with kernels_on(where) as dev:
        y = gpu_kernels.global_avg_pool_forward(dev.put(x, layout), y_layout)
        expected = R.global_avg_pool_forward(x, y_layout)
        assert y.dtype == dtype and y.shape == expected.shape
        np.testing.assert_allclose(dev.get(y), expected, **tolerance(dtype))
        dy = rng.standard_normal(expected.shape).astype(dtype)
        dx = gpu_kernels.global_avg_pool_backward(dev.put(dy, layout), shape, y_layout)
        assert dx.dtype == dtype and dx.shape == shape
        np.testing.assert_array_equal(dev.get(dx), R.global_avg_pool_backward(dy, shape, y_layout))
        with pytest.raises(ValueError, match="expected"):
            wrong = np.zeros((dy.shape[0], dy.shape[1] + 1), dtype)
            gpu_kernels.global_avg_pool_backward(dev.put(wrong), shape, y_layout)


# --- elementwise ----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(N=st.integers(1, 3), C=st.integers(1, 5), spatial=st.sampled_from([(), (1,), (3, 4), (5, 1)]),
       dtype=dtypes, seed=seeds, layout=layouts)
def test_bias_and_relu_kernels_match_reference(where, N, C, spatial, dtype, seed, layout):
    rng = np.random.default_rng(seed)
    shape = (N, C) + spatial
    out = rng.standard_normal(shape).astype(dtype)
    out.flat[0] = np.nan                      # NaN stays NaN through bias + ReLU, and passes dy back
    bias = rng.standard_normal(C).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    with kernels_on(where) as dev:
        a = dev.put(out)
        assert gpu_kernels.bias_relu_(a, dev.put(bias)) is a  # in place, returns out
        np.testing.assert_allclose(dev.get(a), R.bias_relu_(out.copy(), bias), **tolerance(dtype))
        b = dev.put(out)
        assert gpu_kernels.add_bias_(b, dev.put(bias)) is b
        np.testing.assert_allclose(dev.get(b), R.add_bias_(out.copy(), bias), **tolerance(dtype))
        y = R.bias_relu_(out.copy(), bias)
        dx = gpu_kernels.relu_backward(dev.put(dy, layout), dev.put(y, layout))
        np.testing.assert_array_equal(dev.get(dx), R.relu_backward(dy, y))
        dx, db = gpu_kernels.relu_bias_backward(dev.put(dy, layout), dev.put(y, layout))
        expected_dx, expected_db = R.relu_bias_backward(dy, y)
        np.testing.assert_array_equal(dev.get(dx), expected_dx)
        np.testing.assert_allclose(dev.get(db), expected_db, **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 3, 20000), (3, 2, 7, 5), (2, 5, 1), (0, 4, 3), (1, 1, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_relu_bias_backward_matches_reference(where, shape, dtype):
    """One block per channel sums dx as it writes it: every block size (32 to 1024 threads, from
    the elements per channel), channels first as Conv2d passes them, NaN, and an empty batch
    (db = 0, as a sum over nothing). Twice the same bits: the sum's order is fixed."""
    rng = np.random.default_rng(5)
    y = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    y.flat[:3] = np.nan                                       # NaN passes dy on
    dy = rng.standard_normal(shape).astype(dtype)
    with kernels_on(where) as dev:
        dx, db = gpu_kernels.relu_bias_backward(dev.put(dy, "transposed"), dev.put(y))
        again = gpu_kernels.relu_bias_backward(dev.put(dy), dev.put(y, "strided"))
        expected_dx, expected_db = R.relu_bias_backward(dy, y)
        assert dx.dtype == db.dtype == dtype and db.shape == (shape[1],)
        np.testing.assert_array_equal(dev.get(dx), expected_dx)
        np.testing.assert_allclose(dev.get(db), expected_db, **tolerance(dtype))
        np.testing.assert_array_equal(dev.get(again[1]), dev.get(db))
        np.testing.assert_array_equal(dev.get(again[0]), dev.get(dx))


@pytest.mark.parametrize("where", BACKENDS)
def test_long_long_index_instantiations_agree(where, monkeypatch):
    """Sizes past 2**31 switch every kernel to 64-bit indices; force that path on small arrays."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    geometry = (3, 2, 2, 1, 1, 0)
    with kernels_on(where) as dev:
        results = []
        for limit in (gpu_kernels._INT32_MAX, 0):  # int indices, then long long
            monkeypatch.setattr(gpu_kernels, "_INT32_MAX", limit)
            col = gpu_kernels.im2col(dev.put(x), *geometry)
            dx = gpu_kernels.col2im(col, x.shape, *geometry)
            y, argmax = gpu_kernels.max_pool_forward(dev.put(x), 3, 3, 2, 2, 1, 1, 4, 3)
            mdx = gpu_kernels.max_pool_backward(y, argmax, x.shape, 3, 3, 2, 2, 1, 1)
            a = gpu_kernels.avg_pool_forward(dev.put(x), 3, 3, 2, 2, 1, 1, 4, 3)
            adx = gpu_kernels.avg_pool_backward(a, x.shape, 3, 3, 2, 2, 1, 1)
            out = gpu_kernels.bias_relu_(dev.put(x), dev.put(np.arange(3.0)))
            mask = gpu_kernels.dropout_apply(dev.put(x), 0.5, 3, 11)
            mdrop = gpu_kernels.max_pool_forward(dev.put(x), 3, 3, 2, 2, 1, 1, 4, 3,
                                                 dropout=(0.5, 3, 11))[0]
            adrop = gpu_kernels.avg_pool_backward(a, x.shape, 3, 3, 2, 2, 1, 1, dropout=(0.5, 3, 11))
            p, buf = dev.put(x), dev.put(np.zeros_like(x))
            gpu_kernels.sgd_update_(p, dev.put(x), buf, 0.1, 0.9, 1e-4, True)
            many, many_buf = dev.put(x), dev.put(np.zeros_like(x))
            gpu_kernels.sgd_update_many_([many], [dev.put(x)], [many_buf], [(0.1, 0.9, 1e-4, True)])
            g = gpu_kernels.global_avg_pool_forward(dev.put(x), "CNHW")
            gdx = gpu_kernels.global_avg_pool_backward(g, x.shape, "CNHW")
            results.append([dev.get(v) for v in (col, dx, y, argmax, mdx, a, adx, out, mask, mdrop,
                                                  adrop, p, buf, many, many_buf, g, gdx)])
        np.testing.assert_array_equal(dev.get(results[0][0]), R.im2col(x, *geometry))
        for int_result, long_result in zip(*results):
            np.testing.assert_array_equal(int_result, long_result)


# --- dropout --------------------------------------------------------------------------------------

def _dropout_mask(dev, shape, p, seed, offset, dtype):
    """The mask gpu_kernels.dropout_apply draws, as NumPy: dropout applied to ones."""
    return dev.get(gpu_kernels.dropout_apply(dev.put(np.ones(shape, dtype)), p, seed, offset))


def _splitmix_mask(n, p, seed, offset, dtype):
    """kernels/dropout_draw.cuh's mask written out in NumPy (uint64 arithmetic wraps, as in C)."""
    golden = np.uint64(0x9E3779B97F4A7C15)

    def mix64(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    counters = np.uint64(offset) + np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h = mix64(mix64(np.uint64(seed) + golden) + counters * golden)
    if dtype == np.float32:
        u = (h >> np.uint64(40)).astype(np.float32) * np.float32(1 / 16777216)
    else:
        u = (h >> np.uint64(11)).astype(np.float64) * (1 / 9007199254740992)
    return np.where(u >= dtype(p), dtype(0 if p == 1 else 1 / (1 - p)), dtype(0))


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_statistics_and_determinism(where, dtype):
    p, n = 0.3, 400_000
    with kernels_on(where) as dev:
        mask = _dropout_mask(dev, (n,), p, 1234, 10, dtype)
        assert mask.dtype == dtype
        assert set(np.unique(mask).tolist()) <= {0.0, float(dtype(1 / (1 - p)))}
        keep = mask != 0
        assert abs(keep.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
        assert abs(np.corrcoef(keep[:-1], keep[1:])[0, 1]) < 0.01  # neighbours independent
        assert abs(mask.mean() - 1) < 0.01  # E[mask] = 1: inverted dropout keeps the scale
        # same (seed, offset) -> the same mask; the shape does not matter, only the counter
        again = _dropout_mask(dev, (n // 4, 4), p, 1234, 10, dtype)
        np.testing.assert_array_equal(again.ravel(), mask)
        # counter-based: the draw for element i is that of counter offset + i
        shifted = _dropout_mask(dev, (1000,), p, 1234, 10 + 500, dtype)
        np.testing.assert_array_equal(shifted, mask[500:1500])
        # another offset or another seed -> another mask (agreement near p^2 + (1-p)^2 = 0.58)
        for other in (_dropout_mask(dev, (n,), p, 1234, 10 + n, dtype),
                      _dropout_mask(dev, (n,), p, 1235, 10, dtype)):
            agreement = ((other != 0) == keep).mean()
            assert abs(agreement - (p * p + (1 - p) ** 2)) < 0.01
        assert (_dropout_mask(dev, (100,), 0.0, 1, 0, dtype) == 1).all()
        assert (_dropout_mask(dev, (100,), 1.0, 1, 0, dtype) == 0).all()
        assert gpu_kernels.dropout_apply(dev.put(np.ones((0, 3), dtype)), p, 1, 0).shape == (0, 3)
        with pytest.raises(ValueError, match="must be in"):
            gpu_kernels.dropout_apply(dev.put(np.ones(3, dtype)), 1.5, 1, 0)


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_apply_is_x_times_the_documented_mask(where, dtype):
    """y = x * mask in one launch, the mask that of kernels/dropout_draw.cuh's formula (the stream
    seeded runs depend on: the same numbers the separate mask kernel drew before), NaN and
    infinities included (a dropped NaN stays NaN, as x * 0 in PyTorch); its gradient, the same
    function on dy, is dy * mask."""
    x = edge_values(3, (4, 5, 6), dtype)
    expected_mask = _splitmix_mask(x.size, 0.4, 77, 1000, dtype).reshape(x.shape)
    with kernels_on(where) as dev:
        y = dev.get(gpu_kernels.dropout_apply(dev.put(x, "transposed"), 0.4, 77, 1000))
        np.testing.assert_array_equal(_dropout_mask(dev, x.shape, 0.4, 77, 1000, dtype), expected_mask)
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(y, x * expected_mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_dropout_draws_its_mask_in_the_kernel_that_applies_it(dtype):
    """F.dropout on the GPU path: one launch forward (mask drawn and applied), one backward (the
    same mask drawn again from (seed, offset), none stored), the stream moving by the elements
    dropped over as before, the numbers x * mask, and a gradient that passes gradcheck (float64)."""
    import ninpy
    import ninpy.functional as F
    from ninpy import Tensor

    device = require_device("emulated")
    values = random_array(2, (3, 4, 5), dtype)
    x = Tensor(values, device=device, requires_grad=True)
    ninpy.manual_seed(7)
    emulator.launches.clear()
    y = F.dropout(x, 0.3)
    y.backward(backend.to_device(np.ones_like(values), device))
    kernel = f"dropout_kernel<{gpu_kernels._c_type(dtype)}, int>"
    assert emulator.launches == [kernel, kernel]
    assert ninpy.random.get_state()["gpu_offset"] == values.size     # next_gpu_stream(x.size), once
    mask = _splitmix_mask(values.size, 0.3, 7, 0, dtype).reshape(values.shape)
    np.testing.assert_array_equal(backend.to_device(y.data, "cpu"), values * mask)
    np.testing.assert_array_equal(backend.to_device(x.grad, "cpu"), mask)
    if dtype == np.float64:
        def drop(x):
            ninpy.manual_seed(7)  # the same mask on every evaluation
            return F.dropout(x, 0.3)
        assert ninpy.gradcheck(drop, [Tensor(values, device=device, requires_grad=True)])
    ninpy.manual_seed(7)
    assert not backend.to_device(F.dropout(x, 1.0).data, "cpu").any()
    assert ninpy.random.get_state()["gpu_offset"] == 0                # p = 1 draws nothing


# pool: (the pooling alone, the pooling with the dropout after it as one operator)
_POOL_THEN_DROPOUT = {
    "max": (lambda x: functional.max_pool2d(x, 3, 2, 1, ceil_mode=True),
            lambda x, p, training: functional.max_pool2d_dropout(x, 3, 2, 1, True, p=p,
                                                                 training=training)),
    "avg": (lambda x: functional.avg_pool2d(x, 3, 2, 1, True, False),
            lambda x, p, training: functional.avg_pool2d_dropout(x, 3, 2, 1, True, False, p=p,
                                                                 training=training)),
}

@pytest.mark.parametrize("where", ["cpu", *GPU_PATHS])
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pooling_and_dropout_as_one_operator_are_the_two_operators(where, pool, dtype):
    """F.max_pool2d_dropout and F.avg_pool2d_dropout give, for the same seed, the output, input
    gradient and random stream position of the pooling followed by F.dropout, bit for bit; on the
    GPU path in one launch each way (PoolDropout: no dropout launch of its own), with a gradient
    that passes gradcheck (float64). In evaluation, and with p = 0, the pooling alone."""
    import ninpy
    from ninpy import Tensor

    device = require_device(where) if where != "cpu" else "cpu"
    plain, fused = _POOL_THEN_DROPOUT[pool]
    values = random_array(4, (2, 3, 7, 6), dtype, distinct=True)
    grad = backend.to_device(random_array(5, (2, 3, 4, 4), dtype), device)
    runs = []
    for one_operator in (False, True):
        x = Tensor(values, device=device, requires_grad=True)
        ninpy.manual_seed(11)
        emulator.launches.clear()
        y = fused(x, 0.4, True) if one_operator else functional.dropout(plain(x), 0.4)
        y.backward(grad)
        runs.append((backend.to_device(y.data, "cpu"), backend.to_device(x.grad, "cpu"),
                     ninpy.random.get_state(), list(emulator.launches)))
    (y0, dx0, state0, _), (y1, dx1, state1, launches) = runs
    np.testing.assert_array_equal(y1, y0)
    np.testing.assert_array_equal(dx1, dx0)
    assert state1 == state0 and (y1 == 0).any() and (y1 != 0).any()
    if device != "cpu":
        c_type = gpu_kernels._c_type(dtype)
        assert launches == [f"{pool}_pool_forward_kernel<{c_type}, int>",
                            f"{pool}_pool_backward_kernel<{c_type}, int>"]
        if dtype == np.float64:
            def pool_then_drop(x):
                ninpy.manual_seed(11)  # the same mask on every evaluation
                return fused(x, 0.4, True)
            assert ninpy.gradcheck(pool_then_drop, [Tensor(values, device=device, requires_grad=True)])
    x = Tensor(values, device=device)
    for p, training in ((0.4, False), (0.0, True)):
        np.testing.assert_array_equal(backend.to_device(fused(x, p, training).data, "cpu"),
                                      backend.to_device(plain(x).data, "cpu"))


@pytest.mark.parametrize("where", ["cpu", *GPU_PATHS])
def test_nin_runs_each_pooling_and_its_dropout_as_one_operator(where):
    """models.NIN runs each pooling with the dropout after it as one operator: the same logits and
    parameter gradients, bit for bit, as its modules one by one in the working layout (NIN's
    forward before) from the same seed, and on the GPU path no dropout launch of its own. The
    modules, state_dict keys and train()/eval() are NIN's as before."""
    import ninpy
    import ninpy.functional as F
    from ninpy import Tensor, models, nn

    device = require_device(where) if where != "cpu" else "cpu"
    ninpy.random.manual_seed(0)
    model = models.nin(widths=((8, 6, 4), (8, 8, 8), (8, 8, None))).to(device)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["MLPConv", "MaxPool2d", "Dropout", "MLPConv", "AvgPool2d", "Dropout", "MLPConv"]
    assert list(model.state_dict()) == [f"features.{b}.{c}.{p}" for b in (0, 3, 6)
                                        for c in ("conv", "cccp1", "cccp2") for p in ("weight", "bias")]
    x, labels = _small_batch(np.float32, n=2)
    targets = backend.to_device(labels, device)

    def one_by_one(inputs):
        channels_first = F.swap_batch_and_channels(inputs)
        maps = F.swap_batch_and_channels(model.features._forward_working(channels_first))
        return model.gap(maps)

    runs = []
    for forward in (one_by_one, model):
        ninpy.random.manual_seed(3)
        model.zero_grad()
        emulator.launches.clear()
        logits = forward(Tensor(x, device=device))
        F.cross_entropy(logits, targets).backward()
        runs.append((backend.to_device(logits.data, "cpu"),
                     [backend.to_device(p.grad, "cpu") for p in model.parameters()],
                     list(emulator.launches)))
    (logits0, grads0, _), (logits1, grads1, launches) = runs
    np.testing.assert_array_equal(logits1, logits0)
    for g0, g1 in zip(grads0, grads1):
        np.testing.assert_array_equal(g1, g0)
    if device != "cpu":
        assert not [name for name in launches if name.startswith("dropout")], launches
    model.eval()
    ninpy.random.manual_seed(3)
    evaluated = backend.to_device(model(Tensor(x, device=device)).data, "cpu")
    assert ninpy.random.get_state()["gpu_offset"] == 0   # no dropout in evaluation: nothing drawn
    np.testing.assert_array_equal(evaluated,
                                  backend.to_device(one_by_one(Tensor(x, device=device)).data, "cpu"))
    assert all(not m.training for m in model.features if isinstance(m, nn.Dropout))


# --- the convolution's columns: kept on the GPU path, recomputed on the CPU -----------------------

@pytest.mark.parametrize("where", ["cpu", *GPU_PATHS])
def test_the_convolution_keeps_its_columns_on_the_gpu_path_and_lets_them_go(where, monkeypatch):
    """im2col runs once per convolution on the GPU path (its columns kept for backward: a launch
    fewer) and twice on the CPU (recomputed: memory); either way no column matrix outlives the
    graph, after backward or without one."""
    import ninpy.functional as F
    from ninpy import Tensor, cpu_kernels

    device = require_device(where) if where != "cpu" else "cpu"
    kernels = cpu_kernels if device == "cpu" else gpu_kernels
    columns = []
    im2col = kernels.im2col

    def recorded_im2col(*args, **kwargs):
        col = im2col(*args, **kwargs)
        columns.append(weakref.ref(col))
        return col

    monkeypatch.setattr(kernels, "im2col", recorded_im2col)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 6, 5)), device=device, requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), device=device, requires_grad=True)
    b = Tensor(rng.standard_normal(4), device=device, requires_grad=True)
    y = F.conv2d_relu(x, w, b, 1, 1)
    assert len(columns) == 1
    y.sum().backward()
    assert len(columns) == (2 if device == "cpu" else 1)
    gc.collect()
    assert all(ref() is None for ref in columns), "backward left a column matrix alive"
    y = F.conv2d_relu(x, w, b, 1, 1)       # a graph dropped without a backward
    del y
    gc.collect()
    assert all(ref() is None for ref in columns), "a dropped graph left a column matrix alive"


# --- SGD ------------------------------------------------------------------------------------------

def _torch_formula(param, grad, buf, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD (dampening 0) written out in NumPy, in the parameter's dtype."""
    t = param.dtype.type
    g = grad + t(weight_decay) * param
    buf = t(momentum) * buf + g
    step = g + t(momentum) * buf if nesterov else buf
    return param - t(lr) * step, buf


@pytest.mark.parametrize("where", BACKENDS)
@EXAMPLES
@given(size=st.integers(1, 3000), dtype=dtypes, lr=st.sampled_from([0.1, 0.01]),
       momentum=st.sampled_from([0.0, 0.9]), weight_decay=st.sampled_from([0.0, 1e-4, 5e-4]),
       nesterov=st.booleans(), seed=seeds)
def test_sgd_update_matches_torch_formula(where, size, dtype, lr, momentum, weight_decay, nesterov, seed):
    rng = np.random.default_rng(seed)
    param = rng.standard_normal(size).astype(dtype)
    buf = np.zeros_like(param)
    with kernels_on(where) as dev:
        p, b = dev.put(param), dev.put(buf)
        for _ in range(3):
            grad = rng.standard_normal(size).astype(dtype)
            assert gpu_kernels.sgd_update_(p, dev.put(grad), b, lr, momentum, weight_decay, nesterov) is p
            param, buf = _torch_formula(param, grad, buf, lr, momentum, weight_decay, nesterov)
        np.testing.assert_allclose(dev.get(p), param, **tolerance(dtype))
        np.testing.assert_allclose(dev.get(b), buf, **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_update_matches_the_reference_the_cpu_uses(where, nesterov):
    rng = np.random.default_rng(2)
    param = rng.standard_normal((3, 5))
    buf = np.zeros_like(param)
    with kernels_on(where) as dev:
        p, b = dev.put(param), dev.put(buf)
        for _ in range(3):
            grad = rng.standard_normal((3, 5))
            gpu_kernels.sgd_update_(p, dev.put(grad, "transposed"), b, 0.1, 0.9, 1e-4, nesterov)
            R.sgd_update_(param, grad, buf, 0.1, 0.9, 1e-4, nesterov)
        np.testing.assert_allclose(dev.get(p), param, **tolerance(np.float64))
        np.testing.assert_allclose(dev.get(b), buf, **tolerance(np.float64))


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum, weight_decay, nesterov", [(0.9, 1e-4, False), (0.9, 5e-4, True),
                                                              (0.0, 0.0, False)])
def test_sgd_update_matches_torch_itself(where, dtype, momentum, weight_decay, nesterov):
    """sgd.cu against torch.optim.SGD itself (not a copy of its formula): parameters and momentum
    buffers after three steps."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    param = rng.standard_normal((4, 5)).astype(dtype)
    grads = [rng.standard_normal((4, 5)).astype(dtype) for _ in range(3)]
    weight = torch.nn.Parameter(torch.tensor(param))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=momentum, weight_decay=weight_decay,
                                nesterov=nesterov)
    with kernels_on(where) as dev:
        p, b = dev.put(param), dev.put(np.zeros_like(param))
        for grad in grads:
            weight.grad = torch.tensor(grad)
            optimizer.step()
            gpu_kernels.sgd_update_(p, dev.put(grad), b, 0.1, momentum, weight_decay, nesterov)
        # float32: the kernel and torch may round a multiply-add once (FMA) or twice
        rounding = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(dev.get(p), weight.detach().numpy(), **rounding)
        if momentum:
            np.testing.assert_allclose(dev.get(b), optimizer.state[weight]["momentum_buffer"].numpy(),
                                       **rounding)


def _param_groups_like_nin(rng, dtype):
    """Tensors of NIN-like shapes (an empty one too) in groups with their own lr, decay and momentum."""
    shapes = [(6, 3, 5, 5), (6,), (0,), (4, 6, 1, 1), (4,), (3, 4, 1, 1), (3,)]
    settings = [(0.1, 0.9, 1e-4, False), (0.2, 0.9, 0.0, False), (0.1, 0.9, 1e-4, False),
                (0.01, 0.9, 1e-4, True), (0.02, 0.5, 0.0, True), (0.01, 0.0, 5e-4, False),
                (0.3, 0.0, 0.0, False)]
    return [rng.standard_normal(s).astype(dtype) for s in shapes], settings


@pytest.mark.parametrize("where", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_update_many_matches_the_reference_tensor_by_tensor(where, dtype):
    """One launch for every tensor gives each tensor's own update, with its own settings."""
    rng = np.random.default_rng(3)
    params, settings = _param_groups_like_nin(rng, dtype)
    bufs = [np.zeros_like(p) for p in params]
    with kernels_on(where) as dev:
        on_device = [dev.put(p) for p in params]
        device_bufs = [dev.put(b) for b in bufs]
        for step in range(3):
            grads = [rng.standard_normal(p.shape).astype(dtype) for p in params]
            layout = "transposed" if step == 1 else "c_order"
            assert gpu_kernels.sgd_update_many_(on_device, [dev.put(g, layout) for g in grads],
                                                device_bufs, settings) is on_device
            R.sgd_update_many_(params, grads, bufs, settings)
        for got, got_buf, want, want_buf in zip(on_device, device_bufs, params, bufs):
            np.testing.assert_allclose(dev.get(got), want, **tolerance(dtype))
            np.testing.assert_allclose(dev.get(got_buf), want_buf, **tolerance(dtype))


@pytest.mark.parametrize("where", BACKENDS)
def test_sgd_update_many_takes_more_tensors_than_one_launch_holds(where):
    """Past gpu_kernels._SGD_TENSORS tensors the update goes on in a second launch."""
    rng = np.random.default_rng(6)
    count = gpu_kernels._SGD_TENSORS + 8
    params = [rng.standard_normal(int(rng.integers(1, 9))) for _ in range(count)]
    grads = [rng.standard_normal(p.shape) for p in params]
    settings = [(0.01 * (t + 1), 0.9, 1e-4 * t, t % 2 == 0) for t in range(count)]
    with kernels_on(where) as dev:
        on_device = [dev.put(p) for p in params]
        bufs = [dev.put(np.ones_like(p)) for p in params]
        gpu_kernels.sgd_update_many_(on_device, [dev.put(g) for g in grads], bufs, settings)
        R.sgd_update_many_(params, grads, [np.ones_like(p) for p in params], settings)
        for got, want in zip(on_device, params):
            np.testing.assert_allclose(dev.get(got), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", BACKENDS)
def test_sgd_update_many_matches_torch_optim_sgd(where):
    """Against torch.optim.SGD itself, one parameter group per setting (skipped without torch)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    params, settings = _param_groups_like_nin(rng, np.float64)
    weights = [torch.nn.Parameter(torch.tensor(p)) for p in params]
    optimizer = torch.optim.SGD([{"params": [w], "lr": lr, "momentum": m, "weight_decay": wd,
                                  "nesterov": nesterov}
                                 for w, (lr, m, wd, nesterov) in zip(weights, settings)], lr=0.1)
    with kernels_on(where) as dev:
        on_device = [dev.put(p) for p in params]
        bufs = [dev.put(np.zeros_like(p)) for p in params]
        for _ in range(3):
            grads = [rng.standard_normal(p.shape) for p in params]
            for w, g in zip(weights, grads):
                w.grad = torch.tensor(g)
            optimizer.step()
            gpu_kernels.sgd_update_many_(on_device, [dev.put(g) for g in grads], bufs, settings)
        for got, w in zip(on_device, weights):
            np.testing.assert_allclose(dev.get(got), w.detach().numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", BACKENDS)
def test_sgd_update_many_rejects_mixed_or_mismatched_arrays(where):
    with kernels_on(where) as dev:
        p32, p64 = dev.put(np.zeros(3, np.float32)), dev.put(np.zeros(3, np.float64))
        with pytest.raises(TypeError, match="one dtype"):
            gpu_kernels.sgd_update_many_([p32, p64], [p32, p64], [p32.copy(), p64.copy()],
                                         [(0.1, 0, 0, False)] * 2)
        with pytest.raises(ValueError, match="one of each per tensor"):
            gpu_kernels.sgd_update_many_([p32], [p32, p32], [p32], [(0.1, 0, 0, False)])
        with pytest.raises(ValueError, match="must have one shape"):
            gpu_kernels.sgd_update_many_([p32], [dev.put(np.zeros(4, np.float32))], [p32.copy()],
                                         [(0.1, 0, 0, False)])


@pytest.mark.parametrize("where", BACKENDS)
def test_kernels_reject_wrong_dtypes_clearly(where):
    with kernels_on(where) as dev:
        with pytest.raises(TypeError, match="float32 or float64"):
            gpu_kernels.im2col(dev.put(np.zeros((1, 1, 3, 3), np.int32)), 1, 1, 1, 1, 0, 0)
        with pytest.raises(TypeError, match="labels must be int32 or int64"):
            gpu_kernels.cross_entropy_forward(dev.put(np.zeros((2, 3), np.float32)),
                                              dev.put(np.zeros(2, np.float32)))
        with pytest.raises(ValueError, match="C-contiguous"):
            gpu_kernels.bias_relu_(dev.put(np.zeros((2, 3, 4), np.float32)).transpose(0, 2, 1)[:, :3],
                                   dev.put(np.zeros(3, np.float32)))


# --- streams and host synchronisation -------------------------------------------------------------

def _kernel_inputs(device):
    """Small device arrays for _every_kernel_once, made before any no-synchronisation check."""
    xp = backend.module_of_device(device)
    x = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32))
    return dict(x=x, labels=xp.arange(6, dtype=np.int64), scale=xp.asarray(np.float32(1 / 6)),
                bias=xp.ones(3, np.float32), device=device)


def _every_kernel_once(inputs):
    """Call every gpu_kernels function once; return the results (device arrays)."""
    x, labels = inputs["x"], inputs["labels"]
    col = gpu_kernels.im2col(x, 3, 3, 1, 1, 1, 1)
    results = [col, gpu_kernels.col2im(col, x.shape, 3, 3, 1, 1, 1, 1)]
    y, argmax = gpu_kernels.max_pool_forward(x, 3, 3, 2, 2, 0, 0, 4, 4)
    results += [y, argmax, gpu_kernels.max_pool_backward(y, argmax, x.shape, 3, 3, 2, 2, 0, 0)]
    a = gpu_kernels.avg_pool_forward(x, 3, 3, 2, 2, 0, 0, 4, 4)
    results += [a, gpu_kernels.avg_pool_backward(a, x.shape, 3, 3, 2, 2, 0, 0)]
    logits = x.reshape(6, 64)
    loss, count = gpu_kernels.cross_entropy_mean(logits, labels)
    results += [gpu_kernels.cross_entropy_forward(logits, labels),
                gpu_kernels.cross_entropy_backward(logits, labels, 1 / 6),
                gpu_kernels.cross_entropy_backward(logits, labels, inputs["scale"]),
                loss, count, gpu_kernels.cross_entropy_backward(logits, labels, inputs["scale"],
                                                                divisor=count)]
    pooled = gpu_kernels.global_avg_pool_forward(x, "CNHW")
    results += [pooled, gpu_kernels.global_avg_pool_backward(pooled, x.shape, "CNHW")]
    results += [gpu_kernels.bias_relu_(x.copy(), inputs["bias"]),
                gpu_kernels.add_bias_(x.copy(), inputs["bias"]),
                gpu_kernels.relu_backward(x, x),
                *gpu_kernels.relu_bias_backward(x, x),
                gpu_kernels.dropout_apply(x, 0.5, 1, 2),
                gpu_kernels.max_pool_forward(x, 3, 3, 2, 2, 0, 0, 4, 4, dropout=(0.5, 1, 2))[0],
                gpu_kernels.max_pool_backward(y, argmax, x.shape, 3, 3, 2, 2, 0, 0, dropout=(0.5, 1, 2)),
                gpu_kernels.avg_pool_forward(x, 3, 3, 2, 2, 0, 0, 4, 4, dropout=(0.5, 1, 2)),
                gpu_kernels.avg_pool_backward(a, x.shape, 3, 3, 2, 2, 0, 0, dropout=(0.5, 1, 2))]
    p, buf = x.copy(), x * 0
    results += [gpu_kernels.sgd_update_(p, x, buf, 0.1, 0.9, 1e-4, False), buf]
    many, many_buf = x.copy(), x * 0
    results += [gpu_kernels.sgd_update_many_([many], [x], [many_buf], [(0.1, 0.9, 1e-4, True)])[0],
                many_buf]
    return results


@pytest.mark.gpu
def test_kernels_launch_on_the_current_stream():
    cupy = backend.require_gpu()
    inputs = _kernel_inputs("gpu")
    expected = [cupy.asnumpy(r) for r in _every_kernel_once(inputs)]
    stream = cupy.cuda.Stream(non_blocking=True)  # does not wait for the default stream, nor it for us
    with stream:
        results = _every_kernel_once(inputs)
    stream.synchronize()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(cupy.asnumpy(got), want)


# A kernel that keeps the GPU busy for a given number of nanoseconds (%globaltimer: sm_70 and later).
_SPIN = r"""
extern "C" __global__ void spin(unsigned long long nanoseconds) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < nanoseconds);
}
"""
_SPIN_SECONDS = 3.0  # far more than a small step takes to launch, so only a wait can outlast it


def _training_step(device):
    """(run, warm up): run() makes one training step of Trainer._step on a small NIN, without
    reading its loss; the model, batch and optimizer are made (and the kernels compiled) first."""
    import ninpy
    from ninpy import models, optim, training

    ninpy.random.manual_seed(0)
    model = models.nin(dtype=np.float32).to(device).train()  # dropout on: its kernel too
    x, labels = _small_batch(np.float32, n=2)
    xb, yb = backend.to_device(x, device), backend.to_device(labels, device)
    trainer = types.SimpleNamespace(model=model, warmup=types.SimpleNamespace(warmup_steps=-1),
                                    config=training.Config.for_dataset("cifar10"),  # its recipe
                                    optimizer=optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    tally = training._EpochTally.start(backend.module_of_device(device), {}, 0)
    return lambda: training.Trainer._step(trainer, 0, [0.01], xb, yb, tally)


def _step_synchronises(device):
    """True when a training step reads a device value on the host (a sync: the GPU drains)."""
    step = _training_step(device)
    if device == "emulated":
        step()  # compile every kernel first
        try:
            with emulator.forbid_synchronize():
                step()
        except emulator.DeviceSynchronized:
            return True
        return False
    cupy = backend.require_gpu()
    spin = cupy.RawKernel(_SPIN, "spin")
    stream = cupy.cuda.Stream()  # a blocking stream: work on the default stream waits for it too
    with stream:
        step()  # compile every kernel, and fill the memory pool for this stream, first
        spin((1,), (1,), (np.uint64(0),))
        stream.synchronize()
        spin((1,), (1,), (np.uint64(_SPIN_SECONDS * 1e9),))
        spun = cupy.cuda.Event()
        spun.record()  # done once the spin is: a step that waits for the GPU sees it done
        step()
        synchronised = spun.done
    stream.synchronize()
    return synchronised


@pytest.mark.parametrize("device", GPU_PATHS)
def test_a_training_step_never_waits_for_the_gpu(device):
    require_device(device)
    assert not _step_synchronises(device), "a training step reads a device value on the host"


@pytest.mark.parametrize("device", GPU_PATHS)
def test_the_synchronisation_check_sees_a_planted_read(device, monkeypatch):
    """The check above can fail: a `.get()` planted in the optimizer's step is seen."""
    from ninpy import optim

    require_device(device)
    honest = optim.SGD.step

    def step_with_a_read(self):
        self.param_groups[0]["params"][0].data.get()
        return honest(self)

    monkeypatch.setattr(optim.SGD, "step", step_with_a_read)
    assert _step_synchronises(device)


# --- a whole NIN training step, GPU vs CPU, and determinism ----------------------------------------

def _nin_step(model, x, labels, device, steps=2):
    """`steps` SGD steps on one batch; returns (losses, {name: NumPy array} after the steps)."""
    import ninpy.functional as F
    from ninpy import Tensor, optim

    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    inputs = Tensor(x, device=device)
    targets = backend.to_device(labels, device)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    return losses, {name: backend.to_device(value, "cpu") for name, value in model.state_dict().items()}


def _small_batch(dtype, n=4):
    rng = np.random.default_rng(7)
    return rng.standard_normal((n, 3, 32, 32)).astype(dtype), rng.integers(0, 10, n).astype(np.int64)


@pytest.mark.parametrize("where", GPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nin_training_steps_match_the_cpu(where, dtype):
    """Forward, backward and three SGD steps of the CIFAR-10 NIN (its own code: models.nin, full
    widths) on the GPU path and on the CPU, from the same weights on the same batch.

    "emulated" runs ninpy's whole GPU code path (functional.py's GPU branches, every gpu_kernels
    launch) on the CPU: it checks the plumbing, not the GPU's arithmetic. Kept small for CI: two
    32x32 images (four on a GPU) and eval mode (dropout off: the devices draw different masks, each
    checked on its own by the dropout tests).
    """
    import ninpy
    from ninpy import models

    device = require_device(where)
    x, labels = _small_batch(dtype, n=4 if where == "gpu" else 2)
    ninpy.random.manual_seed(0)
    cpu_model = models.nin(dtype=dtype).eval()
    initial = cpu_model.state_dict()
    cpu_losses, cpu_weights = _nin_step(cpu_model, x, labels, "cpu", steps=3)
    gpu_model = models.nin(dtype=dtype).eval()
    gpu_model.load_state_dict(initial)
    gpu_model.to(device)
    assert all(backend.device_of(p.data) == device for p in gpu_model.parameters())
    gpu_losses, gpu_weights = _nin_step(gpu_model, x, labels, device, steps=3)
    if dtype == np.float64:  # to rounding: sums in another order
        rtol, atol = 1e-9, 1e-11
    elif tf32():  # TF32 products (GPU, or emulated) keep 10 mantissa bits: ~5e-4 per input;
        # emulated, three steps moved a weight up to 5.1e-4 away from the CPU's
        rtol, atol = 2e-2, 2e-3
    else:  # float32 sums in another order (cuBLAS, or NumPy's BLAS on other shapes)
        rtol, atol = 1e-3, 1e-5
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=rtol, atol=atol)
    assert cpu_weights.keys() == gpu_weights.keys()
    for name in cpu_weights:
        np.testing.assert_allclose(gpu_weights[name], cpu_weights[name], rtol=rtol, atol=atol,
                                   err_msg=f"parameter {name} after three SGD steps")


@pytest.mark.parametrize("where", GPU_PATHS)
def test_nin_training_step_is_deterministic_on_the_gpu_path(where):
    """Same state, same seed -> bit-identical weights (dropout on: the mask is counter-based)."""
    import ninpy
    from ninpy import models

    device = require_device(where)
    ninpy.random.manual_seed(0)
    state = models.nin().state_dict()
    x, labels = _small_batch(np.float32, n=8 if where == "gpu" else 2)
    runs = []
    for _ in range(2):
        ninpy.random.manual_seed(123)
        model = models.nin().train()
        model.load_state_dict(state)
        model.to(device)
        runs.append(_nin_step(model, x, labels, device, steps=3 if where == "gpu" else 2))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b
    for name in weights_a:
        np.testing.assert_array_equal(weights_a[name], weights_b[name], err_msg=name)


@pytest.mark.parametrize("where", ["cpu", *GPU_PATHS])
def test_nin_parameter_gradients_are_arrays_of_their_own(where):
    """A NIN backward leaves each parameter the gradient its backward made, without a copy (on the
    GPU a copy is a launch per parameter per step), yet an in-place edit of one gradient changes no
    other."""
    import ninpy
    import ninpy.functional as F
    from ninpy import Tensor, models

    device = require_device(where) if where != "cpu" else "cpu"
    ninpy.random.manual_seed(0)
    model = models.nin(widths=((8, 6, 4), (8, 8, 8), (8, 8, None))).eval().to(device)
    x, labels = _small_batch(np.float32, n=2)
    F.cross_entropy(model(Tensor(x, device=device)), backend.to_device(labels, device)).backward()
    grads = [p.grad for p in model.parameters()]
    for i, grad in enumerate(grads):
        before = [backend.to_device(g, "cpu").copy() for g in grads]
        grad += 1
        for j, other in enumerate(grads):
            expected = before[j] + 1 if j == i else before[j]
            np.testing.assert_array_equal(backend.to_device(other, "cpu"), expected,
                                          err_msg=f"editing gradient {i} changed gradient {j}")


# --- every operator through ninpy's GPU path: any layout, and an empty batch ----------------------

def _run_operator(op, values, grad, device, x_layout="c_order", grad_layout="c_order"):
    """(output, input gradient) of op on `device` as NumPy arrays, with x and the upstream gradient
    stored in the given layouts."""
    import test_functional
    from ninpy import Tensor

    xp = backend.module_of_device(device)
    x = Tensor(in_layout(backend.to_device(values, device), x_layout, xp), requires_grad=True)
    # the operators' weights and biases on the device too, as a model's are: CuPy refuses a host
    # array in a product, and so does the emulator
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(test_functional, "Tensor", lambda data, **kwargs: Tensor(data, device=device, **kwargs))
        y = op(x)
    assert backend.device_of(y.data) == device
    y.backward(in_layout(backend.to_device(grad, device), grad_layout, xp) if y.ndim else None)
    return backend.to_device(y.data, "cpu"), backend.to_device(x.grad, "cpu")


@pytest.mark.parametrize("where", GPU_PATHS)
@pytest.mark.parametrize("name", [name for name, _, _ in __import__("test_functional").OPERATORS])
def test_operators_on_the_gpu_take_any_layout_and_an_empty_batch(where, name):
    """The functional operators on the GPU path give the CPU's numbers (dropout draws from its own GPU
    stream, so it is held to itself) whatever the strides of x and of the upstream gradient, and
    take a batch of 0 images."""
    from ninpy import Tensor
    from test_functional import OPERATORS

    _, shape, op = next(o for o in OPERATORS if o[0] == name)
    values = random_array(3, shape, np.float64, distinct=True)
    y_shape = op(Tensor(values)).shape
    grad = random_array(4, y_shape, np.float64)
    on_cpu = _run_operator(op, values, grad, "cpu")
    device = require_device(where)
    on_gpu = _run_operator(op, values, grad, device)
    for x_layout, grad_layout in (("transposed", "channels_last"), ("channels_last", "strided"),
                                  ("strided", "transposed")):
        strided = _run_operator(op, values, grad, device, x_layout, grad_layout)
        for got, want in zip(strided, on_gpu):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)
    if name != "dropout":
        for got, want in zip(on_gpu, on_cpu):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11)
    empty = np.zeros((0,) + shape[1:])
    y, dx = _run_operator(op, empty, np.zeros((0,) + y_shape[1:]), device)
    assert dx.shape == empty.shape and (y.shape[0] == 0 if y.ndim else np.isnan(y))


# --- the emulator's own contract: what a GPU would refuse, it refuses -----------------------------

def test_the_emulator_picks_its_launcher_from_code_not_comments():
    commented = "// one warp: no __syncthreads, no __shfl_xor_sync here\n/* __syncthreads */ int x;"
    assert not emulator.calls(commented, "__syncthreads") and not emulator.calls(commented, "__shfl")
    assert emulator.calls("x = 1; // note\n__syncthreads();", "__syncthreads")
    assert emulator.calls("v += __shfl_xor_sync(~0u, v, 1); /* sum */", "__shfl")


def test_the_emulator_behaves_like_cupy_where_a_gpu_would_differ_from_numpy(monkeypatch):
    require_device("emulated")
    cupy = backend.require_emulator()
    a = cupy.asarray(np.arange(6.0).reshape(2, 3))
    assert backend.device_of(a) == "emulated" and backend.device_of(a.sum()) == "emulated"  # 0-d
    assert backend.device_of(a[0, 0]) == "emulated"  # an element is a 0-d device array, as in CuPy
    with pytest.raises(TypeError, match="NumPy \\(host\\) array"):
        a + np.ones(3)  # CuPy refuses a host array in a device operation
    with pytest.raises(TypeError, match="NumPy \\(host\\) array"):
        cupy.matmul(np.ones((2, 2)), a)
    assert cupy.asarray(a) is a and cupy.asarray(np.ones(2)).get().tolist() == [1.0, 1.0]
    with emulator.forbid_synchronize():
        b = a * 2  # device work: fine
        for read in (b.get, b[0, 1].item, lambda: float(b[0, 1]), lambda: bool(b[0, 0])):
            with pytest.raises(emulator.DeviceSynchronized):
                read()
    kernel = cupy.RawModule(code="", name_expressions=["sgd_update_kernel<double, int>"]
                            ).get_function("sgd_update_kernel<double, int>")
    with pytest.raises(TypeError, match="argument 3 must be a numpy int32 scalar"):
        kernel((1,), (32,), (a, a, a, 6, np.float64(0.1), np.float64(0), np.float64(0), np.int32(0)))


def test_the_emulator_rounds_float32_products_to_tf32_under_cupy_tf32(monkeypatch):
    require_device("emulated")
    cupy = backend.require_emulator()
    assert emulator.round_to_tf32(np.float32([1 + 2 ** -11, 1 + 3 * 2 ** -11, 3.14159265, np.inf])
                                  ).tolist() == [1.0, 1 + 2 ** -9, 3.140625, np.inf]  # ties to even
    rng = np.random.default_rng(0)
    x, w = (rng.standard_normal(s).astype(np.float32) for s in ((4, 64), (64, 3)))
    rounded = emulator.round_to_tf32(x) @ emulator.round_to_tf32(w)
    for tf32_env, expected in (("0", x @ w), ("1", rounded)):
        monkeypatch.setenv("CUPY_TF32", tf32_env)
        got = (cupy.asarray(x) @ cupy.asarray(w)).get()
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(rounded, x @ w)
    doubles = rng.standard_normal((3, 3))
    np.testing.assert_array_equal((cupy.asarray(doubles) @ cupy.asarray(doubles)).get(),
                                  doubles @ doubles)  # float64 is never rounded


# --- AddressSanitizer: an out-of-bounds access in a kernel stops the emulator -----------------------

_PLANTED = """
import sys
from pathlib import Path
import numpy as np
from ninpy import emulator, gpu_kernels

path = Path(sys.argv[1])
names = gpu_kernels._name_expressions("sgd.cu")
cupy = emulator.load([(path, path.read_text(), names)])
kernel = cupy.RawModule(code="", name_expressions=names).get_function("sgd_update_kernel<float, int>")
param, grad, buf = (cupy.asarray(np.ones(3, np.float32)) for _ in range(3))
kernel((1,), (32,), (param, grad, buf, np.int32(3), np.float32(0.1), np.float32(0.9), np.float32(0),
                     np.int32(0)))
print("no error seen")
"""


def test_address_sanitizer_stops_an_out_of_bounds_write_in_a_kernel(tmp_path):
    """NINPY_EMULATOR_SANITIZE=address builds the kernels with AddressSanitizer: sgd.cu with a
    planted write one past the end of `buf` stops with a report naming the .cu line."""
    import subprocess
    import sys
    from pathlib import Path

    require_device("emulated")
    libasan = subprocess.run([emulator.compiler(), "-print-file-name=libasan.so"],
                             capture_output=True, text=True).stdout.strip()
    if not Path(libasan).is_file():
        if IN_CI:
            pytest.fail("g++ has no libasan.so here: install libasan (it comes with Debian's g++)")
        pytest.skip("this g++ has no AddressSanitizer runtime (libasan.so)")
    planted = tmp_path / "sgd.cu"
    source = (gpu_kernels.KERNEL_DIR / "sgd.cu").read_text()
    assert source.count("buf[e] = b;") == 1
    planted.write_text(source.replace("buf[e] = b;", "buf[e + 1] = b;"))
    env = {**os.environ, "NINPY_EMULATOR_SANITIZE": "address", "LD_PRELOAD": libasan,
           "ASAN_OPTIONS": "detect_leaks=0"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _PLANTED, str(planted)], capture_output=True,
                            text=True, env=env, cwd=root, timeout=300)
    assert result.returncode != 0 and "no error seen" not in result.stdout, result.stdout
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr, result.stderr[-2000:]
    assert f"{planted}:" in result.stderr  # the report names the kernel's file and line
    # and the unplanted kernel runs clean under the sanitizer
    clean = subprocess.run([sys.executable, "-c", _PLANTED, str(gpu_kernels.KERNEL_DIR / "sgd.cu")],
                           capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert clean.returncode == 0 and "no error seen" in clean.stdout, clean.stderr[-2000:]


# --- conftest.py's rules for the GPU path's tests ------------------------------------------------

class _Item:
    """A collected test as conftest's hook sees it: keywords (folder names included) and markers."""

    def __init__(self, keywords, markers):
        self.keywords, self.markers, self.added = keywords, markers, []

    def get_closest_marker(self, name):
        return name if name in self.markers else None

    def add_marker(self, marker):
        self.added.append(marker)


def test_only_the_gpu_marker_skips_a_test_without_a_gpu(monkeypatch):
    """A checkout in a folder called `gpu` puts "gpu" among every test's keywords; only the marker
    may decide."""
    import conftest

    monkeypatch.setattr(conftest, "GPU_PROBLEM", "no GPU here")
    in_a_gpu_folder = _Item({"gpu": 1, "test_x": 1}, markers=())
    marked = _Item({"test_y": 1}, markers=("gpu",))
    conftest.pytest_collection_modifyitems(None, [in_a_gpu_folder, marked])
    assert in_a_gpu_folder.added == [] and len(marked.added) == 1


@pytest.mark.parametrize("in_ci", [True, False])
def test_an_emulator_that_cannot_run_fails_in_ci_and_skips_elsewhere(monkeypatch, in_ci):
    import conftest

    monkeypatch.setattr(backend, "_emulated", None)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    monkeypatch.setattr(conftest, "IN_CI", in_ci)
    outcome = pytest.fail.Exception if in_ci else pytest.skip.Exception
    with pytest.raises(outcome, match="no-such-c\\+\\+-compiler is not on PATH"):
        conftest.require_device("emulated")


def test_a_cupy_call_the_emulator_lacks_is_an_error_not_a_skip():
    """EmulatorLacks is raised, never turned into a skip: a CuPy-only API in ninpy's GPU path fails
    the emulated tests (in CI the emulator is the only evidence about that path)."""
    require_device("emulated")
    with pytest.raises(emulator.EmulatorLacks, match="cupy.cuda_only_function"):
        backend.require_emulator().cuda_only_function


GPU_POOLING_CALLS = [case for case in INCONSISTENT_CALLS
                     if "pool" in case and "argmax past" not in case and "negative argmax" not in case]


@pytest.mark.parametrize("case", GPU_POOLING_CALLS)
def test_a_pooling_launcher_refuses_arrays_that_do_not_fit(case):
    """The CUDA pooling launchers check what the Numba wrappers check, before any launch (an argmax
    outside its plane needs no check there: the backward gathers, and such an argmax matches no
    element)."""
    call, message = INCONSISTENT_CALLS[case]
    with pytest.raises((ValueError, RuntimeError), match=message) as caught:
        call(gpu_kernels)
    assert "\n" not in str(caught.value)
