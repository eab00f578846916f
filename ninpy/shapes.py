"""Output sizes of convolution and pooling windows: the one place these formulas live."""
import math


def pair(value, name="value"):
    """2 -> (2, 2); (2, 3) -> (2, 3). Kernel sizes, strides and paddings accept either form."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def conv_output_size(size, kernel, stride, padding):
    """floor((size + 2*padding - kernel) / stride) + 1, as in PyTorch and Caffe."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ValueError(f"input size {size} with padding {padding} is smaller than kernel {kernel}")
    return out


def pool_output_size(size, kernel, stride, padding, ceil_mode):
    """Pooling output size with PyTorch's rule (which matches Caffe's for NIN's layers).

    ceil_mode rounds the window count up, so a last window may hang past the edge; that window is
    dropped when it would start inside the right padding, so every window sees a real element.
    """
    if padding > kernel // 2:
        raise ValueError(f"pool padding {padding} must be at most half the kernel size {kernel}")
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(f"input size {size} with padding {padding} is smaller than kernel {kernel}")
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out
