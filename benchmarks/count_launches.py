"""How many GPU launches one NIN training step makes, kernel by kernel.

    python benchmarks/count_launches.py                  # CIFAR-10 NIN, batch 128, on the emulated device
    python benchmarks/count_launches.py --batch-size 4   # the same count: it follows the layers, not the batch
    python benchmarks/count_launches.py --device gpu     # a real GPU: the step captured as a CUDA graph

On a fast GPU a NIN step's kernels are short, and the host's time to launch them (a few
microseconds each, in CuPy's Python and the driver) becomes the floor of the step: the count is a
cost in its own right. The step is train.py's: the batch (data.batches: gather, the CIFAR recipe's
crop + flip, GCN + ZCA), then Trainer._step (forward, cross-entropy, zero_grad, backward, SGD with
the recipe's parameter groups) and the epoch's running loss and accuracy; each is counted apart.

What "a launch" is here: one operation the GPU path queues on the stream. Counted, one each:
- a kernels/*.cu kernel (a RawKernel call), named as in gpu_kernels;
- a cuBLAS GEMM (cupy.matmul);
- a CuPy elementwise kernel: a ufunc call (`a + b`, `cupy.maximum(..., out=)`, `-g`, a
  comparison), `cupy.where`, `cupy.arange`, an assignment `out[...] = array`, `copy()`, `astype`
  to another dtype (or with copy), `ascontiguousarray` of a non-contiguous array, fancy indexing;
- a CuPy reduction (sum, mean, max, argmax);
- a fill (zeros, ones, full and their _like forms, `x[...] = scalar`, `fill`);
- a copy between host and device (asarray of a host array; `.get()`, `.item()`, `float()`).
Not counted: views (a reshape of a contiguous array, transpose, slicing, broadcast_to),
`cupy.empty` (memory from CuPy's pool queues nothing), `astype(same dtype, copy=False)` (CuPy
returns the array itself) and host work. A CuPy routine counts once, as its API is called; where
CuPy runs it as more than one kernel (CUB's reductions, a GEMM that cuBLAS splits) a device counts
more. An operation of the emulated cupy that no rule names is counted as "unclassified: ...", so
nothing goes uncounted silently.

How: the emulated device (ninpy/emulator.py: NumPy standing in for CuPy, kernels/*.cu compiled by
g++) runs the step with its array class, cupy module and kernel launcher wrapped so that each
operation above adds one to its row. With --device gpu the step runs on the GPU inside a CUDA
stream capture and the captured graph's nodes are counted by type (kernel, memcpy, memset): the
GPU's own account, cuBLAS's and CuPy's kernels as they really run.
"""
import argparse
import collections
import contextlib
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402

from ninpy import backend, emulator  # noqa: E402
from ninpy.models import PRESETS  # noqa: E402


class LaunchCounter:
    """Counts launches per (phase, row); a row is "kind: name", e.g. "cupy elementwise: add"."""

    def __init__(self):
        self.counts = collections.Counter()
        self.enabled = False
        self.phase = "step"
        self._busy = 0   # > 0 while a counted operation runs: what it does inside is not counted again

    def add(self, row):
        if self.enabled and self._busy == 0:
            self.counts[(self.phase, row)] += 1

    @contextlib.contextmanager
    def operation(self, row):
        """Count `row` once (None: nothing) for the whole block, whatever NumPy does inside it."""
        if row is not None:
            self.add(row)
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1


COUNTER = LaunchCounter()


# --- the rules, one per kind of operation --------------------------------------------------------

def _ufunc_row(ufunc, method):
    if ufunc is np.matmul:
        return "cuBLAS: GEMM"
    return f"cupy {'reduction' if method == 'reduce' else 'elementwise'}: {ufunc.__name__}"


def _is_advanced(index):
    keys = index if isinstance(index, tuple) else (index,)
    return any(isinstance(k, (np.ndarray, list)) for k in keys)


_VIEWS = {"broadcast_to", "expand_dims", "reshape", "transpose", "squeeze", "swapaxes", "moveaxis"}
_ALLOCATIONS = {"empty", "empty_like"}
_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like"}
_ELEMENTWISE = {"where", "arange", "stack", "concatenate", "clip"}  # ufuncs count themselves
_GEMMS = {"matmul", "dot", "tensordot", "inner"}
_FROM_HOST = {"array", "asarray", "asanyarray", "ascontiguousarray"}


def _function_row(name, args, kwargs):
    """The row of cupy.NAME(*args, **kwargs), or None when it queues nothing."""
    if name in _VIEWS or name in _ALLOCATIONS:
        return None
    if name in _FILLS:
        return f"cupy fill: {name}"
    if name in _GEMMS:
        return "cuBLAS: GEMM"
    if name in _ELEMENTWISE:
        return f"cupy elementwise: {name}"
    if name in _FROM_HOST:
        data, dtype = args[0], kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if not isinstance(data, emulator.EmulatedArray):
            return f"copy: host->device ({name})"
        if dtype is not None and np.dtype(dtype) != data.dtype:
            return f"cupy astype: {data.dtype}->{np.dtype(dtype)}"
        if name == "array" or (name == "ascontiguousarray" and not data.flags.c_contiguous):
            return f"cupy copy: {name}"
        return None
    return f"unclassified: cupy.{name}"


def _counted_methods(original):
    """Counting versions of EmulatedArray's methods that queue work on a GPU (CuPy's rules)."""
    def ufunc(self, ufunc, method, *inputs, **kwargs):
        with COUNTER.operation(_ufunc_row(ufunc, method)):
            return original["__array_ufunc__"](self, ufunc, method, *inputs, **kwargs)

    def getitem(self, index):
        with COUNTER.operation("cupy gather: fancy indexing" if _is_advanced(index) else None):
            return original["__getitem__"](self, index)

    def setitem(self, index, value):
        row = "cupy fill: x[...] = scalar" if np.ndim(value) == 0 else "cupy copy: x[...] = array"
        with COUNTER.operation(row):
            original["__setitem__"](self, index, value)

    def astype(self, dtype, *args, copy=True, **kwargs):
        same = np.dtype(dtype) == self.dtype
        row = None if same and not copy else (
            "cupy copy: astype" if same else f"cupy astype: {self.dtype}->{np.dtype(dtype)}")
        with COUNTER.operation(row):
            return original["astype"](self, dtype, *args, copy=copy, **kwargs)

    def reshape(self, *args, **kwargs):
        result = original["reshape"](self, *args, **kwargs)
        if result.size and not np.may_share_memory(result, self):
            COUNTER.add("cupy copy: reshape of a non-contiguous array")
        return result

    def one(row, name):
        def method(self, *args, **kwargs):
            with COUNTER.operation(row):
                return original[name](self, *args, **kwargs)
        return method

    return {"__array_ufunc__": ufunc, "__getitem__": getitem, "__setitem__": setitem,
            "astype": astype, "reshape": reshape,
            "copy": one("cupy copy: copy()", "copy"), "fill": one("cupy fill: fill()", "fill"),
            "mean": one("cupy reduction: mean", "mean"), "argmax": one("cupy reduction: argmax", "argmax"),
            **{name: one(f"copy: device->host ({name})", name)
               for name in ("get", "item", "tolist", "__float__", "__int__", "__bool__")}}


@contextlib.contextmanager
def counting():
    """The emulator, with every operation of the rules above counted in COUNTER (when enabled)."""
    array_class, module_class, kernel_class = emulator.EmulatedArray, emulator.EmulatedCupy, emulator.Kernel
    names = ["__array_ufunc__", "__getitem__", "__setitem__", "astype", "reshape", "copy", "fill",
             "mean", "argmax", "get", "item", "tolist", "__float__", "__int__", "__bool__"]
    original = {name: getattr(array_class, name) for name in names}
    original_getattr, original_call = module_class.__getattr__, kernel_class.__call__

    def module_getattr(self, name):
        value = original_getattr(self, name)
        if not callable(value) or isinstance(value, (type, np.ufunc)):
            return value   # a ufunc counts itself, in __array_ufunc__

        def counted(*args, **kwargs):
            with COUNTER.operation(_function_row(name, args, kwargs)):
                return value(*args, **kwargs)
        return counted

    def kernel_call(self, grid, block, args):
        with COUNTER.operation(f"ninpy kernel: {self.expression.split('<')[0]}"):
            return original_call(self, grid, block, args)

    try:
        for name, method in _counted_methods(original).items():
            setattr(array_class, name, method)
        module_class.__getattr__, kernel_class.__call__ = module_getattr, kernel_call
        yield COUNTER
    finally:
        for name, method in original.items():
            setattr(array_class, name, method)
        module_class.__getattr__, kernel_class.__call__ = original_getattr, original_call


# --- one training step, as train.py's Trainer makes it --------------------------------------------

PHASES = ("batch", "step", "tally")
PHASE_TITLES = {"batch": "making the batch (gather, crop + flip, GCN + ZCA)",
                "step": "the training step (forward, loss, backward, SGD)",
                "tally": "the epoch's running loss and accuracy"}


class _Phase:
    """Counts what `inner` does under its own phase: the tally, whose add() the step calls."""

    def __init__(self, inner, phase):
        self.inner, self.phase = inner, phase

    def add(self, *args):
        previous, COUNTER.phase = COUNTER.phase, self.phase
        try:
            self.inner.add(*args)
        finally:
            COUNTER.phase = previous


def make_trainer_step(dataset="cifar10", batch_size=128, device="emulated", seed=0):
    """(next_batch, train) for one training step of train.py's Trainer on `device`, with the
    dataset's recipe (training.Config.for_dataset): next_batch() makes the batch as data.batches
    does (crop + flip, GCN + ZCA or standardisation; made-up images and an identity whitening: the
    launches do not depend on the values), train(xb, yb) runs Trainer._step itself (forward,
    cross-entropy, zero_grad, backward, SGD with the recipe's parameter groups, the epoch tally)."""
    import types

    import ninpy
    from ninpy import data, models, optim, recipes, training

    config = training.Config.for_dataset(dataset, batch_size=batch_size, device=device)
    ninpy.random.manual_seed(seed)
    preset = models.PRESETS[dataset]
    channels, side = preset["in_channels"], 28 if preset["in_channels"] == 1 else 32
    rng = np.random.default_rng(seed)
    images = backend.to_device(rng.integers(0, 256, (2 * batch_size, channels, side, side), np.uint8),
                               device)
    labels = rng.integers(0, preset["num_classes"], 2 * batch_size)
    features = channels * side * side
    transform = (data.GcnZca(np.zeros(features), np.eye(features)) if config.preprocess == "gcn-zca"
                 else data.Standardize(np.zeros(channels), np.ones(channels)))
    crop, flip = recipes.parse_augment(config.augment)
    augment = data.RandomCropFlip(config.crop_pad if crop else 0, flip) if crop or flip else None
    model = models.nin_for(dataset, dropout=config.dropout).to(device)
    optimizer = optim.SGD(recipes.param_groups(model, config.lr, config.weight_decay,
                                               config.bias_lr_mult, config.last_lr_mult),
                          lr=config.lr, momentum=config.momentum)
    trainer = types.SimpleNamespace(config=config, model=model.train(), optimizer=optimizer,
                                    warmup=recipes.WarmupSchedule(optimizer, 0))
    tally = _Phase(training._EpochTally.start(backend.module_of_device(device), {}, 0), "tally")

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, shuffle=True, seed=seed, device=device,
                                    augment=augment, transform=transform)

    stream = batches()

    def next_batch():
        return next(stream)

    def train(xb, yb):
        training.Trainer._step(trainer, 1, [g["lr"] for g in optimizer.param_groups], xb, yb, tally)

    return next_batch, train


def count_emulated(dataset="cifar10", batch_size=128, warmup_steps=1):
    """{phase: Counter of rows} for one training step on the emulated device, after `warmup_steps`
    uncounted ones (the first step makes the momentum buffers)."""
    with counting():
        next_batch, train = make_trainer_step(dataset, batch_size, "emulated")
        for _ in range(warmup_steps):
            train(*next_batch())
        COUNTER.counts.clear()
        COUNTER.enabled = True
        try:
            COUNTER.phase = "batch"
            xb, yb = next_batch()
            COUNTER.phase = "step"
            train(xb, yb)
        finally:
            COUNTER.enabled = False
        return {phase: collections.Counter({row: n for (p, row), n in COUNTER.counts.items() if p == phase})
                for phase in PHASES}


def print_table(counts, title):
    width = max([len(row) for row in counts] + [20])
    print(title)
    for row, count in sorted(counts.items(), key=lambda item: (item[0].split(":")[0], -item[1], item[0])):
        print(f"  {row:<{width}}  {count:4d}")
    print(f"  {'total':<{width}}  {sum(counts.values()):4d}")


def count_on_gpu(dataset="cifar10", batch_size=128):
    """{node type: count} of the CUDA graph captured from one training step on the GPU (the batch
    made before the capture; warm-up steps on the same stream first, so kernels are compiled and
    CuPy's pool has memory for that stream). A graph node is what a launch queues: the GPU's own
    account, with cuBLAS's and CuPy's kernels as they really run."""
    import cupy
    from bench_gpu import _graph_node_counts

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        next_batch, train = make_trainer_step(dataset, batch_size, "gpu")
        for _ in range(2):
            train(*next_batch())
        xb, yb = next_batch()
        stream.synchronize()
        stream.begin_capture()
        try:
            train(xb, yb)
        finally:
            graph = stream.end_capture()
    return _graph_node_counts(graph.graph)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=["emulated", "gpu"], default="emulated")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        try:
            backend.require_gpu()
        except backend.DeviceError as error:
            sys.exit(f"count_launches: {error}")
        try:
            nodes = count_on_gpu(args.dataset, args.batch_size)
        except Exception as error:  # a capture CUDA refuses: say so in one line
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            sys.exit(f"count_launches: the CUDA graph capture of a step failed "
                     f"({type(error).__name__}: {first}); --device emulated counts without a GPU")
        print_table(nodes, f"CUDA graph nodes of one NIN {args.dataset} training step (forward, loss, "
                           f"backward, SGD, tally), batch {args.batch_size}:")
        return
    counts = count_emulated(args.dataset, args.batch_size)
    for phase in PHASES:
        print_table(counts[phase], f"{PHASE_TITLES[phase]}, NIN {args.dataset}, batch {args.batch_size}:")
    print(f"launches per training step: {sum(counts['step'].values())} in the step itself, "
          f"{sum(sum(c.values()) for c in counts.values())} with the batch and the tally")


if __name__ == "__main__":
    main()
