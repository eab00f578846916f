// Max and average pooling, forward and backward, on a stack of (H, W) planes: (N, C, H, W), or the
// channels-first (C, N, H, W) NIN passes (docs/design.md, "Array layouts"); a plane's index never matters.
//
// Windows: output (oy, ox) covers rows oy*sh - ph .. oy*sh - ph + kh - 1 and columns
// ox*sw - pw .. ox*sw - pw + kw - 1 of its plane; oh, ow come from the caller (ceil mode allowed: the
// last window may hang past the edge, but always holds at least one real element).
//
// Forward kernels: one thread per OUTPUT element e of y (N, C, oh, ow) (grid-stride loop):
//   ox = e % ow, oy = (e / ow) % oh, plane = e / (oh*ow) = n*C + c; the thread reads its window.
// Backward kernels: a GATHER, one thread per INPUT element e of dx (N, C, H, W):
//   w = e % W, h = (e / W) % H, plane = e / (H*W); the thread sums dy over the windows covering
//   (h, w): oy from (h+ph < kh ? 0 : (h+ph-kh)/sh + 1) to min((h+ph)/sh, oh-1), same for ox.
//   Each dx element is written by exactly one thread: no atomics, deterministic (Caffe/Chainer style).
//   The same backward is a scatter in reference.py (np.add.at: shortest to read) and in
//   cpu_kernels.py (within the plane a Numba iteration owns): a GPU has too many threads for that.
//
// Max pooling: only real elements compete (padding acts as -inf). Each window starts from its first
//   real element and scans the rest in row-major order, taking an element that is greater (strict >:
//   ties go to the first maximum) or NaN (a NaN wins, the last one, as in PyTorch). argmax (int32)
//   stores h*W + w, the flat index inside the plane.
// Average pooling divides by avg_pool_divisor(rows) * avg_pool_divisor(columns): with
//   count_include_pad (Caffe's rule, PyTorch's default) the window clipped to the padded image
//   [-p, size + p), else clipped to the image [0, size): the real elements only.
//
// Dropout after the pooling, in the same launch (GPU only: NIN follows each pooling with dropout):
//   with p > 0 each output element o of y becomes y[o] * mask(o), mask(o) = dropout_mask_value(seed,
//   offset + o, p, scale) (dropout_draw.cuh: the mask elementwise.cu's dropout_kernel would apply to
//   y, drawn from the same counters), and the backward kernels draw it again and read dy[o] * mask(o)
//   where they read dy[o]: the gradient of dropout(pool(x)). The products are dropout_kernel's, so the
//   numbers are those of the two operators one after the other, bit for bit. p = 0: no dropout.
//
// The window arithmetic (covering_windows, avg_pool_divisor) is derived once, with its reasoning, in
// ninpy/shapes.py, whose functions of the same names these repeat in C; tests/test_gpu.py holds these
// kernels to ninpy/reference.py, which uses them.
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise.
// T is float or double.

#include "dropout_draw.cuh"

// The output positions whose windows cover padded position p (= h + ph): [*start, *end).
// shapes.covering_windows: start = ceil((p - k + 1) / s) clipped at 0, end = floor(p / s) + 1.
__device__ inline void covering_windows(int p, int k, int s, int out, int* start, int* end) {
    *start = p < k ? 0 : (p - k) / s + 1;
    *end = min(p / s + 1, out);
}

// shapes.avg_pool_divisor along one axis, for the window starting at `start`.
__device__ inline int avg_pool_divisor(int start, int k, int size, int pad, int count_include_pad) {
    const int end = start + k;
    return count_include_pad ? min(end, size + pad) - start : min(end, size) - max(start, 0);
}

template <typename T, typename Index>
__global__ void max_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                                        int* __restrict__ argmax, Index total, int H, int W,
                                        int kh, int kw, int sh, int sw, int ph, int pw,
                                        int oh, int ow, unsigned long long seed,
                                        unsigned long long offset, T p, T scale) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int ox = (int)(e % ow);
        const int oy = (int)((e / ow) % oh);
        const Index plane = e / ((Index)ow * oh);
        const T* xp = x + plane * H * W;
        const int hstart = max(oy * sh - ph, 0);
        const int hend = min(oy * sh - ph + kh, H);
        const int wstart = max(ox * sw - pw, 0);
        const int wend = min(ox * sw - pw + kw, W);
        int best_index = hstart * W + wstart;
        T best = xp[best_index];
        for (int h = hstart; h < hend; ++h) {
            for (int w = wstart; w < wend; ++w) {
                const T v = xp[h * W + w];
                if (v > best || isnan(v)) {
                    best = v;
                    best_index = h * W + w;
                }
            }
        }
        y[e] = dropout_at(best, seed, offset + (unsigned long long)e, p, scale);
        argmax[e] = best_index;
    }
}

template <typename T, typename Index>
__global__ void max_pool_backward_kernel(const T* __restrict__ dy, const int* __restrict__ argmax,
                                         T* __restrict__ dx, Index total, int H, int W,
                                         int kh, int kw, int sh, int sw, int ph, int pw,
                                         int oh, int ow, unsigned long long seed,
                                         unsigned long long offset, T p, T scale) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const Index plane = e / ((Index)W * H);
        const int hp = h + ph;
        const int wp = w + pw;
        int y_start, y_end, x_start, x_end;
        covering_windows(hp, kh, sh, oh, &y_start, &y_end);
        covering_windows(wp, kw, sw, ow, &x_start, &x_end);
        const Index base = plane * oh * ow;
        const int me = h * W + w;
        T sum = T(0);
        for (int oy = y_start; oy < y_end; ++oy) {
            for (int ox = x_start; ox < x_end; ++ox) {
                const Index o = base + oy * ow + ox;
                if (argmax[o] == me) {
                    sum += dropout_at(dy[o], seed, offset + (unsigned long long)o, p, scale);
                }
            }
        }
        dx[e] = sum;
    }
}

template <typename T, typename Index>
__global__ void avg_pool_forward_kernel(const T* __restrict__ x, T* __restrict__ y, Index total,
                                        int H, int W, int kh, int kw, int sh, int sw,
                                        int ph, int pw, int oh, int ow, int count_include_pad,
                                        unsigned long long seed, unsigned long long offset, T p,
                                        T scale) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int ox = (int)(e % ow);
        const int oy = (int)((e / ow) % oh);
        const Index plane = e / ((Index)ow * oh);
        const T* xp = x + plane * H * W;
        const int size = avg_pool_divisor(oy * sh - ph, kh, H, ph, count_include_pad) *
                         avg_pool_divisor(ox * sw - pw, kw, W, pw, count_include_pad);
        const int hstart = max(oy * sh - ph, 0);
        const int wstart = max(ox * sw - pw, 0);
        const int hend = min(oy * sh - ph + kh, H);
        const int wend = min(ox * sw - pw + kw, W);
        T sum = T(0);
        for (int h = hstart; h < hend; ++h) {
            for (int w = wstart; w < wend; ++w) {
                sum += xp[h * W + w];
            }
        }
        y[e] = dropout_at(sum / T(size), seed, offset + (unsigned long long)e, p, scale);
    }
}

template <typename T, typename Index>
__global__ void avg_pool_backward_kernel(const T* __restrict__ dy, T* __restrict__ dx, Index total,
                                         int H, int W, int kh, int kw, int sh, int sw,
                                         int ph, int pw, int oh, int ow, int count_include_pad,
                                        unsigned long long seed, unsigned long long offset, T p,
                                        T scale) {
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const Index plane = e / ((Index)W * H);
        const int hp = h + ph;
        const int wp = w + pw;
        int y_start, y_end, x_start, x_end;
        covering_windows(hp, kh, sh, oh, &y_start, &y_end);
        covering_windows(wp, kw, sw, ow, &x_start, &x_end);
        const Index base = plane * oh * ow;
        T sum = T(0);
        for (int oy = y_start; oy < y_end; ++oy) {
            const int rows = avg_pool_divisor(oy * sh - ph, kh, H, ph, count_include_pad);
            for (int ox = x_start; ox < x_end; ++ox) {
                const int size = rows * avg_pool_divisor(ox * sw - pw, kw, W, pw, count_include_pad);
                const Index o = base + oy * ow + ox;
                sum += dropout_at(dy[o], seed, offset + (unsigned long long)o, p, scale) / T(size);
            }
        }
        dx[e] = sum;
    }
}
