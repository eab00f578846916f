// ReLU backward and the bias gradient in one pass, for y = relu(z + bias[c]) on (N, C, L) arrays
// (L = H*W; a channels-first (C, N*H*W) array is (1, C, N*H*W)):
//   dx[n, c, k] = y[n, c, k] <= 0 ? 0 : dy[n, c, k]      (a NaN y passes dy on, as relu_backward)
//   db[c]       = sum over n and k of dx[n, c, k]
// One launch instead of two (an elementwise ReLU backward, then a sum per channel), and dy and y
// are read once.
//
// Mapping: one BLOCK per channel c (grid-stride over channels). Thread t takes the channel's
// elements j = t, t + blockDim, ... of its N*L (n = j / L, k = j % L; consecutive threads read
// consecutive addresses), writes dx, and adds the values into its own partial sum, in double. The
// block then adds its partials in shared memory by halving: at each step thread t < s adds
// partial[t + s] into partial[t], a fixed tree, so db is the same on every run (no atomics).
// blockDim must be a power of two, at most 1024 (gpu_kernels.py chooses it).
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double.

template <typename T, typename Index>
__global__ void relu_bias_backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                          T* __restrict__ dx, T* __restrict__ db, int C, Index L,
                                          Index per_channel) {
    __shared__ double partial[1024];
    for (int c = blockIdx.x; c < C; c += gridDim.x) {
        double sum = 0.0;
        for (Index j = threadIdx.x; j < per_channel; j += blockDim.x) {
            const Index e = (j / L) * C * L + (Index)c * L + j % L;
            const T v = y[e] <= T(0) ? T(0) : dy[e];
            dx[e] = v;
            sum += (double)v;
        }
        partial[threadIdx.x] = sum;
        __syncthreads();
        for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
            if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
            __syncthreads();
        }
        if (threadIdx.x == 0) db[c] = (T)partial[0];
        __syncthreads();  // partial is the next channel's
    }
}
