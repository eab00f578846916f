"""Reusable hypothesis strategies: small geometries, dtypes and arrays for the kernel and operator tests.

Arrays are not drawn element by element: a test draws a small integer seed and builds the array
from it with `random_array`, so a failing example prints as a few numbers. Use it as

    @given(geometry=pool_geometries(), dtype=dtypes, seed=seeds)
    def test_something(geometry, dtype, seed):
        x = random_array(seed, geometry.x_shape, dtype, distinct=True)

Memory layouts are drawn the same way: `layouts` draws a name, and `in_layout(array, name)` gives the
same values stored another way (C order, all axes transposed, channels last, or a strided slice of a
larger buffer), so every operator and kernel is tested with inputs and upstream gradients of any
strides, as the kernel contract (docs/design.md) promises.
"""
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ninpy.shapes import conv_output_size, pair, pool_output_size

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(min_value=0, max_value=2**32 - 1)

LAYOUTS = ("c_order", "transposed", "channels_last", "strided")
layouts = st.sampled_from(LAYOUTS)


def in_layout(array, layout, xp=np):
    """The values of `array` in another memory layout (a new array; `array` is left as it is).

    c_order: C-contiguous. transposed: every axis reversed in memory (Fortran order), viewed back in
    the original axis order. channels_last: axis 1 stored last (NHWC for images), viewed as NCHW.
    strided: every other element of a buffer twice as large along each axis (a strided slice).
    xp: the array module that holds `array` (numpy, cupy, or the host emulator's stand-in).
    """
    array = xp.ascontiguousarray(array).reshape(array.shape)   # ascontiguousarray makes 0-d 1-d
    if layout == "c_order" or array.ndim < 2:   # one axis: C order is the only dense layout
        return array if layout != "strided" or array.ndim == 0 else _strided(array, xp)
    if layout == "transposed":
        return xp.ascontiguousarray(array.T).T
    if layout == "channels_last":
        order = (0,) + tuple(range(2, array.ndim)) + (1,)   # (N, H, W, C) for (N, C, H, W)
        stored = xp.ascontiguousarray(array.transpose(order))
        return stored.transpose(tuple(int(i) for i in np.argsort(order)))
    if layout == "strided":
        return _strided(array, xp)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def _strided(array, xp):
    buffer = xp.empty(tuple(2 * size for size in array.shape), dtype=array.dtype)
    view = buffer[(slice(None, None, 2),) * array.ndim]
    view[...] = array
    return view


@dataclass(frozen=True)
class Geometry:
    """One convolution or pooling window geometry; oh/ow computed with ninpy.shapes."""
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    oh: int
    ow: int
    ceil_mode: bool = False

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def y_shape(self):
        return (self.n, self.c, self.oh, self.ow)

    @property
    def window(self):
        """(kh, kw, sh, sw, ph, pw): the argument order of every kernel."""
        return (self.kh, self.kw, self.sh, self.sw, self.ph, self.pw)


def make_geometry(n, c, h, w, kernel, stride, padding, ceil_mode=None):
    """A Geometry from square-or-pair arguments, for @example cases; ceil_mode None means convolution."""
    (kh, kw), (sh, sw), (ph, pw) = (pair(kernel), pair(stride), pair(padding))
    if ceil_mode is None:
        oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
        ceil_mode = False
    else:
        oh, ow = pool_output_size(h, kh, sh, ph, ceil_mode), pool_output_size(w, kw, sw, pw, ceil_mode)
    return Geometry(n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, ceil_mode)


@st.composite
def _geometry(draw, pooling, max_batch, max_channels, max_size, max_kernel, max_stride):
    # The degenerate geometries are drawn on purpose, since that is where an index runs past an
    # array: an empty batch (the size-0 dimension PyTorch allows), size-1 dimensions, a kernel as
    # large as the padded input (one window), and strides larger than the kernel (gaps).
    n = draw(st.integers(0, max_batch))
    c = draw(st.integers(1, max_channels))
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    sh, sw = draw(st.integers(1, max_stride)), draw(st.integers(1, max_stride))
    ph, pw = draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2))
    h, w = draw(_image_size(kh, ph, max_size)), draw(_image_size(kw, pw, max_size))
    ceil_mode = draw(st.booleans()) if pooling else False
    if pooling:
        oh = pool_output_size(h, kh, sh, ph, ceil_mode)
        ow = pool_output_size(w, kw, sw, pw, ceil_mode)
    else:
        oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    return Geometry(n, c, h, w, kh, kw, sh, sw, ph, pw, oh, ow, ceil_mode)


def _image_size(kernel, padding, max_size):
    """At least one element, and at least the kernel minus both paddings (so one window fits);
    that smallest size, where the kernel covers the whole padded input, is drawn half the time."""
    smallest = max(1, kernel - 2 * padding)
    return st.one_of(st.just(smallest), st.integers(smallest, max(max_size, kernel)))


def pool_geometries(max_batch=3, max_channels=3, max_size=9, max_kernel=4, max_stride=5):
    """Pooling windows (padding <= kernel // 2, ceil_mode on or off): overlapping (stride < kernel),
    gapped (stride > kernel), windows that hang past the edge or do not tile the input, one window
    over the whole padded input, and empty batches."""
    return _geometry(True, max_batch, max_channels, max_size, max_kernel, max_stride)


def conv_geometries(max_batch=3, max_channels=3, max_size=9, max_kernel=4, max_stride=5):
    """Convolution (im2col) windows with the same ranges; ceil_mode is always False."""
    return _geometry(False, max_batch, max_channels, max_size, max_kernel, max_stride)


def random_array(seed, shape, dtype=np.float64, distinct=False, away_from_zero=False, low=-2.0, high=2.0):
    """A reproducible random array of `shape` from an integer seed.

    distinct: no two values are closer than about (high - low) / (3 * size), so max pooling has no
    ties (a random permutation of evenly spaced values, then jitter smaller than the spacing).
    away_from_zero: |value| >= 0.1 * max(|low|, |high|), so ReLU's kink at 0 is never within a
    finite-difference step.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if distinct:
        grid = np.linspace(low, high, size) if size > 1 else np.array([(low + high) / 2])
        step = (high - low) / max(size - 1, 1)
        values = rng.permutation(grid) + rng.uniform(-0.25, 0.25, size) * step
    else:
        values = rng.uniform(low, high, size)
    if away_from_zero:
        # squeeze |value| from [0, top] into [margin, top] on each side of 0: monotone, so distinct
        # values stay distinct
        top = max(abs(low), abs(high))
        margin = 0.1 * top
        values = np.where(values < 0, -1.0, 1.0) * (margin + np.abs(values) * (1 - margin / top))
    return values.reshape(shape).astype(dtype)


def random_labels(seed, n, classes):
    """n integer labels in [0, classes), int64, from an integer seed."""
    return np.random.default_rng(seed).integers(0, classes, n)
