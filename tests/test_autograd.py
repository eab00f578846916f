"""The engine itself: graph walk, accumulation, broadcasting gradients, no_grad, clear errors."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ninpy
import ninpy.functional as F
from ninpy import Tensor, no_grad
from strategies import in_layout, layouts, random_array, seeds


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


def test_tensor_used_twice_accumulates():
    x = leaf([2.0, 3.0])
    y = x * x + x  # x feeds three uses
    y.backward(np.ones(2))
    np.testing.assert_allclose(x.grad, 2 * x.data + 1)


def test_diamond_graph():
    x = leaf([1.5])
    a = x * 3.0
    b = x * x
    z = a * b  # z = 3 x^3, dz/dx = 9 x^2
    z.backward()
    np.testing.assert_allclose(x.grad, 9 * x.data ** 2)


def test_gradients_accumulate_across_backward_calls_and_zero_grad_clears():
    x = leaf([1.0, 2.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_allclose(x.grad, [5.0, 5.0])
    x.grad = None   # what torch does to clear a tensor's gradient
    assert x.grad is None


def test_no_grad_records_nothing():
    x = leaf([1.0])
    with no_grad():
        y = x * 2.0
    assert not y.requires_grad and y.creator is None
    assert ninpy.is_grad_enabled()


def test_requires_grad_propagates_only_from_inputs_that_need_it():
    a = Tensor(np.ones(3))
    b = leaf(np.ones(3))
    assert not (a * 2.0).requires_grad
    assert (a * b).requires_grad
    (a * b).sum().backward()
    assert a.grad is None
    np.testing.assert_allclose(b.grad, np.ones(3))


@given(st.sampled_from([((2, 3), (3,)), ((2, 3), (1, 3)), ((2, 3), (2, 1)), ((4, 1, 3), (2, 1)),
                        ((2, 3), ())]))
def test_broadcasting_gradients(shapes):
    shape_a, shape_b = shapes
    rng = np.random.default_rng(0)
    a, b = leaf(rng.standard_normal(shape_a)), leaf(rng.standard_normal(shape_b) + 3.0)
    for op in (lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a * b, lambda a, b: a / b):
        assert ninpy.gradcheck(op, [a, b])


def test_reductions_reshape_matmul_pow_gradients():
    rng = np.random.default_rng(1)
    a = leaf(rng.standard_normal((3, 4)))
    b = leaf(rng.standard_normal((4, 2)))
    assert ninpy.gradcheck(lambda a: a.sum(dim=1), [a])
    assert ninpy.gradcheck(lambda a: a.mean(dim=0, keepdim=True), [a])
    assert ninpy.gradcheck(lambda a: a.mean(), [a])
    assert ninpy.gradcheck(lambda a: a.reshape(2, 6) * 2.0, [a])
    assert ninpy.gradcheck(lambda a, b: a @ b, [a, b])
    assert ninpy.gradcheck(lambda a: (a * a + 1.0) ** 1.5, [a])
    assert ninpy.gradcheck(lambda a: -a + 1.0 - 2.0 / (a * a + 1.0), [a])


def test_float32_stays_float32_with_python_scalars():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (x * 2.0 + 1) / 3.0
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_tensor_from_lists_is_float32_like_torch():
    assert Tensor([[1.0, 2.0]]).dtype == np.float32
    assert Tensor([1, 2]).dtype.kind == "i"
    assert Tensor(np.zeros(2)).dtype == np.float64


def test_deep_chain_does_not_hit_recursion_limit():
    x = leaf([1.0])
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.backward()
    np.testing.assert_allclose(x.grad, [1.0])


def test_backward_on_non_scalar_without_grad_says_so():
    x = leaf(np.ones((2, 2)))
    with pytest.raises(RuntimeError, match=r"scalar outputs.*\(2, 2\)"):
        (x * 2.0).backward()


def test_backward_grad_of_wrong_shape_names_both_shapes():
    x = leaf(np.ones((2, 2)))
    with pytest.raises(RuntimeError, match=r"\(3,\).*\(2, 2\)"):
        (x * 2.0).backward(np.ones(3))


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        leaf(np.ones((2, 3))) + leaf(np.ones(4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 3\)"):
        leaf(np.ones((2, 3))) @ leaf(np.ones((2, 3)))


def test_backward_without_requires_grad_is_an_error():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(1)).backward()


def test_graph_is_freed_after_backward():
    x = leaf([1.0, 2.0])
    doubled = x * 2.0
    y = doubled.sum()
    y.backward()
    for fn in (y.creator, doubled.creator):
        assert fn.released and fn.inputs == () and not hasattr(fn, "a")  # saved arrays dropped
    assert not y.is_leaf and y.grad is None


def test_second_backward_through_a_freed_graph_raises_like_pytorch():
    x = leaf([1.0, 2.0])
    hidden = x * x
    y = hidden.sum()
    y.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time.*retain_graph=True"):
        y.backward()
    with pytest.raises(RuntimeError, match="second time"):
        hidden.backward(np.ones(2))                  # an intermediate of the freed graph, too
    np.testing.assert_allclose(x.grad, 2 * x.data)   # the failed calls added nothing
    assert y.grad is None


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * x.data)


def test_leaf_gradients_own_their_arrays():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    g = np.array([0.5, -0.5])
    (a + b).backward(g)
    assert a.grad is not g and b.grad is not g and a.grad is not b.grad
    a.grad *= 10.0                                    # an in-place edit of one gradient ...
    np.testing.assert_array_equal(b.grad, [0.5, -0.5])  # ... leaves the other one
    np.testing.assert_array_equal(g, [0.5, -0.5])       # ... and the caller's array alone
    c = leaf([1.0])
    seed = np.array(2.0)
    (c * 1.0).sum().backward(seed)
    c.grad += 1.0
    assert seed == 2.0


def _graphs():
    """(name, leaves, run): graphs whose gradients reach several leaves as one array or views of
    one array; run() calls backward and returns the caller's gradient array, if any."""
    rng = np.random.default_rng(0)
    a, b = leaf(rng.standard_normal(4)), leaf(rng.standard_normal(4))
    yield "a + b, seeded by sum", [a, b], lambda: (a + b).sum().backward()
    c, d = leaf(rng.standard_normal((2, 2))), leaf(rng.standard_normal(4))
    yield "reshape view and a leaf", [c, d], lambda: (c.reshape(4) + d).sum().backward()
    e, f = leaf(rng.standard_normal(3)), leaf(rng.standard_normal(3))
    g = rng.standard_normal(3)
    yield "caller's gradient", [e, f], lambda: (e - (-f)).backward(g) or g
    h = leaf(rng.standard_normal(3))
    seed = rng.standard_normal(3)
    yield "the leaf itself", [h], lambda: h.backward(seed) or seed
    x = leaf(rng.standard_normal((2, 3, 5, 5)))
    w, bias = leaf(rng.standard_normal((4, 3, 3, 3))), leaf(rng.standard_normal(4))
    yield "conv2d_relu", [x, w, bias], lambda: F.conv2d_relu(x, w, bias, padding=1).sum().backward()


@pytest.mark.parametrize("name", [name for name, _, _ in _graphs()])
def test_leaf_gradients_share_no_memory_with_each_other_or_the_caller(name):
    _, leaves, run = next(graph for graph in _graphs() if graph[0] == name)
    given_grad = run()
    grads = [t.grad for t in leaves]
    for i, grad in enumerate(grads):
        assert grad.flags.writeable
        if given_grad is not None:
            assert not np.shares_memory(grad, given_grad), f"leaf {i} holds the caller's array"
        for j in range(i):
            assert not np.shares_memory(grad, grads[j]), f"leaves {j} and {i} share memory"
    for i, grad in enumerate(grads):   # and so an in-place edit of one changes no other
        before = [g.copy() for g in grads]
        grad += 1.0
        for j, other in enumerate(grads):
            if j != i:
                np.testing.assert_array_equal(other, before[j])


def test_a_leaf_keeps_a_new_gradient_without_copying_it():
    """The array a backward makes for a leaf becomes its .grad as it is: on the GPU a copy would be
    one more launch per parameter per step."""
    made = []

    class Double(ninpy.Function):
        def forward(self, a):
            return 2 * a

        def backward(self, grad):
            made.append(2 * grad)
            return (made[-1],)

    x = leaf([1.0, 2.0])
    Double.apply(x).sum().backward()
    assert x.grad is made[0]


def test_gradcheck_catches_a_wrong_backward():
    class WrongSquare(ninpy.Function):
        def forward(self, a):
            self.a = a
            return a * a

        def backward(self, grad):
            return (grad * self.a,)  # should be 2a

    with pytest.raises(ninpy.GradcheckError, match="input 0"):
        ninpy.gradcheck(lambda a: WrongSquare.apply(a), [leaf([1.0, 2.0])])


@given(layout=layouts, seed=seeds)
def test_gradcheck_perturbs_inputs_of_any_layout(layout, seed):
    """Finite differences must perturb the input itself, not a reshaped copy of it."""
    values = random_array(seed, (3, 4, 2))
    x = Tensor(in_layout(values, layout), requires_grad=True)
    assert ninpy.gradcheck(lambda a: a * a * 0.5 + a.sum(dim=0, keepdim=True), [x])
    np.testing.assert_array_equal(x.data, values)   # and put every element back


def test_gradcheck_of_a_transposed_input():
    x = Tensor(np.arange(1.0, 7.0).reshape(2, 3).T, requires_grad=True)   # not C-contiguous
    assert not x.data.flags.c_contiguous
    assert ninpy.gradcheck(lambda a: a * a, [x])


def test_gradcheck_refuses_float32():
    with pytest.raises(TypeError, match="float64"):
        ninpy.gradcheck(lambda a: a * 2.0, [leaf([1.0], dtype=np.float32)])


def test_numpy_and_to_cpu():
    x = Tensor([[1.0, 2.0]], device="cpu")
    assert x.device == "cpu" and x.to("cpu") is x
    np.testing.assert_array_equal(x.numpy(), [[1.0, 2.0]])


# ---- PyTorch's autograd semantics (docs/design.md, "Public API") ---------------------------------

def _conv_model_loss():
    from ninpy import functional as F, nn
    ninpy.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, dtype=np.float64)
    x = Tensor(np.random.default_rng(0).standard_normal((2, 1, 5, 5)))
    return conv, F.cross_entropy(F.global_avg_pool2d(conv(x)), np.array([0, 1]))


def test_optimizer_step_before_backward_is_refused_as_in_pytorch():
    """The conv saved its weight for backward; the step changes it in place (version 0 -> 1)."""
    conv, loss = _conv_model_loss()
    opt = ninpy.optim.SGD(conv.parameters(), lr=0.1)
    conv.weight.grad = np.ones(conv.weight.shape)       # a gradient from an earlier step
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation.*version 1; expected "
                                           "version 0"):
        loss.backward()


def test_load_state_dict_before_backward_is_refused():
    conv, loss = _conv_model_loss()
    conv.load_state_dict(conv.state_dict())
    with pytest.raises(RuntimeError, match="inplace operation"):
        loss.backward()


def test_an_input_no_function_saved_may_change_and_data_writes_are_untracked():
    """Add keeps no input, so changing one is no error (as in torch); writes through .data are
    invisible to autograd, as torch's .data is."""
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    y = (a + b).sum()
    a.bump_version()
    y.backward()
    np.testing.assert_allclose(a.grad, [1.0, 1.0])
    x = leaf([2.0])
    z = (x * x).sum()
    x.data[...] = 5.0                       # untracked: the gradient uses the new value
    z.backward()
    np.testing.assert_allclose(x.grad, [10.0])


class _TwoInputsOneGradient(ninpy.Function):
    def forward(self, a, b):
        return a * b

    def backward(self, grad):
        return (grad,)


class _OneInputBareGradient(ninpy.Function):
    def forward(self, a):
        return 3 * a

    def backward(self, grad):
        return 3 * grad            # not a tuple: fine for one input, as in torch


def test_function_backward_must_return_one_gradient_per_input():
    y = _TwoInputsOneGradient.apply(leaf([1.0]), leaf([2.0]))
    with pytest.raises(RuntimeError, match=r"incorrect number of gradients \(expected 2, got 1\)"):
        y.backward()
    x = leaf([1.0, 2.0])
    _OneInputBareGradient.apply(x).sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0])


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_, np.uint8])
def test_integer_and_bool_tensors_cannot_require_grad(dtype):
    with pytest.raises(RuntimeError, match="floating point"):
        Tensor(np.zeros(2, dtype=dtype), requires_grad=True)
    t = Tensor(np.zeros(2, dtype=dtype))
    with pytest.raises(RuntimeError, match="floating point"):
        t.requires_grad = True
    assert not (t * 2).requires_grad


@pytest.mark.parametrize("make, dtype, values", [
    (lambda: Tensor(np.array([1, 2, 3])) * 0.5, np.float32, [0.5, 1.0, 1.5]),
    (lambda: 0.5 * Tensor(np.array([1, 2, 3])), np.float32, [0.5, 1.0, 1.5]),
    (lambda: Tensor(np.array([1, 2, 3])) / Tensor(np.array([2])), np.float32, [0.5, 1.0, 1.5]),
    (lambda: Tensor(np.array([1, 2])) + Tensor(np.ones(2, np.float16)), np.float16, [2, 3]),
    (lambda: Tensor(np.ones(2, np.float32)) + Tensor(np.float64(1)), np.float32, [2, 2]),
    (lambda: Tensor(np.array([1, 2])) + Tensor(np.float64(0.5)), np.float64, [1.5, 2.5]),
    (lambda: Tensor(np.array([True, False])) * 2, np.int64, [2, 0]),
    (lambda: Tensor(np.array([2, 3])) ** 2, np.int64, [4, 9]),
    (lambda: Tensor(np.array([4, 9])) ** 0.5, np.float32, [2, 3]),
    (lambda: Tensor(np.ones(2, np.float32)) * 3, np.float32, [3, 3]),
])
def test_python_numbers_and_mixed_dtypes_promote_as_in_pytorch(make, dtype, values):
    result = make()
    assert result.dtype == dtype
    np.testing.assert_allclose(result.data, values)


def test_operations_pytorch_refuses_are_refused():
    with pytest.raises(RuntimeError, match="Subtraction.*bool"):
        Tensor(np.array([True])) - Tensor(np.array([True]))
    with pytest.raises(RuntimeError, match="Negation.*bool"):
        -Tensor(np.array([True]))
    with pytest.raises(RuntimeError, match="negative integer powers"):
        Tensor(np.array([2])) ** -1
    with pytest.raises(RuntimeError, match="same dtype"):
        Tensor(np.ones((2, 2), np.float32)) @ Tensor(np.ones((2, 2)))


def test_leaf_grad_has_the_leaf_dtype_and_shape():
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = (x * Tensor(np.full((3,), 2.0))).sum()     # float64 product: the gradient comes back float32
    assert y.dtype == np.float64
    y.backward()
    assert x.grad.dtype == np.float32 and x.grad.shape == (2, 3)
    np.testing.assert_allclose(x.grad, 2.0)


ZERO_D_OPERATIONS = {
    "add": lambda a, b: a + b, "radd": lambda a, b: 2.0 + a, "sub": lambda a, b: a - b,
    "rsub": lambda a, b: 2.0 - a, "mul": lambda a, b: a * b, "div": lambda a, b: a / b,
    "rdiv": lambda a, b: 2.0 / a, "neg": lambda a, b: -a, "pow": lambda a, b: a ** 3,
    "sum": lambda a, b: a.sum(), "mean": lambda a, b: a.mean(), "reshape": lambda a, b: a.reshape(1),
    "relu": lambda a, b: ninpy.functional.relu(a), "dropout": lambda a, b: ninpy.functional.dropout(a, 0.0),
}


@pytest.mark.parametrize("name", list(ZERO_D_OPERATIONS))
def test_zero_d_tensors_work_through_every_operator(name):
    a, b = Tensor(np.float64(1.5), requires_grad=True), Tensor(np.float64(-2.0), requires_grad=True)
    out = ZERO_D_OPERATIONS[name](a, b)
    assert isinstance(out.data, np.ndarray)
    out.sum().backward()
    assert isinstance(a.grad, np.ndarray) and a.grad.shape == () and a.grad.dtype == np.float64
    assert ninpy.gradcheck(lambda a, b: ZERO_D_OPERATIONS[name](a, b), [a, b])
