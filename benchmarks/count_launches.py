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
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

from ninpy import backend, gpu_kernels  # noqa: E402
from ninpy.models import PRESETS  # noqa: E402

import cuda_host_emulator  # noqa: E402


class LaunchCounter:
    """Counts, per row ("category: name"), the launches the counted CuPy operations make."""

    def __init__(self):
        self.counts = collections.Counter()   # (phase, row) -> launches
        self.enabled = True
        self.phase = "step"
        self._busy = 0   # > 0 while a counted operation runs: what it does inside is not counted again

    def add(self, row):
        if self.enabled and self._busy == 0:
            self.counts[(self.phase, row)] += 1

    @contextlib.contextmanager
    def operation(self, row):
        """Count `row` once for the whole `with` block, whatever NumPy does inside."""
        self.add(row)
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1

    def reset(self):
        self.counts.clear()


COUNTER = LaunchCounter()


def _plain(value):
    """A counted array as a plain NumPy view (so NumPy's internals do not call back into the counter)."""
    if isinstance(value, CountedArray):
        return value.view(np.ndarray)
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _device(value):
    """A result as a device array: CuPy returns 0-d arrays where NumPy returns scalars."""
    if isinstance(value, np.ndarray):
        return value if isinstance(value, CountedArray) else value.view(CountedArray)
    if isinstance(value, np.generic):
        return np.asarray(value).view(CountedArray)
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    return value


def _is_advanced(key):
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (np.ndarray, list)) for k in keys)


class CountedArray(cuda_host_emulator.EmulatedArray):
    """An emulated device array whose kernel-making operations are counted in COUNTER."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        kind = "reduction" if method == "reduce" else "elementwise"
        row = "cuBLAS: GEMM" if ufunc is np.matmul else f"cupy {kind}: {ufunc.__name__}"
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _plain(out)
        with COUNTER.operation(row):
            result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def mean(self, *args, **kwargs):
        with COUNTER.operation("cupy reduction: mean"):
            return _device(self.view(np.ndarray).mean(*args, **kwargs))

    def argmax(self, *args, **kwargs):
        with COUNTER.operation("cupy reduction: argmax"):
            return _device(self.view(np.ndarray).argmax(*args, **kwargs))

    def astype(self, dtype, *args, copy=True, **kwargs):
        if np.dtype(dtype) == self.dtype and not copy:
            return self
        with COUNTER.operation(f"cupy astype: {self.dtype}->{np.dtype(dtype)}"):
            return _device(self.view(np.ndarray).astype(dtype, *args, copy=copy, **kwargs))

    def copy(self, *args, **kwargs):
        with COUNTER.operation("cupy copy: copy()"):
            return _device(self.view(np.ndarray).copy(*args, **kwargs))

    def fill(self, value):
        with COUNTER.operation("cupy fill: fill()"):
            self.view(np.ndarray).fill(value)

    def reshape(self, *args, **kwargs):
        result = super().reshape(*args, **kwargs)
        if result.size and not np.may_share_memory(result, self):
            COUNTER.add("cupy copy: reshape of a non-contiguous array")
        return result

    def __getitem__(self, key):
        if _is_advanced(key):
            with COUNTER.operation("cupy gather: fancy indexing"):
                return _device(self.view(np.ndarray)[_plain(key)])
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        row = "cupy fill: x[...] = scalar" if np.ndim(value) == 0 else "cupy copy: x[...] = array"
        with COUNTER.operation(row):
            self.view(np.ndarray)[_plain(key)] = _plain(value)

    def get(self):
        with COUNTER.operation("copy: device->host (get)"):
            return np.array(self.view(np.ndarray))

    def item(self):
        with COUNTER.operation("copy: device->host (item)"):
            return self.view(np.ndarray).item()


# How each cupy function the step may call is counted: a row, or None for no launch.
_VIEWS = {"broadcast_to", "expand_dims", "reshape", "transpose", "squeeze", "ravel_view"}
_ALLOCATIONS = {"empty", "empty_like"}
_FILLS = {"zeros", "ones", "full", "zeros_like", "ones_like", "full_like"}
_ELEMENTWISE = {"where", "arange", "stack", "concatenate", "clip"}
_GEMMS = {"matmul", "dot"}
_TYPES = {"float32", "float64", "int32", "int64", "uint8", "bool_", "dtype", "result_type", "iinfo",
          "finfo", "ndim", "shape", "isscalar", "issubdtype", "can_cast", "newaxis", "nan", "inf",
          "pi"}


def _asarray_row(value, dtype=None, **_):
    if not isinstance(value, CountedArray):
        return "copy: host->device (asarray)"
    if dtype is not None and np.dtype(dtype) != value.dtype:
        return f"cupy astype: {value.dtype}->{np.dtype(dtype)}"
    return None


def _contiguous_row(value, dtype=None, **_):
    if not isinstance(value, CountedArray):
        return "copy: host->device (ascontiguousarray)"
    if value.flags.c_contiguous and (dtype is None or np.dtype(dtype) == value.dtype):
        return None
    return "cupy copy: ascontiguousarray"


class CountingCupy(cuda_host_emulator.EmulatedCupyModule):
    """The emulator's cupy module, counting every launch of the rules above in COUNTER."""

    def __init__(self, sources):
        super().__init__(sources)
        emulated_raw_module = self.RawModule
        self.ndarray = CountedArray

        class RawModule(emulated_raw_module):
            def get_function(self, expression):
                kernel = super().get_function(expression)
                row = f"ninpy kernel: {expression.split('<')[0]}"

                def launch(grid, block, args):
                    with COUNTER.operation(row):
                        kernel(grid, block, _plain(args))
                return launch

        self.RawModule = RawModule

    def __getattr__(self, name):
        function = getattr(np, name, None)
        if function is None:
            return super().__getattr__(name)   # raises EmulatorLacks
        if name in _TYPES or not callable(function) or isinstance(function, (type, np.ufunc)):
            return function   # a ufunc counts itself, in CountedArray.__array_ufunc__

        def counted(*args, **kwargs):
            row = self._row(name, args, kwargs)
            if row is None:
                return _device(function(*_plain(args), **_plain(kwargs)))
            with COUNTER.operation(row):
                result = function(*_plain(args), **_plain(kwargs))
            out = kwargs.get("out")
            return out if out is not None else _device(result)
        return counted

    @staticmethod
    def _row(name, args, kwargs):
        if name in _VIEWS or name in _ALLOCATIONS:
            return None
        if name in _FILLS:
            return f"cupy fill: {name}"
        if name in _GEMMS:
            return "cuBLAS: GEMM"
        if name in _ELEMENTWISE:
            return f"cupy elementwise: {name}"
        if name in ("asarray", "array"):
            return _asarray_row(*args, **kwargs)
        if name == "ascontiguousarray":
            return _contiguous_row(*args, **kwargs)
        return f"unclassified: cupy.{name}"

    def asnumpy(self, value):
        with COUNTER.operation("copy: device->host (asnumpy)"):
            return np.array(_plain(value))


@contextlib.contextmanager
def emulated_gpu():
    """ninpy's "gpu" device made of CountingCupy for the block (as tests/test_gpu.py's gpu_device)."""
    module = CountingCupy(gpu_kernels.kernel_sources())
    saved = (backend._cupy, backend.gpu_problem, backend.require_gpu, gpu_kernels._modules,
             gpu_kernels._functions)
    backend._cupy, backend.gpu_problem, backend.require_gpu = module, (lambda: None), (lambda: module)
    gpu_kernels._modules, gpu_kernels._functions = {}, {}
    try:
        yield module
    finally:
        (backend._cupy, backend.gpu_problem, backend.require_gpu, gpu_kernels._modules,
         gpu_kernels._functions) = saved


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


def make_trainer_step(dataset="cifar10", batch_size=128, seed=0):
    """A function running one training step of train.py's Trainer on the device "gpu": the next batch
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
    images = backend.to_device(rng.integers(0, 256, (2 * batch_size, channels, side, side), np.uint8), "gpu")
    labels = rng.integers(0, preset["num_classes"], 2 * batch_size)
    features = channels * side * side
    transform = (data.GcnZca(np.zeros(features), np.eye(features)) if recipe.preprocess == "gcn-zca"
                 else data.Standardize(np.zeros(channels), np.ones(channels)))
    crop, flip = recipes.parse_augment(recipe.augment)
    augment = data.RandomCropFlip(recipe.crop_pad if crop else 0, flip) if crop or flip else None
    model = models.nin_for(dataset).to("gpu")
    optimizer = optim.SGD(recipes.param_groups(model, recipe.lr, recipe.weight_decay), lr=recipe.lr,
                          momentum=recipe.momentum)
    trainer = types.SimpleNamespace(model=model.train(), optimizer=optimizer,
                                    warmup=recipes.WarmupSchedule(optimizer, 0))
    tally = _Phase(training._EpochTally.start(backend.require_gpu(), {}, 0), "tally")

    def batches():
        while True:
            yield from data.batches(images, labels, batch_size, shuffle=True, seed=seed, device="gpu",
                                    augment=augment, transform=transform)

    stream = batches()

    def step():
        COUNTER.phase = "batch"
        xb, yb = next(stream)
        COUNTER.phase = "step"
        training.Trainer._step(trainer, 1, [g["lr"] for g in optimizer.param_groups], xb, yb, tally)

    return step


def count_emulated(dataset="cifar10", batch_size=128, warmup_steps=1):
    """{phase: Counter of rows} for one training step on the emulated GPU, after `warmup_steps`
    uncounted ones (the first step makes the momentum buffers)."""
    with emulated_gpu():
        COUNTER.enabled = False
        step = make_trainer_step(dataset, batch_size)
        for _ in range(warmup_steps):
            step()
        COUNTER.reset()
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
