// Softmax cross-entropy, fused: per-example losses, their mean, and the gradient.
//
// logits (N, K) row-major, labels (N,) int or long long; eps = label_smoothing in [0, 1]: the target
// is (1 - eps) onehot(labels[n]) + eps / K, as PyTorch's label_smoothing.
// A row whose label is ignore_index (PyTorch's default -100) is ignored, as in PyTorch: loss 0,
// gradient 0 times the row's softmax terms (so 0, or NaN where a logit is), and it does not count
// in the mean. Any other label outside [0, K) gives NaN for that
// row (loss and gradient) instead of reading out of bounds.
// With s[k] = logits[n,k] - m, m = max_k logits[n,k] (m cancels, because the target sums to 1):
//   forward:  losses[n] = (1 - eps) (log S - s[labels[n]]) + eps (log S - mean_k s[k]),  S = sum_k exp(s[k])
//             (the two terms added as PyTorch adds them, so a -inf logit gives inf, not inf - inf)
//   mean:     loss = (sum of losses[n] over the rows counted) / count, count = the rows counted
//             (NaN when there are none, as in PyTorch); count is written too, for the backward
//   backward: dlogits[n,k] = g * (exp(s[k]) / sum_k' exp(s[k']) - (1 - eps) (k == labels[n]) - eps / K)
//             g = *scale, or *scale / *divisor when by_divisor (the mean's count): both are read
//             from device memory (0-d arrays), so no host synchronisation is needed.
//
// Mapping: forward and backward: one WARP per row n (grid-stride over rows: warp w of the grid takes
//   rows w, w + warps, ...). A warp is 32 threads that execute together on every NVIDIA GPU so far;
//   the 32s and the shuffle offsets 16, 8, 4, 2, 1 below are that size (gpu_kernels._WARP on the
//   Python side). Lane l handles k = l, l + 32, ...; the row max and the row sum are reduced across
//   the warp with __shfl_xor_sync in a fixed butterfly order, so the result is deterministic (no
//   atomics). Blocks must hold a whole number of warps (gpu_kernels.py launches 256 threads).
// The mean: ONE warp in all (grid 1, block 32). Lane l takes the rows l, l + 32, ... whole, each by
//   itself, adds their losses and counts in double, then the warp adds its 32 partial sums by the
//   same butterfly: one launch for the training step's loss instead of two (the losses, then their
//   mean), deterministic. A batch's rows are few and short next to a convolution, so one warp is
//   enough; more warps would need shared memory and a block barrier to add up their sums.
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

// Over the elements k = first, first + step, ... of a row (a lane's share with step 32, the whole
// row with first 0 and step 1): their max, their sum of exp(row[k] - m), their sum of row[k] - m.
template <typename T>
__device__ inline T strided_max(const T* row, int K, int first, int step) {
    T m = row[0];  // every lane starts from a real element of the row
    for (int k = first; k < K; k += step) {
        m = max(m, row[k]);
    }
    return m;
}

template <typename T>
__device__ inline T strided_exp_sum(const T* row, int K, int first, int step, T m) {
    T s = T(0);
    for (int k = first; k < K; k += step) {
        s += exp_(row[k] - m);
    }
    return s;
}

template <typename T>
__device__ inline T strided_shifted_sum(const T* row, int K, int first, int step, T m) {
    T t = T(0);
    for (int k = first; k < K; k += step) {
        t += row[k] - m;
    }
    return t;
}

// Row max m and sum_k exp(row[k] - m), identical in every lane (every lane must call it: it
// shuffles across the warp).
template <typename T>
__device__ inline void row_max_sum(const T* row, int K, int lane, T& m, T& s) {
    m = warp_max(strided_max(row, K, lane, 32));
    s = warp_sum(strided_exp_sum(row, K, lane, 32, m));
}

// The loss of a row with a label in [0, K), from its max m, sum of exps s and mean_k (row[k] - m).
template <typename T>
__device__ inline T row_loss(const T* row, long long label, T m, T s, T shifted_mean, T eps) {
    const T log_s = log_(s);
    const T nll = log_s - (row[label] - m);
    return eps != T(0) ? (T(1) - eps) * nll + eps * (log_s - shifted_mean) : nll;
}

template <typename T, typename Label>
__global__ void cross_entropy_forward_kernel(const T* __restrict__ logits,
                                             const Label* __restrict__ labels,
                                             T* __restrict__ losses, T eps, long long ignore_index,
                                             int N, int K) {
    const int lane = threadIdx.x % 32;
    const int warps = (blockDim.x / 32) * gridDim.x;
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32; n < N; n += warps) {
        const T* row = logits + (long long)n * K;
        T m, s;
        row_max_sum(row, K, lane, m, s);
        // eps is the same in every lane, so the whole warp takes this branch or none of it
        const T shifted_mean = eps != T(0) ? warp_sum(strided_shifted_sum(row, K, lane, 32, m)) / T(K)
                                           : T(0);
        if (lane == 0) {
            const Label label = labels[n];
            if ((long long)label == ignore_index) {
                losses[n] = T(0);
            } else if (label >= 0 && label < K) {
                losses[n] = row_loss(row, (long long)label, m, s, shifted_mean, eps);
            } else {
                losses[n] = nan_(T(0));
            }
        }
    }
}

template <typename T, typename Label>
__global__ void cross_entropy_mean_kernel(const T* __restrict__ logits,
                                          const Label* __restrict__ labels, T* __restrict__ loss,
                                          T* __restrict__ count, T eps, long long ignore_index,
                                          int N, int K) {
    const int lane = threadIdx.x % 32;  // launched as one warp: lane l owns rows l, l + 32, ...
    double total = 0.0, counted = 0.0;
    for (int n = lane; n < N; n += 32) {
        const Label label = labels[n];
        if ((long long)label == ignore_index) {
            continue;
        }
        counted += 1.0;
        if (label < 0 || label >= K) {
            total += (double)nan_(T(0));
            continue;
        }
        const T* row = logits + (long long)n * K;
        const T m = strided_max(row, K, 0, 1);
        const T s = strided_exp_sum(row, K, 0, 1, m);
        const T shifted_mean = eps != T(0) ? strided_shifted_sum(row, K, 0, 1, m) / T(K) : T(0);
        total += (double)row_loss(row, (long long)label, m, s, shifted_mean, eps);
    }
    total = warp_sum(total);
    counted = warp_sum(counted);
    if (lane == 0) {
        *loss = (T)(total / counted);  // 0 / 0 = NaN when no row counts
        *count = (T)counted;
    }
}

template <typename T, typename Label>
__global__ void cross_entropy_backward_kernel(const T* __restrict__ logits,
                                              const Label* __restrict__ labels,
                                              const T* __restrict__ scale,
                                              const T* __restrict__ divisor,
                                              T* __restrict__ dlogits, T eps, long long ignore_index,
                                              int by_divisor, int N, int K) {
    const int lane = threadIdx.x % 32;
    const int warps = (blockDim.x / 32) * gridDim.x;
    const T g = by_divisor ? *scale / *divisor : *scale;  // divisor is only read when by_divisor
    const T spread = eps / T(K);  // the target's share of every class
    for (int n = (blockIdx.x * blockDim.x + threadIdx.x) / 32; n < N; n += warps) {
        const T* row = logits + (long long)n * K;
        T* drow = dlogits + (long long)n * K;
        T m, s;
        row_max_sum(row, K, lane, m, s);
        const Label label = labels[n];
        const bool ignored = (long long)label == ignore_index;
        const bool valid = label >= 0 && label < K;
        const T row_g = ignored ? T(0) : g;  // 0 times the row, as PyTorch: a NaN logit stays NaN
        for (int k = lane; k < K; k += 32) {
            const T p = exp_(row[k] - m) / s;
            drow[k] = ignored || valid ? row_g * (p - (k == label ? T(1) - eps : T(0)) - spread)
                                       : nan_(T(0));
        }
    }
}
