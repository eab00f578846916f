"""Numerical gradient checking: analytic gradients (backward) against central differences.

For a function f of tensors, draw a fixed random direction v of f's output shape and compare
d<v, f(x)>/dx from backward() with (<v, f(x + eps e_i)> - <v, f(x - eps e_i)>) / (2 eps) for every
element i of every input that requires grad. Float64 only: in float32 the differences are noise.
"""
import numpy as np

from . import backend
from .autograd import Tensor, no_grad, refuse_unimplemented


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


def gradcheck(func, inputs, *, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True,
              nondet_tol=0.0, check_undefined_grad=True, check_grad_dtypes=False,
              check_batched_grad=False, check_batched_forward_grad=False, check_forward_ad=False,
              check_backward_ad=True, fast_mode=False, masked=None, seed=0):
    """torch.autograd.gradcheck's call: check every requires_grad input's gradient; return True,
    or raise GradcheckError (return False if not raise_exception). PyTorch's other checks only
    at their defaults. seed (ninpy's): the random direction v the output is projected on."""
    refuse_unimplemented("gradcheck", nondet_tol=(nondet_tol, 0.0),
                         check_grad_dtypes=(check_grad_dtypes, False),
                         check_batched_grad=(check_batched_grad, False),
                         check_batched_forward_grad=(check_batched_forward_grad, False),
                         check_forward_ad=(check_forward_ad, False),
                         check_backward_ad=(check_backward_ad, True), fast_mode=(fast_mode, False),
                         masked=(masked, None))
    try:
        return _gradcheck(func, [inputs] if isinstance(inputs, Tensor) else list(inputs), eps,
                          atol, rtol, seed)
    except GradcheckError:
        if raise_exception:
            raise
        return False


def _gradcheck(fn, inputs, eps, atol, rtol, seed):
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
