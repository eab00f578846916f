"""Every operator's gradient against finite differences (float64, NumPy path), with inputs and
upstream gradients in any memory layout, its edge cases (NaN, -inf, empty batches), and its forward
and backward against PyTorch when PyTorch is installed."""
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ninpy
import ninpy.functional as F
from ninpy import Tensor, models
from ninpy.shapes import conv_output_size, pool_output_size
from conftest import require_device
from strategies import (LAYOUTS, conv_geometries, in_layout, layouts, pool_geometries, random_array,
                        seeds)


def arr(seed, shape, low=None):
    """Uniform values in [-2, 2]; with `low`, kept away from ReLU's kink at 0."""
    return random_array(seed, shape, away_from_zero=low is not None)


def distinct(seed, shape):
    """No two values equal, so max pooling has no ties."""
    return random_array(seed, shape, distinct=True)


def leaf(values, layout="c_order"):
    """A float64 leaf holding `values`, stored in memory `layout` (see strategies.in_layout)."""
    return Tensor(in_layout(np.asarray(values, dtype=np.float64), layout), requires_grad=True)


def conv_inputs(g, c_out, seed, layout="c_order"):
    """x, weight and bias leaves for a drawn geometry; stride and padding as F.conv2d takes them."""
    x = leaf(arr(seed, g.x_shape), layout)
    w = leaf(arr(seed + 1, (c_out, g.c, g.kh, g.kw)), layout)
    b = leaf(arr(seed + 2, (c_out,)))
    return x, w, b, (g.sh, g.sw), (g.ph, g.pw)


@settings(max_examples=40)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds, st.booleans(), layouts)
def test_conv2d_gradients(g, c_out, seed, with_bias, layout):
    x, w, b, stride, pad = conv_inputs(g, c_out, seed, layout)
    inputs = [x, w] + ([b] if with_bias else [])
    conv = lambda x, w, b=None: F.conv2d(x, w, b, stride, pad)  # noqa: E731
    assert ninpy.gradcheck(conv, inputs)


@settings(max_examples=15)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), seeds, layouts)
def test_pointwise_conv_path_gradients(n, c, c_out, seed, layout):
    """1x1, stride 1, pad 0 skips im2col (x itself is the column matrix): check it separately."""
    x = leaf(arr(seed, (n, c, 3, 2)), layout)
    w = leaf(arr(seed + 1, (c_out, c, 1, 1)), layout)
    b = leaf(arr(seed + 2, (c_out,)))
    assert ninpy.gradcheck(lambda x, w, b: F.conv2d(x, w, b), [x, w, b])


@settings(max_examples=20)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds, st.booleans(), st.booleans(), layouts)
def test_channels_first_conv2d_gradients_and_values(g, c_out, seed, with_bias, relu, layout):
    """layout="CNHW" (what NIN runs between layers): the NCHW result with axes 0 and 1 exchanged,
    and gradients right by finite differences, for general and 1x1 kernels alike."""
    x, w, b, stride, pad = conv_inputs(g, c_out, seed, layout)
    b = b if with_bias else None
    op = F.conv2d_relu if relu else F.conv2d
    x_cf = F.swap_batch_and_channels(x)
    y_cf = op(x_cf, w, b, stride, pad, layout="CNHW")
    np.testing.assert_allclose(y_cf.data, op(x, w, b, stride, pad).data.transpose(1, 0, 2, 3),
                               rtol=1e-12, atol=1e-12)
    if relu and np.abs(F.conv2d(x, w, b, stride, pad).data).min(initial=1) < 1e-3:
        return                                   # finite differences across ReLU's kink are meaningless
    leaf_cf = leaf(x_cf.data, layout)
    inputs = [leaf_cf, w] + ([b] if with_bias else [])
    assert ninpy.gradcheck(lambda x, w, b=None: op(x, w, b, stride, pad, layout="CNHW"), inputs)
    w1 = leaf(arr(seed + 4, (c_out, g.c, 1, 1)))
    assert ninpy.gradcheck(lambda x, w: op(x, w, None, 1, 0, layout="CNHW"), [leaf_cf, w1])


@settings(max_examples=15)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds, layouts,
       st.sampled_from(["fast", "reference"]))
def test_conv2d_relu_from_batch_first_to_channels_first(g, c_out, seed, layout, kernels):
    """layout="NCHW", out_layout="CNHW" (NIN's first convolution, on the images): the NCHW result
    with axes 0 and 1 exchanged, and gradients right by finite differences, for general and 1x1
    kernels, on both paths."""
    x, w, b, stride, pad = conv_inputs(g, c_out, seed, layout)
    w1 = leaf(arr(seed + 4, (c_out, g.c, 1, 1)))
    with ninpy.use_kernels(kernels):
        for weight, s, p in ((w, stride, pad), (w1, 1, 0)):
            y = F.conv2d_relu(x, weight, b, s, p, out_layout="CNHW")
            expected = F.conv2d_relu(x, weight, b, s, p).data.transpose(1, 0, 2, 3)
            np.testing.assert_allclose(y.data, expected, rtol=1e-12, atol=1e-12)
            if np.abs(F.conv2d(x, weight, b, s, p).data).min(initial=1) > 1e-3:  # not at ReLU's kink
                assert ninpy.gradcheck(
                    lambda x, w, b: F.conv2d_relu(x, w, b, s, p, out_layout="CNHW"), [x, weight, b])
        with pytest.raises(ValueError, match="out_layout must be one of"):
            F.conv2d_relu(x, w, b, stride, pad, out_layout="NHWC")


def test_swap_batch_and_channels_gradient_and_errors():
    x = leaf(arr(0, (2, 3, 4, 5)), "transposed")
    y = F.swap_batch_and_channels(x)
    assert y.shape == (3, 2, 4, 5) and y.data.flags.c_contiguous
    np.testing.assert_array_equal(y.data, x.data.transpose(1, 0, 2, 3))
    assert ninpy.gradcheck(F.swap_batch_and_channels, [x])
    with pytest.raises(ValueError, match="layout"):
        F.conv2d(x, leaf(arr(1, (2, 3, 1, 1))), layout="NHWC")
    with pytest.raises(ValueError, match=r"\(CNHW\); expected \(C_out, 2"):
        F.conv2d(x, leaf(arr(1, (2, 3, 1, 1))), layout="CNHW")   # (2, 3, ...) read as C=2, N=3


@settings(max_examples=15)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds, layouts)
def test_conv2d_relu_is_relu_of_conv_and_has_right_gradients(g, c_out, seed, layout):
    x, w, b, stride, pad = conv_inputs(g, c_out, seed, layout)
    fused = F.conv2d_relu(x, w, b, stride, pad)
    plain = F.relu(F.conv2d(x, w, b, stride, pad))
    np.testing.assert_allclose(fused.data, plain.data, rtol=1e-12, atol=1e-12)
    pre = F.conv2d(x, w, b, stride, pad).data
    if np.abs(pre).min(initial=1) > 1e-3:  # finite differences across ReLU's kink are meaningless
        assert ninpy.gradcheck(lambda x, w, b: F.conv2d_relu(x, w, b, stride, pad), [x, w, b])


@given(seeds, layouts)
def test_relu_gradient(seed, layout):
    assert ninpy.gradcheck(F.relu, [leaf(arr(seed, (2, 3, 4), low=0.05), layout)])


def pool_args(g):
    return dict(kernel_size=(g.kh, g.kw), stride=(g.sh, g.sw), padding=(g.ph, g.pw),
                ceil_mode=g.ceil_mode)


@settings(max_examples=40)
@given(pool_geometries(max_batch=2, max_channels=2, max_size=7), seeds, layouts)
def test_max_pool_gradients(g, seed, layout):
    x = leaf(distinct(seed, g.x_shape), layout)
    assert ninpy.gradcheck(lambda x: F.max_pool2d(x, **pool_args(g)), [x], eps=1e-7)


@settings(max_examples=40)
@given(pool_geometries(max_batch=2, max_channels=2, max_size=7), seeds, layouts, st.booleans())
def test_avg_pool_gradients(g, seed, layout, count_include_pad):
    x = leaf(arr(seed, g.x_shape), layout)
    assert ninpy.gradcheck(lambda x: F.avg_pool2d(x, **pool_args(g), count_include_pad=count_include_pad), [x])


def test_global_avg_pool_gradient_and_value():
    x = leaf(arr(0, (2, 3, 4, 5)))
    np.testing.assert_allclose(F.global_avg_pool2d(x).data, x.data.mean(axis=(2, 3)))
    assert ninpy.gradcheck(F.global_avg_pool2d, [x])


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_global_avg_pool_reads_channels_first_maps(kernels):
    """layout="CNHW": (C, N, H, W) maps give the (N, C) logits of their (N, C, H, W) copy, and the
    gradient in the maps' layout (NIN's classifier, with no swap back)."""
    x = leaf(arr(1, (2, 3, 4, 5)))
    channels_first = leaf(np.ascontiguousarray(x.data.transpose(1, 0, 2, 3)))
    with ninpy.use_kernels(kernels):
        np.testing.assert_allclose(F.global_avg_pool2d(channels_first, layout="CNHW").data,
                                   F.global_avg_pool2d(x).data, rtol=1e-15)
        assert ninpy.gradcheck(lambda t: F.global_avg_pool2d(t, layout="CNHW"), [channels_first])
    with pytest.raises(ValueError, match="layout must be one of"):
        F.global_avg_pool2d(x, layout="NHWC")


@given(st.integers(2, 5), st.integers(1, 6), seeds, layouts)
def test_cross_entropy_gradient_and_value(n, k, seed, layout):
    logits = leaf(arr(seed, (n, k)) * 3, layout)
    labels = np.random.default_rng(seed).integers(0, k, n)
    assert ninpy.gradcheck(lambda z: F.cross_entropy(z, labels), [logits])
    z = logits.data
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), labels])
    assert F.cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-12)


@given(st.integers(2, 5), st.integers(1, 6), seeds, layouts, st.sampled_from([0.1, 0.5, 1.0]))
def test_label_smoothed_cross_entropy_gradient_and_value(n, k, seed, layout, label_smoothing):
    logits = leaf(arr(seed, (n, k)) * 3, layout)
    labels = np.random.default_rng(seed).integers(0, k, n)
    loss = lambda z: F.cross_entropy(z, labels, label_smoothing=label_smoothing)  # noqa: E731
    log_p = logits.data - np.log(np.exp(logits.data).sum(axis=1, keepdims=True))
    plain, uniform = -log_p[np.arange(n), labels], -log_p.mean(axis=1)
    expected = np.mean((1 - label_smoothing) * plain + label_smoothing * uniform)
    for kernels in ("fast", "reference"):
        with ninpy.use_kernels(kernels):
            assert ninpy.gradcheck(loss, [logits])
            assert loss(logits).item() == pytest.approx(expected, rel=1e-12)


def test_label_smoothing_outside_0_1_is_refused():
    logits = Tensor(np.zeros((2, 3)))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be between 0.0 and 1.0"):
            F.cross_entropy(logits, np.array([0, 1]), label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing must be a number"):
        F.cross_entropy(logits, np.array([0, 1]), label_smoothing="0.1x")


@pytest.mark.parametrize("device", ["cpu", "emulated"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothed_cross_entropy_of_an_infinite_logit_is_pytorchs(device, reduction):
    """A -inf logit at the label: the loss is inf (both of its terms are), as in PyTorch, not the
    NaN of inf - inf; the gradient stays finite."""
    torch = pytest.importorskip("torch")
    if device != "cpu":
        require_device(device)
    logits = np.array([[-np.inf, 0.0], [1.0, 2.0]], np.float32)
    labels = np.array([0, 1])
    z = Tensor(logits, device=device, requires_grad=True)
    loss = F.cross_entropy(z, ninpy.backend.to_device(labels, device), reduction=reduction,
                           label_smoothing=0.1)
    (loss.sum() if reduction == "none" else loss).backward()
    tz = torch.tensor(logits, requires_grad=True)
    theirs = torch.nn.functional.cross_entropy(tz, torch.tensor(labels), reduction=reduction,
                                               label_smoothing=0.1)
    (theirs.sum() if reduction == "none" else theirs).backward()
    np.testing.assert_allclose(ninpy.backend.to_device(loss.data, "cpu"), theirs.detach().numpy(),
                               rtol=1e-6)
    np.testing.assert_allclose(ninpy.backend.to_device(z.grad, "cpu"), tz.grad.numpy(), rtol=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = Tensor(np.array([[1000.0, 0.0], [-1000.0, 0.0]]), requires_grad=True)
    loss = F.cross_entropy(logits, np.array([0, 1]))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert np.isfinite(logits.grad).all()


def test_cross_entropy_rejects_bad_labels():
    logits = Tensor(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        F.cross_entropy(logits, np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        F.cross_entropy(logits, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="integer class indices"):
        F.cross_entropy(logits, np.array([0.0, 1.0]))


def test_dropout_gradient_scaling_and_modes():
    x = leaf(arr(0, (4, 50)))

    def drop(x):
        ninpy.manual_seed(7)  # the same mask on every evaluation
        return F.dropout(x, 0.3, training=True)

    assert ninpy.gradcheck(drop, [x])
    y = drop(x).data
    kept = y != 0
    np.testing.assert_allclose(y[kept], x.data[kept] / 0.7)
    assert 0.55 < kept.mean() < 0.85
    assert F.dropout(x, 0.3, training=False) is x
    assert not F.dropout(x, 1.0).data.any()
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.dropout(x, 1.5)


def test_operators_keep_float32():
    x = Tensor(arr(0, (2, 3, 8, 8)).astype(np.float32), requires_grad=True)
    w = Tensor(arr(1, (4, 3, 3, 3)).astype(np.float32), requires_grad=True)
    y = F.conv2d_relu(x, w, None, 1, 1)
    y = F.avg_pool2d(F.max_pool2d(y, 3, 2, ceil_mode=True), 2)
    loss = F.cross_entropy(F.global_avg_pool2d(y), np.array([0, 1]))
    loss.backward()
    assert y.dtype == loss.dtype == x.grad.dtype == w.grad.dtype == np.float32


def test_shape_errors_are_clear():
    x = Tensor(np.zeros((1, 3, 5, 5)))
    with pytest.raises(ValueError, match=r"\(8, 2, 3, 3\).*\(1, 3, 5, 5\)"):
        F.conv2d(x, Tensor(np.zeros((8, 2, 3, 3))))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\).*\(3, 5, 5\)"):
        F.max_pool2d(Tensor(np.zeros((3, 5, 5))), 2)
    with pytest.raises(RuntimeError, match="smaller than kernel"):
        F.conv2d(x, Tensor(np.zeros((1, 3, 7, 7))))


# Geometries PyTorch refuses, each of which once reached a Numba kernel and read or wrote out of
# bounds (a kernel of 0 returned 9 values from a 2x2 input and its backward crashed the
# interpreter) or failed inside NumPy. Each case is (what torch.nn.functional or ninpy.functional
# is called with, the message): `f` is the functional module, `t` makes a tensor of it.
def _image(t, h=4, w=4):
    return t(np.ones((1, 1, h, w), np.float32))


def _weight(t, kh, kw):
    return t(np.ones((1, 1, kh, kw), np.float32))


HOSTILE_GEOMETRIES = {
    "max_pool2d kernel 0": (lambda f, t: f.max_pool2d(_image(t, 2, 2), 0, 1), "kernel size"),
    "max_pool2d kernel -1 padding -1": (lambda f, t: f.max_pool2d(_image(t, 2, 2), -1, 1, -1),
                                        "kernel size"),
    "max_pool2d kernel (2, 0)": (lambda f, t: f.max_pool2d(_image(t), (2, 0), 1), "kernel size"),
    "max_pool2d stride 0": (lambda f, t: f.max_pool2d(_image(t), 2, 0), "stride"),
    "max_pool2d stride -1": (lambda f, t: f.max_pool2d(_image(t), 2, -1), "stride"),
    "max_pool2d padding -1": (lambda f, t: f.max_pool2d(_image(t), 2, 1, -1), "non-negative"),
    "max_pool2d padding over half the kernel": (lambda f, t: f.max_pool2d(_image(t), 2, 1, 2),
                                                "half of kernel"),
    "max_pool2d kernel over the input": (lambda f, t: f.max_pool2d(_image(t, 2, 2), 5, 1), "too small"),
    "max_pool2d empty image": (lambda f, t: f.max_pool2d(_image(t, 0, 4), 1), "too small"),
    "avg_pool2d kernel 0": (lambda f, t: f.avg_pool2d(_image(t, 2, 2), 0, 1), "kernel size"),
    "avg_pool2d stride 0": (lambda f, t: f.avg_pool2d(_image(t), 2, 0), "stride"),
    "avg_pool2d padding -1": (lambda f, t: f.avg_pool2d(_image(t), 2, 1, -1), "non-negative"),
    "avg_pool2d padding over half the kernel": (lambda f, t: f.avg_pool2d(_image(t), 3, 1, 2),
                                                "half of kernel"),
    "conv2d weight (1, 1, 0, 0)": (lambda f, t: f.conv2d(_image(t), _weight(t, 0, 0)), "kernel size"),
    "conv2d stride -1": (lambda f, t: f.conv2d(_image(t), _weight(t, 2, 2), stride=-1), "stride"),
    "conv2d stride 0": (lambda f, t: f.conv2d(_image(t), _weight(t, 2, 2), stride=0), "stride"),
    "conv2d stride (1, 0)": (lambda f, t: f.conv2d(_image(t), _weight(t, 2, 2), stride=(1, 0)),
                             "stride"),
    "conv2d padding -1": (lambda f, t: f.conv2d(_image(t), _weight(t, 2, 2), padding=-1),
                          "non-negative"),
    "conv2d kernel over the input": (lambda f, t: f.conv2d(_image(t), _weight(t, 5, 5)), "too small"),
    "conv2d empty image": (lambda f, t: f.conv2d(_image(t, 0, 4), _weight(t, 1, 1)), "too small"),
}


@pytest.mark.parametrize("device, kernel_set", [("cpu", "fast"), ("cpu", "reference"),
                                                 ("emulated", "fast")],
                         ids=["numba", "reference", "cuda-emulated"])
@pytest.mark.parametrize("case", HOSTILE_GEOMETRIES)
def test_a_geometry_pytorch_refuses_is_refused_before_any_kernel(case, device, kernel_set,
                                                                  monkeypatch):
    """On every kernel set: the Numba kernels, the plain NumPy path, and the CUDA launchers (run by
    the emulator, which compiles the .cu sources for the CPU)."""
    call, message = HOSTILE_GEOMETRIES[case]
    if device == "emulated":
        require_device(device)
    reached = lambda *args, **kwargs: pytest.fail("a kernel was reached")  # noqa: E731
    monkeypatch.setattr(F, "kernels_for", reached)                          # Numba's and CUDA's
    for name in ("im2col", "max_pool_forward", "avg_pool_forward"):          # the plain path's
        monkeypatch.setattr(ninpy.reference, name, reached)
    with ninpy.use_kernels(kernel_set), pytest.raises(RuntimeError, match=message):
        call(F, lambda array: Tensor(array, device=device))


@pytest.mark.parametrize("case", HOSTILE_GEOMETRIES)
def test_pytorch_refuses_the_same_geometries_with_the_same_kind_of_error(case):
    torch = pytest.importorskip("torch")
    call, _ = HOSTILE_GEOMETRIES[case]
    with pytest.raises(RuntimeError):
        call(torch.nn.functional, torch.tensor)


HOSTILE_LAYERS = {
    "MaxPool2d(0)": lambda nn: nn.MaxPool2d(0),
    "MaxPool2d(2, stride=0)": lambda nn: nn.MaxPool2d(2, stride=0),
    "AvgPool2d(2, padding=-1)": lambda nn: nn.AvgPool2d(2, padding=-1),
    "Conv2d(1, 1, 0)": lambda nn: nn.Conv2d(1, 1, 0),
    "Conv2d(1, 1, 2, stride=0)": lambda nn: nn.Conv2d(1, 1, 2, stride=0),
    "Conv2d(1, 1, 2, padding=-1)": lambda nn: nn.Conv2d(1, 1, 2, padding=-1),
}


@pytest.mark.parametrize("case", HOSTILE_LAYERS)
def test_a_layer_with_a_refused_geometry_is_refused(case):
    """ninpy refuses when the layer is built or called (a Conv2d when built: its He initialisation
    would divide by a kernel of 0); PyTorch, when called. Both with a RuntimeError."""
    from ninpy import nn
    with pytest.raises(RuntimeError):
        HOSTILE_LAYERS[case](nn)(_image(Tensor))
    torch = pytest.importorskip("torch")
    with pytest.raises(RuntimeError):
        HOSTILE_LAYERS[case](torch.nn)(_image(torch.tensor))


def test_output_sizes_follow_caffe_for_nin():
    assert pool_output_size(32, 3, 2, 0, ceil_mode=True) == 16
    assert pool_output_size(16, 3, 2, 0, ceil_mode=True) == 8
    assert pool_output_size(28, 3, 2, 0, ceil_mode=True) == 14
    assert pool_output_size(14, 3, 2, 0, ceil_mode=True) == 7
    assert pool_output_size(32, 3, 2, 0, ceil_mode=False) == 15
    assert conv_output_size(32, 5, 1, 2) == 32


def test_small_whole_nin_gradcheck():
    """A narrow NIN (all three blocks, both poolings, GAP, loss) in float64 against finite differences."""
    ninpy.manual_seed(3)
    model = models.nin(in_channels=1, num_classes=3, widths=((3, 2, 2), (2, 2, 2), (2, 2, None)),
                       kernel_sizes=(3, 3, 3), dropout=0.0, dtype=np.float64)
    for p in model.parameters():  # biases away from zero keep pre-activations off ReLU's kink
        p.data += np.random.default_rng(0).uniform(0.05, 0.2, p.shape)
    x = Tensor(arr(5, (2, 1, 7, 7)))
    labels = np.array([0, 2])
    inputs = [leaf(p.data.copy()) for p in model.parameters()]
    assert ninpy.gradcheck(lambda *ps: _loss_through(model, x, labels, ps), inputs, atol=1e-6)


def _loss_through(model, x, labels, leaves):
    """Run the model with its parameters replaced by the given leaf tensors."""
    params = model.parameters()
    saved = list(_param_slots(model))
    for (owner, name), value in zip(saved, leaves):
        setattr(owner, name, value)
    try:
        return F.cross_entropy(model(x), labels)
    finally:
        for (owner, name), p in zip(saved, params):
            setattr(owner, name, p)


def _param_slots(module):
    for _, sub in module.named_modules():
        for name, value in vars(sub).items():
            if isinstance(value, ninpy.nn.Parameter):
                yield sub, name


def test_relu_backward_with_a_transposed_upstream_gradient():
    """The upstream gradient may have any strides (here channels-last, viewed as NCHW)."""
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((2, 3, 4, 5)), requires_grad=True)
    g = rng.standard_normal((2, 4, 5, 3)).transpose(0, 3, 1, 2)
    F.relu(x).backward(g)
    np.testing.assert_array_equal(x.grad, np.where(x.data > 0, g, 0.0))


def test_fused_conv_relu_backward_with_a_transposed_upstream_gradient():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((2, 3, 5, 5)), requires_grad=True)
    w = Tensor(rng.standard_normal((4, 3, 3, 3)), requires_grad=True)
    g = rng.standard_normal((2, 5, 5, 4)).transpose(0, 3, 1, 2)
    F.conv2d_relu(x, w, None, 1, 1).backward(g)
    fused = x.grad, w.grad
    x.grad = w.grad = None
    F.relu(F.conv2d(x, w, None, 1, 1)).backward(np.ascontiguousarray(g))
    np.testing.assert_allclose(fused[0], x.grad, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fused[1], w.grad, rtol=1e-12, atol=1e-12)


# Every operator, as (name, input shape, function of the input tensor). The 1x1 convolution skips
# im2col, the 3x3 one uses it; dropout re-seeds so both runs draw one mask.
def _dropout_seeded(x):
    ninpy.manual_seed(5)
    return F.dropout(x, 0.4)


_W3 = arr(11, (4, 3, 3, 3))
_W1 = arr(12, (4, 3, 1, 1))
_B = arr(13, (4,))
OPERATORS = [
    ("conv2d", (2, 3, 6, 5), lambda x: F.conv2d(x, Tensor(_W3), Tensor(_B), 2, 1)),
    ("conv2d_relu", (2, 3, 6, 5), lambda x: F.conv2d_relu(x, Tensor(_W3), Tensor(_B), 1, 1)),
    ("conv2d_1x1_relu", (2, 3, 6, 5), lambda x: F.conv2d_relu(x, Tensor(_W1), Tensor(_B))),
    ("relu", (2, 3, 6, 5), F.relu),
    ("max_pool2d", (2, 3, 7, 6), lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True)),
    ("avg_pool2d", (2, 3, 7, 6), lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True)),
    ("avg_pool2d_real_only", (2, 3, 7, 6),
     lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)),
    ("global_avg_pool2d", (2, 3, 4, 5), F.global_avg_pool2d),
    ("dropout", (2, 3, 4, 5), _dropout_seeded),
    ("cross_entropy", (4, 3), lambda x: F.cross_entropy(x, np.array([0, 2, 1, 2])[:x.shape[0]])),
]


@pytest.mark.parametrize("name, shape, op", OPERATORS, ids=[o[0] for o in OPERATORS])
@settings(max_examples=12)
@given(x_layout=layouts, grad_layout=layouts, seed=seeds)
def test_operators_take_inputs_and_upstream_gradients_of_any_layout(name, shape, op, x_layout,
                                                                    grad_layout, seed):
    """Forward and backward give the same numbers whatever the strides of x and of the gradient."""
    values = distinct(seed, shape)
    results = []
    for xl, gl in (("c_order", "c_order"), (x_layout, grad_layout)):
        x = leaf(values, xl)
        y = op(x)
        grad = arr(seed + 1, y.shape)
        y.backward(in_layout(grad, gl) if y.ndim else grad)
        results.append((y.data, x.grad))
    (y0, g0), (y1, g1) = results
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("name, shape, op", OPERATORS, ids=[o[0] for o in OPERATORS])
def test_operators_take_an_empty_batch(name, shape, op):
    """A batch of 0 images gives empty outputs and empty gradients, as in PyTorch (the loss of no
    examples is NaN, as torch's mean reduction gives)."""
    x = leaf(np.zeros((0,) + shape[1:]))
    y = op(x)
    if name == "cross_entropy":
        assert y.shape == () and np.isnan(y.item())
        y.backward()
    else:
        assert y.shape[0] == 0
        y.backward(np.zeros(y.shape))
    assert x.grad.shape == x.shape


def test_nin_takes_an_empty_batch_forward_and_backward():
    ninpy.manual_seed(0)
    model = models.nin_for("mnist")
    logits = model(Tensor(np.zeros((0, 1, 28, 28), np.float32)))
    assert logits.shape == (0, 10)
    logits.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


class TestAgainstTorch:
    """Forward and backward of each operator vs torch.nn.functional (skipped without torch)."""

    @staticmethod
    def _torch():
        return pytest.importorskip("torch")

    @settings(max_examples=20)
    @given(conv_geometries(max_size=6), st.integers(1, 3), seeds)
    def test_conv2d(self, g, c_out, seed):
        torch = self._torch()
        nx, nw, nb, stride, pad = conv_inputs(g, c_out, seed)
        tx, tw, tb = (torch.tensor(t.data, requires_grad=True) for t in (nx, nw, nb))
        ty = torch.nn.functional.conv2d(tx, tw, tb, stride, pad)
        grad = arr(seed + 3, tuple(ty.shape))
        ty.backward(torch.tensor(grad))
        ny = F.conv2d(nx, nw, nb, stride, pad)
        ny.backward(grad)
        np.testing.assert_allclose(ny.data, ty.detach().numpy(), rtol=1e-10, atol=1e-10)
        for ours, theirs in ((nx, tx), (nw, tw), (nb, tb)):
            np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-10, atol=1e-10)

    def test_whole_nin_step_matches_torch(self):
        """NIN as models.nin builds it (channels first inside) against the same net in torch.nn:
        logits, loss and every parameter gradient, float64, dropout off."""
        torch = self._torch()
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
        from torch_nin import torch_nin
        ninpy.manual_seed(0)
        model = models.nin(dropout=0.0, dtype=np.float64)
        net = torch_nin(torch).double()
        with torch.no_grad():
            for theirs, ours in zip(net.parameters(), model.parameters()):
                theirs.copy_(torch.from_numpy(ours.data))
        for module in net:
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        x = arr(1, (3, 3, 32, 32))
        labels = np.array([1, 7, 3])
        loss = F.cross_entropy(model(Tensor(x)), labels)
        loss.backward()
        theirs = torch.nn.functional.cross_entropy(net(torch.tensor(x)), torch.tensor(labels))
        theirs.backward()
        np.testing.assert_allclose(loss.item(), theirs.item(), rtol=1e-10)
        for ours, p in zip(model.parameters(), net.parameters()):
            np.testing.assert_allclose(ours.grad, p.grad.numpy(), rtol=1e-8, atol=1e-12)

    @settings(max_examples=40)
    @given(pool_geometries(), seeds, st.sampled_from(["max", "avg", "avg_real_only"]))
    def test_pooling(self, g, seed, kind):
        torch = self._torch()
        x = distinct(seed, g.x_shape)
        args = pool_args(g)
        tx = torch.tensor(x, requires_grad=True)
        if kind == "max":
            ty = torch.nn.functional.max_pool2d(tx, **args)
            ny_fn = F.max_pool2d
        else:
            count_include_pad = kind == "avg"
            ty = torch.nn.functional.avg_pool2d(tx, **args, count_include_pad=count_include_pad)
            ny_fn = lambda x, **args: F.avg_pool2d(x, **args, count_include_pad=count_include_pad)  # noqa: E731
        grad = arr(seed + 1, tuple(ty.shape))
        ty.backward(torch.tensor(grad))
        nx = leaf(x)
        ny = ny_fn(nx, **args)
        ny.backward(grad)
        np.testing.assert_allclose(ny.data, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(nx.grad, tx.grad.numpy(), rtol=1e-10, atol=1e-12)

    def test_cross_entropy(self):
        torch = self._torch()
        z = arr(0, (5, 7)) * 4
        labels = np.array([0, 6, 3, 3, 1])
        tz = torch.tensor(z, requires_grad=True)
        torch.nn.functional.cross_entropy(tz, torch.tensor(labels)).backward()
        nz = leaf(z)
        F.cross_entropy(nz, labels).backward()
        np.testing.assert_allclose(nz.grad, tz.grad.numpy(), rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
    @pytest.mark.parametrize("ignored", [False, True])
    @pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.37, 1.0])
    def test_cross_entropy_label_smoothing(self, label_smoothing, reduction, ignored):
        """With every reduction, and with a row at ignore_index (it counts nothing, and the mean
        is over the other rows: torch's smoothed term too)."""
        torch = self._torch()
        z = arr(1, (6, 10)) * 4
        labels = np.array([0, 9, -100 if ignored else 3, 3, 1, 7])
        grad = arr(2, (6,)) if reduction == "none" else np.array(1.0)
        tz = torch.tensor(z, requires_grad=True)
        theirs = torch.nn.functional.cross_entropy(tz, torch.tensor(labels), reduction=reduction,
                                                   label_smoothing=label_smoothing)
        theirs.backward(torch.tensor(grad))
        nz = leaf(z)
        ours = F.cross_entropy(nz, labels, reduction=reduction, label_smoothing=label_smoothing)
        ours.backward(grad)
        np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(nz.grad, tz.grad.numpy(), rtol=1e-10, atol=1e-12)

    def test_avg_pool_count_include_pad_defaults_to_true_like_torch(self):
        torch = self._torch()
        x = arr(0, (1, 2, 5, 5))
        for count_include_pad in (None, True, False):
            extra = {} if count_include_pad is None else dict(count_include_pad=count_include_pad)
            ours = F.avg_pool2d(Tensor(x), 3, 2, 1, **extra).data
            theirs = torch.nn.functional.avg_pool2d(torch.tensor(x), 3, 2, 1, **extra).numpy()
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
        module = ninpy.nn.AvgPool2d(3, 2, 1, count_include_pad=False)
        np.testing.assert_allclose(module(Tensor(x)).data, F.avg_pool2d(Tensor(x), 3, 2, 1, count_include_pad=False).data)

    @pytest.mark.parametrize("case", ["nan", "all_minus_inf", "inf_and_nan"])
    def test_max_pool_nan_and_infinities(self, case):
        """The max-pool contract at the edges (docs/design.md): NaN wins (the last NaN of the window),
        a window of -inf reports -inf at its first real element, and the gradient follows argmax."""
        torch = self._torch()
        x = arr(1, (1, 2, 5, 6))
        if case == "nan":
            x[0, 0, 1, 1] = x[0, 0, 1, 4] = x[0, 1, 2, 2] = x[0, 1, 3, 3] = np.nan
        elif case == "all_minus_inf":
            x[0, 0, :3, :3] = -np.inf               # whole windows with no finite element
            x[0, 1] = -np.inf
        else:
            x[0, 0, 0, :] = np.inf
            x[0, 1, 1, 1] = np.nan
            x[0, 1, 0, 0] = np.inf
        args = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        tx = torch.tensor(x, requires_grad=True)
        ty = torch.nn.functional.max_pool2d(tx, **args)
        dy = arr(2, tuple(ty.shape))
        ty.backward(torch.tensor(dy))
        nx = leaf(x)
        ny = F.max_pool2d(nx, **args)
        ny.backward(dy)
        np.testing.assert_array_equal(ny.data, ty.detach().numpy())          # NaN == NaN here
        np.testing.assert_allclose(nx.grad, tx.grad.numpy(), rtol=1e-12, atol=1e-14)  # via argmax


KERNEL_OPERATORS = {
    "conv2d": lambda x: F.conv2d(x, Tensor(np.ones((1, 2, 1, 1), x.dtype))),
    "relu": F.relu,
    "max_pool2d": lambda x: F.max_pool2d(x, 2),
    "avg_pool2d": lambda x: F.avg_pool2d(x, 2),
    "global_avg_pool2d": F.global_avg_pool2d,
    "dropout": lambda x: F.dropout(x, 0.5),
    "cross_entropy": lambda x: F.cross_entropy(x.reshape(2, -1), np.zeros(2, np.int64)),
}


@pytest.mark.parametrize("name", list(KERNEL_OPERATORS))
@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.int32, np.bool_])
@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_one_dtype_contract_checked_before_any_kernel(name, dtype, kernels, monkeypatch):
    """float32 and float64 only, on every path: the public function checks, before kernels_for
    or the plain path's Functions see an array (docs/design.md, "Dtypes")."""
    def no_kernel(array):
        raise AssertionError("a kernel was reached")
    monkeypatch.setattr(F, "kernels_for", no_kernel)
    x = Tensor(np.ones((2, 2, 2, 2), dtype=dtype))
    with ninpy.use_kernels(kernels), pytest.raises(
            TypeError, match=f"{np.dtype(dtype).name} input is not supported.*float32"):
        KERNEL_OPERATORS[name](x)


def test_mixed_dtypes_are_refused_at_the_boundary():
    x = Tensor(np.ones((1, 2, 3, 3), np.float32))
    with pytest.raises(TypeError, match="float32, float64"):
        F.conv2d(x, Tensor(np.ones((1, 2, 1, 1))))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignore_index_and_reduction_match_torch(reduction):
    torch = pytest.importorskip("torch")
    z = np.random.default_rng(0).standard_normal((4, 3))
    for labels in (np.array([0, 2, 1, 2]), np.array([1, 1, 0, 1]), np.array([1, 1, 1, 1])):
        ours_z, theirs_z = Tensor(z, requires_grad=True), torch.tensor(z, requires_grad=True)
        ours = F.cross_entropy(ours_z, labels, ignore_index=1, reduction=reduction)
        theirs = torch.nn.functional.cross_entropy(theirs_z, torch.tensor(labels), ignore_index=1,
                                                   reduction=reduction)
        np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-12)   # NaN: all ignored
        ours.sum().backward()
        theirs.sum().backward()
        np.testing.assert_allclose(ours_z.grad, theirs_z.grad.numpy(), rtol=1e-12, atol=1e-15)
