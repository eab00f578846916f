"""The plain path (ninpy/reference.py's operators, chosen by use_kernels("reference")) against the
fast path: the same NIN trained a few steps from the same weights on the same batches gives the same
losses and parameters; the plain path runs no Numba kernel and takes nothing from the memory pool;
NINPY_KERNELS and train.py --kernels choose it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ninpy
import ninpy.functional as F
from ninpy import Tensor, cpu_kernels, memory, models, optim, reference

ROOT = Path(__file__).resolve().parents[1]


def small_nin(dtype, dropout=0.5):
    """NIN's three blocks, both pool kinds and dropout, at a few channels (12x12 -> 3x3 maps)."""
    return models.nin(in_channels=2, num_classes=4, widths=((6, 5, 5), (6, 5, 5), (6, 5, None)),
                      kernel_sizes=(5, 3, 3), dropout=dropout, dtype=dtype)


def train(kernels, dtype, steps=4):
    """Losses and final parameters of a few SGD steps (momentum, weight decay). Without dropout:
    each path draws its mask in its own working layout, so the same draws land on other elements
    (test_dropout_draws_the_same_mask_on_both_paths compares them in one layout)."""
    ninpy.manual_seed(0)
    model = small_nin(dtype, dropout=0.0)
    opt = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    rng = np.random.default_rng(1)
    losses = []
    with ninpy.use_kernels(kernels):
        for _ in range(steps):
            x = rng.standard_normal((3, 2, 12, 12)).astype(dtype)
            labels = rng.integers(0, 4, 3)
            loss = F.cross_entropy(model(Tensor(x)), labels, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return np.array(losses), [p.data.copy() for p in model.parameters()]


@pytest.mark.parametrize("dtype, rtol, atol", [(np.float64, 1e-10, 1e-12), (np.float32, 2e-4, 1e-5)],
                         ids=["float64", "float32"])
def test_a_few_training_steps_agree_on_both_paths(dtype, rtol, atol):
    """float64: the two paths differ only in summation order; float32: to the stated tolerance."""
    fast_losses, fast_params = train("fast", dtype)
    plain_losses, plain_params = train("reference", dtype)
    assert fast_losses[0] != fast_losses[-1]                     # it trained
    np.testing.assert_allclose(plain_losses, fast_losses, rtol=rtol, atol=atol)
    for plain, fast in zip(plain_params, fast_params):
        assert plain.dtype == fast.dtype == dtype
        np.testing.assert_allclose(plain, fast, rtol=rtol, atol=atol)


def test_the_plain_path_runs_no_numba_kernel_and_takes_nothing_from_the_pool(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the plain path reached the fast path")

    for name in ("im2col", "col2im", "max_pool_forward", "max_pool_backward", "avg_pool_forward",
                 "avg_pool_backward", "bias_relu_", "add_bias_", "relu_backward", "relu_bias_backward"):
        monkeypatch.setattr(cpu_kernels, name, forbidden)
    monkeypatch.setattr(memory, "pooled_empty", forbidden)
    losses, _ = train("reference", np.float64, steps=1)
    assert np.isfinite(losses).all()
    with pytest.raises(AssertionError, match="fast path"):
        train("fast", np.float64, steps=1)


def test_the_plain_graph_has_one_function_per_operator_in_the_public_layout():
    """No fused Conv2d+ReLU and no layout swaps: conv, relu, conv, ... in (N, C, H, W)."""
    model = small_nin(np.float64)
    with ninpy.use_kernels("reference"):
        maps = model.class_maps(Tensor(np.ones((2, 2, 12, 12)), requires_grad=True))
    names, shapes, tensor = [], [], maps
    while tensor.creator is not None:
        names.append(type(tensor.creator).__name__)
        shapes.append(tensor.shape)
        tensor = tensor.creator.inputs[0]
    assert names[::-1] == ["Conv2d", "ReLU"] * 3 + ["MaxPool2d", "Dropout"] + \
        ["Conv2d", "ReLU"] * 3 + ["AvgPool2d", "Dropout"] + ["Conv2d", "ReLU"] * 3
    assert all(shape[0] == 2 for shape in shapes)                # the batch axis stays first
    assert type(maps.creator) is reference.ReLU and maps.shape == (2, 4, 3, 3)


def test_dropout_draws_the_same_mask_on_both_paths():
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 4, 4)), requires_grad=True)
    results = []
    for kernels in ("fast", "reference"):
        ninpy.manual_seed(5)
        with ninpy.use_kernels(kernels):
            y = F.dropout(x, 0.5)
            y.backward(np.ones(y.shape))
        results.append((y.data, x.grad))
        x.grad = None
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_use_kernels_is_a_call_and_a_block():
    assert ninpy.kernel_set() == "fast"
    with ninpy.use_kernels("reference"):
        assert ninpy.kernel_set() == "reference" and F.working_layout() == "NCHW"
    assert ninpy.kernel_set() == "fast" and F.working_layout() == "CNHW"
    ninpy.use_kernels("reference")
    try:
        assert F.kernels_for(np.zeros(1)) is reference
    finally:
        ninpy.use_kernels("fast")
    with pytest.raises(ValueError, match="'numba' is not one of"):
        ninpy.use_kernels("numba")


def test_plain_conv2d_takes_the_channels_first_layout_too():
    rng = np.random.default_rng(2)
    x = Tensor(rng.standard_normal((3, 2, 5, 5)))                 # (C, N, H, W)
    w, b = Tensor(rng.standard_normal((4, 3, 3, 3))), Tensor(rng.standard_normal(4))
    fast = F.conv2d_relu(x, w, b, 1, 1, layout="CNHW").data
    with ninpy.use_kernels("reference"):
        plain = F.conv2d_relu(x, w, b, 1, 1, layout="CNHW").data
        with pytest.raises(ValueError, match="does not fit input"):
            F.conv2d(x, Tensor(np.ones((4, 2, 3, 3))), layout="CNHW")
    np.testing.assert_allclose(plain, fast, rtol=1e-12)


def run(args, **env):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=300)


def test_the_environment_variable_chooses_the_plain_path():
    code = "import ninpy, warnings; print(ninpy.kernel_set())"
    assert run(["-c", code], NINPY_KERNELS="reference").stdout.strip() == "reference"
    bad = run(["-c", code], NINPY_KERNELS="plain")
    assert bad.stdout.strip() == "fast"
    assert bad.stderr == "warning: NINPY_KERNELS='plain' is not one of ('fast', 'reference'); using 'fast'\n"


def test_train_py_refuses_the_gpu_on_the_plain_path():
    result = run(["train.py", "--dataset", "mnist", "--kernels", "reference", "--device", "gpu"])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --kernels reference runs on the CPU only; drop --device gpu (or pass "
        "--device cpu)"]
