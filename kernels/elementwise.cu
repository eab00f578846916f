// Elementwise kernels: bias + ReLU (in place), bias (in place), ReLU backward, dropout.
//
// Mapping: one thread per element e of the (flattened, C-contiguous) array, grid-stride loop over
// `total` elements. For the bias kernels out is (N, C, L) with L = H*W, so the channel of element e
// is c = (e / L) % C:
//   bias_relu:      out[e] = max(out[e] + bias[c], 0)    (written v < 0 ? 0 : v, so NaN stays NaN)
//   add_bias:       out[e] = out[e] + bias[c]
//   relu_backward:  dx[e] = y[e] <= 0 ? 0 : dy[e]      (a NaN y passes dy on, as in PyTorch)
//   dropout:        y[e] = x[e] * mask(e) (dropout_at),  mask(e) = dropout_mask_value(seed, offset + e, p, scale):
//                   scale = 1 / (1 - p) where the uniform drawn for counter offset + e is >= p, else 0
//                   (dropout_draw.cuh). The mask is drawn as it is applied and never stored: dropout's
//                   backward runs the same kernel on dy with the same (seed, offset), dx = dy * mask.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double.

#include "dropout_draw.cuh"

template <typename T, typename Index>
__global__ void bias_relu_kernel(T* __restrict__ out, const T* __restrict__ bias, Index total,
                                 int C, Index L) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)((e / L) % C);
        const T v = out[e] + bias[c];
        out[e] = v < T(0) ? T(0) : v;
    }
}

template <typename T, typename Index>
__global__ void add_bias_kernel(T* __restrict__ out, const T* __restrict__ bias, Index total,
                                int C, Index L) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int c = (int)((e / L) % C);
        out[e] += bias[c];
    }
}

template <typename T, typename Index>
__global__ void relu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                     T* __restrict__ dx, Index total) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        dx[e] = y[e] <= T(0) ? T(0) : dy[e];
    }
}

template <typename T, typename Index>
__global__ void dropout_kernel(const T* __restrict__ x, T* __restrict__ y, Index total,
                               unsigned long long seed, unsigned long long offset, T p, T scale) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        y[e] = dropout_at(x[e], seed, offset + (unsigned long long)e, p, scale);
    }
}
