"""The matrix product of every convolution: one GEMM, written into a pooled array.

Convolutions run channels first (functional.Conv2d), so each of their products is one plain 2-D
GEMM over the whole batch: NumPy's (OpenBLAS) on the CPU, CuPy's (cuBLAS; CUPY_TF32=1 allows TF32)
on the GPU. The result goes into an array from ninpy.memory (`out=`), so the next step reuses it.

Why one GEMM and not one per image: in the (N, C, H, W) layout a 1x1 convolution is a product per
image with a shared weight, and NumPy runs it as one small GEMM per image, slower than the same
arithmetic as one GEMM per layer; and the im2col convolutions needed two layout copies each on top
(docs/design.md, "Array layouts"; benchmarks/bench_gemm.py measures both, docs/why-fast.md has the numbers).
"""
import numpy as np

from . import backend, memory


def matmul(a, b):
    """a (M, K) @ b (K, L), written into a pooled array."""
    out = memory.pooled_empty_for(b, (a.shape[0], b.shape[1]), np.result_type(a.dtype, b.dtype))
    return backend.array_module(b).matmul(a, b, out=out)
