"""The autograd engine: Tensor, Function, backward, no_grad.

A Tensor holds an array (NumPy on the CPU, CuPy on the GPU) and, when it was computed by an
operation that needs gradients, a link to the Function that made it. Each Function remembers its
input tensors and what its backward needs. `backward()` walks that graph from the output in reverse
topological order, asks every Function for the gradients of its inputs, and adds them up at the
leaves (`x.grad`). Everything here fits in one read: Tensor, Function, the graph walk, then the small
arithmetic operations (add, mul, sum, ...) that Tensor's operators call.
"""
import collections
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
        given = grad is not None
        grad = self._initial_grad(grad)
        grads = {id(self): grad}
        owners = _MemoryOwners()
        if given:
            owners.claim(grad)  # the caller's array: a leaf gets a copy of it
        for tensor in reversed(self._topological_order()):
            g = grads.pop(id(tensor), None)
            if g is None:
                continue
            fn = tensor.creator
            if fn is None:
                tensor.grad = owners.own(g) if tensor.grad is None else tensor.grad + g
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

    def __rmatmul__(self, other):
        return MatMul.apply(self._lift(other), self)

    # ---- what a loss is written with: PyTorch's names, parameters and defaults ---------------
    def matmul(self, other):
        """self @ other, as torch.matmul: 1-D operands are vectors, leading axes broadcast."""
        return self @ other

    def exp(self):
        return Exp.apply(self)

    def log(self):
        return Log.apply(self)

    def sum(self, dim=None, keepdim=False, *, dtype=None):
        """The sum of every element, or over dim (an int or a tuple of ints)."""
        return Sum.apply(self._as_dtype(dtype, "sum"), dim=_dims(dim, self.ndim, "sum"),
                         keepdim=keepdim)

    def mean(self, dim=None, keepdim=False, *, dtype=None):
        """The mean of every element, or over dim (an int or a tuple of ints); dtype: computed in it."""
        x = self._as_dtype(dtype, "mean")
        if x.dtype.kind != "f":
            raise RuntimeError(f"mean(): a tensor of dtype {x.dtype} has no mean; pass "
                               "dtype=np.float32 (or float64)")
        return Mean.apply(x, dim=_dims(dim, self.ndim, "mean"), keepdim=keepdim)

    def max(self, dim=None, keepdim=False):
        """max(): the largest element, a 0-d tensor. max(dim, keepdim=False): (values, indices), the
        largest along dim and its index (the first on ties; a NaN is the largest), as torch.max."""
        if isinstance(dim, Tensor):
            raise NotImplementedError("Tensor.max(other), the elementwise maximum of two tensors, "
                                      "is not implemented; max() and max(dim) are")
        if dim is None:
            if keepdim:
                raise TypeError("max(): keepdim needs a dim; use max(dim, keepdim=True)")
            if self.size == 0:
                raise RuntimeError("max(): the tensor is empty, so it has no largest element")
            return Max.apply(self)
        (axis,) = _dims(dim, self.ndim, "max")
        data = self.data.reshape(self.shape or (1,))             # a 0-d tensor has one axis here
        if data.shape[axis] == 0:
            raise RuntimeError(f"max(): dim {dim} has size 0, so it has no largest element")
        indices = backend.array_module(data).expand_dims(data.argmax(axis=axis), axis)
        values = MaxAlongDim.apply(self, dim=axis, indices=indices, keepdim=keepdim)
        return MaxResult(values, Tensor(indices.reshape(values.shape).astype(np.int64)))

    def __getitem__(self, index):
        """self[index]: ints, slices, None, ..., and integer or boolean arrays (or tensors)."""
        return Index.apply(self, index=_index_on(index, self.device))

    def reshape(self, *shape):
        """The same elements, in row-major order, as `shape` (one entry may be -1)."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape.apply(self, shape=shape)

    def transpose(self, dim0, dim1):
        """The tensor with axes dim0 and dim1 exchanged."""
        (a,), (b,) = _dims(dim0, self.ndim, "transpose"), _dims(dim1, self.ndim, "transpose")
        return Transpose.apply(self, dim0=a, dim1=b)

    def _as_dtype(self, dtype, op):
        """self converted to dtype (gradients flow back), or self when dtype is None or its own."""
        if dtype is None or np.dtype(dtype) == self.dtype:
            return self
        if np.dtype(dtype).kind != "f":
            raise RuntimeError(f"{op}(): dtype={np.dtype(dtype)} is not supported; use a float dtype")
        return Cast.apply(self, dtype=np.dtype(dtype))

    def _lift(self, value):
        """A number or array next to a tensor becomes a constant tensor of the same dtype/device."""
        if isinstance(value, Tensor):
            return value
        return Tensor(_as_array(value, self.device, self.dtype))


class _MemoryOwners:
    """Which memory the leaves of one backward() pass already hold as their .grad.

    A leaf keeps the gradient that reaches it as it is, without a copy (on the GPU a copy is a launch
    per parameter per step), when that array's memory is its own: every backward returns new arrays
    or views of the gradient it was given (Function's contract), so what reaches a leaf is
    shared only if the same memory reached another leaf before it (Add gives one array to both
    inputs; x.reshape(...) passes views), or came from the caller. Those get a copy.
    """

    def __init__(self):
        self.claimed = {}  # id(memory owner) -> the owner, kept alive so the id is not reused

    @staticmethod
    def _owner(array):
        while getattr(array, "base", None) is not None:  # a view's memory belongs to its base
            array = array.base
        return array

    def claim(self, array):
        owner = self._owner(array)
        self.claimed[id(owner)] = owner

    def own(self, array):
        """`array`, or a copy of it when its memory is already claimed or not writeable."""
        owner = self._owner(array)
        if id(owner) in self.claimed or not getattr(array.flags, "writeable", True):
            return array.copy()
        self.claimed[id(owner)] = owner
        return array


MaxResult = collections.namedtuple("max", ["values", "indices"])   # what torch.max(dim) returns


def _dims(dim, ndim, op):
    """dim (None, an int or a tuple/list of ints, negatives counting from the end) as a sorted
    tuple of axes, or None for every axis; PyTorch's errors for a dim out of range or repeated."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        return None
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    low, high = -max(ndim, 1), max(ndim, 1) - 1
    axes = []
    for d in dims:
        if not isinstance(d, (int, np.integer)) or isinstance(d, bool):
            raise TypeError(f"{op}(): dim must be an int or a tuple of ints, got {d!r}")
        if not low <= d <= high:
            raise IndexError(f"{op}(): Dimension out of range (expected to be in range of "
                             f"[{low}, {high}], but got {d})")
        axes.append(int(d) % max(ndim, 1))
    if len(set(axes)) != len(axes):
        raise RuntimeError(f"{op}(): dim {dims} names an axis more than once")
    return tuple(sorted(axes))


def _index_on(index, device):
    """An index with its tensors replaced by their arrays, and arrays moved to `device`."""
    if isinstance(index, tuple):
        return tuple(_index_on(part, device) for part in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list) or isinstance(index, np.ndarray) or backend.is_gpu_array(index):
        return backend.to_device(np.asarray(index) if isinstance(index, list) else index, device)
    return index


def _check_grad_shape(fn, parent, grad):
    if grad.shape != parent.shape:
        raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape {grad.shape} "
                           f"for an input of shape {parent.shape}")


class Function:
    """One differentiable operation. Subclasses define forward (arrays in, one array out) and
    backward (gradient of the output in, one gradient per input out, None where not needed).

    `forward` stores on `self` only what `backward` needs (as Chainer's retain_inputs does);
    `self.needs_input_grad` (one bool per input, as in PyTorch) lets backward skip unneeded work.
    `backward` returns new arrays, or the gradient it was given and views of it, and never writes
    into that gradient: a leaf then keeps what reaches it without a copy (`_MemoryOwners`).
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
    """Z = A @ B (batched, leading axes broadcast; a 1-D A is a row, a 1-D B a column);
    dA = dZ @ B^T, dB = A^T @ dZ (summed over broadcast axes)."""

    def forward(self, a, b):
        inner_b = b.shape[-2] if b.ndim > 1 else b.shape[0] if b.ndim else None
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != inner_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} cannot be multiplied; "
                             "expected (..., m, k) and (..., k, n), or vectors of k")
        try:
            np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: the batch axes of {a.shape} and {b.shape} cannot be "
                             "broadcast together") from None
        self.a, self.b = a, b
        return a @ b

    def backward(self, grad):
        xp = backend.array_module(grad)
        a = self.a[None, :] if self.a.ndim == 1 else self.a      # a vector as a one-row matrix
        b = self.b[:, None] if self.b.ndim == 1 else self.b      # and as a one-column matrix
        if self.a.ndim == 1:
            grad = xp.expand_dims(grad, -2)                      # the row axis the product dropped
        if self.b.ndim == 1:
            grad = xp.expand_dims(grad, -1)
        grad_a = unbroadcast(grad @ xp.swapaxes(b, -1, -2), a.shape).reshape(self.a.shape)
        grad_b = unbroadcast(xp.swapaxes(a, -1, -2) @ grad, b.shape).reshape(self.b.shape)
        return grad_a, grad_b


class Exp(Function):
    """y = e^a;  da = dy * y."""

    def forward(self, a):
        self.y = backend.array_module(a).exp(a)
        return self.y

    def backward(self, grad):
        return (grad * self.y,)


class Log(Function):
    """y = ln a;  da = dy / a."""

    def forward(self, a):
        self.a = a
        return backend.array_module(a).log(a)

    def backward(self, grad):
        return (grad / self.a,)


class Sum(Function):
    """z = sum of a over `dim` (every axis when None);  da = dz at every summed element."""

    def forward(self, a, dim=None, keepdim=False):
        self.shape, self.dim, self.keepdim = a.shape, dim, keepdim
        return a.sum(axis=dim, keepdims=keepdim)

    def backward(self, grad):
        xp = backend.array_module(grad)
        if self.dim is not None and not self.keepdim:
            grad = xp.expand_dims(grad, self.dim)
        return (xp.broadcast_to(grad, self.shape).copy(),)


class Mean(Function):
    """z = mean of a over `dim` (every axis when None);  da = dz / count at every averaged element."""

    def forward(self, a, dim=None, keepdim=False):
        self.shape, self.dim, self.keepdim = a.shape, dim, keepdim
        out = a.mean(axis=dim, keepdims=keepdim)
        self.count = a.size // max(out.size, 1)
        return out

    def backward(self, grad):
        xp = backend.array_module(grad)
        if self.dim is not None and not self.keepdim:
            grad = xp.expand_dims(grad, self.dim)
        return (xp.broadcast_to(grad / grad.dtype.type(max(self.count, 1)), self.shape).copy(),)


class Max(Function):
    """z = the largest element of a (NaN if any is NaN);  da = dz shared evenly by the elements
    equal to it (PyTorch's rule for ties)."""

    def forward(self, a):
        self.a, self.z = a, a.max()
        return self.z

    def backward(self, grad):
        xp = backend.array_module(grad)
        winners = xp.isnan(self.a) if xp.isnan(self.z) else self.a == self.z
        return (winners * (grad / winners.sum()).astype(grad.dtype),)


class MaxAlongDim(Function):
    """z = a's largest element along dim, found by the caller at `indices`;  da = dz at those
    indices, 0 elsewhere."""

    def forward(self, a, dim, indices, keepdim):
        self.shape, self.dim, self.indices = a.shape, dim, indices
        values = backend.array_module(a).take_along_axis(a.reshape(a.shape or (1,)), indices, dim)
        return values if keepdim and a.ndim else values.reshape(values.shape[:dim] + values.shape[dim + 1:])

    def backward(self, grad):
        xp = backend.array_module(grad)
        grad_a = xp.zeros(self.shape or (1,), dtype=grad.dtype)
        xp.put_along_axis(grad_a, self.indices, grad.reshape(self.indices.shape), axis=self.dim)
        return (grad_a.reshape(self.shape),)


class Index(Function):
    """z = a[index];  da = zeros with dz added at index (np.add.at: a repeated index adds up)."""

    def forward(self, a, index):
        self.shape, self.index = a.shape, index
        try:
            return a[index]
        except IndexError as error:
            raise IndexError(f"index {index!r} does not fit a tensor of shape {a.shape}: "
                             f"{error}") from None

    def backward(self, grad):
        xp = backend.array_module(grad)
        grad_a = xp.zeros(self.shape, dtype=grad.dtype)
        xp.add.at(grad_a, self.index, grad)
        return (grad_a,)


class Transpose(Function):
    """z = a with axes dim0 and dim1 exchanged;  da = dz with them exchanged back."""

    def forward(self, a, dim0, dim1):
        self.dims = dim0, dim1
        return backend.array_module(a).swapaxes(a, dim0, dim1)

    def backward(self, grad):
        return (backend.array_module(grad).swapaxes(grad, *self.dims),)


class Cast(Function):
    """z = a in another dtype;  da = dz in a's dtype."""

    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, grad):
        return (grad.astype(self.dtype),)


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
