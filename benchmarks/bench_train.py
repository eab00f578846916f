"""Training-step throughput of NIN (CIFAR-10 layout) on the CPU: ninpy vs the same network in PyTorch.

Both run in this one process, alternating round by round so that both see the same machine state;
each round times a few full SGD steps (forward, loss, backward, update) at the same batch size.

    python benchmarks/bench_train.py                  # batch 64, 5 rounds of 3 steps each
    python benchmarks/bench_train.py --json out.json  # also write the numbers as JSON
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.dirname(__file__)]

import ninpy  # noqa: E402
import ninpy.functional as F  # noqa: E402
from ninpy import Tensor, models, optim  # noqa: E402
from torch_nin import torch_nin  # noqa: E402


def ninpy_stepper(batch, labels):
    model = models.nin()
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = Tensor(batch)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss.item()

    return model, step


def torch_stepper(torch, ninpy_model, batch, labels):
    model = torch_nin(torch, ninpy_model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.tensor(batch), torch.tensor(labels)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def timed(step, steps, batch_size):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per round")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    ninpy.manual_seed(0)
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch_size, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, args.batch_size)
    model, ninpy_step = ninpy_stepper(batch, labels)
    contenders = {"ninpy": ninpy_step}
    versions = {"ninpy": ninpy.__version__, "numpy": np.__version__}
    try:
        import torch
        torch.manual_seed(0)
        contenders["torch"] = torch_stepper(torch, model, batch, labels)
        versions["torch"] = torch.__version__
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None
        print("PyTorch is not installed: timing ninpy alone")

    for step in contenders.values():  # warm-up: Numba compilation, allocator growth
        step()
    rates = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            rates[name].append(timed(step, args.steps, args.batch_size))

    result = {"device": "cpu", "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch_threads": torch_threads,
              "numba_threading_layer": numba.threading_layer(),  # known after the first kernel
              "precision": "fp32",
              "batch_size": args.batch_size, "versions": versions,
              "images_per_s": {name: statistics.median(r) for name, r in rates.items()},
              "rounds": rates}
    print(f"NIN CIFAR-10 training step, batch {args.batch_size}, CPU ({os.cpu_count()} cores), fp32, "
          f"Numba threading layer {result['numba_threading_layer']}")
    print(f"{'engine':8s} {'images/s (median)':>18s}   rounds")
    for name, r in rates.items():
        print(f"{name:8s} {statistics.median(r):18.1f}   " + " ".join(f"{v:.1f}" for v in r))
    if "torch" in rates:
        ratio = result["images_per_s"]["ninpy"] / result["images_per_s"]["torch"]
        result["ratio_ninpy_over_torch"] = ratio
        print(f"ratio ninpy / torch = {ratio:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
