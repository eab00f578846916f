"""Every Numba kernel in ninpy.cpu_kernels against the NumPy reference, in float32 and float64, with
inputs in every memory layout (tests/strategies.py, `layouts`).

Exact where the computation is a copy or a comparison (im2col, max pooling values and argmax); close
where sums may be taken in another order or precision (col2im, pooling backward, average pooling).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ninpy import cpu_kernels as K
from ninpy import reference as R
from strategies import (conv_geometries, dtypes, in_layout, layouts, make_geometry, pool_geometries,
                        random_array, random_labels, seeds)
from test_reference import edge_values

# Fixed cases on top of the drawn ones: batch 1 and channel 1, odd sizes, overlapping windows
# (stride < kernel), gaps (stride > kernel), NIN's 3x3 stride-2 ceil-mode pool whose last window
# hangs past the edge, windows that do not tile the input, and NIN-sized planes.
POOL_EXAMPLES = [make_geometry(1, 1, 7, 7, 3, 2, 0, True), make_geometry(1, 1, 1, 1, 1, 1, 0, False),
                 make_geometry(2, 3, 9, 5, 3, 2, 1, True), make_geometry(1, 2, 8, 7, (2, 4), (3, 1), (1, 2), True),
                 make_geometry(1, 1, 5, 5, 2, 3, 0, False), make_geometry(2, 4, 32, 32, 3, 2, 0, True),
                 make_geometry(2, 4, 16, 16, 3, 2, 0, True)]
CONV_EXAMPLES = [make_geometry(1, 1, 5, 5, 5, 1, 2), make_geometry(2, 3, 32, 32, 5, 1, 2),
                 make_geometry(1, 2, 7, 9, 3, 2, 1), make_geometry(3, 1, 4, 9, (1, 4), (3, 2), (0, 2)),
                 make_geometry(1, 1, 1, 1, 1, 1, 0)]


def with_examples(examples):
    def decorate(test):
        for g in examples:
            for dtype in (np.float32, np.float64):
                test = example(g=g, dtype=dtype, seed=1, layout="c_order")(test)
        return test
    return decorate


def close(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.flags.c_contiguous
    tol = dict(rtol=1e-5, atol=1e-6) if actual.dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(actual, expected, **tol)


def same(actual, expected):
    assert actual.dtype == expected.dtype and actual.flags.c_contiguous
    np.testing.assert_array_equal(actual, expected)


@settings(max_examples=30)
@with_examples(CONV_EXAMPLES)
@given(g=conv_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_im2col_and_col2im(g, dtype, seed, layout):
    x = random_array(seed, g.x_shape, dtype)
    same(K.im2col(in_layout(x, layout), *g.window), R.im2col(x, *g.window))
    col = random_array(seed + 1, (g.c * g.kh * g.kw, g.n * g.oh * g.ow), dtype)
    close(K.col2im(in_layout(col, layout), g.x_shape, *g.window), R.col2im(col, g.x_shape, *g.window))
    # the channels-first layout (C, N, H, W) that functional.Conv2d uses: the same col
    channels_first = np.ascontiguousarray(x.transpose(1, 0, 2, 3))
    same(K.im2col(in_layout(channels_first, layout), *g.window, layout="CNHW"), R.im2col(x, *g.window))
    swapped = (g.c, g.n) + g.x_shape[2:]
    dx = K.col2im(col, swapped, *g.window, layout="CNHW")
    close(dx, np.ascontiguousarray(R.col2im(col, g.x_shape, *g.window).transpose(1, 0, 2, 3)))
    close(R.col2im(col, swapped, *g.window, layout="CNHW"), dx)
    same(R.im2col(channels_first, *g.window, layout="CNHW"), R.im2col(x, *g.window))


@settings(max_examples=30)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_max_pool(g, dtype, seed, layout):
    x = random_array(seed, g.x_shape, dtype, distinct=True)
    y, argmax = K.max_pool_forward(in_layout(x, layout), *g.window, g.oh, g.ow)
    expected_y, expected_argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    same(y, expected_y)
    same(argmax, expected_argmax)
    dy = random_array(seed + 1, g.y_shape, dtype)
    close(K.max_pool_backward(in_layout(dy, layout), in_layout(argmax, layout), g.x_shape, *g.window),
          R.max_pool_backward(dy, argmax, g.x_shape, *g.window))


@settings(max_examples=15)
@with_examples(POOL_EXAMPLES[:3])
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_max_pool_with_ties(g, dtype, seed, layout):
    x = np.round(random_array(seed, g.x_shape, dtype))    # few distinct values: many ties
    max_pool_forward_matches_reference(x, g, layout)


def max_pool_forward_matches_reference(x, g, layout):
    y, argmax = K.max_pool_forward(in_layout(x, layout), *g.window, g.oh, g.ow)
    expected_y, expected_argmax = R.max_pool_forward(x, *g.window, g.oh, g.ow)
    same(y, expected_y)
    same(argmax, expected_argmax)


@settings(max_examples=30)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_max_pool_with_nan_and_infinities(g, dtype, seed, layout):
    """The contract at the edges: NaN wins, a window of -inf points at its first real element."""
    max_pool_forward_matches_reference(edge_values(seed, g.x_shape, dtype), g, layout)


@settings(max_examples=30)
@with_examples(POOL_EXAMPLES)
@given(g=pool_geometries(), dtype=dtypes, seed=seeds, layout=layouts)
def test_avg_pool(g, dtype, seed, layout):
    x = random_array(seed, g.x_shape, dtype)
    dy = random_array(seed + 1, g.y_shape, dtype)
    for count_include_pad in (True, False):
        close(K.avg_pool_forward(in_layout(x, layout), *g.window, g.oh, g.ow, count_include_pad),
              R.avg_pool_forward(x, *g.window, g.oh, g.ow, count_include_pad))
        close(K.avg_pool_backward(in_layout(dy, layout), g.x_shape, *g.window, count_include_pad),
              R.avg_pool_backward(dy, g.x_shape, *g.window, count_include_pad))


@settings(max_examples=20)
@given(dtype=dtypes, seed=seeds, layout=layouts, magnitude=st.sampled_from([8.0, 1000.0]))
def test_cross_entropy(dtype, seed, layout, magnitude):
    """The CPU loss is the reference's NumPy code (re-exported, so comparing the two would compare a
    function with itself): held instead to SciPy's logsumexp and softmax in float64, another
    implementation of the same formulas, with logits large enough (1000) to overflow a naive exp."""
    special = pytest.importorskip("scipy.special")
    n, k = 1 + seed % 9, 1 + seed % 11
    logits = in_layout(random_array(seed, (n, k), dtype, low=-magnitude, high=magnitude), layout)
    labels = random_labels(seed, n, k).astype(np.int32 if seed % 2 else np.int64)
    z, rows = logits.astype(np.float64), np.arange(n)
    close(K.cross_entropy_forward(logits, labels),
          (special.logsumexp(z, axis=1) - z[rows, labels]).astype(dtype))
    softmax_minus_onehot = special.softmax(z, axis=1)
    softmax_minus_onehot[rows, labels] -= 1
    for scale in (1.0 / n, np.array(1.0 / n)):
        close(K.cross_entropy_backward(logits, labels, scale),
              (softmax_minus_onehot / n).astype(dtype))


@settings(max_examples=20)
@given(dtype=dtypes, seed=seeds, dy_layout=layouts, y_layout=layouts)
def test_bias_relu_add_bias_relu_backward(dtype, seed, dy_layout, y_layout):
    shape = (1 + seed % 3, 1 + seed % 5, 1 + seed % 7, 1 + seed % 4)
    out = random_array(seed, shape, dtype, away_from_zero=True)
    bias = random_array(seed + 1, shape[1:2], dtype)
    for kernel_shape in (shape, shape[:2] + (-1,)):            # (N, C, H, W) and (N, C, L)
        for name in ("bias_relu_", "add_bias_"):
            actual, expected = out.reshape(kernel_shape).copy(), out.reshape(kernel_shape).copy()
            assert getattr(K, name)(actual, bias) is actual                  # in place, returns out
            getattr(R, name)(expected, bias)
            close(actual, expected)
    dy = random_array(seed + 2, shape, dtype)
    out[0, 0, 0, 0] = np.nan                                   # a NaN y passes dy on
    same(K.relu_backward(in_layout(dy, dy_layout), in_layout(out, y_layout)), R.relu_backward(dy, out))


@settings(max_examples=20)
@given(dtype=dtypes, seed=seeds, dy_layout=layouts, y_layout=layouts)
def test_relu_bias_backward(dtype, seed, dy_layout, y_layout):
    """The fused pass: dx exactly as relu_backward, db as NumPy's sum (close: another order, float64)."""
    shape = (1 + seed % 3, 1 + seed % 5, 1 + seed % 7, 1 + seed % 4)
    y = np.maximum(random_array(seed, shape, dtype, away_from_zero=True), 0)
    y[0, 0, 0, 0] = np.nan                                     # a NaN y passes dy on
    dy = random_array(seed + 2, shape, dtype)
    dx, db = K.relu_bias_backward(in_layout(dy, dy_layout), in_layout(y, y_layout))
    expected_dx, expected_db = R.relu_bias_backward(dy, y)
    same(dx, expected_dx)
    close(db, expected_db)
    again_dx, again_db = K.relu_bias_backward(dy, y)           # the same order on every call
    same(again_db, db)


def test_relu_bias_backward_sums_a_nin_sized_channel_accurately():
    """131,072 float32 terms a channel (batch 128, 32x32): the float64 sum stays within float32's
    rounding of the exact sum, where one float32 running sum would drift."""
    rng = np.random.default_rng(0)
    dy = rng.standard_normal((128, 2, 32, 32)).astype(np.float32)
    y = np.ones_like(dy)
    _, db = K.relu_bias_backward(dy, y)
    exact = dy.astype(np.float64).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(db, exact, rtol=1e-6, atol=1e-4)


def test_relu_backward_with_a_channels_last_gradient():
    """np.empty_like would keep dy's channels-last order, and then a flat view of it is a copy."""
    rng = np.random.default_rng(0)
    y = np.maximum(rng.standard_normal((2, 3, 4, 5)), 0)
    dy = rng.standard_normal((2, 4, 5, 3)).transpose(0, 3, 1, 2)
    same(K.relu_backward(dy, y), np.where(y > 0, dy, 0.0))


@settings(max_examples=20)
@given(dtype=dtypes, seed=seeds, nesterov=st.booleans(), layout=layouts)
def test_sgd_update_matches_torch(dtype, seed, nesterov, layout):
    """The CPU update (the reference's NumPy code) against torch.optim.SGD itself."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    param = rng.standard_normal((3, 4)).astype(dtype)
    weight = torch.nn.Parameter(torch.tensor(param))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    buf = np.zeros_like(param)
    for _ in range(3):
        grad = rng.standard_normal((3, 4)).astype(dtype)
        weight.grad = torch.tensor(grad)
        optimizer.step()
        assert K.sgd_update_(param, in_layout(grad, layout), buf, 0.1, 0.9, 1e-3, nesterov) is param
    assert param.dtype == dtype
    close(param, weight.detach().numpy())


def test_in_place_bias_refuses_a_non_contiguous_out():
    out = np.zeros((2, 3, 4, 4), dtype=np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        K.bias_relu_(out, np.zeros(3, dtype=np.float32))


_LAYER_PROBE = """
import numba, numpy as np
from ninpy import cpu_kernels
a = np.ones((1, 2, 3, 3), np.float32)
cpu_kernels.relu_backward(a, a)
print(numba.threading_layer())
"""


@pytest.mark.parametrize("chosen, expected", [(None, "workqueue"), ("omp", "omp")])
def test_threading_layer_is_workqueue_unless_the_user_chose_one(chosen, expected):
    """Numba's OpenMP pool and OpenBLAS's spin against each other (cpu_kernels explains), so ninpy
    picks the workqueue layer; a NUMBA_THREADING_LAYER the user set wins."""
    env = {k: v for k, v in os.environ.items()    # a bounds-checked build has no parallel loops
           if k not in ("NUMBA_THREADING_LAYER", "NUMBA_BOUNDSCHECK")}
    if chosen:
        env["NUMBA_THREADING_LAYER"] = chosen
    out = subprocess.run([sys.executable, "-c", _LAYER_PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[-1] == expected


@pytest.mark.parametrize("module", [R, K], ids=["reference", "numba"])
def test_every_kernel_takes_an_empty_batch(module):
    g = make_geometry(0, 2, 5, 5, 3, 2, 1, True)
    x = np.zeros(g.x_shape)
    col = module.im2col(x, *g.window)
    assert col.shape == (2 * 9, 0)
    assert module.col2im(col, g.x_shape, *g.window).shape == g.x_shape
    y, argmax = module.max_pool_forward(x, *g.window, g.oh, g.ow)
    assert y.shape == argmax.shape == g.y_shape
    assert module.max_pool_backward(y, argmax, g.x_shape, *g.window).shape == g.x_shape
    for count_include_pad in (True, False):
        y = module.avg_pool_forward(x, *g.window, g.oh, g.ow, count_include_pad)
        assert y.shape == g.y_shape
        assert module.avg_pool_backward(y, g.x_shape, *g.window, count_include_pad).shape == g.x_shape
    logits, labels = np.zeros((0, 4)), np.zeros(0, np.int64)
    assert module.cross_entropy_forward(logits, labels).shape == (0,)
    assert module.cross_entropy_backward(logits, labels, 1.0).shape == (0, 4)
    out = np.zeros((0, 3, 2, 2))
    assert module.bias_relu_(out, np.ones(3)) is out and module.add_bias_(out, np.ones(3)) is out
    assert module.relu_backward(out, out).shape == out.shape
    dx, db = module.relu_bias_backward(out, out)
    assert dx.shape == out.shape and db.shape == (3,) and not db.any()


# Calls with arrays that do not fit each other or their geometry. Numba does not test indices, so
# before the wrappers checked, each of these read or wrote past an array (relu_backward read 5
# elements past y; max_pool_backward with an argmax past the plane wrote into another array).
def _ones(*shape):
    return np.ones(shape)


INCONSISTENT_CALLS = {   # (the call on a kernel module, what the message names)
    "relu_backward 10 vs 5 elements": (lambda m: m.relu_backward(_ones(10), _ones(5)),
                                       r"dy has shape \(10,\), expected \(5,\)"),
    "relu_bias_backward (2, 3, 4) vs (2, 3, 2)": (
        lambda m: m.relu_bias_backward(_ones(2, 3, 4), _ones(2, 3, 2)), "dy has shape"),
    "bias_relu_ with 5 biases for 3 channels": (
        lambda m: m.bias_relu_(_ones(2, 3, 4), _ones(5)), r"bias has shape \(5,\), expected \(3,\)"),
    "add_bias_ with no biases": (lambda m: m.add_bias_(_ones(2, 3, 4), _ones(0)), "bias has shape"),
    "im2col of a 3-d x": (lambda m: m.im2col(_ones(1, 4, 4), 2, 2, 1, 1, 0, 0), r"\(N, C, H, W\)"),
    "im2col kernel 0": (lambda m: m.im2col(_ones(1, 1, 4, 4), 0, 0, 1, 1, 0, 0), "kernel size"),
    "im2col stride 0": (lambda m: m.im2col(_ones(1, 1, 4, 4), 2, 2, 0, 0, 0, 0), "stride"),
    "col2im with a col of the wrong shape": (
        lambda m: m.col2im(_ones(3, 3), (1, 1, 4, 4), 2, 2, 1, 1, 0, 0),
        r"col has shape \(3, 3\), expected \(4, 9\)"),
    "col2im padding -1": (lambda m: m.col2im(_ones(4, 25), (1, 1, 4, 4), 2, 2, 1, 1, -1, -1),
                          "non-negative"),
    "max_pool_forward kernel 0": (
        lambda m: m.max_pool_forward(_ones(1, 1, 2, 2), 0, 0, 1, 1, 0, 0, 3, 3), "kernel size"),
    "max_pool_forward oh past the input": (
        lambda m: m.max_pool_forward(_ones(1, 1, 4, 4), 2, 2, 2, 2, 0, 0, 5, 2),
        "5 output rows do not fit"),
    "max_pool_backward argmax past the plane": (
        lambda m: m.max_pool_backward(_ones(1, 1, 1, 1), np.full((1, 1, 1, 1), 9, np.int32),
                                      (1, 1, 2, 2), 2, 2, 2, 2, 0, 0), "outside the 2x2 plane"),
    "max_pool_backward negative argmax": (
        lambda m: m.max_pool_backward(_ones(1, 2, 1, 1), np.array([0, -1], np.int32).reshape(1, 2, 1, 1),
                                      (1, 2, 2, 2), 2, 2, 2, 2, 0, 0), "outside the 2x2 plane"),
    "max_pool_backward argmax of another shape": (
        lambda m: m.max_pool_backward(_ones(1, 1, 2, 2), np.zeros((1, 1, 1, 1), np.int32),
                                      (1, 1, 4, 4), 2, 2, 2, 2, 0, 0), "argmax has shape"),
    "max_pool_backward dy for more planes": (
        lambda m: m.max_pool_backward(_ones(2, 1, 2, 2), np.zeros((2, 1, 2, 2), np.int32),
                                      (1, 1, 4, 4), 2, 2, 2, 2, 0, 0), "dy has shape"),
    "avg_pool_forward stride 0": (
        lambda m: m.avg_pool_forward(_ones(1, 1, 4, 4), 2, 2, 0, 0, 0, 0, 2, 2), "stride"),
    "avg_pool_backward dy larger than the windows": (
        lambda m: m.avg_pool_backward(_ones(1, 1, 3, 3), (1, 1, 4, 4), 2, 2, 2, 2, 0, 0),
        "3 output rows do not fit"),
}


@pytest.mark.parametrize("case", INCONSISTENT_CALLS)
def test_a_kernel_refuses_arrays_that_do_not_fit(case):
    """One line naming what does not fit (PyTorch's RuntimeError for a refused window, ValueError
    for arrays that do not fit each other), raised before the kernel runs."""
    call, message = INCONSISTENT_CALLS[case]
    with pytest.raises((ValueError, RuntimeError), match=message) as caught:
        call(K)
    assert "\n" not in str(caught.value)


def _run_probe(probe, env, cwd=None):
    return subprocess.run([sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


_OUT_OF_BOUNDS_PROBE = """
import numpy as np
from ninpy import cpu_kernels
dx = np.empty(10)
cpu_kernels._relu_backward_kernel(np.ones(10), np.ones({y_size}), dx)   # the wrapper's check bypassed
print("ran")
"""


def test_bounds_checking_turns_an_index_past_an_array_into_an_index_error(tmp_path):
    """What the memory-safety pass of .ci/run relies on: with NUMBA_BOUNDSCHECK=1 a kernel that
    reads past an array raises IndexError, even when the disk cache already holds the unchecked
    kernel for the same arguments (here: y of 5 elements where the kernel reads 10)."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_BOUNDSCHECK"}
    env["NUMBA_CACHE_DIR"] = str(tmp_path)
    filled = _run_probe(_OUT_OF_BOUNDS_PROBE.format(y_size=10), env)
    assert filled.returncode == 0, filled.stderr
    checked = _run_probe(_OUT_OF_BOUNDS_PROBE.format(y_size=5), {**env, "NUMBA_BOUNDSCHECK": "1"})
    assert checked.returncode != 0 and "IndexError" in checked.stderr, checked.stdout + checked.stderr


_AVERAGE_PROBE = """
import numpy as np
from ninpy import cpu_kernels
assert cpu_kernels.__file__.startswith({package!r}), cpu_kernels.__file__
x = np.arange(16.0).reshape(1, 1, 4, 4)
print(cpu_kernels.avg_pool_forward(x, 2, 2, 2, 2, 0, 0, 2, 2).ravel().tolist())
"""


def test_cached_kernels_follow_an_edit_to_shapes_py(tmp_path):
    """The kernels compile in shapes.py's functions, so their disk cache must not outlive an edit
    to shapes.py: in a copy of the package, fill the cache, double avg_pool_divisor, and see the
    averages halve in a fresh process."""
    package = tmp_path / "ninpy"
    shutil.copytree(Path(K.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "PYTHONPATH")}
    probe = _AVERAGE_PROBE.format(package=str(package))

    def averages():
        result = _run_probe(probe, env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return eval(result.stdout)

    assert averages() == [2.5, 4.5, 10.5, 12.5]
    assert list(package.glob("__pycache__/cpu_kernels._avg_pool_forward_kernel*.nbi"))   # cached
    shapes = package / "shapes.py"
    source = shapes.read_text()
    doubled = source.replace("return min(end, size + padding) - start",
                             "return 2 * (min(end, size + padding) - start)")
    assert doubled != source
    shapes.write_text(doubled)
    assert averages() == [0.625, 1.125, 2.625, 3.125]   # the divisor of rows and of columns doubled
