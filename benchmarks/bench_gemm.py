"""The CPU choice in ninpy/gemm.py, measured: a 1x1 convolution as one GEMM per image, or as one
large GEMM after moving the batch next to the pixels, at the sizes of NIN's 1x1 layers on CIFAR-10;
and, for scale, the large GEMMs alone ("no copies"), which a (C, N, H, W) activation layout would run.

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
    """What ninpy runs on the CPU: NumPy's broadcast matmul, one BLAS GEMM per image, no layout copies."""
    y = gemm.matmul_shared(w, x)
    return y, gemm.pointwise_backward(w, g, x)


def columns(w, x, g):
    """The alternative: x (B, K, L) -> (K, B*L) so that each product is one large GEMM."""
    batch = x.shape[0]
    y = gemm.columns_to_batch(w @ gemm.batch_to_columns(x), batch)
    g_cols = gemm.batch_to_columns(g)
    grad_w = g_cols @ gemm.batch_to_columns(x).T
    return y, (grad_w, gemm.columns_to_batch(w.T @ g_cols, batch))


def no_copies(w, x, g):
    """What a (C, N, H, W) activation layout would run: x and g already (K, B*L) and (M, B*L)."""
    x_cols, g_cols = x.reshape(x.shape[1], -1), g.reshape(g.shape[1], -1)  # stand-ins of that shape
    return gemm.matmul(w, x_cols), gemm.matmul(g_cols, x_cols.T), gemm.matmul(w.T, g_cols)


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
    shapes = {"per_image": per_image, "columns": columns, "no_copies": no_copies}
    results = []
    print(f"1x1 convolution forward + backward, batch {args.batch_size}, CPU ({os.cpu_count()} cores), "
          f"fp32, median of {args.rounds} rounds")
    print(f"{'C_in':>5s} {'C_out':>5s} {'H*W':>5s} {'per image ms':>13s} {'columns ms':>11s} {'ratio':>6s}"
          f" {'no copies ms':>13s}")
    for c_in, c_out, pixels in NIN_POINTWISE_LAYERS:
        w = rng.standard_normal((c_out, c_in), dtype=np.float32)
        x = rng.standard_normal((args.batch_size, c_in, pixels), dtype=np.float32)
        g = rng.standard_normal((args.batch_size, c_out, pixels), dtype=np.float32)
        (y, (dw, dx)), (y_ref, (dw_ref, dx_ref)) = per_image(w, x, g), columns(w, x, g)  # also a warm-up
        assert np.allclose(y, y_ref, atol=1e-3) and np.allclose(dx, dx_ref, atol=1e-3)
        assert np.allclose(dw, dw_ref, rtol=1e-4, atol=1e-2)
        times = {name: [] for name in shapes}
        for _ in range(args.rounds):
            for name, run in shapes.items():
                times[name].append(milliseconds(run, w, x, g))
        median = {name: statistics.median(t) for name, t in times.items()}
        ratio = median["per_image"] / median["columns"]
        results.append({"c_in": c_in, "c_out": c_out, "pixels": pixels, "ms": median,
                        "ratio_per_image_over_columns": ratio, "rounds": times})
        print(f"{c_in:5d} {c_out:5d} {pixels:5d} {median['per_image']:13.1f} {median['columns']:11.1f} "
              f"{ratio:6.2f} {median['no_copies']:13.1f}")
    total = {name: sum(r["ms"][name] for r in results) for name in shapes}
    print(f"{'all':>17s} {total['per_image']:13.1f} {total['columns']:11.1f} "
          f"{total['per_image'] / total['columns']:6.2f} {total['no_copies']:13.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": "cpu", "cores": os.cpu_count(), "batch_size": args.batch_size,
                       "numpy": np.__version__, "layers": results, "total_ms": total}, f, indent=2)


if __name__ == "__main__":
    main()
