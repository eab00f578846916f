"""Tensor's methods for writing a loss (exp, log, sum, mean, max, indexing, reshape, transpose,
matmul): finite-difference gradients in float64, and values and gradients against PyTorch, which has
the same names, parameters and defaults (so one lambda runs on both)."""
import numpy as np
import pytest

import ninpy
from conftest import GPU_PATHS, require_device
from ninpy import Tensor, backend

rng = np.random.default_rng(0)
X = rng.standard_normal((3, 4, 5))
M = rng.standard_normal((5, 2))
V = rng.standard_normal(5)
BATCH = rng.standard_normal((2, 5, 3))
TIES = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]])

# name, input, fn(t, const) where const turns a NumPy array into the library's constant tensor
CASES = [
    ("exp", X, lambda t, c: t.exp()),
    ("log", np.abs(X) + 0.5, lambda t, c: t.log()),
    ("sum", X, lambda t, c: t.sum()),
    ("sum_dim_keepdim", X, lambda t, c: t.sum(dim=(0, 2), keepdim=True)),
    ("sum_negative_dim", X, lambda t, c: t.sum(-1)),
    ("mean", X, lambda t, c: t.mean()),
    ("mean_dim", X, lambda t, c: t.mean(1)),
    ("mean_dims_keepdim", X, lambda t, c: t.mean(dim=[0, -1], keepdim=True)),
    ("max", X, lambda t, c: t.max()),
    ("max_ties_share_the_gradient", TIES, lambda t, c: t.max()),
    ("max_dim_values", X, lambda t, c: t.max(1).values),
    ("max_dim_keepdim", X, lambda t, c: t.max(dim=-1, keepdim=True)[0]),
    ("max_dim_ties", TIES, lambda t, c: t.max(1)[0]),
    ("getitem_int", X, lambda t, c: t[1]),
    ("getitem_slices", X, lambda t, c: t[1:, ::2, -3:]),
    ("getitem_none_ellipsis", X, lambda t, c: t[None, ..., 2]),
    ("getitem_repeated_rows", X, lambda t, c: t[np.array([0, 2, 0])]),
    ("getitem_pairs", X, lambda t, c: t[np.array([0, 1, 1]), np.array([3, 0, 3])]),
    ("getitem_mask", X, lambda t, c: t[c(X > 0)]),
    ("getitem_tensor_index", X, lambda t, c: t[:, c(np.array([3, 1]))]),
    ("reshape", X, lambda t, c: t.reshape(4, -1)),
    ("reshape_tuple", X, lambda t, c: t.reshape((5, 12))),
    ("transpose", X, lambda t, c: t.transpose(0, 2)),
    ("transpose_negative", X, lambda t, c: t.transpose(-1, 1)),
    ("matmul_matrix", X, lambda t, c: t.matmul(c(M))),
    ("matmul_vector", X, lambda t, c: t @ c(V)),
    ("vector_matmul", M.T.copy(), lambda t, c: c(V) @ t.transpose(0, 1)),
    ("matmul_batched_broadcast", X, lambda t, c: t[:2] @ c(BATCH)),
    ("a_loss", X, lambda t, c: (t.exp().sum(-1).log() - t[:, :, 0]).mean()),
]
IDS = [case[0] for case in CASES]


def ninpy_const(array):
    return Tensor(array)


SMOOTH = [case for case in CASES if "ties" not in case[0]]   # a tie is a kink: PyTorch decides there


@pytest.mark.parametrize("name, x, fn", SMOOTH, ids=[case[0] for case in SMOOTH])
def test_gradients_match_finite_differences(name, x, fn):
    leaf = Tensor(x.astype(np.float64), requires_grad=True)
    assert ninpy.gradcheck(lambda t: fn(t, ninpy_const), [leaf])


@pytest.mark.parametrize("name, x, fn", CASES, ids=IDS)
def test_values_and_gradients_match_pytorch(name, x, fn):
    torch = pytest.importorskip("torch")
    ours = Tensor(x, requires_grad=True)
    theirs = torch.tensor(x, requires_grad=True)
    y, y_torch = fn(ours, ninpy_const), fn(theirs, torch.tensor)
    assert y.shape == tuple(y_torch.shape) and y.dtype == np.float64
    np.testing.assert_allclose(y.data, y_torch.detach().numpy(), rtol=1e-12, atol=1e-14)
    dy = rng.standard_normal(y.shape)
    y.backward(dy)
    y_torch.backward(torch.tensor(dy))
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("x", [X, TIES, np.array(2.5), np.array([1.0, np.nan, 3.0, np.nan])],
                         ids=["random", "ties", "0-d", "nan"])
@pytest.mark.parametrize("keepdim", [False, True])
def test_max_along_a_dim_returns_torchs_values_and_indices(x, keepdim):
    torch = pytest.importorskip("torch")
    dim = -1
    values, indices = Tensor(x).max(dim, keepdim=keepdim)
    expected = torch.tensor(x).max(dim, keepdim=keepdim)
    np.testing.assert_array_equal(values.data, expected.values.numpy())
    np.testing.assert_array_equal(indices.data, expected.indices.numpy())
    assert indices.dtype == np.int64 and indices.shape == tuple(expected.indices.shape)
    assert not indices.requires_grad


def test_float32_stays_float32_and_mean_takes_a_dtype():
    x = Tensor(np.abs(X).astype(np.float32) + 0.5, requires_grad=True)
    for y in (x.exp(), x.log(), x.mean(1), x.max(), x.max(0).values, x[0], x.transpose(0, 1),
              x @ Tensor(M.astype(np.float32))):
        assert y.dtype == np.float32
    y = x.mean(dtype=np.float64)
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, np.full(X.shape, 1 / X.size), rtol=1e-6)


def test_bad_arguments_are_one_clear_error():
    x = Tensor(X)
    with pytest.raises(IndexError, match=r"range of \[-3, 2\], but got 3"):
        x.sum(3)
    with pytest.raises(IndexError, match="but got -4"):
        x.transpose(0, -4)
    with pytest.raises(RuntimeError, match="more than once"):
        x.mean((1, -2))
    with pytest.raises(NotImplementedError, match="elementwise maximum"):
        x.max(Tensor(X))
    with pytest.raises(RuntimeError, match="no mean"):
        Tensor(np.arange(3)).mean()
    with pytest.raises(RuntimeError, match="empty"):
        Tensor(np.zeros((0, 2))).max()
    with pytest.raises(IndexError, match=r"shape \(3, 4, 5\)"):
        x[3]
    with pytest.raises(ValueError, match=r"\(3, 4, 5\) and \(4, 2\) cannot be multiplied"):
        x @ Tensor(np.ones((4, 2)))


@pytest.mark.parametrize("device", GPU_PATHS)
def test_the_gpu_code_path_gives_the_cpu_values_and_gradients(device):
    """The methods use the array's own module (CuPy, or the emulator's stand-in) for everything."""
    require_device(device)

    def on(device_name):
        def const(array):
            return Tensor(array, device=device_name)
        return const

    for name, x, fn in CASES:
        cpu, dev = Tensor(x, requires_grad=True), Tensor(x, requires_grad=True, device=device)
        y_cpu, y_dev = fn(cpu, on("cpu")), fn(dev, on(device))
        dy = np.random.default_rng(1).standard_normal(y_cpu.shape)
        y_cpu.backward(dy)
        y_dev.backward(backend.to_device(dy, device))
        np.testing.assert_allclose(y_dev.detach().numpy(), y_cpu.data, rtol=1e-12, atol=1e-14, err_msg=name)
        np.testing.assert_allclose(backend.to_device(dev.grad, "cpu"), cpu.grad, rtol=1e-12,
                                   atol=1e-14, err_msg=name)
