"""Show the autograd graph behind a tensor: as a text tree, as Graphviz DOT, or drawn as an image.

Every tensor computed with gradients on remembers the Function that made it (`tensor.creator`), and
every Function its input tensors (`fn.inputs`): that is the whole graph `backward()` walks
(ninpy/autograd.py). These functions only read it.

    print_graph(loss)                        # the text tree, from the output down to the leaves
    print_graph(loss, names=dict(model.named_parameters()))
    to_dot(loss)                             # the same graph in Graphviz's DOT language (a string)
    draw_graph(loss, "graph", format="png")  # graph.png, with the graphviz package and `dot`

One line per tensor: the Function that made it (or what the leaf is), its shape and dtype, and
`requires_grad` where gradients flow into it. A tensor reached a second time (used twice) is shown
once and then named "(shown above)". After `backward()` a Function has let go of its inputs (unless
retain_graph=True), so the tree stops there with "(released by backward)".
"""
from .autograd import Tensor


def print_graph(tensor, names=None, file=None):
    """Print the text tree of the graph behind `tensor` (see graph_text)."""
    print(graph_text(tensor, names), file=file)


def graph_text(tensor, names=None):
    """The graph behind `tensor` as a text tree, one line per tensor, inputs indented under the
    Function that used them. names: {name: tensor} (e.g. dict(model.named_parameters()))."""
    labels = {id(t): name for name, t in (names or {}).items()}
    lines, seen = [], set()

    def visit(t, prefix, branch, child_prefix):
        lines.append(prefix + branch + _describe(t, labels) + (" (shown above)" if id(t) in seen else ""))
        if id(t) in seen:
            return
        seen.add(id(t))
        inputs = _inputs(t)
        if inputs is None:
            lines.append(child_prefix + "└── (released by backward)")
            return
        for index, parent in enumerate(inputs):
            last = index == len(inputs) - 1
            visit(parent, child_prefix, "└── " if last else "├── ",
                  child_prefix + ("    " if last else "│   "))

    visit(tensor, "", "", "")
    return "\n".join(lines)


def _describe(t, labels):
    """'Mul (2, 3) float64 requires_grad': what made t (or what leaf it is), its shape and dtype."""
    if t.creator is not None:
        what = type(t.creator).__name__
    else:
        what = labels.get(id(t)) or ("leaf" if t.requires_grad else "constant")
    shape = "(" + ", ".join(str(n) for n in t.shape) + ("," if len(t.shape) == 1 else "") + ")"
    return f"{what} {shape} {t.dtype}" + (" requires_grad" if t.requires_grad else "")


def _inputs(t):
    """The tensors t was computed from ([] for a leaf), or None when backward released them."""
    if t.creator is None:
        return []
    if t.creator.released:
        return None
    return [parent for parent in t.creator.inputs if isinstance(parent, Tensor)]


def to_dot(tensor, names=None):
    """The graph behind `tensor` in Graphviz's DOT language: a box per tensor (shape, dtype, and
    its name if it is a leaf; filled where it requires grad), an ellipse per Function, arrows in
    the forward direction. Nodes are numbered in the order they are reached, from the output."""
    labels = {id(t): name for name, t in (names or {}).items()}
    numbers = {}

    def node(obj, prefix):
        return f"{prefix}{numbers.setdefault(id(obj), len(numbers))}"

    lines = ["digraph autograd {", "  rankdir=BT;", '  node [fontname="monospace"];']
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        label = _describe(t, labels)
        if t.creator is not None:
            label = label[len(type(t.creator).__name__) + 1:]   # the Function has its own node
        fill = ', style=filled, fillcolor="lightblue"' if t.requires_grad else ""
        lines.append(f'  {node(t, "t")} [shape=box, label="{label}"{fill}];')
        if t.creator is None:
            continue
        op = node(t.creator, "f")
        lines.append(f'  {op} [shape=ellipse, label="{type(t.creator).__name__}"];')
        lines.append(f'  {op} -> {node(t, "t")};')
        inputs = _inputs(t)
        if inputs is None:
            lines.append(f'  {op}_released [shape=plaintext, label="(released by backward)"];')
            lines.append(f"  {op}_released -> {op};")
            continue
        for parent in inputs:
            lines.append(f'  {node(parent, "t")} -> {op};')
        stack.extend(reversed(inputs))
    lines.append("}")
    return "\n".join(lines)


GRAPHVIZ_MISSING = ("draw_graph needs the graphviz Python package and Graphviz's `dot` program: "
                    "`pip install graphviz` and `apt-get install graphviz` (or your system's "
                    "package); print_graph and to_dot need neither")


def draw_graph(tensor, filename=None, format="png", names=None):
    """Draw the graph behind `tensor` with Graphviz, as micrograd's draw_dot does. Returns a
    graphviz.Source (a notebook shows it inline); with `filename`, also writes filename.format and
    returns that path. Without the graphviz package or its `dot` program: RuntimeError, one line."""
    try:
        import graphviz
    except ImportError:
        raise RuntimeError(GRAPHVIZ_MISSING) from None
    source = graphviz.Source(to_dot(tensor, names), format=format)
    if filename is None:
        return source
    try:
        return source.render(filename, cleanup=True)
    except graphviz.ExecutableNotFound:
        raise RuntimeError(GRAPHVIZ_MISSING) from None
