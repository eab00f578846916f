"""The CPU choice in ninpy/gemm.py, measured: a 1x1 convolution as one GEMM per image (what the
(N, C, H, W) layout gives) or as one GEMM over the whole batch (what ninpy's channels-first layout
gives), at the sizes of NIN's 1x1 layers on CIFAR-10.

Both shapes run in this one process, alternating round by round; each row is forward
(y[b] = w @ x[b]) and backward (dW = sum_b g[b] @ x[b]^T, dx[b] = w^T @ g[b]) in milliseconds.

    python benchmarks/bench_gemm.py                  # batch 128, 5 rounds
    python benchmarks/bench_gemm.py --json out.json  # also write the numbers as JSON
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ninpy import gemm  # noqa: E402  (ninpy before NumPy: ninpy/cpu_settings.py)
import numpy as np  # noqa: E402

# (C_in, C_out, H*W) of each 1x1 layer of models.nin() on a 32x32 input
NIN_POINTWISE_LAYERS = [(192, 160, 1024), (160, 96, 1024), (192, 192, 256), (192, 192, 64),
                        (192, 10, 64)]


def per_image(w, x, g):
    """The (N, C, H, W) layout: NumPy's broadcast matmul, one BLAS GEMM per image, no layout copies."""
    y = np.matmul(w, x)
    grad_w = np.matmul(g, x.transpose(0, 2, 1)).sum(axis=0)
    return y, grad_w, np.matmul(w.T, g)


def one_gemm(w, x, g):
    """What ninpy runs, channels first: x (K, B*L) and g (M, B*L), one GEMM for each product."""
    return gemm.matmul(w, x), gemm.matmul(g, x.T), gemm.matmul(w.T, g)


def milliseconds(run, *args):
    start = time.perf_counter()
    run(*args)
    return 1e3 * (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shapes = {"per_image": per_image, "one_gemm": one_gemm}
    results = []
    print(f"1x1 convolution forward + backward, batch {args.batch_size}, CPU ({os.cpu_count()} cores), "
          f"fp32, median of {args.rounds} rounds")
    print(f"{'C_in':>5s} {'C_out':>5s} {'H*W':>5s} {'per image ms':>13s} {'one GEMM ms':>12s} {'ratio':>6s}")
    for c_in, c_out, pixels in NIN_POINTWISE_LAYERS:
        w = rng.standard_normal((c_out, c_in), dtype=np.float32)
        x = rng.standard_normal((args.batch_size, c_in, pixels), dtype=np.float32)
        g = rng.standard_normal((args.batch_size, c_out, pixels), dtype=np.float32)
        x_cf = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(c_in, -1)   # channels first
        g_cf = np.ascontiguousarray(g.transpose(1, 0, 2)).reshape(c_out, -1)
        inputs = {"per_image": (w, x, g), "one_gemm": (w, x_cf, g_cf)}
        (y, dw, dx), (y_cf, dw_cf, dx_cf) = per_image(*inputs["per_image"]), one_gemm(*inputs["one_gemm"])
        assert np.allclose(y.transpose(1, 0, 2).reshape(c_out, -1), y_cf, atol=1e-3)   # also a warm-up
        assert np.allclose(dx.transpose(1, 0, 2).reshape(c_in, -1), dx_cf, atol=1e-3)
        assert np.allclose(dw, dw_cf, rtol=1e-4, atol=1e-2)
        times = {name: [] for name in shapes}
        for _ in range(args.rounds):
            for name, run in shapes.items():
                times[name].append(milliseconds(run, *inputs[name]))
        median = {name: statistics.median(t) for name, t in times.items()}
        ratio = median["per_image"] / median["one_gemm"]
        results.append({"c_in": c_in, "c_out": c_out, "pixels": pixels, "ms": median,
                        "ratio_per_image_over_one_gemm": ratio, "rounds": times})
        print(f"{c_in:5d} {c_out:5d} {pixels:5d} {median['per_image']:13.1f} {median['one_gemm']:12.1f} "
              f"{ratio:6.2f}")
    total = {name: sum(r["ms"][name] for r in results) for name in shapes}
    print(f"{'all':>17s} {total['per_image']:13.1f} {total['one_gemm']:12.1f} "
          f"{total['per_image'] / total['one_gemm']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "cores": os.cpu_count(), "batch_size": args.batch_size,
                       "numpy": np.__version__, "layers": results, "total_ms": total}, f, indent=2)


if __name__ == "__main__":
    main()
