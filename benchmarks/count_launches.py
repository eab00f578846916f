"""How many GPU launches one NIN training step makes, kernel by kernel.

    python benchmarks/count_launches.py                       # CIFAR-10 NIN, batch 128, on the emulator
    python benchmarks/count_launches.py --batch-size 8        # the same count: it follows the layers
    python benchmarks/count_launches.py --device gpu          # a real GPU: the step captured as a CUDA graph

On a fast GPU a NIN step's kernels are short, and the host's time to launch them (a few
microseconds each, in CuPy's Python and the driver) becomes the floor of the step: the count is a
cost in its own right.

What "a launch" is here: one operation a GPU would queue on the stream for the step. Counted:
- every kernels/*.cu kernel (a RawKernel call), named as in gpu_kernels;
- every cuBLAS GEMM (cupy.matmul), one launch each;
- every CuPy elementwise kernel: each ufunc call (`a + b`, `cupy.maximum(..., out=)`, `-g`,
  a comparison), `cupy.where`, `cupy.arange`, a strided assignment `out[...] = view`, `copy()`,
  `astype` to another dtype, `ascontiguousarray` of a non-contiguous array, fancy indexing (a gather);
- every CuPy reduction (sum, mean, max, argmax), one launch each;
- every fill (zeros, ones, full and their _like forms; a memset or a fill kernel);
- every copy between host and device (asarray of a host array, `.get()`, `.item()`).
Not counted: views (reshape of a contiguous array, transpose, slicing, broadcast_to), `cupy.empty`
(an allocation from CuPy's pool queues nothing), and host work.
A CuPy routine is counted once, as CuPy's API calls it; where CuPy runs one as several kernels
(CUB's two-pass reductions, a GEMM split by cuBLAS) the device count is higher.
Anything the emulated CuPy does that is not in these rules is counted and listed as
"unclassified", so nothing goes uncounted silently.

How: on the host emulator (NumPy standing in for CuPy, kernels/*.cu compiled by g++), the arrays
and the cupy module are wrapped so that each of the operations above adds one to its row.
With --device gpu the step runs on the GPU inside a CUDA stream capture, and the captured graph's
nodes (kernel, memset, memcpy) are counted by name: the GPU's own account, CUB and cuBLAS
kernels included.
"""
import argparse
import collections
import contextlib
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

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
_ELEMENTWISE = {"where", "arange", "stack", "concatenate", "clip", "sqrt", "exp", "log"}
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
    """A function running one training step of train.py's Trainer on `device`: the next batch
    made by data.batches (the recipe's crop + flip and GCN + ZCA; made-up images and an identity
    whitening: the launches do not depend on the values), then Trainer._step itself (forward,
    cross-entropy, zero_grad, backward, SGD with the recipe's parameter groups, the epoch tally)."""
    import types

    import ninpy
    from ninpy import data, models, optim, recipes, training

    ninpy.random.manual_seed(seed)
    preset = models.PRESETS[dataset]
    recipe = recipes.RECIPES[dataset]
    channels, side = preset["in_channels"], 28 if preset["in_channels"] == 1 else 32
    rng = np.random.default_rng(seed)
    images = backend.to_device(rng.integers(0, 256, (2 * batch_size, channels, side, side), np.uint8),
                               device)
    labels = rng.integers(0, preset["num_classes"], 2 * batch_size)
    features = channels * side * side
    transform = (data.GcnZca(np.zeros(features), np.eye(features)) if recipe.preprocess == "gcn-zca"
                 else data.Standardize(np.zeros(channels), np.ones(channels)))
    crop, flip = recipes.parse_augment(recipe.augment)
    augment = data.RandomCropFlip(recipe.crop_pad if crop else 0, flip) if crop or flip else None
    model = models.nin_for(dataset).to(device)
    optimizer = optim.SGD(recipes.param_groups(model, recipe.lr, recipe.weight_decay), lr=recipe.lr,
                          momentum=recipe.momentum)
    trainer = types.SimpleNamespace(model=model.train(), optimizer=optimizer,
                                    warmup=recipes.WarmupSchedule(optimizer, 0))
    tally = _Phase(training._EpochTally.start(backend.module_of_device(device), {}, 0), "tally")

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, shuffle=True, seed=seed, device=device,
                                    augment=augment, transform=transform)

    stream = batches()

    def step():
        COUNTER.phase = "batch"
        xb, yb = next(stream)
        COUNTER.phase = "step"
        training.Trainer._step(trainer, 1, [g["lr"] for g in optimizer.param_groups], xb, yb, tally)

    return step


def count_emulated(dataset="cifar10", batch_size=128, warmup_steps=1):
    """{phase: Counter of rows} for one training step on the emulated device, after `warmup_steps`
    uncounted ones (the first step makes the momentum buffers)."""
    with counting():
        step = make_trainer_step(dataset, batch_size, "emulated")
        for _ in range(warmup_steps):
            step()
        COUNTER.counts.clear()
        COUNTER.enabled = True
        try:
            step()
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


def run_on_gpu(dataset, batch_size, steps):
    """Warm-up steps, then `steps` steps between cudaProfilerStart and Stop, for a profiler to count.
    Nsight Systems counts the launches of that range:
        nsys profile --capture-range=cudaProfilerApi --stats=true \\
            python benchmarks/count_launches.py --device gpu
    (its CUDA API summary counts cudaLaunchKernel / cuLaunchKernel, cudaMemcpyAsync, cudaMemsetAsync;
    its GPU kernel summary names each kernel)."""
    import cupy

    step = make_trainer_step(dataset, batch_size)
    for _ in range(2):        # compile the kernels, fill CuPy's memory pool
        step()
    cupy.cuda.get_current_stream().synchronize()
    cupy.cuda.profiler.start()
    for _ in range(steps):
        step()
    cupy.cuda.get_current_stream().synchronize()
    cupy.cuda.profiler.stop()
    print(f"ran {steps} NIN {dataset} training step(s), batch {batch_size}, between "
          "cudaProfilerStart and cudaProfilerStop: the profiler's summary counts their launches")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10", choices=sorted(PRESETS))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=["emulated", "gpu"], default="emulated")
    parser.add_argument("--steps", type=int, default=1, help="--device gpu: profiled steps")
    args = parser.parse_args(argv)
    if args.device == "gpu":
        backend.require_gpu()
        run_on_gpu(args.dataset, args.batch_size, args.steps)
        return
    counts = count_emulated(args.dataset, args.batch_size)
    for phase in PHASES:
        print_table(counts[phase], f"{PHASE_TITLES[phase]}, NIN {args.dataset}, batch {args.batch_size}:")
    print(f"launches per training step: {sum(counts['step'].values())} in the step itself, "
          f"{sum(sum(c.values()) for c in counts.values())} with the batch and the tally")


if __name__ == "__main__":
    main()
