// Dropout's draws, shared by every kernel that applies dropout: elementwise.cu's dropout_kernel, and
// pooling.cu's kernels, which apply the dropout that follows a pooling in the pooling's own launch.
// gpu_kernels.py puts this text in place of each `#include "dropout_draw.cuh"` before NVRTC compiles
// a file (the emulator's g++ includes it as usual); the guard keeps one copy where several files
// that include it are compiled together.
//
// The uniform drawn for counter value n is counter-based: h = mix64(mix64(seed + GOLDEN) + n * GOLDEN),
// the SplitMix64 finaliser (Steele, Lea, Flood 2014) of a Weyl sequence keyed by the seed; its top 24
// (float) or 53 (double) bits give a uniform in [0, 1). (seed, n) fixes the draw, whatever kernel, thread
// or launch configuration makes it, so a run repeats bit for bit, resumes from a stored offset, and a
// backward pass draws the forward pass's mask again instead of storing it.
//
// dropout_mask_value(seed, n, p, scale) = scale (= 1 / (1 - p)) when uniform(seed, n) >= p, else 0:
// inverted dropout's mask at counter n. Element e of a dropout that reserved counters from `offset`
// (ninpy.random.next_gpu_stream) uses n = offset + e.
// dropout_at(v, seed, n, p, scale) = v * dropout_mask_value(seed, n, p, scale): v after dropout; with
// p = 0 (no dropout) v itself, nothing drawn.
#ifndef NINPY_DROPOUT_DRAW_CUH
#define NINPY_DROPOUT_DRAW_CUH

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

template <typename T>
__device__ inline T dropout_mask_value(unsigned long long seed, unsigned long long counter, T p, T scale) {
    const unsigned long long golden = 0x9E3779B97F4A7C15ULL;
    T u;
    uniform_from_bits(mix64(mix64(seed + golden) + counter * golden), u);
    return u >= p ? scale : T(0);
}

template <typename T>
__device__ inline T dropout_at(T value, unsigned long long seed, unsigned long long counter, T p, T scale) {
    return p > T(0) ? value * dropout_mask_value(seed, counter, p, scale) : value;
}

#endif  // NINPY_DROPOUT_DRAW_CUH
