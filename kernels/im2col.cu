// im2col and col2im: unfold image patches into columns so a convolution is one 2-D GEMM, and fold
// them back.
//
// Layout (the whole batch in one matrix):
//   x   (N, C, H, W), or (C, N, H, W) when channels_first is 1 (ninpy's convolution uses that one:
//       docs/design.md, "Array layouts")
//   col (C*kh*kw, N*oh*ow)
//   col[(c*kh + i)*kw + j][(n*oh + y)*ow + x] = x[n][c][y*sh - ph + i][x*sw - pw + j]  (0 off the image)
//
// im2col: one thread per (channel c, column (n, y, x)) (grid-stride loop over C * N*oh*ow). The
//   thread writes the kh*kw entries of its column that belong to channel c, rows (c*kh + i)*kw + j,
//   so the index arithmetic is paid once per kh*kw elements; for each (i, j) neighbouring threads read
//   neighbouring pixels and write neighbouring columns (coalesced). Every col element is written by
//   exactly one thread, padding included (zeros), so col needs no prior fill.
//
// col2im: the adjoint, written as a GATHER: one thread per element e of dx (n, c, h, w) sums every
//   col entry that im2col copied from x[n][c][h][w]: the output positions (y, x) whose window covers
//   (h, w), i.e. y*sh - ph <= h <= y*sh - ph + kh - 1, with i = h + ph - y*sh (same for columns).
//   y runs from (h+ph < kh ? 0 : (h+ph-kh)/sh + 1) to min((h+ph)/sh, oh-1): the covering windows derived
//   in ninpy/shapes.py (covering_windows), repeated here in C. No atomics: each dx element is written
//   by exactly one thread, so the result is deterministic. (reference.py scatters instead, one window
//   offset at a time, and cpu_kernels.py gathers a whole image plane per Numba iteration.)
//
// Index is int when every flat index (and index + grid size) fits in 31 bits, long long otherwise;
// gpu_kernels.py picks it. T is float or double.

// The plane of image n, channel c among the N*C planes of x: n*C + c, or c*N + n channels first.
template <typename Index>
__device__ Index plane_of(Index n, Index c, int N, int C, int channels_first) {
    return channels_first ? c * N + n : n * C + c;
}

template <typename T, typename Index>
__global__ void im2col_kernel(const T* __restrict__ x, T* __restrict__ col,
                              int N, int C, int channels_first, int H, int W, int kh, int kw,
                              int sh, int sw, int ph, int pw, int oh, int ow) {
    const Index columns = (Index)N * oh * ow;
    const Index total = (Index)C * columns;
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index c = e / columns;
        const Index column = e - c * columns;  // (n*oh + oy)*ow + ox
        const int ox = (int)(column % ow);
        const Index t = column / ow;
        const int oy = (int)(t % oh);
        const Index n = t / oh;
        const T* plane = x + plane_of<Index>(n, c, N, C, channels_first) * H * W;
        T* out = col + c * kh * kw * columns + column;  // row (c*kh + 0)*kw + 0 of this column
        const int h0 = oy * sh - ph;
        const int w0 = ox * sw - pw;
        for (int i = 0; i < kh; ++i) {
            const int h = h0 + i;
            for (int j = 0; j < kw; ++j) {
                const int w = w0 + j;
                *out = (h >= 0 && h < H && w >= 0 && w < W) ? plane[(Index)h * W + w] : T(0);
                out += columns;  // next row of col
            }
        }
    }
}

template <typename T, typename Index>
__global__ void col2im_kernel(const T* __restrict__ col, T* __restrict__ dx,
                              int N, int C, int channels_first, int H, int W, int kh, int kw,
                              int sh, int sw, int ph, int pw, int oh, int ow) {
    const Index columns = (Index)N * oh * ow;
    const Index total = (Index)N * C * H * W;
    const Index stride = (Index)blockDim.x * gridDim.x;
    for (Index e = (Index)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int w = (int)(e % W);
        const int h = (int)((e / W) % H);
        const Index plane = e / ((Index)W * H);  // n*C + c, or c*N + n channels first
        const int c = (int)(channels_first ? plane / N : plane % C);
        const Index n = channels_first ? plane % N : plane / C;
        const int hp = h + ph;  // row in the padded image
        const int wp = w + pw;
        const int y_start = hp < kh ? 0 : (hp - kh) / sh + 1;
        const int y_end = min(hp / sh + 1, oh);
        const int x_start = wp < kw ? 0 : (wp - kw) / sw + 1;
        const int x_end = min(wp / sw + 1, ow);
        T sum = T(0);
        for (int oy = y_start; oy < y_end; ++oy) {
            const int i = hp - oy * sh;
            for (int ox = x_start; ox < x_end; ++ox) {
                const int j = wp - ox * sw;
                const Index row = ((Index)c * kh + i) * kw + j;
                sum += col[row * columns + (n * oh + oy) * ow + ox];
            }
        }
        dx[e] = sum;
    }
}
