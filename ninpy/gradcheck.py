"""Numerical gradient checking: analytic gradients (backward) against central differences.

For a function f of tensors, draw a fixed random direction v of f's output shape and compare
d<v, f(x)>/dx from backward() with (<v, f(x + eps e_i)> - <v, f(x - eps e_i)>) / (2 eps) for every
element i of every input that requires grad. Float64 only: in float32 the differences are noise.
"""
import numpy as np

from . import backend
from .autograd import Tensor, no_grad


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree; the message names the input and element."""


def _projected(fn, inputs, v):
    with no_grad():
        out = fn(*inputs)
    return float((backend.to_device(out.data, "cpu") * v).sum())


def numerical_grad(fn, inputs, index, v, eps):
    """Central differences of <v, fn(*inputs)> with respect to inputs[index], element by element."""
    tensor = inputs[index]
    data = tensor.data  # perturbed in place, element by element, whatever its strides
    grad = np.zeros(tensor.shape, dtype=np.float64)
    for where in np.ndindex(tensor.shape):
        original = data[where].item()
        data[where] = original + eps
        plus = _projected(fn, inputs, v)
        data[where] = original - eps
        minus = _projected(fn, inputs, v)
        data[where] = original
        grad[where] = (plus - minus) / (2 * eps)
    return grad


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, seed=0):
    """Check every requires_grad input's gradient; return True or raise GradcheckError."""
    inputs = list(inputs)
    for position, tensor in enumerate(inputs):
        if isinstance(tensor, Tensor) and tensor.requires_grad and tensor.dtype != np.float64:
            raise TypeError(f"gradcheck: input {position} is {tensor.dtype}; finite differences "
                            "need float64 (build it with dtype=np.float64)")
    out = fn(*inputs)
    v = np.random.default_rng(seed).standard_normal(out.shape)
    for tensor in inputs:
        if isinstance(tensor, Tensor):
            tensor.grad = None
    out.backward(backend.to_device(v, out.device))
    for position, tensor in enumerate(inputs):
        if not (isinstance(tensor, Tensor) and tensor.requires_grad):
            continue
        analytic = backend.to_device(tensor.grad, "cpu") if tensor.grad is not None else np.zeros(tensor.shape)
        numeric = numerical_grad(fn, inputs, position, v, eps)
        bad = ~np.isclose(analytic, numeric, atol=atol, rtol=rtol)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise GradcheckError(
                f"gradcheck: input {position} (shape {tensor.shape}) disagrees at {bad.sum()} of "
                f"{bad.size} elements; first at {where}: analytic {analytic[where]:.8g}, numerical "
                f"{numeric[where]:.8g}; max abs difference {np.abs(analytic - numeric).max():.3g}")
    return True
