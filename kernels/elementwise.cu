// Elementwise kernels: bias + ReLU (in place), bias (in place), ReLU backward, dropout mask.
//
// Mapping: one thread per element e of the (flattened, C-contiguous) array, grid-stride loop over
// `total` elements. For the bias kernels out is (N, C, L) with L = H*W, so the channel of element e
// is c = (e / L) % C:
//   bias_relu:      out[e] = max(out[e] + bias[c], 0)    (written v < 0 ? 0 : v, so NaN stays NaN)
//   add_bias:       out[e] = out[e] + bias[c]
//   relu_backward:  dx[e] = y[e] <= 0 ? 0 : dy[e]      (a NaN y passes dy on, as in PyTorch)
//   dropout_mask:   mask[e] = (uniform(seed, offset + e) >= p) ? scale : 0,  scale = 1 / (1 - p)
//
// The dropout uniform is counter-based: h = mix64(mix64(seed + GOLDEN) + (offset + e) * GOLDEN), the
// SplitMix64 finaliser (Steele, Lea, Flood 2014) of a Weyl sequence keyed by the seed; its top 24
// (float) or 53 (double) bits give a uniform in [0, 1). (seed, offset) fixes every draw, independent of
// the launch configuration, so a run repeats bit for bit and resumes from a stored offset.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double.

__device__ inline unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

__device__ inline void uniform_from_bits(unsigned long long h, float& u) {
    u = (float)(h >> 40) * (1.0f / 16777216.0f);  // 24 bits: exact in float, in [0, 1)
}

__device__ inline void uniform_from_bits(unsigned long long h, double& u) {
    u = (double)(h >> 11) * (1.0 / 9007199254740992.0);  // 53 bits: exact in double, in [0, 1)
}

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
__global__ void dropout_mask_kernel(T* __restrict__ mask, Index total, unsigned long long seed,
                                    unsigned long long offset, T p, T scale) {
    const unsigned long long golden = 0x9E3779B97F4A7C15ULL;
    const unsigned long long key = mix64(seed + golden);
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned long long counter = offset + (unsigned long long)e;
        T u;
        uniform_from_bits(mix64(key + counter * golden), u);
        mask[e] = u >= p ? scale : T(0);
    }
}
