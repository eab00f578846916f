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


def refuse_unimplemented(op, **options):
    """Raise NotImplementedError naming the first option given a value other than its default.

    options: name=(value, default). PyTorch's parameters that ninpy does not implement are
    accepted at PyTorch's default, so a PyTorch line either computes PyTorch's result or says why not.
    """
    for name, (value, default) in options.items():
        if not (value is default or (value == default if default is not None else value is None)):
            raise NotImplementedError(f"{op}: {name}={value!r} is not implemented in ninpy "
                                      f"(only {name}={default!r})")


# ---- type promotion: PyTorch's rule ------------------------------------------------------------
DEFAULT_FLOAT = np.dtype(np.float32)   # torch.get_default_dtype(): what a Python float becomes


def _category(dtype):
    """0 bool, 1 integer, 2 floating point: the order in which PyTorch promotes categories."""
    return 0 if dtype.kind == "b" else 1 if dtype.kind in "iu" else 2


def _promote(a, b):
    """torch.promote_types: within a category the wider type; across, the higher category's type
    (int64 with float16 is float16, where NumPy would say float64)."""
    if a is None or b is None:
        return b if a is None else a
    if _category(a) != _category(b):
        return a if _category(a) > _category(b) else b
    return np.promote_types(a, b)


def _scalar_dtype(value):
    """The dtype a Python number takes part in promotion with: bool, int64, or the default float."""
    if isinstance(value, (bool, np.bool_)):
        return np.dtype(bool)
    if isinstance(value, (int, np.integer)):
        return np.dtype(np.int64)
    if isinstance(value, (float, np.floating)):
        return DEFAULT_FLOAT
    raise TypeError(f"unsupported operand: {type(value).__name__}; expected a Tensor or a Python number")


def result_type(*operands):
    """The dtype of an arithmetic result, by PyTorch's rule (torch.result_type): tensors with
    dimensions decide; 0-d tensors only when of a higher category; Python numbers only when of a
    higher category still, and then as int64 or the default float (float32)."""
    tiers = [None, None, None]   # dimensioned tensors, 0-d tensors, Python numbers
    for x in operands:
        if isinstance(x, Tensor):
            tier, dtype = (0 if x.ndim else 1), x.dtype
        else:
            tier, dtype = 2, _scalar_dtype(x)
        tiers[tier] = _promote(tiers[tier], dtype)
    result = None
    for dtype in tiers:                            # each lower tier counts only if higher category
        if result is None or (dtype is not None and _category(dtype) > _category(result)):
            result = dtype if result is None or result.kind == "b" else _promote(result, dtype)
    return result


@contextlib.contextmanager
def enable_grad():
    """Inside this block the graph is recorded again, even within no_grad() (an optimiser's closure)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
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
    """An array plus what autograd needs: requires_grad, grad, and the Function that made it.

    Tensor(data, dtype=None, device=None, requires_grad=False) is torch.tensor(data, ...): Python
    floats become float32 (the default dtype), integers int64, a NumPy array keeps its dtype.
    `x.data` is the array itself: changing it (`x.data[...] = v`) is invisible to autograd, as
    `.data` is in PyTorch. The operations that change a tensor in place (optimizer.step(),
    Module.load_state_dict) raise its version; backward() refuses a Function whose saved input
    changed version since the forward pass (Function.saved_inputs).
    """

    __array_priority__ = 1000  # so `ndarray * Tensor` calls Tensor.__rmul__

    def __init__(self, data, *, dtype=None, device=None, requires_grad=False, pin_memory=False):
        refuse_unimplemented("Tensor", pin_memory=(pin_memory, False))
        self.data = _as_array(data, device, dtype)
        self.requires_grad = requires_grad
        self.grad = None
        self.creator = None  # the Function that computed this tensor; None for a leaf
        self._version = 0    # raised by every tracked in-place change (bump_version)

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        if value and self.data.dtype.kind not in "fc":
            raise RuntimeError(f"only Tensors of floating point dtype can require gradients, "
                               f"this one is {self.data.dtype}; cast it first (dtype=np.float32)")
        self._requires_grad = bool(value)

    def requires_grad_(self, requires_grad=True):
        self.requires_grad = requires_grad
        return self

    def bump_version(self):
        """Record an in-place change of this tensor's values (what torch's version counter counts)."""
        self._version += 1

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

    def size(self, dim=None):
        """The shape, or its length along `dim`, as torch.Tensor.size."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self):
        return self.data.size

    def dim(self):
        return self.data.ndim

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
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return len(self.data)

    # ---- moving and copying -----------------------------------------------------------------
    def numpy(self, *, force=False):
        """The values as a NumPy array (copied from the GPU if needed)."""
        if self.requires_grad and not force:
            raise RuntimeError("Can't call numpy() on Tensor that requires grad. "
                               "Use tensor.detach().numpy() instead.")
        return backend.to_device(self.data, "cpu")

    def item(self):
        if self.numel() != 1:
            raise RuntimeError(f"a Tensor with {self.numel()} elements cannot be converted to Scalar")
        return backend.to_device(self.data, "cpu").item()

    def to(self, device):
        """This tensor on `device` ("cpu" / "gpu" / "emulated"); gradients flow back to the original."""
        device = backend.resolve_device(device)
        if device == self.device:
            return self
        return ToDevice.apply(self, device=device)

    def detach(self):
        """The same values with no graph behind them."""
        return Tensor(self.data)

    # ---- the graph walk ---------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        """Fill `.grad` of every leaf that requires it with d(self)/d(leaf), accumulating (+=).

        gradient: the gradient flowing into this tensor; may be omitted only for a one-element
        tensor. Unless retain_graph, each Function drops what it saved once used, as PyTorch does,
        so the activations of one step are freed before the next step's forward; a second
        backward() through those Functions is then an error, as in PyTorch.
        A leaf's .grad is always an array of its own, with the leaf's dtype and shape: never the
        array passed in as `gradient`, nor one shared with another leaf.
        """
        refuse_unimplemented("backward", create_graph=(create_graph, False), inputs=(inputs, None))
        if not self.requires_grad:
            raise RuntimeError("element 0 of tensors does not require grad and does not have a "
                               "grad_fn: no input of the computation had requires_grad=True (or it "
                               "ran under no_grad())")
        grad = self._initial_grad(gradient)
        grads = {id(self): grad}
        owners = _MemoryOwners()
        if gradient is not None:
            owners.claim(grad)  # the caller's array: a leaf gets a copy of it
        for tensor in reversed(self._topological_order()):
            g = grads.pop(id(tensor), None)
            if g is None:
                continue
            fn = tensor.creator
            if fn is None:
                tensor.grad = owners.own(g) if tensor.grad is None else tensor.grad + g
                continue
            for parent, parent_grad in zip(fn.inputs, fn._checked_backward(g)):
                if parent is None or parent_grad is None or not parent.requires_grad:
                    continue
                key = id(parent)
                grads[key] = parent_grad if key not in grads else grads[key] + parent_grad
            if not retain_graph:
                fn._release()

    def _initial_grad(self, grad):
        xp = backend.array_module(self.data)
        if grad is None:
            if self.numel() != 1:
                raise RuntimeError(f"grad can be implicitly created only for scalar outputs, but "
                                   f"this tensor has shape {self.shape}; pass gradient= of that shape")
            return xp.ones_like(self.data)
        grad = _as_array(grad, self.device, self.dtype)
        if grad.shape != self.shape:
            raise RuntimeError(f"backward(): gradient has shape {grad.shape} but the tensor has "
                               f"shape {self.shape}; they must match")
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

    # ---- operators (the Functions are defined below), with PyTorch's type promotion ----------
    def __add__(self, other):
        return _arithmetic(Add, self, other)

    def __radd__(self, other):
        return _arithmetic(Add, other, self)

    def __sub__(self, other):
        return _arithmetic(Sub, self, other)

    def __rsub__(self, other):
        return _arithmetic(Sub, other, self)

    def __mul__(self, other):
        return _arithmetic(Mul, self, other)

    def __rmul__(self, other):
        return _arithmetic(Mul, other, self)

    def __truediv__(self, other):
        return _arithmetic(Div, self, other)

    def __rtruediv__(self, other):
        return _arithmetic(Div, other, self)

    def __neg__(self):
        if self.dtype.kind == "b":
            raise RuntimeError("Negation, the `-` operator, on a bool tensor is not supported. If "
                               "you are trying to invert a mask, use the `~` operator instead.")
        return Neg.apply(self)

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or not isinstance(exponent, (int, float, np.number)):
            raise NotImplementedError("Tensor ** Tensor is not implemented in ninpy; the exponent "
                                      f"must be a Python number, got {type(exponent).__name__}")
        dtype = result_type(self, exponent)
        if dtype.kind in "iub" and exponent < 0:
            raise RuntimeError("Integers to negative integer powers are not allowed.")
        return Pow.apply(self, exponent=exponent, dtype=dtype)

    def __matmul__(self, other):
        other = other if isinstance(other, Tensor) else Tensor(other, device=self.device)
        if self.dtype != other.dtype:
            raise RuntimeError(f"expected m1 and m2 to have the same dtype, but got: {self.dtype} "
                               f"!= {other.dtype}")
        if self.dtype.kind == "b":
            raise RuntimeError("matmul of bool tensors is not supported (nor in PyTorch); cast "
                               "them to a number dtype first")
        return MatMul.apply(self, other)

    def __rmatmul__(self, other):
        return Tensor(other, device=self.device) @ self

    # ---- what a loss is written with: PyTorch's names, parameters and defaults ---------------
    def matmul(self, other):
        """self @ other, as torch.matmul: 1-D operands are vectors, leading axes broadcast."""
        return self @ other

    def exp(self):
        return Exp.apply(self._floating())

    def log(self):
        return Log.apply(self._floating())

    def _floating(self):
        """self, or self as the default float (float32) if it holds integers or bool: what
        PyTorch computes exp and log of an integer tensor in."""
        return self if self.dtype.kind in "fc" else Cast.apply(self, dtype=DEFAULT_FLOAT)

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
            if self.numel() == 0:
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


def _arithmetic(op, a, b):
    """a op b for tensors and Python numbers: both cast to PyTorch's result dtype
    (torch.result_type), true division of integers in the default float, a number as a constant."""
    dtype = result_type(a, b)
    if op is Div and dtype.kind in "iub":
        dtype = DEFAULT_FLOAT
    if op is Sub and dtype.kind == "b" or op is Sub and any(
            isinstance(x, Tensor) and x.dtype.kind == "b" or isinstance(x, (bool, np.bool_)) for x in (a, b)):
        raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported. "
                           "If you are trying to invert a mask, use the `~` operator instead.")
    like = a if isinstance(a, Tensor) else b
    a, b = (x if isinstance(x, Tensor) else Tensor(_as_array(x, like.device, dtype)) for x in (a, b))
    return op.apply(a, b, dtype=dtype)


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


class Function:
    """One differentiable operation. Subclasses define forward (arrays in, one array out) and
    backward (gradient of the output in, one gradient per input out, None where not needed).

    `forward` stores on `self` only what `backward` needs (as Chainer's retain_inputs does);
    `self.needs_input_grad` (one bool per input, as in PyTorch) lets backward skip unneeded work.
    `saved_inputs` names the positions of the inputs whose values backward reads (all, unless a
    subclass says fewer): if one of them is changed in place between forward and backward,
    backward raises, as PyTorch's version counter makes it do.
    `backward` returns new arrays, or the gradient it was given and views of it, and never writes
    into that gradient: a leaf then keeps what reaches it without a copy (`_MemoryOwners`).
    """

    inputs = ()
    needs_input_grad = ()
    released = False
    saved_inputs = None   # None: every input

    @classmethod
    def apply(cls, *args, **kwargs):
        """Run forward on the input tensors' arrays (args) with the options (kwargs); link the
        result into the graph if gradients are needed."""
        inputs, params = args, kwargs
        fn = cls()
        fn.needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs)
        arrays = [None if t is None else t.data for t in inputs]
        out = fn.forward(*arrays, **params)
        needs_grad = _grad_enabled and any(fn.needs_input_grad)
        result = Tensor(out, requires_grad=needs_grad and out.dtype.kind in "fc")
        if result.requires_grad:
            fn.inputs = inputs
            positions = range(len(inputs)) if cls.saved_inputs is None else cls.saved_inputs
            fn.versions = {i: inputs[i]._version for i in positions if inputs[i] is not None}
            result.creator = fn
        return result

    def forward(self, *arrays, **params):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    def _checked_backward(self, grad):
        """backward(grad), checked as PyTorch checks it: the graph was not freed, no saved input
        changed in place since forward, one gradient per input, each of its input's shape and
        dtype (a float64 gradient reaching a float32 input is cast to float32)."""
        name = type(self).__name__
        if self.released:
            raise RuntimeError(
                "Trying to backward through the graph a second time: the first backward() freed "
                f"what {name} saved for it. Pass retain_graph=True to the first backward() if "
                "you need to call it again")
        for i, version in self.versions.items():
            if self.inputs[i]._version != version:
                t = self.inputs[i]
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an "
                    f"inplace operation: input {i} of {name}, of shape {t.shape} and dtype "
                    f"{t.dtype}, is at version {t._version}; expected version {version} instead. "
                    "Hint: call optimizer.step() (or change a saved tensor) only after backward()")
        grads = self.backward(grad)
        if not isinstance(grads, (tuple, list)):
            grads = (grads,)
        if len(grads) != len(self.inputs):
            raise RuntimeError(f"function {name}.backward returned an incorrect number of "
                               f"gradients (expected {len(self.inputs)}, got {len(grads)})")
        return [None if g is None or t is None else _fit_grad(self, t, g)
                for t, g in zip(self.inputs, grads)]

    def _release(self):
        """Drop the inputs and everything forward saved (its arrays): backward has used them."""
        self.__dict__.clear()
        self.released = True


def _fit_grad(fn, parent, grad):
    """The gradient as its input's own dtype and an array (NumPy turns 0-d results into scalars)."""
    xp = backend.array_module(parent.data)
    grad = xp.asarray(grad)
    if grad.shape != parent.shape:
        raise RuntimeError(f"{type(fn).__name__}.backward returned a gradient of shape {grad.shape} "
                           f"for an input of shape {parent.shape}")
    return grad if grad.dtype == parent.dtype else grad.astype(parent.dtype)


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


def _cast(array, dtype):
    return array if dtype is None or array.dtype == dtype else array.astype(dtype)


class Add(Function):
    """z = a + b;  dz/da = 1, dz/db = 1 (summed over broadcast axes)."""

    saved_inputs = ()

    def forward(self, a, b, dtype=None):
        _broadcast_shapes(a, b, "add")
        self.shapes = a.shape, b.shape
        return _cast(a, dtype) + _cast(b, dtype)

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(grad, self.shapes[1])


class Sub(Function):
    """z = a - b;  dz/da = 1, dz/db = -1."""

    saved_inputs = ()

    def forward(self, a, b, dtype=None):
        _broadcast_shapes(a, b, "sub")
        self.shapes = a.shape, b.shape
        return _cast(a, dtype) - _cast(b, dtype)

    def backward(self, grad):
        return unbroadcast(grad, self.shapes[0]), unbroadcast(-grad, self.shapes[1])


class Mul(Function):
    """z = a * b;  dz/da = b, dz/db = a."""

    def forward(self, a, b, dtype=None):
        _broadcast_shapes(a, b, "mul")
        self.a, self.b = _cast(a, dtype), _cast(b, dtype)
        return self.a * self.b

    def backward(self, grad):
        return unbroadcast(grad * self.b, self.a.shape), unbroadcast(grad * self.a, self.b.shape)


class Div(Function):
    """z = a / b;  dz/da = 1/b, dz/db = -a/b^2."""

    def forward(self, a, b, dtype=None):
        _broadcast_shapes(a, b, "div")
        self.a, self.b = _cast(a, dtype), _cast(b, dtype)
        return self.a / self.b

    def backward(self, grad):
        grad_a = grad / self.b
        return (unbroadcast(grad_a, self.a.shape),
                unbroadcast(-grad_a * self.a / self.b, self.b.shape))


class Neg(Function):
    """z = -a;  dz/da = -1."""

    saved_inputs = ()

    def forward(self, a):
        return -a

    def backward(self, grad):
        return (-grad,)


class Pow(Function):
    """z = a^p for a constant p;  dz/da = p a^(p-1) (0 when p = 0, as in PyTorch)."""

    def forward(self, a, exponent, dtype=None):
        self.a, self.exponent = _cast(a, dtype), exponent
        return self.a ** self.a.dtype.type(exponent)

    def backward(self, grad):
        if self.exponent == 0:
            return (grad * 0,)
        p = self.a.dtype.type(self.exponent)
        return (grad * p * self.a ** (p - 1),)


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

    saved_inputs = ()

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

    saved_inputs = ()

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

    saved_inputs = ()

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

    saved_inputs = ()

    def forward(self, a, device):
        self.source = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, grad):
        return (backend.to_device(grad, self.source),)
