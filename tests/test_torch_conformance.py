"""Same name, same meaning: every public name ninpy shares with PyTorch is held to PyTorch's.

One table, ROWS, pairs each such ninpy callable with its PyTorch counterpart. For every row:
- its signature (parameter names, order, kinds, defaults) equals PyTorch's, with ninpy's extras
  only after PyTorch's parameters and keyword-only;
- each option ninpy does not implement is refused by name (NotImplementedError) when given a
  value other than PyTorch's default (REFUSED);
- where the row has a behaviour check, hypothesis draws inputs (0-d and empty shapes, float32,
  float64, float16, int64, bool and mixed pairs, Python numbers, memory layouts, NaN and +-inf) and
  ninpy and PyTorch must give the same values, result dtype and shape and input gradients, or both
  refuse. ninpy may refuse where PyTorch computes only where docs/design.md says its contract is
  narrower (the kernel operators take float32 and float64 only; the options above), and every
  refusal must be one line raised by ninpy's own code, never an error from inside NumPy or Numba.
A completeness test walks ninpy.functional, ninpy.nn, ninpy.optim, Tensor, Function and the
top-level autograd names: each public callable is a row or in NINPY_ONLY with its reason.

PyTorch's signature comes from inspect.signature where PyTorch's callable is Python; for its C++
builtins (F.conv2d, F.avg_pool2d, torch.tensor, Tensor methods) inspect has none, so the signature
is parsed from the first line of the builtin's own docstring (e.g. "conv2d(input, weight,
bias=None, stride=1, ...) -> Tensor"); Tensor's operators (__add__, ...) take (other) by Python's
operator protocol. Where a docstring disagrees with the binding (Tensor.sum's dtype is keyword-only
in the binding, positional in the text), the row says so.
"""
import inspect
import operator
import os
import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ninpy
import ninpy.functional as F
from ninpy import Tensor, nn, optim
from ninpy.autograd import Function
from strategies import conv_geometries, in_layout, layouts, pool_geometries

torch = pytest.importorskip("torch")
TF = torch.nn.functional
NINPY_DIR = os.path.dirname(ninpy.__file__)
EXAMPLES = settings(max_examples=int(os.environ.get("NINPY_CONFORMANCE_EXAMPLES", 15)))


# ---- PyTorch's signatures ------------------------------------------------------------------------

def signature_from_text(text):
    """An inspect.Signature from a documented signature line such as "f(a, b=1, *, c=None) -> T"."""
    params = text[text.index("(") + 1:text.rindex(")")]
    namespace = {}
    exec(f"def documented({params}): pass", {}, namespace)   # torch's own text, defaults literals
    return inspect.signature(namespace["documented"])


def torch_signature(source):
    """PyTorch's signature: inspect's where it can read one, else the docstring's first line."""
    if isinstance(source, str):
        return signature_from_text(source)
    try:
        return inspect.signature(source)
    except ValueError:
        return signature_from_text((source.__doc__ or "").strip().splitlines()[0].split(" -> ")[0])


def parameters(signature):
    return [(p.name, p.kind, p.default) for p in signature.parameters.values() if p.name != "self"]


# ---- running both ---------------------------------------------------------------------------------

FLOATS = (np.float32, np.float64)
KERNEL_REFUSES = "ninpy's kernel operators compute in float32 and float64 only (docs/design.md)"


def to_torch(value, requires_grad):
    if isinstance(value, np.ndarray):
        t = torch.from_numpy(value)
        return t.requires_grad_() if requires_grad else t
    return value


def to_ninpy(value, requires_grad):
    if isinstance(value, np.ndarray):
        return Tensor(value, requires_grad=requires_grad)
    return value


def _call(fn, args):
    try:
        return fn(*args), None
    except Exception as error:  # noqa: BLE001 - the outcome is compared, whatever it is
        return None, error


def assert_refused_at_boundary(error):
    """A refusal is one line raised by ninpy's own code: not from NumPy, Numba or CuPy."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert frames and frames[-1].startswith(NINPY_DIR), (
        f"{type(error).__name__}: {error} was raised inside {frames[-1] if frames else '?'}, "
        "not by ninpy at its public boundary")
    assert str(error) and "\n" not in str(error), f"not one line: {error!r}"


def _outputs(result):
    return list(result) if isinstance(result, tuple) else [result]


def _array(value):
    if isinstance(value, Tensor):
        return value.data
    return value.detach().numpy()


def _dtype_name(value):
    return value.dtype.name if isinstance(value, Tensor) else str(value.dtype).replace("torch.", "")


TOLERANCE = {"float16": 2e-3, "float32": 2e-5}   # any other dtype: 1e-10


def assert_same(ours, theirs, what, computed_in=None):
    """Same dtype, shape and values; within the rounding of the value's dtype, or of `computed_in`
    where the value was computed in a narrower one (a float64 input's gradient through a float32
    result carries float32's rounding: the sums over broadcast axes run in float32 on both sides,
    in each library's own order)."""
    assert _dtype_name(ours) == _dtype_name(theirs), f"{what}: dtype {ours.dtype} vs {theirs.dtype}"
    a, b = _array(ours), _array(theirs)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    tolerance = max(TOLERANCE.get(np.dtype(dtype).name, 1e-10)
                    for dtype in (a.dtype, computed_in or a.dtype))
    if a.dtype.kind == "f":
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance, equal_nan=True, err_msg=what)
    else:
        np.testing.assert_array_equal(a, b, err_msg=what)


def compare(fn, args, may_refuse=False, theirs_fn=None, grad_seed=0):
    """Run fn on ninpy tensors and (theirs_fn or fn) on torch tensors built from the same arrays;
    assert the same outputs and gradients, or that both refuse. may_refuse: ninpy may refuse here
    where PyTorch computes (a documented narrower contract)."""
    wants_grad = [isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in args]
    ours_in = [to_ninpy(a, g) for a, g in zip(args, wants_grad)]
    theirs_in = [to_torch(a, g) for a, g in zip(args, wants_grad)]
    ours, our_error = _call(fn, ours_in)
    theirs, their_error = _call(theirs_fn or fn, theirs_in)
    if our_error is not None:
        assert their_error is not None or may_refuse, (
            f"ninpy refused ({type(our_error).__name__}: {our_error}) where PyTorch computes")
        assert_refused_at_boundary(our_error)
        return None
    assert their_error is None, f"ninpy computed where PyTorch refuses ({their_error})"
    ours, theirs = _outputs(ours), _outputs(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert_same(a, b, f"output {i}")
    a, b = ours[0], theirs[0]
    if b.requires_grad:
        assert a.requires_grad, "PyTorch's result requires grad, ninpy's does not"
        upstream = np.random.default_rng(grad_seed).uniform(-1, 1, b.shape)
        a.backward(upstream.astype(a.dtype))
        b.backward(torch.from_numpy(upstream.astype(_array(b).dtype)))
        for i, (x, y) in enumerate(zip(ours_in, theirs_in)):
            if isinstance(x, Tensor) and x.requires_grad:
                assert (x.grad is None) == (y.grad is None), f"gradient of input {i}"
                if y.grad is not None:
                    assert_same(Tensor(x.grad), y.grad, f"gradient of input {i}",
                                computed_in=a.dtype)
    return ours


# ---- drawing inputs -------------------------------------------------------------------------------

ALL_DTYPES = [np.float32, np.float64, np.float16, np.int64, np.bool_]
dtypes = st.sampled_from(ALL_DTYPES)


def draw_array(data, shape, dtype, special=True, low=-3, high=3):
    """Values of `dtype` in a drawn memory layout, with NaN and +-inf sometimes."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    if np.dtype(dtype).kind == "b":
        values = rng.random(shape) < 0.5
    elif np.dtype(dtype).kind in "iu":
        values = rng.integers(low, high + 1, shape)
    else:
        values = rng.uniform(low, high, shape)
        if special and values.size and data.draw(st.booleans(), label="special values"):
            flat = values.reshape(-1)
            picks = rng.integers(0, flat.size, max(1, flat.size // 4))
            flat[picks] = rng.choice([np.nan, np.inf, -np.inf], picks.size)
    return in_layout(np.asarray(values, dtype=dtype), data.draw(layouts, label="layout"))


def kernel_may_refuse(*arrays):
    return any(np.dtype(a.dtype) not in map(np.dtype, FLOATS) for a in arrays)


# ---- behaviour checks, one per row (or shared) ----------------------------------------------------

def check_conv2d(data, fn=None):
    g = data.draw(conv_geometries(max_batch=2), label="geometry")
    n = data.draw(st.sampled_from([0, g.n]), label="batch")
    x_dtype, w_dtype = data.draw(dtypes, label="x dtype"), data.draw(dtypes, label="w dtype")
    x = draw_array(data, (n, g.c, g.h, g.w), x_dtype)
    w = draw_array(data, (2, g.c, g.kh, g.kw), w_dtype, special=False)
    b = draw_array(data, (2,), w_dtype, special=False) if data.draw(st.booleans()) else None
    stride, padding = (g.sh, g.sw), (g.ph, g.pw)
    args = [x, w] + ([b] if b is not None else [])
    call = fn or (lambda F_: lambda x, w, b=None: F_.conv2d(x, w, b, stride, padding))
    # torch skips its dtype check for an empty batch; ninpy refuses mixed dtypes always
    mixed_empty = n == 0 and x.dtype != w.dtype
    compare(call(F), args, may_refuse=kernel_may_refuse(x, w) or mixed_empty, theirs_fn=call(TF))


def check_relu(data):
    shape = data.draw(st.sampled_from([(), (0,), (3,), (2, 3), (1, 2, 3, 3)]), label="shape")
    x = draw_array(data, shape, data.draw(dtypes))
    compare(F.relu, [x], may_refuse=kernel_may_refuse(x), theirs_fn=TF.relu)


def _pool_args(data):
    g = data.draw(pool_geometries(max_batch=2), label="geometry")
    n = data.draw(st.sampled_from([0, g.n]), label="batch")
    x = draw_array(data, (n, g.c, g.h, g.w), data.draw(dtypes))
    return g, x


def check_max_pool2d(data):
    g, x = _pool_args(data)
    dilation = data.draw(st.sampled_from([1, 1, 1, 2]), label="dilation")
    indices = data.draw(st.booleans(), label="return_indices")

    def call(F_):
        return lambda x: F_.max_pool2d(x, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw), dilation,
                                       g.ceil_mode, indices)
    compare(call(F), [x], may_refuse=kernel_may_refuse(x) or dilation != 1, theirs_fn=call(TF))


def check_avg_pool2d(data):
    g, x = _pool_args(data)
    include_pad = data.draw(st.booleans(), label="count_include_pad")
    divisor = data.draw(st.sampled_from([None, None, None, 3]), label="divisor_override")

    def call(F_):
        return lambda x: F_.avg_pool2d(x, (g.kh, g.kw), (g.sh, g.sw), (g.ph, g.pw), g.ceil_mode,
                                       include_pad, divisor)
    compare(call(F), [x], may_refuse=kernel_may_refuse(x) or divisor is not None,
            theirs_fn=call(TF))


def check_dropout(data):
    """Deterministic settings only: evaluation, p = 0 and p = 1 (the masks are random)."""
    shape = data.draw(st.sampled_from([(), (0,), (4,), (2, 3)]), label="shape")
    x = draw_array(data, shape, data.draw(dtypes))
    p, training = data.draw(st.sampled_from([(0.0, True), (1.0, True), (0.5, False)]), label="p")
    def call(F_):
        return lambda x: F_.dropout(x, p, training) * 1
    may = kernel_may_refuse(x) and p == 1.0
    compare(call(F), [x], may_refuse=may, theirs_fn=call(TF))


def check_cross_entropy(data):
    n, k = data.draw(st.integers(0, 4), label="N"), data.draw(st.integers(1, 4), label="K")
    unbatched = data.draw(st.booleans(), label="unbatched") and n == 1
    x = draw_array(data, (k,) if unbatched else (n, k), data.draw(dtypes), low=-5, high=5)
    labels = np.random.default_rng(n * 7 + k).integers(0, k, n).astype(np.int64)
    ignore = data.draw(st.sampled_from([-100, 0, 1]), label="ignore_index")
    if n and data.draw(st.booleans(), label="some ignored"):
        labels[0] = ignore
    target = labels.reshape(()) if unbatched else labels
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    smoothing = data.draw(st.sampled_from([0.0, 0.0, 0.1]), label="label_smoothing")

    def call(F_):
        to = (lambda a: a) if F_ is F else torch.from_numpy
        return lambda x: F_.cross_entropy(x, to(target), ignore_index=ignore, reduction=reduction,
                                          label_smoothing=smoothing)
    compare(call(F), [x], may_refuse=kernel_may_refuse(x), theirs_fn=call(TF))


# Tensor arithmetic: the same Python expression on both libraries' tensors.
OPERAND_KINDS = ALL_DTYPES + [int, float, bool]
SHAPES = [(), (0,), (3,), (2, 3), (1, 3)]


def _operand(data, kind, shape):
    if kind in (int, float, bool):
        return data.draw({int: st.integers(-3, 3), float: st.sampled_from([0.5, -2.0, 0.0]),
                          bool: st.booleans()}[kind], label="number")
    return draw_array(data, shape, kind)


def check_binary(op):
    def check(data):
        a_kind = data.draw(st.sampled_from(ALL_DTYPES), label="a")
        b_kind = data.draw(st.sampled_from(OPERAND_KINDS), label="b")
        a_shape = data.draw(st.sampled_from(SHAPES), label="a shape")
        b_shape = data.draw(st.sampled_from([a_shape, a_shape[1:], ()]), label="b shape")
        a, b = _operand(data, a_kind, a_shape), _operand(data, b_kind, b_shape)
        reflected = data.draw(st.booleans(), label="reflected") and not isinstance(b, np.ndarray)
        if reflected:   # number op tensor: __radd__ and friends
            compare(lambda t: op(b, t), [a])
        else:
            compare(op, [a, b])
    return check


def check_neg(data):
    x = draw_array(data, data.draw(st.sampled_from(SHAPES)), data.draw(dtypes))
    compare(operator.neg, [x])


def check_pow(data):
    x = draw_array(data, data.draw(st.sampled_from(SHAPES)), data.draw(dtypes), special=False, low=1)
    exponent = data.draw(st.sampled_from([0, 1, 2, 3, -1, 0.5, 2.0, -1.5]), label="exponent")
    compare(lambda t: t ** exponent, [x])


def check_matmul(data):
    m, k, n = (data.draw(st.integers(0, 3)) for _ in range(3))
    a = draw_array(data, (m, k), data.draw(dtypes), special=False)
    b = draw_array(data, (k, n), data.draw(dtypes), special=False)
    # torch multiplies bool matrices only when they are empty; ninpy refuses bool always
    compare(operator.matmul, [a, b], may_refuse=a.dtype == bool or b.dtype == bool)


def check_reduction(name):
    def check(data):
        shape = data.draw(st.sampled_from([(), (0,), (3,), (2, 3), (2, 0)]), label="shape")
        x = draw_array(data, shape, data.draw(dtypes))
        dims = [None] + list(range(len(shape)))
        dim, keepdim = data.draw(st.sampled_from(dims)), data.draw(st.booleans())
        compare(lambda t: getattr(t, name)(dim, keepdim) if dim is not None else getattr(t, name)(), [x])
    return check


def check_unary(name):
    def check(data):
        x = draw_array(data, data.draw(st.sampled_from(SHAPES), label="shape"), data.draw(dtypes),
                       low=0)
        compare(lambda t: getattr(t, name)(), [x])
    return check


def check_max(data):
    shape = data.draw(st.sampled_from([(), (0,), (3,), (2, 3), (2, 0)]), label="shape")
    x = draw_array(data, shape, data.draw(dtypes))
    dim = data.draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))), label="dim")
    keepdim = data.draw(st.booleans(), label="keepdim") and dim is not None
    compare(lambda t: t.max() if dim is None else tuple(t.max(dim, keepdim)), [x])


def check_transpose(data):
    shape = data.draw(st.sampled_from([(2, 3), (1, 2, 3), (0, 2)]), label="shape")
    x = draw_array(data, shape, data.draw(dtypes))
    dims = data.draw(st.sampled_from([(0, 1), (1, 0), (-1, 0), (0, 0)]), label="dims")
    compare(lambda t: t.transpose(*dims), [x])


def check_getitem(data):
    x = draw_array(data, (3, 4), data.draw(dtypes))
    index = data.draw(st.sampled_from([0, -1, (1, 2), slice(1, None), (slice(None), 2),
                                       (None, 1), (Ellipsis, 1), (slice(None, None, 2),)]))
    compare(lambda t: t[index], [x])


def check_reshape(data):
    x = draw_array(data, (2, 3), data.draw(dtypes))
    shape = data.draw(st.sampled_from([(6,), (3, 2), (-1,), (1, 6), (3, -1), (4, 2)]))
    compare(lambda t: t.reshape(*shape), [x])


def check_size_and_numel(data):
    x = draw_array(data, data.draw(st.sampled_from(SHAPES)), np.float32)
    ours, theirs = Tensor(x), torch.from_numpy(x)
    assert tuple(ours.size()) == tuple(theirs.size()) and ours.numel() == theirs.numel()
    assert ours.dim() == theirs.dim()
    for d in range(x.ndim):
        assert ours.size(d) == theirs.size(d)


def check_tensor_construction(data):
    value = data.draw(st.sampled_from([1, 1.5, True, [1, 2], [1.0, 2.0], [[True]], [1, 2.5]]))
    assert_same(Tensor(value), torch.tensor(value), f"Tensor({value!r})")


def check_requires_grad(data):
    dtype = data.draw(dtypes)
    x = draw_array(data, (2,), dtype)
    _, ours = _call(lambda: Tensor(x, requires_grad=True), [])
    _, theirs = _call(lambda: torch.tensor(x, requires_grad=True), [])
    assert (ours is None) == (theirs is None), (dtype, ours, theirs)
    _, ours = _call(lambda: Tensor(x).requires_grad_(), [])
    assert (ours is None) == (theirs is None)
    if ours is not None:
        assert_refused_at_boundary(ours)


def check_backward_refusals(data):
    x = draw_array(data, (2, 2), np.float32, special=False)
    for call in (lambda t: (t * 2).backward(),                             # no gradient, 4 elements
                 lambda t: (t * 2).backward(np.ones(3, np.float32)         # a wrong shape
                                            if isinstance(t, Tensor) else torch.ones(3)),
                 lambda t: t.detach().backward()):                          # nothing requires grad
        _, ours = _call(call, [Tensor(x, requires_grad=True)])
        _, theirs = _call(call, [torch.tensor(x, requires_grad=True)])
        assert ours is not None and theirs is not None
        assert_refused_at_boundary(ours)


def check_numpy_item_detach(data):
    x = draw_array(data, data.draw(st.sampled_from([(), (1,), (2,)])), np.float32)
    ours, theirs = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    for call in (lambda t: t.numpy(), lambda t: t.numpy(force=True), lambda t: t.item(),
                 lambda t: t.detach().numpy(), lambda t: len(t)):
        a, ours_error = _call(call, [ours])
        b, theirs_error = _call(call, [theirs])
        assert (ours_error is None) == (theirs_error is None), (ours_error, theirs_error)
        if ours_error is None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert_refused_at_boundary(ours_error)
    assert ours.detach().requires_grad is theirs.detach().requires_grad is False


def check_no_grad(data):
    x = draw_array(data, (2,), np.float32, special=False)
    for lib, make in ((ninpy, lambda: Tensor(x, requires_grad=True)),
                      (torch, lambda: torch.tensor(x, requires_grad=True))):
        t = make()
        with lib.no_grad():
            assert not (t * 2).requires_grad and not lib.is_grad_enabled()
            with lib.enable_grad():
                assert (t * 2).requires_grad and lib.is_grad_enabled()
        assert lib.no_grad()(lambda: (t * 2).requires_grad)() is False   # as a decorator


class _OursWrongCount(Function):
    def forward(self, a, b):
        return a * b

    def backward(self, grad):
        return (grad,)              # one gradient for two inputs


class _TheirsWrongCount(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        return a * b

    @staticmethod
    def backward(ctx, grad):
        return (grad,)


class _OursWrongGrad(Function):
    def forward(self, a):
        return a * a

    def backward(self, grad):
        return (grad * 3.0,)        # the gradient of a*a is 2a


class _TheirsWrongGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        return a * a

    @staticmethod
    def backward(ctx, grad):
        return grad * 3.0


def check_function(data):
    x = draw_array(data, (3,), np.float64, special=False)
    ours = _OursWrongCount.apply(Tensor(x, requires_grad=True), Tensor(x, requires_grad=True))
    theirs = _TheirsWrongCount.apply(torch.tensor(x, requires_grad=True), torch.tensor(x))
    _, ours_error = _call(lambda: ours.sum().backward(), [])
    _, theirs_error = _call(lambda: theirs.sum().backward(), [])
    assert ours_error is not None and theirs_error is not None
    assert "incorrect number of gradients" in str(ours_error)
    assert_refused_at_boundary(ours_error)


def check_gradcheck(data):
    x = draw_array(data, (3,), np.float64, special=False, low=1)
    for lib, make, wrong in ((ninpy, lambda: Tensor(x, requires_grad=True), _OursWrongGrad),
                             (torch.autograd, lambda: torch.tensor(x, requires_grad=True),
                              _TheirsWrongGrad)):
        assert lib.gradcheck(lambda t: t * t, (make(),)) is True
        assert lib.gradcheck(wrong.apply, (make(),), raise_exception=False) is False


def _module_pair(data):
    """The same small network in both libraries, ninpy's weights copied into torch's."""
    ours = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, dtype=np.float64), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Dropout(0.5), nn.AvgPool2d(2, ceil_mode=True),
                         nn.Conv2d(3, 2, 1, dtype=np.float64))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1, dtype=torch.float64),
                                 torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Dropout(0.5),
                                 torch.nn.AvgPool2d(2, ceil_mode=True),
                                 torch.nn.Conv2d(3, 2, 1, dtype=torch.float64))
    rng = np.random.default_rng(data.draw(st.integers(0, 1000), label="weights"))
    state = {name: rng.standard_normal(p.shape) for name, p in ours.named_parameters()}
    ours.load_state_dict(state)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return ours, theirs


def check_modules(data):
    ours, theirs = _module_pair(data)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert isinstance(ours.parameters(), types.GeneratorType)
    assert len(list(ours.children())) == len(list(theirs.children()))
    assert len(list(ours.modules())) == len(list(theirs.modules()))
    assert [m.training for m in ours.eval().modules()] == [m.training for m in theirs.eval().modules()]
    x = draw_array(data, (data.draw(st.integers(0, 2)), 2, 5, 5), np.float64)
    compare(ours, [x], theirs_fn=theirs)
    keys = ours.load_state_dict({}, strict=False)
    assert keys.missing_keys == theirs.load_state_dict({}, strict=False).missing_keys
    ours.train(), theirs.train()
    for model in (ours, theirs):
        model.zero_grad()
    assert all(p.grad is None for p in ours.parameters())


def check_sgd(data):
    lr = data.draw(st.sampled_from([0.1, 0.01]))
    momentum = data.draw(st.sampled_from([0, 0.9]))
    weight_decay = data.draw(st.sampled_from([0, 1e-2]))
    nesterov = data.draw(st.booleans()) and momentum > 0
    rng = np.random.default_rng(data.draw(st.integers(0, 1000)))
    start = [rng.standard_normal((3, 2)), rng.standard_normal(2)]
    ours = [nn.Parameter(a.copy()) for a in start]
    theirs = [torch.tensor(a, requires_grad=True) for a in start]
    sgd = optim.SGD(ours, lr, momentum, 0, weight_decay, nesterov)
    torch_sgd = torch.optim.SGD(theirs, lr, momentum, 0, weight_decay, nesterov)
    for _ in range(3):
        sgd.zero_grad(), torch_sgd.zero_grad()
        sum(((p * p * 0.5).sum() for p in ours), Tensor(0.0)).backward()
        sum((p * p * 0.5).sum() for p in theirs).backward()
        sgd.step(), torch_sgd.step()
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.data, b.detach().numpy(), rtol=1e-12)


def check_schedule(data):
    kind = data.draw(st.sampled_from(["multistep", "cosine"]))
    t_max = data.draw(st.integers(1, 4))
    milestones = sorted(data.draw(st.lists(st.integers(1, 6), max_size=3)))
    ours_sgd = optim.SGD([nn.Parameter(np.zeros(1))], lr=0.1)
    theirs_sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    if kind == "cosine":
        ours = optim.CosineAnnealingLR(ours_sgd, t_max, eta_min=0.001)
        theirs = torch.optim.lr_scheduler.CosineAnnealingLR(theirs_sgd, t_max, eta_min=0.001)
    else:
        ours = optim.MultiStepLR(ours_sgd, milestones, gamma=0.5)
        theirs = torch.optim.lr_scheduler.MultiStepLR(theirs_sgd, milestones, gamma=0.5)
    for epoch in range(3 * t_max + 2):
        np.testing.assert_allclose(ours.get_last_lr(), theirs.get_last_lr(), rtol=1e-9,
                                   err_msg=f"epoch {epoch}")
        theirs_sgd.step()
        ours.step(), theirs.step()


# ---- the table --------------------------------------------------------------------------------------

@dataclass
class Row:
    name: str                        # the ninpy name, as the completeness test spells it
    ours: Callable
    theirs: object                   # PyTorch's callable, or its documented signature text
    check: Optional[Callable] = None
    refused: dict = field(default_factory=dict)   # option -> a value ninpy refuses by name
    call: Optional[Callable] = None  # how to call ours with one refused option (kwargs -> call)
    signature_note: str = ""         # why the signature is compared differently, if it is


def _binary(name, op):
    return Row(f"Tensor.{name}", getattr(Tensor, name), "(other)", check_binary(op))


_x4 = np.zeros((1, 1, 4, 4), np.float32)
_w = np.zeros((1, 1, 1, 1), np.float32)

ROWS = [
    # ---- ninpy.functional
    Row("functional.conv2d", F.conv2d, TF.conv2d, check_conv2d,
        refused={"dilation": 2, "groups": 2},
        call=lambda **kw: F.conv2d(Tensor(_x4), Tensor(_w), **kw)),
    Row("functional.relu", F.relu, TF.relu, check_relu, refused={"inplace": True},
        call=lambda **kw: F.relu(Tensor(_x4), **kw)),
    Row("functional.max_pool2d", F.max_pool2d, TF._max_pool2d, check_max_pool2d,
        refused={"dilation": 2}, call=lambda **kw: F.max_pool2d(Tensor(_x4), 2, **kw),
        signature_note="F.max_pool2d dispatches on return_indices; F._max_pool2d has its signature"),
    Row("functional.avg_pool2d", F.avg_pool2d, TF.avg_pool2d, check_avg_pool2d,
        refused={"divisor_override": 3}, call=lambda **kw: F.avg_pool2d(Tensor(_x4), 2, **kw)),
    Row("functional.dropout", F.dropout, TF.dropout, check_dropout, refused={"inplace": True},
        call=lambda **kw: F.dropout(Tensor(_x4), **kw)),
    Row("functional.cross_entropy", F.cross_entropy, TF.cross_entropy, check_cross_entropy,
        refused={"weight": np.ones(2)},
        call=lambda **kw: F.cross_entropy(Tensor(np.zeros((1, 2))), np.zeros(1, np.int64), **kw)),
    # ---- ninpy.nn
    Row("nn.Parameter", nn.Parameter, torch.nn.Parameter),
    Row("nn.Module", nn.Module, torch.nn.Module, signature_note="torch's takes (*args, **kwargs) "
        "and uses none; ninpy's takes nothing"),
    Row("nn.Conv2d", nn.Conv2d, torch.nn.Conv2d, check_modules,
        refused={"dilation": 2, "groups": 2, "padding_mode": "reflect"},
        call=lambda **kw: nn.Conv2d(1, 1, 1, **kw)),
    Row("nn.ReLU", nn.ReLU, torch.nn.ReLU, refused={"inplace": True}, call=lambda **kw: nn.ReLU(**kw)),
    Row("nn.MaxPool2d", nn.MaxPool2d, torch.nn.MaxPool2d, refused={"dilation": 2},
        call=lambda **kw: nn.MaxPool2d(2, **kw)),
    Row("nn.AvgPool2d", nn.AvgPool2d, torch.nn.AvgPool2d, refused={"divisor_override": 2},
        call=lambda **kw: nn.AvgPool2d(2, **kw)),
    Row("nn.Dropout", nn.Dropout, torch.nn.Dropout, refused={"inplace": True},
        call=lambda **kw: nn.Dropout(**kw)),
    Row("nn.Sequential", nn.Sequential, torch.nn.Sequential),
    # ---- ninpy.optim
    Row("optim.SGD", optim.SGD, torch.optim.SGD, check_sgd,
        refused={"dampening": 0.1, "maximize": True, "foreach": True, "differentiable": True,
                 "fused": True},
        call=lambda **kw: optim.SGD([nn.Parameter(np.zeros(1))], 0.1, **kw)),
    Row("optim.MultiStepLR", optim.MultiStepLR, torch.optim.lr_scheduler.MultiStepLR, check_schedule,
        refused={"last_epoch": 3},
        call=lambda **kw: optim.MultiStepLR(optim.SGD([nn.Parameter(np.zeros(1))]), [1], **kw)),
    Row("optim.CosineAnnealingLR", optim.CosineAnnealingLR,
        torch.optim.lr_scheduler.CosineAnnealingLR, check_schedule, refused={"last_epoch": 3},
        call=lambda **kw: optim.CosineAnnealingLR(optim.SGD([nn.Parameter(np.zeros(1))]), 2, **kw)),
    # ---- Tensor
    Row("Tensor", Tensor, torch.tensor, check_tensor_construction, refused={"pin_memory": True},
        call=lambda **kw: Tensor(1.0, **kw),
        signature_note="ninpy's Tensor(data, ...) is torch.tensor(data, ...)"),
    _binary("__add__", operator.add), _binary("__radd__", operator.add),
    _binary("__sub__", operator.sub), _binary("__rsub__", operator.sub),
    _binary("__mul__", operator.mul), _binary("__rmul__", operator.mul),
    _binary("__truediv__", operator.truediv), _binary("__rtruediv__", operator.truediv),
    Row("Tensor.__neg__", Tensor.__neg__, "()", check_neg),
    Row("Tensor.__pow__", Tensor.__pow__, "(exponent)", check_pow),
    Row("Tensor.__matmul__", Tensor.__matmul__, "(other)", check_matmul),
    Row("Tensor.__rmatmul__", Tensor.__rmatmul__, "(other)", check_matmul),
    Row("Tensor.matmul", Tensor.matmul, "matmul(other)", check_matmul,
        signature_note="the docstring says tensor2; the binding's parameter is other"),
    Row("Tensor.__getitem__", Tensor.__getitem__, "(index)", check_getitem),
    Row("Tensor.exp", Tensor.exp, torch.Tensor.exp, check_unary("exp")),
    Row("Tensor.log", Tensor.log, torch.Tensor.log, check_unary("log")),
    Row("Tensor.max", Tensor.max, torch.Tensor.max, check_max),
    Row("Tensor.transpose", Tensor.transpose, torch.Tensor.transpose, check_transpose),
    Row("Tensor.__len__", Tensor.__len__, "()", check_numpy_item_detach),
    Row("Tensor.sum", Tensor.sum, "sum(dim=None, keepdim=False, *, dtype=None)", check_reduction("sum"),
        signature_note="the docstring shows dtype positional; the binding takes it by keyword only"),
    Row("Tensor.mean", Tensor.mean, torch.Tensor.mean, check_reduction("mean")),
    Row("Tensor.reshape", Tensor.reshape, torch.Tensor.reshape, check_reshape),
    Row("Tensor.size", Tensor.size, torch.Tensor.size, check_size_and_numel),
    Row("Tensor.numel", Tensor.numel, torch.Tensor.numel, check_size_and_numel),
    Row("Tensor.dim", Tensor.dim, torch.Tensor.dim, check_size_and_numel),
    Row("Tensor.numpy", Tensor.numpy, torch.Tensor.numpy, check_numpy_item_detach),
    Row("Tensor.item", Tensor.item, torch.Tensor.item, check_numpy_item_detach),
    Row("Tensor.detach", Tensor.detach, "detach()", check_numpy_item_detach,
        signature_note="torch's docstring has no signature line; detach() takes nothing"),
    Row("Tensor.requires_grad_", Tensor.requires_grad_, torch.Tensor.requires_grad_,
        check_requires_grad),
    Row("Tensor.backward", Tensor.backward, torch.Tensor.backward, check_backward_refusals,
        refused={"create_graph": True, "inputs": [1]},
        call=lambda **kw: (Tensor(1.0, requires_grad=True) * 2).backward(**kw)),
    # ---- autograd
    Row("Function.apply", Function.apply, torch.autograd.Function.apply, check_function,
        signature_note="apply(*args) in both"),
    Row("no_grad", ninpy.no_grad, torch.no_grad, check_no_grad),
    Row("enable_grad", ninpy.enable_grad, "enable_grad()", check_no_grad,
        signature_note="torch's takes an optional function to decorate; ninpy's decorates as "
                       "a context manager does"),
    Row("is_grad_enabled", ninpy.is_grad_enabled, "is_grad_enabled()", check_no_grad),
    Row("gradcheck", ninpy.gradcheck, torch.autograd.gradcheck, check_gradcheck,
        refused={"fast_mode": True, "check_forward_ad": True},
        call=lambda **kw: ninpy.gradcheck(lambda t: t, [Tensor(np.ones(1), requires_grad=True)], **kw)),
    Row("manual_seed", ninpy.manual_seed, torch.manual_seed),
]

# Methods of the classes above that PyTorch's classes have too: the signature is compared.
METHOD_ROWS = {
    "nn.Module": ["forward", "__call__", "named_children", "children", "named_modules", "modules",
                  "named_parameters", "parameters", "train", "eval", "zero_grad", "state_dict",
                  "load_state_dict", "to"],
    "optim.SGD": ["step", "zero_grad", "state_dict", "load_state_dict"],
    "optim.MultiStepLR": ["step", "get_last_lr", "state_dict", "load_state_dict"],
    "optim.CosineAnnealingLR": ["step", "get_last_lr", "state_dict", "load_state_dict"],
}
for module_class in ("Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "Dropout", "Sequential"):
    METHOD_ROWS[f"nn.{module_class}"] = ["forward"]
METHOD_ROWS["nn.Sequential"] += ["__len__", "__getitem__"]

# Signatures that are overloaded in PyTorch (read by hand, no one signature to compare).
OVERLOADED = {
    "nn.Module.to": "torch's to(*args, **kwargs) takes a device, dtype or tensor; ninpy's to(device)",
    "nn.Module.__call__": "torch's _wrapped_call_impl(*args, **kwargs); ninpy's the same",
    "nn.Module.state_dict": "torch's (*args, destination=None, prefix='', keep_vars=False)",
}

_BY_NAME = {row.name: row for row in ROWS}
for owner, methods in METHOD_ROWS.items():
    ours_class, theirs_class = _BY_NAME[owner].ours, _BY_NAME[owner].theirs
    for method in methods:
        name = f"{owner}.{method}"
        _BY_NAME[name] = Row(name, getattr(ours_class, method), getattr(theirs_class, method),
                             check_modules if owner == "nn.Module" and method != "to" else None)
ROWS = list(_BY_NAME.values())

# Public callables PyTorch does not have under the same name, each with why it stays ninpy's.
NINPY_ONLY = {
    "functional.conv2d_relu": "conv2d + ReLU fused in one Function (NIN's every conv); torch fuses elsewhere",
    "functional.global_avg_pool2d": "NIN's classifier, (N, C, H, W) -> (N, C): torch spells it "
                                    "adaptive_avg_pool2d(x, 1).flatten(1)",
    "functional.swap_batch_and_channels": "(N, C, H, W) <-> (C, N, H, W), into NIN's channels-first layout",
    "functional.kernels_for": "picks the kernel module (Numba or CUDA) for an array's device",
    "functional.use_kernels": "chooses the fast path (Numba, CUDA) or the plain one (reference.py)",
    "functional.kernel_set": "which path use_kernels chose",
    "functional.working_layout": "the layout NIN keeps between its layers on the chosen path",
    "functional.Conv2d": "the autograd Function behind F.conv2d and F.conv2d_relu",
    "functional.ReLU": "the autograd Function behind F.relu",
    "functional.MaxPool2d": "the autograd Function behind F.max_pool2d",
    "functional.AvgPool2d": "the autograd Function behind F.avg_pool2d",
    "functional.GlobalAvgPool2d": "the autograd Function behind F.global_avg_pool2d",
    "functional.Dropout": "the autograd Function behind F.dropout",
    "functional.CounterDropout": "the autograd Function behind F.dropout on the GPU (counter-based mask)",
    "functional.PoolDropout": "the autograd Function behind F.max_pool2d_dropout and avg_pool2d_dropout on the GPU",
    "functional.max_pool2d_dropout": "max pooling then dropout, one operator on the GPU (NIN's pair); torch has none",
    "functional.avg_pool2d_dropout": "average pooling then dropout, as max_pool2d_dropout",
    "functional.CrossEntropy": "the autograd Function behind F.cross_entropy",
    "functional.SwapBatchAndChannels": "the autograd Function behind F.swap_batch_and_channels",
    "nn.init_weight": "NIN's Gaussian initialisation (He's std, or a fixed one)",
    "nn.GlobalAvgPool2d": "module of F.global_avg_pool2d (torch: AdaptiveAvgPool2d(1) + Flatten)",
    "nn.GlobalAvgPool2d.forward": "as nn.GlobalAvgPool2d",
    "nn.MLPConv": "NIN's mlpconv block: a conv and two 1x1 convs, each with ReLU",
    "nn.MLPConv.forward": "as nn.MLPConv",
    "nn.Module.num_parameters": "the parameter count the README and train.py print",
    "optim.SGD.parameters": "every group's parameters in one list: what checkpoints key buffers by",
    "Tensor.to": "torch's to(*args, **kwargs) also converts dtypes; ninpy's to(device) moves only",
    "Tensor.bump_version": "records an in-place change (torch's version counter, internal there)",
    "Function.forward": "ninpy's Functions are Chainer-style: forward(self, *arrays) on arrays, "
                        "not a static forward(ctx, *tensors)",
    "Function.backward": "backward(self, grad) on arrays, one gradient per input (as forward)",
    "GradcheckError": "torch.autograd.gradcheck.GradcheckError; ninpy's is an AssertionError",
}


def _public(owner):
    names = []
    for name, value in vars(owner).items():
        if name.startswith("_") or not callable(value) and not isinstance(value, (classmethod, staticmethod)):
            continue
        if isinstance(owner, types.ModuleType) and getattr(value, "__module__", None) != owner.__name__:
            continue   # imported from elsewhere
        names.append(name)
    return names


OPERATORS = {"__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
             "__rtruediv__", "__neg__", "__pow__", "__matmul__", "__rmatmul__", "__getitem__", "__len__",
             "__call__"}


def _methods(prefix, module, cls):
    """The public methods of a ninpy class, each named after the class that defines it: Tensor's
    as Tensor.*, a public base class's under that base, a private base's under `cls` itself."""
    names = set()
    for base in cls.__mro__[:-1]:
        if not base.__module__.startswith("ninpy") or issubclass(base, Function):
            continue   # a Function's methods are Function's interface (Function.* rows)
        owner = ("Tensor" if base is Tensor else f"{prefix}.{base.__name__}"
                 if getattr(module, base.__name__, None) is base and not base.__name__.startswith("_")
                 else f"{prefix}.{cls.__name__}")
        names.update(f"{owner}.{m}" for m in _public(base) + [o for o in OPERATORS if o in vars(base)])
    return names


def public_names():
    """Every public callable of the API the conformance rule covers, as the table names them."""
    names = {"Tensor"} | _methods("", None, Tensor)
    names.update(f"Function.{m}" for m in _public(Function))
    names.update(("no_grad", "enable_grad", "is_grad_enabled", "gradcheck", "GradcheckError",
                  "manual_seed"))
    for prefix, module in (("functional", F), ("nn", nn), ("optim", optim)):
        for name in _public(module):
            names.add(f"{prefix}.{name}")
            if isinstance(getattr(module, name), type):
                names.update(_methods(prefix, module, getattr(module, name)))
    return names


# ---- the tests ----------------------------------------------------------------------------------------

def test_every_public_name_is_a_row_or_ninpy_only():
    covered = set(_BY_NAME) | set(NINPY_ONLY)
    undecided = sorted(public_names() - covered)
    assert not undecided, (f"public names neither in the conformance table nor in NINPY_ONLY: "
                           f"{undecided}; add a Row (PyTorch has the name) or a reason")
    stale = sorted(covered - public_names())
    assert not stale, f"table entries for names ninpy no longer has: {stale}"


@pytest.mark.parametrize("row", [r for r in ROWS if r.name not in OVERLOADED], ids=lambda r: r.name)
def test_signature_is_pytorchs(row):
    ours = parameters(inspect.signature(row.ours))
    theirs = parameters(torch_signature(row.theirs))
    if row.name == "nn.Module":
        theirs = []   # torch.nn.Module(*args, **kwargs) accepts and ignores them
    if row.name == "Function.apply":
        theirs = [p for p in theirs if p[0] != "cls"]
    head = [(n, k, d) for n, k, d in ours[:len(theirs)]]
    assert [(n, k) for n, k, _ in head] == [(n, k) for n, k, _ in theirs], (ours, theirs)
    for (name, _, ours_default), (_, _, theirs_default) in zip(head, theirs):
        assert ours_default == theirs_default or (ours_default is None) == (theirs_default is None) \
            and ours_default is theirs_default, f"{name}: default {ours_default!r}, torch {theirs_default!r}"
    extras = ours[len(theirs):]
    assert all(kind == inspect.Parameter.KEYWORD_ONLY for _, kind, _ in extras), (
        f"ninpy's extras {[n for n, _, _ in extras]} must come after PyTorch's, keyword-only")


@pytest.mark.parametrize("row, option", [(r, o) for r in ROWS for o in r.refused],
                         ids=lambda v: v.name if isinstance(v, Row) else v)
def test_unimplemented_options_are_refused_by_name(row, option):
    with pytest.raises(NotImplementedError, match=option) as error:
        row.call(**{option: row.refused[option]})
    assert_refused_at_boundary(error.value)


_CHECKS = {}
for _row in ROWS:
    if _row.check is not None:
        _CHECKS.setdefault(_row.check, _row.name)


@pytest.mark.parametrize("check", list(_CHECKS), ids=list(_CHECKS.values()))
@EXAMPLES
@given(data=st.data())
def test_behaviour_is_pytorchs(check, data):
    check(data)
