"""Every operator's gradient against finite differences (float64, NumPy path), and its forward
against PyTorch when PyTorch is installed."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ninpy
import ninpy.functional as F
from ninpy import Tensor, models
from ninpy.shapes import conv_output_size, pool_output_size
from strategies import conv_geometries, pool_geometries, random_array, seeds


def arr(seed, shape, low=None):
    """Uniform values in [-2, 2]; with `low`, kept away from ReLU's kink at 0."""
    return random_array(seed, shape, away_from_zero=low is not None)


def distinct(seed, shape):
    """No two values equal, so max pooling has no ties."""
    return random_array(seed, shape, distinct=True)


def leaf(values):
    return Tensor(np.asarray(values, dtype=np.float64), requires_grad=True)


def conv_inputs(g, c_out, seed):
    """x, weight and bias leaves for a drawn geometry; stride and padding as F.conv2d takes them."""
    x = leaf(arr(seed, g.x_shape))
    w = leaf(arr(seed + 1, (c_out, g.c, g.kh, g.kw)))
    b = leaf(arr(seed + 2, (c_out,)))
    return x, w, b, (g.sh, g.sw), (g.ph, g.pw)


@settings(max_examples=40)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds, st.booleans())
def test_conv2d_gradients(g, c_out, seed, with_bias):
    x, w, b, stride, pad = conv_inputs(g, c_out, seed)
    inputs = [x, w] + ([b] if with_bias else [])
    conv = lambda x, w, b=None: F.conv2d(x, w, b, stride, pad)  # noqa: E731
    assert ninpy.gradcheck(conv, inputs)


@settings(max_examples=15)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), seeds)
def test_pointwise_conv_path_gradients(n, c, c_out, seed):
    """1x1, stride 1, pad 0 takes the batched-GEMM path: check it separately."""
    x = leaf(arr(seed, (n, c, 3, 2)))
    w = leaf(arr(seed + 1, (c_out, c, 1, 1)))
    b = leaf(arr(seed + 2, (c_out,)))
    assert ninpy.gradcheck(lambda x, w, b: F.conv2d(x, w, b), [x, w, b])


@settings(max_examples=15)
@given(conv_geometries(max_size=6), st.integers(1, 3), seeds)
def test_conv2d_relu_is_relu_of_conv_and_has_right_gradients(g, c_out, seed):
    x, w, b, stride, pad = conv_inputs(g, c_out, seed)
    fused = F.conv2d_relu(x, w, b, stride, pad)
    plain = F.relu(F.conv2d(x, w, b, stride, pad))
    np.testing.assert_allclose(fused.data, plain.data, rtol=1e-12, atol=1e-12)
    pre = F.conv2d(x, w, b, stride, pad).data
    if np.abs(pre).min() > 1e-3:  # finite differences across ReLU's kink are meaningless
        assert ninpy.gradcheck(lambda x, w, b: F.conv2d_relu(x, w, b, stride, pad), [x, w, b])


@given(seeds)
def test_relu_gradient(seed):
    assert ninpy.gradcheck(F.relu, [leaf(arr(seed, (2, 3, 4), low=0.05))])


def pool_args(g):
    return dict(kernel_size=(g.kh, g.kw), stride=(g.sh, g.sw), padding=(g.ph, g.pw),
                ceil_mode=g.ceil_mode)


@settings(max_examples=40)
@given(pool_geometries(max_batch=2, max_channels=2, max_size=7), seeds)
def test_max_pool_gradients(g, seed):
    x = leaf(distinct(seed, g.x_shape))
    assert ninpy.gradcheck(lambda x: F.max_pool2d(x, **pool_args(g)), [x], eps=1e-7)


@settings(max_examples=40)
@given(pool_geometries(max_batch=2, max_channels=2, max_size=7), seeds)
def test_avg_pool_gradients(g, seed):
    x = leaf(arr(seed, g.x_shape))
    assert ninpy.gradcheck(lambda x: F.avg_pool2d(x, **pool_args(g)), [x])


def test_global_avg_pool_gradient_and_value():
    x = leaf(arr(0, (2, 3, 4, 5)))
    np.testing.assert_allclose(F.global_avg_pool2d(x).data, x.data.mean(axis=(2, 3)))
    assert ninpy.gradcheck(F.global_avg_pool2d, [x])


@given(st.integers(2, 5), st.integers(1, 6), seeds)
def test_cross_entropy_gradient_and_value(n, k, seed):
    logits = leaf(arr(seed, (n, k)) * 3)
    labels = np.random.default_rng(seed).integers(0, k, n)
    assert ninpy.gradcheck(lambda z: F.cross_entropy(z, labels), [logits])
    z = logits.data
    expected = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(n), labels])
    assert F.cross_entropy(logits, labels).item() == pytest.approx(expected, rel=1e-12)


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
    with pytest.raises(TypeError, match="integers"):
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
    with pytest.raises(ValueError, match="p must be in"):
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
    with pytest.raises(ValueError, match="smaller than kernel"):
        F.conv2d(x, Tensor(np.zeros((1, 3, 7, 7))))


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

    @settings(max_examples=30)
    @given(pool_geometries(), seeds, st.sampled_from(["max", "avg"]))
    def test_pooling(self, g, seed, kind):
        torch = self._torch()
        x = distinct(seed, g.x_shape)
        args = pool_args(g)
        tx = torch.tensor(x, requires_grad=True)
        if kind == "max":
            ty = torch.nn.functional.max_pool2d(tx, **args)
            ny_fn = F.max_pool2d
        else:
            ty = torch.nn.functional.avg_pool2d(tx, **args, count_include_pad=True)
            ny_fn = F.avg_pool2d
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
