"""Window arithmetic of convolution and pooling: the one place these formulas are derived.

Along one axis (rows or columns alike) an input of `size` elements is padded by `padding` on both
sides, and output index o looks at the `kernel` input positions

    start(o) = o * stride - padding,  ...,  start(o) + kernel - 1            (image coordinates)

Everything else follows from that one line:
- which windows are allowed at all (`check_window`: what PyTorch refuses is refused here, once,
  before any kernel sees it) and how many outputs there are (`conv_output_size`,
  `pool_output_size`, and `check_pool_output` for a kernel handed its output size);
- which outputs look at a given input position (`covering_windows`), which every backward pass
  that is written as a gather needs (col2im, max and average pooling backward);
- how many elements an average divides by (`avg_pool_divisor`).

reference.py, cpu_kernels.py and gpu_kernels.py call these functions (cpu_kernels compiles them with
Numba). The CUDA kernels in kernels/*.cu cannot import Python: they repeat the formulas in C, name the
function here in a comment, and tests/test_gpu.py runs them against the reference, which uses these.
"""
import math


def pair(value, name="value"):
    """2 -> (2, 2); (2, 3) -> (2, 3). Kernel sizes, strides and paddings accept either form."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def check_window(kernel, stride, padding):
    """Refuse, along one axis, a window PyTorch refuses: kernel >= 1, stride >= 1, padding >= 0.

    Every output size below starts here, so no kernel (reference, Numba or CUDA) is ever handed a
    window that would make it index outside its arrays (a kernel of 0 gives empty windows whose
    "first element" lies past the input, a stride of 0 divides by zero, a negative stride or padding
    puts windows outside the input).
    """
    if kernel < 1:
        raise RuntimeError(f"kernel size should be greater than zero, but got {kernel}")
    if stride < 1:
        raise RuntimeError(f"stride should be greater than zero, but got {stride}")
    if padding < 0:
        raise RuntimeError(f"padding must be non-negative, but got {padding}")


def _too_small(size, kernel, padding):
    return RuntimeError(f"output size is too small: input size {size} padded by {padding} on each "
                        f"side is smaller than kernel {kernel}")


def conv_output_size(size, kernel, stride, padding):
    """floor((size + 2*padding - kernel) / stride) + 1, as in PyTorch and Caffe.

    The last window must end inside the padded input: start(o) + kernel <= size + padding, i.e.
    o * stride <= size + 2*padding - kernel; count the o >= 0 that satisfy it.
    """
    check_window(kernel, stride, padding)
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise _too_small(size, kernel, padding)
    return out


def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Pooling output size with PyTorch's rule (which matches Caffe's for NIN's layers).

    Without ceil_mode this is conv_output_size. ceil_mode rounds the window count up, so the last
    window may hang past the padded edge; that window is dropped when it would start inside the
    right padding (start(o) >= size), so every window holds at least one real element. PyTorch
    also limits the padding to half the kernel: a window could otherwise lie in the padding alone.
    """
    check_window(kernel, stride, padding)
    if 2 * padding > kernel:
        raise RuntimeError(f"pad should be at most half of kernel size, but got pad={padding}, "
                           f"kernel_size={kernel}")
    span = size + 2 * padding - kernel
    if span < 0 or size < 1:
        raise _too_small(size, kernel, padding)
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def check_pool_output(x_shape, kh, kw, sh, sw, ph, pw, oh, ow):
    """Refuse an (oh, ow) that pool_output_size gives for neither ceil_mode, for an (N, C, H, W) input.

    The pooling kernels take the output size from their caller (ceil_mode is the caller's choice);
    one that does not fit the window would make them read or write past the input.
    """
    if len(x_shape) != 4:
        raise ValueError(f"pooling: expected an (N, C, H, W) input, got shape {tuple(x_shape)}")
    for axis, size, kernel, stride, padding, out in (("rows", x_shape[2], kh, sh, ph, oh),
                                                     ("columns", x_shape[3], kw, sw, pw, ow)):
        fits = {pool_output_size(size, kernel, stride, padding, ceil) for ceil in (False, True)}
        if out not in fits:
            raise ValueError(f"pooling: {out} output {axis} do not fit input size {size}, kernel "
                             f"{kernel}, stride {stride}, padding {padding}; expected one of "
                             f"{sorted(fits)} (shapes.pool_output_size)")


def check_pool_gradient(op, dy_shape, x_shape, kh, kw, sh, sw, ph, pw):
    """Refuse a pooling backward's dy that no forward over an x_shape input with this window gives.

    The backward kernels size dx from x_shape and read dy at every window of every plane: a dy
    with other planes or another output size would make them read past it.
    """
    if len(dy_shape) != 4 or tuple(dy_shape[:2]) != tuple(x_shape[:2]):
        raise ValueError(f"{op}: dy has shape {tuple(dy_shape)}, expected ({x_shape[0]}, "
                         f"{x_shape[1]}, out_h, out_w) for an input of shape {tuple(x_shape)}")
    check_pool_output(x_shape, kh, kw, sh, sw, ph, pw, *dy_shape[2:])


def covering_windows(position, kernel, stride, padding, out):
    """The outputs o in [lo, hi) whose window holds input `position` (0 <= position < size).

    With p = position + padding (the position in the padded input), window o holds it when
    o*stride <= p <= o*stride + kernel - 1, i.e. (p - kernel + 1) / stride <= o <= p / stride:
        lo = ceil((p - kernel + 1) / stride), at least 0;   hi = floor(p / stride) + 1, at most out.
    (ceil(a / s) for a possibly negative a is written -((-a) // s) with floor division.)
    """
    p = position + padding
    lo = max(0, -((kernel - 1 - p) // stride))
    hi = min(out, p // stride + 1)
    return lo, hi


def avg_pool_divisor(o, kernel, stride, padding, size, count_include_pad):
    """How many elements output o's average divides by, along one axis (multiply the two axes).

    count_include_pad=True (PyTorch's default, Caffe's rule): the window clipped to the padded input
    [-padding, size + padding), so padding counts but a ceil-mode overhang past it does not.
    count_include_pad=False: only the real elements, the window clipped to [0, size).
    """
    start = o * stride - padding
    end = start + kernel
    if count_include_pad:
        return min(end, size + padding) - start
    return min(end, size) - max(start, 0)


def batch_and_channels(shape, layout):
    """(N, C) of an image array's shape: (N, C, H, W), or (C, N, H, W) with layout "CNHW"
    (channels first, the fast path's convolutions: docs/design.md, "Array layouts")."""
    return (shape[1], shape[0]) if layout == "CNHW" else (shape[0], shape[1])
