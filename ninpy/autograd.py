"""The autograd engine: Tensor, Function, backward, no_grad.

A Tensor holds an array (NumPy on the CPU, CuPy on the GPU) and, when it was computed by an
operation that needs gradients, a link to the Function that made it. Each Function remembers its
input tensors and what its backward needs. `backward()` walks that graph from the output in reverse
topological order, asks every Function for the gradients of its inputs, and adds them up at the
leaves (`x.grad`). Everything here fits in one read: Tensor, Function, the graph walk, then the small
arithmetic operations (add, mul, sum, ...) that Tensor's operators call.
"""
import contextlib

import numpy as np

from . import backend

_grad_enabled = True


def is_grad_enabled():
    return _grad_enabled


@contextlib.contextmanager
def no_grad():
    """Inside this block no graph is recorded (evaluation, optimiser updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def _as_array(value, device, dtype):
    """Turn an array, a nested list or a number into an array on `device`."""
    if isinstance(value, Tensor):
        value = value.data
    if isinstance(value, np.generic):
        value = np.asarray(value)  # a NumPy scalar keeps its dtype
    if not (isinstance(value, np.ndarray) or backend.is_gpu_array(value)):
        value = np.asarray(value, dtype=dtype)
        if dtype is None and value.dtype == np.float64:
            value = value.astype(np.float32)  # like torch.tensor([1.0]): Python floats train in fp32
    elif dtype is not None:
        value = value.astype(dtype, copy=False)
    if device is not None:
        value = backend.to_device(value, device)
    return value


class Tensor:
    """An array plus what autograd needs: requires_grad, grad, and the Function that made it."""

    __array_priority__ = 1000  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, requires_grad=False, device=None, dtype=None):
        self.data = _as_array(data, device, dtype)
        self.requires_grad = bool(requires_grad)
        self.grad = None
        self.creator = None  # the Function that computed this tensor; None for a leaf

    # ---- what it is -------------------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def device(self):
        return backend.device_of(self.data)

    @property
    def is_leaf(self):
        return self.creator is None

    def __repr__(self):
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device!r}{grad})"

    def __len__(self):
        return len(self.data)

    # ---- moving and copying -----------------------------------------------------------------
    def numpy(self):
        """The values as a NumPy array (copied from the GPU if needed)."""
        return backend.to_device(self.data, "cpu")

    def item(self):
        return self.numpy().item()

    def to(self, device):
        """This tensor on `device` ("cpu" / "gpu" / "emulated"); gradients flow back to the original."""
        device = backend.resolve_device(device)
        if device == self.device:
            return self
        return ToDevice.apply(self, device=device)

    def detach(self):
        """The same values with no graph behind them."""
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    # ---- the graph walk ---------------------------------------------------------------------
    def backward(self, grad=None, retain_graph=False):
        """Fill `.grad` of every leaf that requires it with d(self)/d(leaf), accumulating (+=).

        grad: the gradient flowing into this tensor; may be omitted only for a one-element tensor.
        Unless retain_graph, each Function drops what it saved once used, as PyTorch does, so the
        activations of one step are freed before the next step's forward; a second backward()
        through those Functions is then an error, as in PyTorch.
        A leaf's .grad is always an array of its own: never the array passed in as `grad`, nor one
        shared with another leaf, so changing one gradient in place cannot change another.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "computation had requires_grad=True (or it ran under no_grad())")
        grad = self._initial_grad(grad)
        grads = {id(self): grad}
        for tensor in reversed(self._topological_order()):
            g = grads.pop(id(tensor), None)
            if g is None:
                continue
            fn = tensor.creator
            if fn is None:
                tensor.grad = g.copy() if tensor.grad is None else tensor.grad + g
                continue
            if fn.released:
                raise RuntimeError(
                    "Trying to backward through the graph a second time: the first backward() freed "
                    f"what {type(fn).__name__} saved for it. Pass retain_graph=True to the first "
                    "backward() if you need to call it again")
            for parent, parent_grad in zip(fn.inputs, fn.backward(g)):
                if parent is None or parent_grad is None or not parent.requires_grad:
                    continue
                _check_grad_shape(fn, parent, parent_grad)
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            if not retain_graph:
                fn.release()

    def _initial_grad(self, grad):
        xp = backend.array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor, but "
                                   f"this one has shape {self.shape}; pass grad= of that shape")
            return xp.ones_like(self.data)
        grad = _as_array(grad, self.device, self.dtype)
        if grad.shape != self.shape:
            raise RuntimeError(f"backward(): grad has shape {grad.shape} but the tensor has shape "
                               f"{self.shape}; they must match")
        return grad

    def _topological_order(self):
        """Tensors reachable from self, each after all the tensors it was computed from."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:  # an explicit stack: deep graphs must not hit Python's recursion limit
            tensor, children_done = stack.pop()
            if children_done:
                order.append(tensor)
                continue
            if id(tensor) in visited:
                continue
            visited.add(id(tensor))
            stack.append((tensor, True))
            if tensor.creator is not None:  # a released Function has no inputs left to visit
                for parent in tensor.creator.inputs:
                    if parent is not None and parent.requires_grad and id(parent) not in visited:
                        stack.append((parent, False))
        return order

    # ---- operators (the Functions are defined below) ---------------------------------------
    def __add__(self, other):
        return Add.apply(self, self._lift(other))

    def __radd__(self, other):
        return Add.apply(self._lift(other), self)

    def __sub__(self, other):
        return Sub.apply(self, self._lift(other))

    def __rsub__(self, other):
        return Sub.apply(self._lift(other), self)

    def __mul__(self, other):
        return Mul.apply(self, self._lift(other))

    def __rmul__(self, other):
        return Mul.apply(self._lift(other), self)

    def __truediv__(self, other):
        return Div.apply(self, self._lift(other))

    def __rtruediv__(self, other):
        return Div.apply(self._lift(other), self)

    def __neg__(self):
        return Neg.apply(self)

    def __pow__(self, exponent):
        return Pow.apply(self, exponent=float(exponent))

    def __matmul__(self, other):
        return MatMul.apply(self, self._lift(other))

    def sum(self, axis=None, keepdims=False):
        return Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return Mean.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape.apply(self, shape=shape)

    def _lift(self, value):
        """A number or array next to a tensor becomes a constant tensor of the same dtype/device."""
        if isinstance(value, Tensor):
            return value
        return Tensor(_as_array(value, self.device, self.dtype))


def _check_grad_shape(fn, parent, grad):
    if grad.shape != parent.shape:
        raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape {grad.shape} "
                           f"for an input of shape {parent.shape}")


class Function:
    """One differentiable operation. Subclasses define forward (arrays in, one array out) and
    backward (gradient of the output in, one gradient per input out, None where not needed).

    `forward` stores on `self` only what `backward` needs (as Chainer's retain_inputs does);
    `self.needs_input_grad` (one bool per input, as in PyTorch) lets backward skip unneeded work.
    """

    inputs = ()
    needs_input_grad = ()
    released = False

    @classmethod
    def apply(cls, *inputs, **params):
        """Run forward on the inputs' arrays; link the result into the graph if gradients are needed."""
        fn = cls()
        fn.needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs)
        arrays = [None if t is None else t.data for t in inputs]
        out = fn.forward(*arrays, **params)
        needs_grad = _grad_enabled and any(t is not None and t.requires_grad for t in inputs)
        result = Tensor(out, requires_grad=needs_grad)
        if needs_grad:
            fn.inputs = inputs
            result.creator = fn
        return result

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def release(self):
        """Drop the inputs and everything forward saved (its arrays): backward has used them."""
        self.__dict__.clear()
        self.released = True


def unbroadcast(grad, shape):
    """Sum `grad` down to `shape`: the gradient of numpy broadcasting from `shape` to grad.shape."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    grad = grad.sum(axis=tuple(range(extra))) if extra > 0 else grad
    stretched = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _broadcast_shapes(a, b, op):
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} cannot be broadcast together") from None


class Add(Function):
    """z = a + b;  dz/da = 1, dz/db = 1 (summed over broadcast axes)."""

    def forward(self, a, b):
        _broadcast_shapes(a, b, "add")
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(grad, self.shapes[1])


class Sub(Function):
    """z = a - b;  dz/da = 1, dz/db = -1."""

    def forward(self, a, b):
        _broadcast_shapes(a, b, "sub")
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(-grad, self.shapes[1])


class Mul(Function):
    """z = a * b;  dz/da = b, dz/db = a."""

    def forward(self, a, b):
        _broadcast_shapes(a, b, "mul")
        self.a, self.b = a, b
        return a * b

    def backward(self, grad):
        return unbroadcast(grad * self.b, self.a.shape), unbroadcast(grad * self.a, self.b.shape)


class Div(Function):
    """z = a / b;  dz/da = 1/b, dz/db = -a/b^2."""

    def forward(self, a, b):
        _broadcast_shapes(a, b, "div")
        self.a, self.b = a, b
        return a / b

    def backward(self, grad):
        grad_a = grad / self.b
        return (unbroadcast(grad_a, self.a.shape),
                unbroadcast(-grad_a * self.a / self.b, self.b.shape))


class Neg(Function):
    """z = -a;  dz/da = -1."""

    def forward(self, a):
        return -a

    def backward(self, grad):
        return (-grad,)


class Pow(Function):
    """z = a^p for a constant p;  dz/da = p a^(p-1)."""

    def forward(self, a, exponent):
        self.a, self.exponent = a, exponent
        return a ** exponent

    def backward(self, grad):
        return (grad * self.exponent * self.a ** (self.exponent - 1),)


class MatMul(Function):
    """Z = A @ B for 2-D A, B;  dA = dZ @ B^T, dB = A^T @ dZ."""

    def forward(self, a, b):
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not (m, k) and (k, n)")
        self.a, self.b = a, b
        return a @ b

    def backward(self, grad):
        return grad @ self.b.T, self.a.T @ grad


class Sum(Function):
    """z = sum of a over `axis`;  dz/da = 1 at every summed element."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        return a.sum(axis=axis, keepdims=keepdims)

    def backward(self, grad):
        xp = backend.array_module(grad)
        if self.axis is not None and not self.keepdims:
            grad = xp.expand_dims(grad, self.axis)
        return (xp.broadcast_to(grad, self.shape).copy(),)


class Mean(Function):
    """z = mean of a over `axis`;  dz/da = 1/count at every averaged element."""

    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = a.shape, axis, keepdims
        out = a.mean(axis=axis, keepdims=keepdims)
        self.count = a.size // max(out.size, 1)
        return out

    def backward(self, grad):
        xp = backend.array_module(grad)
        if self.axis is not None and not self.keepdims:
            grad = xp.expand_dims(grad, self.axis)
        return (xp.broadcast_to(grad / self.count, self.shape).copy(),)


class Reshape(Function):
    """z = a viewed with a new shape;  the gradient is reshaped back."""

    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot view shape {a.shape} as {shape}") from None

    def backward(self, grad):
        return (grad.reshape(self.shape),)


class ToDevice(Function):
    """z = a copied to another device;  the gradient is copied back."""

    def forward(self, a, device):
        self.source = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, grad):
        return (backend.to_device(grad, self.source),)
