"""A pool of big CPU arrays: a training step reuses the last step's memory instead of asking for new.

This is the one place the pool is explained. The Numba wrappers (cpu_kernels.py), the GEMMs
(gemm.py) and the layout copies (functional.py) get their outputs from `pooled_empty(shape, dtype)`
(or `pooled_empty_for(array, shape)`, which gives a CuPy array on the GPU); nothing is ever handed
back by hand. The plain path (reference.py) does not use the pool.

Why. glibc's malloc gives every block over 32 MB its own fresh mapping from the OS and unmaps it
when the block is freed. A NIN step makes dozens of such arrays (activations, im2col columns, their
gradients), so without the pool every step starts on fresh pages, each zeroed by the kernel before
NumPy writes it. Every step asks for the same sizes as the step before, so keeping the freed blocks
and handing them out again removes that cost, as CuPy's memory pool does on the GPU.
(docs/why-fast.md has the page-fault counts and the time they cost.)

How. Each block is a 1-D uint8 array owned by the pool; `pooled_empty` hands out a view of the
smallest free block that holds the asked size and is under twice it, or of a new block of that size
(a block much larger than the request would be kept from the big arrays that need it).

When is a block free? Every NumPy view keeps a reference to the array that owns its memory
(`view.base` is the block), and so does every view of a view. So while any array made from a block
is alive, the block has more references than the pool's own one; when the last of them is garbage,
only the pool's reference is left. `_in_use` counts them with sys.getrefcount, which is exact
here: nothing but those views can refer to a block, since it is never handed out itself.
Arrays under MIN_BYTES come from NumPy as usual (malloc already reuses small blocks); GPU arrays
come from CuPy, which has its own pool.

The price is memory: the pool keeps, for each size, as many blocks as were ever in use at once,
which adds up to more than the peak of all sizes together (docs/why-fast.md measures it). The pool
holds at most LIMIT_BYTES (blocks in use can always be made; past the limit it lets go of free
blocks before it makes a new one); the environment variable NINPY_MEMORY_POOL_MB sets it, and 0
turns the pool off. `release()` lets go of every free block now; the training loop calls it around
each evaluation, where the sizes change, so that one phase's blocks are not held through the
other. One Python thread at a time.
"""
import os
import sys

import numpy as np

from . import backend
from .notices import warn

MIN_BYTES = 1 << 20


def _limit_from_environment(default_mb=4096):
    text = os.environ.get("NINPY_MEMORY_POOL_MB", "").strip()
    try:
        return max(int(float(text or default_mb) * 2**20), 0)
    except (ValueError, OverflowError):
        warn(f"NINPY_MEMORY_POOL_MB={text!r} is not a number of megabytes (0 turns the "
                      f"pool off); using {default_mb}", stacklevel=2)
        return default_mb * 2**20


LIMIT_BYTES = _limit_from_environment()

_blocks = {}   # nbytes -> [uint8 arrays], every block the pool owns, free or in use


def _references(blocks, index):
    """sys.getrefcount of blocks[index]: the pool's list, this call's own, and one per live view."""
    return sys.getrefcount(blocks[index])


_ONLY_THE_POOL = _references([np.empty(0, np.uint8)], 0)   # measured on a block no view refers to


def _in_use(blocks, index):
    """True while an array made from blocks[index] (a view: its base is the block) is alive."""
    return _references(blocks, index) > _ONLY_THE_POOL


def pooled_empty(shape, dtype=np.float32):
    """An uninitialised C-contiguous NumPy array, as np.empty; a big one is a view of a pool block
    (a block an earlier step let go of, when one fits)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if nbytes < MIN_BYTES or LIMIT_BYTES <= 0:
        return np.empty(shape, dtype)
    block = _free_block(nbytes)
    if block is None:
        _make_room(nbytes)
        block = np.empty(nbytes, np.uint8)
        _blocks.setdefault(nbytes, []).append(block)
    return block[:nbytes].view(dtype).reshape(shape)


def _free_block(nbytes):
    """The smallest free block of at least nbytes and under twice that, or None."""
    for size in sorted(_blocks):
        if nbytes <= size < 2 * nbytes:
            blocks = _blocks[size]
            for index in range(len(blocks)):
                if not _in_use(blocks, index):
                    return blocks[index]
    return None


def pooled_empty_for(array, shape, dtype=None):
    """pooled_empty on `array`'s device (a CuPy array, from CuPy's pool, on the GPU); dtype
    defaults to array's."""
    dtype = array.dtype if dtype is None else dtype
    if backend.is_gpu_array(array):
        return backend.array_module(array).empty(shape, dtype)
    return pooled_empty(shape, dtype)


def pooled_bytes():
    """Bytes the pool holds, free or in use."""
    return sum(nbytes * len(blocks) for nbytes, blocks in _blocks.items())


def release(keep_bytes=0):
    """Let go of free blocks, largest first, until the pool holds at most keep_bytes."""
    for nbytes in sorted(_blocks, reverse=True):
        blocks = _blocks[nbytes]
        for index in reversed(range(len(blocks))):
            if pooled_bytes() <= keep_bytes:
                return
            if not _in_use(blocks, index):
                del blocks[index]


def _make_room(nbytes):
    if pooled_bytes() + nbytes > LIMIT_BYTES:
        release(max(LIMIT_BYTES - nbytes, 0))
