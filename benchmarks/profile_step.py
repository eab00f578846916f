"""Where one NIN training step spends its time on the CPU, operator by operator.

    python benchmarks/profile_step.py                   # NIN CIFAR-10, batch 128, 3 steps after a warm-up
    python benchmarks/profile_step.py --batch-size 64 --dataset fashion-mnist

It wraps each operator's forward and backward, each kernel (ninpy.cpu_kernels) and the layout copy
(functional._swapped) with a timer and reports EXCLUSIVE times: a row's time excludes the rows called
inside it. So a convolution's own rows are its matrix products (GEMMs; their rate in GFLOP/s is shown)
and the few NumPy calls around them; "autograd, loss, Python" is what is left of the step.
Page faults are the process's minor faults per step (fresh memory the kernel has to map in).
The timers cost a few microseconds a call, nothing next to a step.
"""
import argparse
import collections
import os
import resource
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

import ninpy  # noqa: E402  (before NumPy: ninpy/cpu_settings.py sets what OpenBLAS reads as it loads)
import numpy as np  # noqa: E402
import ninpy.functional as F  # noqa: E402
from ninpy import Tensor, cpu_kernels, models, optim  # noqa: E402
from machine import blas_lines, machine_line  # noqa: E402


class ExclusiveTimer:
    """Accumulates, per label, the time spent inside wrapped calls minus their wrapped children."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)
        self.flops = collections.defaultdict(float)
        self.children = []   # one running total of children's time per open call

    def wrap(self, owner, name, label):
        """Replace owner.name by a timed version; label: a string, or a function of the call's
        arguments returning (label, flops)."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            key, flops = label(*args, **kwargs) if callable(label) else (label, 0)
            self.children.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[key] += elapsed - self.children.pop()
                self.calls[key] += 1
                self.flops[key] += flops
                if self.children:
                    self.children[-1] += elapsed

        setattr(owner, name, timed)

    def reset(self):
        self.seconds.clear(), self.calls.clear(), self.flops.clear()


def _conv_name(w_shape, h, width):
    c_out, c_in, kh, kw = w_shape
    return f"conv {kh}x{kw} {c_in}->{c_out} at {h}x{width}"


def _conv_forward_label(fn, x, w, *rest, layout="NCHW", **params):
    n = x.shape[0] if layout == "NCHW" else x.shape[1]
    c_out, c_in, kh, kw = w.shape
    h, width = x.shape[2:]
    flops = 2.0 * n * c_out * c_in * kh * kw * h * width   # size-preserving convs, as in NIN
    return f"GEMMs {_conv_name(w.shape, h, width)}", flops


def _conv_backward_label(fn, grad):
    c_out, n, oh, ow = fn.out_shape                         # the work is channels first
    _, c_in, kh, kw = fn.w.shape
    products = 2 if fn.needs_input_grad[0] else 1           # dW, and dx unless x is the input
    flops = products * 2.0 * n * c_out * c_in * kh * kw * oh * ow
    return f"GEMMs {_conv_name(fn.w.shape, *fn.x.shape[2:])}", flops


def instrument(timer):
    """Wrap the operators, kernels and helpers that a NIN step calls."""
    timer.wrap(F.Conv2d, "forward", _conv_forward_label)
    timer.wrap(F.Conv2d, "backward", _conv_backward_label)
    for cls in (F.MaxPool2d, F.AvgPool2d, F.GlobalAvgPool2d, F.Dropout, F.CounterDropout,
                F.CrossEntropy, F.ReLU, F.SwapBatchAndChannels):
        timer.wrap(cls, "forward", f"{cls.__name__} forward (glue)")
        timer.wrap(cls, "backward", f"{cls.__name__} backward (glue)")
    kernels = {
        "im2col": "im2col (forward and backward)", "col2im": "col2im",
        "max_pool_forward": "max pool forward", "max_pool_backward": "max pool backward",
        "avg_pool_forward": "avg pool forward", "avg_pool_backward": "avg pool backward",
        "bias_relu_": "bias + ReLU (forward)", "add_bias_": "bias (forward)",
        "relu_backward": "ReLU backward", "sgd_update_many_": "SGD update",
    }
    for name, label in kernels.items():
        if hasattr(cpu_kernels, name):
            timer.wrap(cpu_kernels, name, label)
    for name in ("relu_bias_backward",):
        if hasattr(cpu_kernels, name):
            timer.wrap(cpu_kernels, name, "ReLU backward + bias gradient")
    timer.wrap(F, "_swapped", "(N, C, H, W) <-> (C, N, H, W) copies")
    timer.wrap(Tensor, "backward", "autograd, loss, Python (the rest)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dataset", default="cifar10", choices=sorted(models.PRESETS))
    parser.add_argument("--steps", type=int, default=3, help="steps profiled after one warm-up step")
    args = parser.parse_args()

    ninpy.manual_seed(0)
    preset = models.PRESETS[args.dataset]
    side = 28 if preset["in_channels"] == 1 else 32
    rng = np.random.default_rng(0)
    batch = Tensor(rng.standard_normal((args.batch_size, preset["in_channels"], side, side)).astype(np.float32))
    labels = rng.integers(0, preset["num_classes"], args.batch_size)
    model = models.nin_for(args.dataset)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(batch), labels).backward()
        opt.step()

    timer = ExclusiveTimer()
    instrument(timer)
    step()                                                  # Numba compiles, memory grows
    timer.reset()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    total = (time.perf_counter() - start) / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    timer.seconds["autograd, loss, Python (the rest)"] += total * args.steps - sum(timer.seconds.values())

    print(f"NIN {args.dataset}, batch {args.batch_size}, one training step on the CPU: "
          f"{total * 1e3:.0f} ms ({args.batch_size / total:.1f} images/s), {faults:.0f} page faults")
    for line in (machine_line(), *blas_lines()):
        print(line)
    print(f"{'part':52s} {'ms/step':>8s} {'share':>6s} {'calls':>6s} {'GFLOP/s':>8s}")
    for key, seconds in sorted(timer.seconds.items(), key=lambda item: -item[1]):
        ms = seconds / args.steps * 1e3
        rate = f"{timer.flops[key] / seconds / 1e9:8.0f}" if timer.flops[key] else ""
        print(f"{key:52s} {ms:8.1f} {ms / total / 10:5.1f}% {timer.calls[key] // args.steps:6d} {rate:>8s}")


if __name__ == "__main__":
    main()
