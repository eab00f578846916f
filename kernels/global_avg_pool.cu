// Global average pooling, NIN's classifier: the mean of every (H, W) plane, and its gradient.
//
// x is a stack of N*C planes of HW = H*W elements: (N, C, H, W), or channels first (C, N, H, W) (the
// layout NIN keeps between its layers; channels_first = 1). The logits y are (N, C) either way, so
// from channels-first maps no layout copy is needed on the way to the loss:
//   forward:  y[n, c] = (sum of the plane of (n, c)) / HW,  the plane p = n*C + c, or c*N + n
//   backward: dx[p, k] = dy[n, c] / HW for every k of the plane p of (n, c)
//
// Mapping: forward: one thread per output y[n, c] (grid-stride), which adds its plane's HW elements
// in order, in double, so the result is deterministic (no atomics) and as accurate in float32 as
// in float64. NIN's last maps are small (8x8 for CIFAR), and the N*C threads are plenty.
// backward: one thread per dx element (grid-stride); consecutive threads write consecutive
// addresses.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double.

// The plane of logit (n, c) among the N*C planes of x: im2col.cu's plane_of. Each .cu file is its
// own module on the GPU, so it is repeated, under another name: the emulator builds every file into
// one library, where one name can be defined once.
template <typename Index>
__device__ inline Index logit_plane(Index n, Index c, int N, int C, int channels_first) {
    return channels_first ? c * N + n : n * C + c;
}

template <typename T, typename Index>
__global__ void global_avg_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                               Index outputs, int N, int C, int channels_first,
                                               Index HW) {
    for (Index o = (Index)blockIdx.x * blockDim.x + threadIdx.x; o < outputs;
         o += (Index)gridDim.x * blockDim.x) {
        const T* plane = x + logit_plane(o / C, o % C, N, C, channels_first) * HW;
        double sum = 0.0;
        for (Index k = 0; k < HW; ++k) {
            sum += (double)plane[k];
        }
        y[o] = (T)(sum / (double)HW);
    }
}

template <typename T, typename Index>
__global__ void global_avg_pool_backward_kernel(const T* __restrict__ dy, T* __restrict__ dx,
                                                Index total, int N, int C, int channels_first,
                                                Index HW) {
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += (Index)gridDim.x * blockDim.x) {
        const Index p = e / HW;  // the plane: (n, c) or (c, n)
        const Index n = channels_first ? p % N : p / C;
        const Index c = channels_first ? p / N : p % C;
        dx[e] = dy[n * C + c] / T(HW);
    }
}
