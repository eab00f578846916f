"""ninpy.graph: the autograd graph as a text tree (checked exactly), as DOT, and drawn as an image
where the graphviz package and Graphviz's `dot` are installed."""
import builtins
import shutil

import numpy as np
import pytest

from ninpy import Tensor, graph, models, nn
import ninpy.functional as F


def small_graph():
    x = Tensor(np.ones((2, 3)), requires_grad=True, dtype=np.float64)
    w = Tensor(np.ones(3), requires_grad=True, dtype=np.float32)
    y = ((x * w).exp() + x).sum() * 2.0
    return x, w, y


def test_the_text_tree_names_op_shape_dtype_and_grad_and_shows_a_reused_input_once():
    x, w, y = small_graph()
    assert graph.graph_text(y, names={"w": w}) == "\n".join([
        "Mul () float64 requires_grad",
        "├── Sum () float64 requires_grad",
        "│   └── Add (2, 3) float64 requires_grad",
        "│       ├── Exp (2, 3) float64 requires_grad",
        "│       │   └── Mul (2, 3) float64 requires_grad",
        "│       │       ├── leaf (2, 3) float64 requires_grad",
        "│       │       └── w (3,) float32 requires_grad",
        "│       └── leaf (2, 3) float64 requires_grad (shown above)",
        "└── constant () float64",
    ])


def test_after_backward_the_tree_stops_where_the_graph_was_released(capsys):
    _, _, y = small_graph()
    y.backward()
    graph.print_graph(y)
    assert capsys.readouterr().out == "Mul () float64 requires_grad\n└── (released by backward)\n"
    assert graph.graph_text(Tensor(np.zeros(2))) == "constant (2,) float64"


def test_a_nin_graph_names_its_parameters():
    model = models.nin(in_channels=1, num_classes=2, widths=((2, 2, 2), (2, 2, 2), (2, 2, None)),
                       kernel_sizes=(3, 3, 3), dtype=np.float64)
    loss = F.cross_entropy(model(Tensor(np.ones((1, 1, 8, 8)))), np.array([1]))
    text = graph.graph_text(loss, names=dict(model.named_parameters()))
    assert text.splitlines()[0] == "CrossEntropy () float64 requires_grad"
    for name, p in model.named_parameters():
        assert f"{name} {p.shape} float64 requires_grad" in text
    assert "constant (1,) int64" in text          # the labels, which need no gradient


def test_dot_has_a_box_per_tensor_an_ellipse_per_function_and_forward_arrows():
    x, w, y = small_graph()
    dot = graph.to_dot(y, names={"x": x, "w": w})
    assert dot.startswith("digraph autograd {") and dot.endswith("}")
    assert dot.count("shape=box") == 8 and dot.count("shape=ellipse") == 5
    assert dot.count("->") == 5 + 8                # each Function -> its output, each input -> it
    assert 'label="x (2, 3) float64 requires_grad", style=filled' in dot
    assert 'label="constant () float64"];' in dot


def test_without_graphviz_draw_graph_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_graphviz(name, *args, **kwargs):
        if name == "graphviz":
            raise ImportError("No module named 'graphviz'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_graphviz)
    with pytest.raises(RuntimeError, match=r"pip install graphviz.*print_graph and to_dot need neither"):
        graph.draw_graph(small_graph()[2])


def test_draw_graph_writes_an_image(tmp_path):
    pytest.importorskip("graphviz")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot program is not installed")
    path = graph.draw_graph(small_graph()[2], str(tmp_path / "graph"), format="png")
    data = open(path, "rb").read()
    assert path.endswith("graph.png") and data.startswith(b"\x89PNG")


def test_module_graph_is_reachable_from_the_package():
    import ninpy
    assert ninpy.graph.print_graph is graph.print_graph and isinstance(nn.Parameter(np.ones(1)), Tensor)
