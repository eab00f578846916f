"""NIN CIFAR-10 training on the GPU: ninpy against the same network in PyTorch, side by side.

    python benchmarks/bench_gpu.py --json results/bench_gpu.json

For each precision (fp32, then TF32) a fresh worker process of this script measures, with ninpy and
PyTorch alternating in that one process after a warm-up:
- training throughput (images/s) of the CIFAR-10 NIN at batch 128 (synthetic data already on the
  GPU; forward + backward + SGD momentum 0.9 step; the clock includes Python/launch overhead);
- peak GPU memory: ninpy's CuPy pool (exact peak of bytes in use during a step, via a memory hook,
  and the pool's reserved bytes polled after steps) and torch.cuda.max_memory_allocated/reserved;
- per-operator forward/backward times of ninpy's operators (and torch's) at NIN's shapes, with CUDA
  events;
- GPU kernel launches per training step (ninpy: nodes of a CUDA graph captured from one step;
  PyTorch: GPU activities seen by torch.profiler), where that works.
A precision runs in its own process because CuPy reads CUPY_TF32 once, before its first matmul.
PyTorch's TF32 is switched with torch.backends.cuda.matmul.allow_tf32 / torch.backends.cudnn.allow_tf32
(cudnn.benchmark is on, as most PyTorch training scripts set it).

Prints a table and, with --json PATH, writes every number plus the device, precisions and versions.
Without a usable GPU it prints why and exits with status 2.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from torch_nin import torch_nin  # noqa: E402

PRECISIONS = ("fp32", "tf32")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10, help="untimed training steps per library")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed round")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds; ninpy and PyTorch alternate round by round")
    parser.add_argument("--op-repeats", type=int, default=20, help="timed repeats per operator")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated subset of fp32,tf32")
    parser.add_argument("--no-torch", action="store_true", help="measure ninpy only")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-operator timings")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = set(args.precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"unknown precision(s) {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    return args


# ================================================================================================
# The worker: everything below runs in a process whose CUPY_TF32 is already set.
# ================================================================================================

def _versions(cupy, torch):
    versions = {"python": platform.python_version()}
    import numpy
    versions["numpy"] = numpy.__version__
    versions["cupy"] = cupy.__version__
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    driver = cupy.cuda.runtime.driverGetVersion()
    versions["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
    versions["cuda_driver"] = f"{driver // 1000}.{driver % 1000 // 10}"
    if torch is not None:
        versions["torch"] = torch.__version__
        versions["torch_cuda"] = torch.version.cuda
        versions["cudnn"] = torch.backends.cudnn.version()
    return versions


def _import_torch(args):
    if args.no_torch:
        return None, "disabled with --no-torch"
    try:
        import torch
    except ImportError as error:
        return None, f"PyTorch not installed ({error})"
    if not torch.cuda.is_available():
        return None, "this PyTorch build sees no CUDA GPU (a CPU-only wheel?)"
    return torch, None


class _PeakHook:
    """A CuPy memory hook tracking the peak of bytes handed out by the pool (exact, not polled)."""

    @staticmethod
    def make(cupy):
        class PeakHook(cupy.cuda.MemoryHook):
            name = "ninpy_peak"

            def __init__(self):
                self.current = cupy.get_default_memory_pool().used_bytes()
                self.peak = self.current

            def malloc_postprocess(self, **kw):
                self.current += kw["mem_size"]
                self.peak = max(self.peak, self.current)

            def free_postprocess(self, **kw):
                self.current -= kw["mem_size"]

        return PeakHook()


def _graph_node_counts(graph_handle):
    """Count the nodes of a CUDA graph by type (child graphs included), through the driver API."""
    import ctypes
    cuda = ctypes.CDLL("libcuda.so.1")
    names = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "child_graph", 5: "empty",
             10: "mem_alloc", 11: "mem_free"}
    counts = {}

    def walk(graph):
        n = ctypes.c_size_t(0)
        if cuda.cuGraphGetNodes(graph, None, ctypes.byref(n)) != 0:
            raise RuntimeError("cuGraphGetNodes failed")
        nodes = (ctypes.c_void_p * n.value)()
        if n.value and cuda.cuGraphGetNodes(graph, nodes, ctypes.byref(n)) != 0:
            raise RuntimeError("cuGraphGetNodes failed")
        for node in nodes:
            kind = ctypes.c_int(-1)
            cuda.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind))
            name = names.get(kind.value, f"type_{kind.value}")
            counts[name] = counts.get(name, 0) + 1
            if kind.value == 4:
                child = ctypes.c_void_p()
                cuda.cuGraphChildGraphNodeGetGraph(ctypes.c_void_p(node), ctypes.byref(child))
                walk(child)

    walk(ctypes.c_void_p(int(graph_handle)))
    return counts


class NinpyBench:
    def __init__(self, cupy, batch_size):
        import numpy as np

        import ninpy
        import ninpy.functional as F
        from ninpy import Tensor, models, optim

        self.cupy, self.F, self.Tensor = cupy, F, Tensor
        ninpy.manual_seed(0)
        self.model = models.nin().to("gpu").train()
        self.optimizer = optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        rng = np.random.default_rng(0)
        self.x = Tensor(cupy.asarray(rng.standard_normal((batch_size, 3, 32, 32)).astype(np.float32)))
        self.labels = cupy.asarray(rng.integers(0, 10, batch_size).astype(np.int64))
        self.parameters = self.model.num_parameters()
        self.pool_high_water = 0

    def step(self):
        self.optimizer.zero_grad()
        loss = self.F.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def sync(self):
        self.cupy.cuda.Device().synchronize()

    def run(self, steps):
        pool = self.cupy.get_default_memory_pool()
        for _ in range(steps):
            self.step()
            self.pool_high_water = max(self.pool_high_water, pool.total_bytes())  # polled after steps

    def peak_step_bytes(self):
        self.sync()
        hook = _PeakHook.make(self.cupy)
        with hook:
            self.step()
            self.sync()
        return hook.peak

    def launches_per_step(self):
        cupy = self.cupy
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                self.step()
            finally:
                graph = stream.end_capture()
        return _graph_node_counts(graph.graph)


class TorchBench:
    def __init__(self, torch, batch_size, tf32):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(0)
        self.torch = torch
        self.model = torch_nin(torch).cuda().train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.x = torch.randn(batch_size, 3, 32, 32, device="cuda")
        self.labels = torch.randint(0, 10, (batch_size,), device="cuda")
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss

    def sync(self):
        self.torch.cuda.synchronize()

    def run(self, steps):
        for _ in range(steps):
            self.step()

    def gpu_activities_per_step(self, step):
        from torch.profiler import ProfilerActivity, profile
        self.sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            self.sync()
        return sum(1 for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA"))


def _timed_rounds(benches, args):
    """Alternate the libraries round by round; images/s per round (wall clock, synchronised)."""
    rates = {name: [] for name in benches}
    for name, bench in benches.items():
        bench.run(args.warmup)
        bench.sync()
    for round_index in range(args.rounds):
        for name, bench in benches.items():
            bench.sync()
            start = time.perf_counter()
            bench.run(args.steps)
            bench.sync()
            seconds = time.perf_counter() - start
            rates[name].append(args.steps * args.batch_size / seconds)
        print(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {rates[name][-1]:,.0f} img/s" for name in benches), flush=True)
    return rates


# ---- per-operator timings ------------------------------------------------------------------------

def _nin_ops(batch):
    """(label, kind, input shape, extra) for each operator of the CIFAR NIN at batch `batch`."""
    ops = []
    for label, c_in, c_out, k, pad, hw in [
            ("conv1 5x5 3->192", 3, 192, 5, 2, 32), ("cccp1 1x1 192->160", 192, 160, 1, 0, 32),
            ("cccp2 1x1 160->96", 160, 96, 1, 0, 32), ("conv2 5x5 96->192", 96, 192, 5, 2, 16),
            ("cccp3 1x1 192->192", 192, 192, 1, 0, 16), ("conv3 3x3 192->192", 192, 192, 3, 1, 8),
            ("cccp6 1x1 192->10", 192, 10, 1, 0, 8)]:
        ops.append((label + " +relu", "conv_relu", (batch, c_in, hw, hw), (c_out, k, pad)))
    ops += [("maxpool 3 s2 ceil", "max_pool", (batch, 96, 32, 32), None),
            ("avgpool 3 s2 ceil", "avg_pool", (batch, 192, 16, 16), None),
            ("dropout 0.5", "dropout", (batch, 192, 8, 8), None),
            ("relu", "relu", (batch, 192, 32, 32), None),
            ("global avg pool", "gap", (batch, 10, 8, 8), None),
            ("cross entropy", "cross_entropy", (batch, 10), None)]
    return ops


def _median_ms(timer, fn, repeats):
    times = []
    for _ in range(repeats):
        times.append(timer(fn))
    return statistics.median(times)


def _time_ops(args, cupy, torch):
    import numpy as np

    from ninpy import Tensor
    import ninpy.functional as F

    conv_relu = F.conv2d_relu

    def cupy_timer(fn):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end)

    def torch_timer(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    rng = np.random.default_rng(0)
    rows = []
    for label, kind, shape, extra in _nin_ops(args.batch_size):
        data = rng.standard_normal(shape).astype(np.float32)
        labels = rng.integers(0, shape[-1], shape[0]).astype(np.int64)
        row = {"op": label, "input_shape": list(shape)}

        # ninpy
        x = Tensor(cupy.asarray(data), requires_grad=True)
        params = []
        if kind == "conv_relu":
            c_out, k, pad = extra
            w = Tensor(cupy.asarray(rng.standard_normal((c_out, shape[1], k, k)).astype(np.float32) * 0.05),
                       requires_grad=True)
            b = Tensor(cupy.zeros(c_out, np.float32), requires_grad=True)
            params = [w, b]
            # channels first, as NIN runs it between layers (an NCHW call adds two layout copies)
            x = Tensor(cupy.asarray(np.ascontiguousarray(data.transpose(1, 0, 2, 3))), requires_grad=True)
            forward = lambda: conv_relu(x, w, b, 1, pad, layout="CNHW")  # noqa: E731
        elif kind == "max_pool":
            forward = lambda: F.max_pool2d(x, 3, 2, 0, ceil_mode=True)  # noqa: E731
        elif kind == "avg_pool":
            forward = lambda: F.avg_pool2d(x, 3, 2, 0, True)  # noqa: E731
        elif kind == "dropout":
            forward = lambda: F.dropout(x, 0.5, True)  # noqa: E731
        elif kind == "relu":
            forward = lambda: F.relu(x)  # noqa: E731
        elif kind == "gap":
            forward = lambda: F.global_avg_pool2d(x)  # noqa: E731
        else:
            device_labels = cupy.asarray(labels)
            forward = lambda: F.cross_entropy(x, device_labels)  # noqa: E731

        def ninpy_backward():
            out = forward()
            grad = cupy.ones(out.shape, np.float32) if out.size > 1 else None
            for t in [x] + params:
                t.grad = None
            cupy.cuda.Device().synchronize()
            row.setdefault("_ninpy_bwd", []).append(cupy_timer(lambda: out.backward(grad)))

        for _ in range(3):  # warm-up (kernel compilation, pool growth)
            forward()
            ninpy_backward()
        row.pop("_ninpy_bwd", None)
        row["ninpy_forward_ms"] = _median_ms(cupy_timer, forward, args.op_repeats)
        for _ in range(args.op_repeats):
            ninpy_backward()
        row["ninpy_backward_ms"] = statistics.median(row.pop("_ninpy_bwd"))

        # torch
        if torch is not None:
            nnf = torch.nn.functional
            tx = torch.tensor(data, device="cuda", requires_grad=True)
            tparams = []
            if kind == "conv_relu":
                c_out, k, pad = extra
                tw = torch.randn(c_out, shape[1], k, k, device="cuda").mul_(0.05).requires_grad_()
                tb = torch.zeros(c_out, device="cuda", requires_grad=True)
                tparams = [tw, tb]
                tforward = lambda: nnf.relu(nnf.conv2d(tx, tw, tb, 1, pad))  # noqa: E731
            elif kind == "max_pool":
                tforward = lambda: nnf.max_pool2d(tx, 3, 2, 0, ceil_mode=True)  # noqa: E731
            elif kind == "avg_pool":
                tforward = lambda: nnf.avg_pool2d(tx, 3, 2, 0, ceil_mode=True)  # noqa: E731
            elif kind == "dropout":
                tforward = lambda: nnf.dropout(tx, 0.5, True)  # noqa: E731
            elif kind == "relu":
                tforward = lambda: nnf.relu(tx)  # noqa: E731
            elif kind == "gap":
                tforward = lambda: nnf.adaptive_avg_pool2d(tx, 1).flatten(1)  # noqa: E731
            else:
                tlabels = torch.tensor(labels, device="cuda")
                tforward = lambda: nnf.cross_entropy(tx, tlabels)  # noqa: E731
            backward_times = []

            def torch_backward():
                out = tforward()
                grad = torch.ones_like(out) if out.numel() > 1 else None
                for t in [tx] + tparams:
                    t.grad = None
                torch.cuda.synchronize()
                backward_times.append(torch_timer(lambda: out.backward(grad)))

            for _ in range(3):
                tforward()
                torch_backward()
            backward_times.clear()
            row["torch_forward_ms"] = _median_ms(torch_timer, tforward, args.op_repeats)
            for _ in range(args.op_repeats):
                torch_backward()
            row["torch_backward_ms"] = statistics.median(backward_times)
        rows.append(row)
        print(f"  op {label}: ninpy {row['ninpy_forward_ms']:.3f}/{row['ninpy_backward_ms']:.3f} ms"
              + (f", torch {row['torch_forward_ms']:.3f}/{row['torch_backward_ms']:.3f} ms"
                 if torch is not None else ""), flush=True)
    return rows


def _largest_im2col_bytes(batch):
    """The biggest column matrix a CIFAR NIN step builds: C*kh*kw x N*oh*ow floats (conv2)."""
    sizes = {"conv1": 3 * 25 * 32 * 32, "conv2": 96 * 25 * 16 * 16, "conv3": 192 * 9 * 8 * 8}
    layer = max(sizes, key=sizes.get)
    return layer, sizes[layer] * batch * 4


def worker(args):
    from ninpy import backend

    problem = backend.gpu_problem()
    if problem:
        print(f"bench_gpu: {problem}", file=sys.stderr)
        return 2
    cupy = backend.require_gpu()
    precision = args.worker
    torch, torch_problem = _import_torch(args)
    properties = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = properties["name"]
    result = {
        "precision": precision,
        "cupy_tf32_env": os.environ.get("CUPY_TF32", ""),
        "device": name.decode() if isinstance(name, bytes) else str(name),
        "compute_capability": cupy.cuda.Device().compute_capability,
        "versions": _versions(cupy, torch),
        "batch_size": args.batch_size,
        "torch_problem": torch_problem,
    }
    print(f"[{precision}] {result['device']}: warm-up and {args.rounds} rounds of {args.steps} steps",
          flush=True)
    ninpy_bench = NinpyBench(cupy, args.batch_size)
    benches = {"ninpy": ninpy_bench}
    if torch is not None:
        benches["torch"] = TorchBench(torch, args.batch_size, tf32=precision == "tf32")
        torch.cuda.reset_peak_memory_stats()
    rates = _timed_rounds(benches, args)
    layer, col_bytes = _largest_im2col_bytes(args.batch_size)
    result["ninpy"] = {
        "parameters": ninpy_bench.parameters,
        "images_per_s": statistics.median(rates["ninpy"]),
        "images_per_s_rounds": rates["ninpy"],
        "pool_total_bytes_high_water": ninpy_bench.pool_high_water,
        "peak_bytes_in_use_during_step": ninpy_bench.peak_step_bytes(),
        "largest_im2col_buffer": {"layer": layer, "bytes": col_bytes},
    }
    if torch is not None:
        torch_bench = benches["torch"]
        result["torch"] = {
            "parameters": torch_bench.parameters,
            "images_per_s": statistics.median(rates["torch"]),
            "images_per_s_rounds": rates["torch"],
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "cudnn_benchmark": True,
        }
        try:
            result["torch"]["gpu_activities_per_step"] = torch_bench.gpu_activities_per_step(torch_bench.step)
            # CUPTI sees every kernel of the process, so the same count works for ninpy
            result["ninpy"]["gpu_activities_per_step"] = torch_bench.gpu_activities_per_step(ninpy_bench.step)
        except Exception as error:  # profiler unavailable
            result["torch"]["gpu_activities_per_step"] = f"n/a: {type(error).__name__}: {error}"
    if not args.no_ops:
        print(f"[{precision}] per-operator times (median of {args.op_repeats}, CUDA events)", flush=True)
        result["ops"] = _time_ops(args, cupy, torch)
    _save(args.worker_out, result)
    # Last, because a failed capture can leave state behind: kernel launches per step from a graph.
    try:
        result["ninpy"]["cuda_graph_nodes_per_step"] = ninpy_bench.launches_per_step()
    except Exception as error:
        result["ninpy"]["cuda_graph_nodes_per_step"] = f"n/a: {type(error).__name__}: {error}"
    _save(args.worker_out, result)
    return 0


def _save(path, result):
    if path:
        Path(path).write_text(json.dumps(result, indent=2, default=str))


# ================================================================================================
# The driver: one worker process per precision, then a table and the JSON file.
# ================================================================================================

def _mib(n):
    return f"{n / 2 ** 20:,.0f} MiB" if isinstance(n, (int, float)) else str(n)


def _launches(value):
    if isinstance(value, dict):
        return f"{value.get('kernel', 0)} kernels" + (
            f" (+{sum(v for k, v in value.items() if k != 'kernel')} other nodes)"
            if len(value) > 1 else "")
    return "n/a" if value is None else str(value)


def print_table(results):
    for precision, r in results.items():
        print(f"\n=== {precision.upper()} on {r['device']} (sm_{r['compute_capability']}), "
              f"batch {r['batch_size']} ===")
        n, t = r["ninpy"], r.get("torch")
        print(f"{'':32}{'ninpy':>22}{'PyTorch':>22}")
        print(f"{'images/s (median)':32}{n['images_per_s']:>22,.0f}"
              f"{(format(t['images_per_s'], ',.0f') if t else r.get('torch_problem') or '-'):>22}")
        if t:
            print(f"{'ninpy / PyTorch':32}{n['images_per_s'] / t['images_per_s']:>22.2f}")
        print(f"{'peak memory in use':32}{_mib(n['peak_bytes_in_use_during_step']):>22}"
              f"{(_mib(t['max_memory_allocated']) if t else '-'):>22}")
        print(f"{'memory reserved (pool)':32}{_mib(n['pool_total_bytes_high_water']):>22}"
              f"{(_mib(t['max_memory_reserved']) if t else '-'):>22}")
        col = n["largest_im2col_buffer"]
        print(f"{'largest im2col buffer':32}{_mib(col['bytes']) + ' (' + col['layer'] + ')':>22}")
        print(f"{'GPU activities/step (CUPTI)':32}{str(n.get('gpu_activities_per_step', 'n/a')):>22}"
              f"{(str(t.get('gpu_activities_per_step', 'n/a')) if t else '-'):>22}")
        print(f"{'CUDA graph nodes/step':32}{_launches(n.get('cuda_graph_nodes_per_step')):>22}")
        if r.get("ops"):
            print(f"\n{'operator (ms, fwd / bwd)':34}{'ninpy fwd':>10}{'bwd':>9}{'torch fwd':>11}{'bwd':>9}")
            for op in r["ops"]:
                torch_cols = (f"{op['torch_forward_ms']:>11.3f}{op['torch_backward_ms']:>9.3f}"
                              if "torch_forward_ms" in op else "")
                print(f"{op['op']:34}{op['ninpy_forward_ms']:>10.3f}{op['ninpy_backward_ms']:>9.3f}{torch_cols}")
    print("\nThroughput: synthetic batch resident on the GPU, forward + backward + SGD step, no .item() "
          "per step; the wall clock includes Python and launch overhead.")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    from ninpy import backend

    problem = backend.gpu_problem()
    if problem:
        print(f"bench_gpu: no usable GPU, nothing to measure: {problem}", file=sys.stderr)
        return 2
    results = {}
    passthrough = [f"--batch-size={args.batch_size}", f"--warmup={args.warmup}", f"--steps={args.steps}",
                   f"--rounds={args.rounds}", f"--op-repeats={args.op_repeats}"]
    passthrough += ["--no-torch"] * args.no_torch + ["--no-ops"] * args.no_ops
    for precision in args.precisions:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            env = dict(os.environ, CUPY_TF32="1" if precision == "tf32" else "0")
            code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--worker", precision,
                                    "--worker-out", str(out)] + passthrough, env=env)
            if out.exists():
                results[precision] = json.loads(out.read_text())
            if code != 0:
                print(f"bench_gpu: the {precision} worker exited with status {code}"
                      + ("; keeping what it measured" if out.exists() else ""), file=sys.stderr)
                if not out.exists():
                    return code
    print_table(results)
    if args.json:
        first = next(iter(results.values()))
        summary = {"benchmark": "NIN CIFAR-10 training, ninpy vs PyTorch", "device": first["device"],
                   "compute_capability": first["compute_capability"], "versions": first["versions"],
                   "batch_size": args.batch_size, "precisions": list(results), "results": results,
                   "settings": {k: getattr(args, k) for k in ("warmup", "steps", "rounds", "op_repeats")}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
