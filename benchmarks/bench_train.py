"""Training-step throughput of NIN (CIFAR-10 layout) on the CPU: ninpy vs the same network in PyTorch.

Each round times a few full SGD steps (forward, loss, backward, update) of each engine at the same
batch size, on the same random batch and the same starting weights; rounds alternate between the
engines so that both see the same machine state, and the report gives every round and the medians.

    python benchmarks/bench_train.py                      # batch 64, both engines in this one process
    python benchmarks/bench_train.py --batch-size 128 --rounds 7
    python benchmarks/bench_train.py --separate           # each round of each engine in a fresh process
    python benchmarks/bench_train.py --import-orders      # ninpy alone: ninpy or NumPy imported first
    python benchmarks/bench_train.py --json out.json      # also write the numbers as JSON

In one process both engines share process-wide settings: ninpy, imported first, sets malloc to
keep freed memory (ninpy/cpu_settings.py), and PyTorch's allocator profits from it too.
--separate runs each engine as users run it, alone in its process (PyTorch then without ninpy's
settings), alternating process by process.

--import-orders times ninpy alone, each round in a fresh process, in turn: imported before NumPy,
imported after NumPy (ninpy/cpu_settings.py then restarts OpenBLAS's threads with its setting),
and, for comparison, after NumPy with OpenBLAS's own thread timeout (OPENBLAS_THREAD_TIMEOUT=28,
its default: what an import after NumPy gave before cpu_settings could apply it at run time).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from machine import blas_lines, machine_line  # noqa: E402


def ninpy_stepper(batch, labels, weights):
    import ninpy.functional as F
    from ninpy import Tensor, models, optim
    model = models.nin()
    for p, w in zip(model.parameters(), weights):
        p.data[...] = w
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = Tensor(batch)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def torch_stepper(batch, labels, weights):
    import torch
    from torch_nin import torch_nin
    model = torch_nin(torch, weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x, y = torch.tensor(batch), torch.tensor(labels)

    def step():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


STEPPERS = {"ninpy": ninpy_stepper, "torch": torch_stepper}


def problem(batch_size, seed=0):
    """The batch, labels and starting weights both engines train on (He init, as ninpy's nin())."""
    import numpy as np  # not at the top: --numpy-first chooses which is imported first
    rng = np.random.default_rng(seed)
    batch = rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, batch_size)
    weights = []
    for c_in, c_out, k in [(3, 192, 5), (192, 160, 1), (160, 96, 1), (96, 192, 5), (192, 192, 1),
                           (192, 192, 1), (192, 192, 3), (192, 192, 1), (192, 10, 1)]:
        std = np.sqrt(2.0 / (c_in * k * k))
        weights.append((rng.standard_normal((c_out, c_in, k, k)) * std).astype(np.float32))
        weights.append(np.zeros(c_out, dtype=np.float32))
    return batch, labels, weights


def timed(step, steps, batch_size):
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def engine_facts(name):
    """What the engine ran with: versions, threads, the settings ninpy applied."""
    if name == "ninpy":
        import numba
        import numpy
        import ninpy
        return {"version": ninpy.__version__, "numpy": numpy.__version__,
                "numba_threading_layer": numba.threading_layer(),
                "settings_applied": list(ninpy.cpu_settings.APPLIED)}
    import torch
    return {"version": torch.__version__, "threads": torch.get_num_threads()}


def run_in_process(engines, args):
    """Alternate the engines round by round here; returns {engine: [images/s per round]}, facts."""
    batch, labels, weights = problem(args.batch_size)
    steps = {name: STEPPERS[name](batch, labels, weights) for name in engines}
    for step in steps.values():  # warm-up: Numba compilation, allocator growth
        step()
    rates = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, step in steps.items():
            rates[name].append(timed(step, args.steps, args.batch_size))
    return rates, {name: engine_facts(name) for name in engines}


IMPORT_ORDERS = {   # name -> (import NumPy before ninpy, environment changes)
    "ninpy first": (False, {}),
    "numpy first": (True, {}),
    "numpy first, OpenBLAS's timeout": (True, {"OPENBLAS_THREAD_TIMEOUT": "28"}),
}


def run_import_orders(args):
    """ninpy alone, each round of each import order in a fresh process, alternating order by order."""
    rates, facts = {name: [] for name in IMPORT_ORDERS}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, (numpy_first, env_changes) in IMPORT_ORDERS.items():
                out = os.path.join(tmp, "ninpy.json")
                env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
                subprocess.run([sys.executable, os.path.abspath(__file__), "--engine", "ninpy",
                                "--batch-size", str(args.batch_size), "--rounds", "1",
                                "--steps", str(args.steps), "--json", out, "--quiet",
                                *(["--numpy-first"] if numpy_first else [])],
                               env={**env, **env_changes}, check=True)
                with open(out) as f:
                    result = json.load(f)
                rates[name] += result["rounds"]["ninpy"]
                facts[name] = result["engines"]["ninpy"]
    return rates, facts


def report_import_orders(rates, facts, args):
    print(f"NIN CIFAR-10 training step, ninpy alone, batch {args.batch_size}, CPU, fp32, each round "
          f"in a fresh process, {args.rounds} rounds of {args.steps} steps")
    for line in (machine_line(), *blas_lines()):
        print(line)
    for name, fact in facts.items():
        print(f"{name}: settings applied {fact['settings_applied']}")
    first = statistics.median(rates["ninpy first"])
    print(f"{'import order':34s} {'images/s (median)':>18s} {'/ ninpy first':>14s}   rounds")
    for name, r in rates.items():
        print(f"{name:34s} {statistics.median(r):18.1f} {statistics.median(r) / first:14.2f}   "
              + " ".join(f"{v:.1f}" for v in r))


def run_separately(engines, args):
    """Each round of each engine in a fresh process of its own, alternating engine by engine."""
    rates, facts = {name: [] for name in engines}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name in engines:
                out = os.path.join(tmp, f"{name}.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--engine", name,
                                "--batch-size", str(args.batch_size), "--rounds", "1",
                                "--steps", str(args.steps), "--json", out, "--quiet"], check=True)
                with open(out) as f:
                    result = json.load(f)
                rates[name] += result["rounds"][name]
                facts[name] = result["engines"][name]
    return rates, facts


def report(rates, facts, args):
    print(f"NIN CIFAR-10 training step, batch {args.batch_size}, CPU, fp32, "
          f"{'each engine in its own processes' if args.separate else 'both engines in one process'}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for line in (machine_line(), *blas_lines()):
        print(line)
    for name, fact in facts.items():
        print(f"{name}: {fact}")
    print(f"{'engine':8s} {'images/s (median)':>18s}   rounds")
    for name, r in rates.items():
        print(f"{name:8s} {statistics.median(r):18.1f}   " + " ".join(f"{v:.1f}" for v in r))
    if len(rates) == 2:
        ratio = statistics.median(rates["ninpy"]) / statistics.median(rates["torch"])
        per_round = [a / b for a, b in zip(rates["ninpy"], rates["torch"])]
        print(f"ratio ninpy / torch = {ratio:.2f} (medians); per round: "
              + " ".join(f"{r:.2f}" for r in per_round))
        return ratio
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per round")
    parser.add_argument("--engine", choices=["both", "ninpy", "torch"], default="both")
    parser.add_argument("--separate", action="store_true",
                        help="run every round of every engine in a fresh process of its own")
    parser.add_argument("--import-orders", action="store_true",
                        help="ninpy alone, imported before and after NumPy, each round in a fresh process")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--numpy-first", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.import_orders:
        rates, facts = run_import_orders(args)
        report_import_orders(rates, facts, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": "cpu", "machine": machine_line(), "blas": blas_lines(),
                           "batch_size": args.batch_size, "engines": facts, "rounds": rates,
                           "images_per_s": {n: statistics.median(r) for n, r in rates.items()}},
                          f, indent=2)
        return

    engines = ["ninpy", "torch"] if args.engine == "both" else [args.engine]
    if args.numpy_first:
        import numpy  # noqa: F401  (as a script that imports NumPy first does)
    if args.engine == "ninpy" or (args.engine == "both" and not args.separate):
        import ninpy  # noqa: F401  (imported first, unless --numpy-first: ninpy/cpu_settings.py)
    if "torch" in engines:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch is not installed: timing ninpy alone")
            engines.remove("torch")
    rates, facts = (run_separately if args.separate else run_in_process)(engines, args)
    ratio = None if args.quiet else report(rates, facts, args)
    if args.json:
        result = {"device": "cpu", "machine": machine_line(), "blas": blas_lines(),
                  "precision": "fp32", "batch_size": args.batch_size, "separate": args.separate,
                  "engines": facts, "rounds": rates,
                  "images_per_s": {name: statistics.median(r) for name, r in rates.items()},
                  "ratio_ninpy_over_torch": ratio}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
