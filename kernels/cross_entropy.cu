// Softmax cross-entropy, fused: per-example loss (forward) and its gradient (backward).
//
// logits (N, K) row-major, labels (N,) int or long long, values in [0, K); eps = label_smoothing in
// [0, 1]: the target is (1 - eps) onehot(labels[n]) + eps / K, as PyTorch's label_smoothing.
// With s[k] = logits[n,k] - m, m = max_k logits[n,k] (m cancels, because the target sums to 1):
//   forward:  losses[n] = log(sum_k exp(s[k])) - s[labels[n]] + eps * (s[labels[n]] - mean_k s[k])
//   backward: dlogits[n,k] = scale * (exp(s[k]) / sum_k' exp(s[k']) - (1 - eps) (k == labels[n]) - eps / K)
//             scale is read from device memory (a 0-d array), so no host synchronisation is needed.
//
// Mapping: one WARP per row n (grid-stride over rows: warp w of the grid takes rows w, w + warps, ...).
//   A warp is 32 threads that execute together on every NVIDIA GPU so far; the 32s and the shuffle
//   offsets 16, 8, 4, 2, 1 below are that size (gpu_kernels._WARP on the Python side).
//   Lane l handles k = l, l + 32, ...; the row max and the row sum are reduced across the warp with
//   __shfl_xor_sync in a fixed butterfly order, so the result is deterministic (no atomics).
//   Blocks must hold a whole number of warps (gpu_kernels.py launches 256 threads).
// A label outside [0, K) gives NaN for that row (loss and gradient) instead of reading out of bounds.
//
// T is float or double; Label is int or long long.

__device__ inline float exp_(float v) { return expf(v); }
__device__ inline double exp_(double v) { return exp(v); }
__device__ inline float log_(float v) { return logf(v); }
__device__ inline double log_(double v) { return log(v); }
__device__ inline float nan_(float) { return nanf(""); }
__device__ inline double nan_(double) { return nan(""); }

template <typename T>
__device__ inline T warp_max(T v) {
    for (int offset = 16; offset > 0; offset /= 2) {
        v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

template <typename T>
__device__ inline T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// sum_k (row[k] - m), identical in every lane (every lane must call it: it shuffles across the warp).
template <typename T>
__device__ inline T row_shifted_sum(const T* row, int K, int lane, T m) {
    T t = T(0);
    for (int k = lane; k < K; k += 32) {
        t += row[k] - m;
    }
    return warp_sum(t);
}

// Row max m and sum_k exp(row[k] - m), identical in every lane.
template <typename T>
__device__ inline void row_max_sum(const T* row, int K, int lane, T& m, T& s) {
    m = row[0];  // every lane starts from a real element of the row
    for (int k = lane; k < K; k += 32) {
        m = max(m, row[k]);
    }
    m = warp_max(m);
    s = T(0);
    for (int k = lane; k < K; k += 32) {
        s += exp_(row[k] - m);
    }
    s = warp_sum(s);
}

template <typename T, typename Label>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ logits,
                                             const Label* __restrict__ labels,
                                             T* __restrict__ losses, T eps, int N, int K) {
    const int lane = threadIdx.x % 32;
    const int warps = (blockDim.x / 32) * gridDim.x;
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32; n < N; n += warps) {
        const T* row = logits + (long long)n * K;
        T m, s;
        row_max_sum(row, K, lane, m, s);
        // eps is the same in every lane, so the whole warp takes this branch or none of it
        const T shifted_mean = eps != T(0) ? row_shifted_sum(row, K, lane, m) / T(K) : T(0);
        if (lane == 0) {
            const Label label = labels[n];
            if (label >= 0 && label < K) {
                const T target = row[label] - m;
                T loss = log_(s) - target;
                if (eps != T(0)) {
                    loss += eps * (target - shifted_mean);
                }
                losses[n] = loss;
            } else {
                losses[n] = nan_(T(0));
            }
        }
    }
}

template <typename T, typename Label>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ logits,
                                              const Label* __restrict__ labels,
                                              const T* __restrict__ scale,
                                              T* __restrict__ dlogits, T eps, int N, int K) {
    const int lane = threadIdx.x % 32;
    const int warps = (blockDim.x / 32) * gridDim.x;
    const T g = *scale;
    const T spread = eps / T(K);  // the target's share of every class
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32; n < N; n += warps) {
        const T* row = logits + (long long)n * K;
        T* drow = dlogits + (long long)n * K;
        T m, s;
        row_max_sum(row, K, lane, m, s);
        const Label label = labels[n];
        const bool valid = label >= 0 && label < K;
        for (int k = lane; k < K; k += 32) {
            const T p = exp_(row[k] - m) / s;
            drow[k] = valid ? g * (p - (k == label ? T(1) - eps : T(0)) - spread) : nan_(T(0));
        }
    }
}
