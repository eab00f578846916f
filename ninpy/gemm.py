"""The batched matrix products of a 1x1 convolution, done the way that measured fastest per device.

A 1x1 convolution of x (B, K, L) (L = H*W pixels) is a matrix product per image with one shared
weight w (M, K). Each device runs it without moving the batch:
- GPU: one cuBLAS strided-batched GEMM with stride 0 for w (gpu_kernels.matmul_shared).
- CPU: NumPy's matmul broadcasts w over the batch and calls one BLAS GEMM per image, writing
  straight into the output. The other shape of the same arithmetic, one large GEMM on x moved to
  (K, B*L), pays for two layout copies and took about 1.5x as long over NIN's 1x1 layers
  (batch 128, 2 cores, benchmarks/bench_gemm.py).

`batch_to_columns` and `columns_to_batch` are those copies; the im2col convolution needs them,
because im2col lays out the whole batch as one column matrix.

Every big result is written into an array from ninpy.memory (`out=`), so the next step reuses it.
"""
import numpy as np

from . import backend, memory


def matmul(a, b):
    """a (M, K) @ b (K, L), written into a pooled array."""
    out = memory.empty_for(b, (a.shape[0], b.shape[1]), np.result_type(a.dtype, b.dtype))
    return backend.array_module(b).matmul(a, b, out=out)


def batch_to_columns(x):
    """(B, K, L) -> (K, B*L), the layout of one big GEMM (a copy)."""
    b, k, l = x.shape
    out = memory.empty_for(x, (k, b, l))
    out[...] = x.transpose(1, 0, 2)
    return out.reshape(k, b * l)


def columns_to_batch(y, batch):
    """(M, B*L) -> (B, M, L) (a copy)."""
    m = y.shape[0]
    pixels = y.shape[1] // batch if batch else 0   # not -1, which an empty batch cannot resolve
    out = memory.empty_for(y, (batch, m, pixels))
    out[...] = y.reshape(m, batch, pixels).transpose(1, 0, 2)
    return out


def matmul_shared(w, x, transpose_w=False):
    """out[b] = op(w) @ x[b] for w (M, K) shared by every b, x (B, K, L) -> (B, M, L)."""
    if backend.is_gpu_array(x):
        from . import gpu_kernels
        return gpu_kernels.matmul_shared(w, x, transpose_w)
    w = w.T if transpose_w else w
    out = memory.empty((x.shape[0], w.shape[0], x.shape[2]), np.result_type(w.dtype, x.dtype))
    return np.matmul(w, x, out=out)


def pointwise_backward(w, g, x, need_x=True):
    """(dW, dx) of y[b] = w @ x[b]: dW = sum_b g[b] @ x[b]^T, dx[b] = w^T @ g[b] (None unless need_x)."""
    xp = backend.array_module(x)
    per_image = memory.empty_for(x, (x.shape[0], g.shape[1], x.shape[1]), np.result_type(g.dtype, x.dtype))
    grad_w = xp.matmul(g, x.transpose(0, 2, 1), out=per_image).sum(axis=0)
    return grad_w, matmul_shared(w, g, transpose_w=True) if need_x else None
