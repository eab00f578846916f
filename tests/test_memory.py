"""ninpy.memory: big CPU arrays come back to the pool once nothing refers to them, and only then."""
import numpy as np
import pytest

from ninpy import cpu_kernels, memory

BIG = (1024, 1024)   # 4 MB of float32: over memory.MIN_BYTES


def address(array):
    return array.__array_interface__["data"][0]


@pytest.fixture(autouse=True)
def empty_pool():
    memory.release()
    yield
    memory.release()


def test_a_freed_array_is_handed_out_again():
    a = memory.pooled_empty(BIG, np.float32)
    where = address(a)
    del a
    b = memory.pooled_empty(BIG, np.float32)
    assert address(b) == where
    assert b.shape == BIG and b.dtype == np.float32 and b.flags.c_contiguous and b.flags.writeable


def test_an_array_in_use_is_never_handed_out_twice():
    a = memory.pooled_empty(BIG, np.float32)
    b = memory.pooled_empty(BIG, np.float32)
    assert not np.shares_memory(a, b)


def test_a_view_keeps_its_block_in_use():
    a = memory.pooled_empty(BIG, np.float32)
    a[...] = 7
    view = a[::2, 3:].T                                      # a view of a view, then the array goes
    del a
    b = memory.pooled_empty(BIG, np.float32)
    b[...] = 0
    assert not np.shares_memory(view, b) and (view == 7).all()


def test_a_kernel_result_stays_its_own_while_it_lives():
    x = np.ones(BIG, np.float32).reshape(1, 1, *BIG)
    dx = cpu_kernels.relu_backward(x, x)
    again = cpu_kernels.relu_backward(x, -x)
    assert not np.shares_memory(dx, again) and (dx == 1).all() and (again == 0).all()


def test_one_block_serves_any_dtype_and_shape_of_its_size():
    a = memory.pooled_empty(BIG, np.float32)
    where = address(a)
    del a
    b = memory.pooled_empty((512, 1024), np.float64)
    assert address(b) == where and b.dtype == np.float64


def test_small_and_empty_arrays_do_not_use_the_pool():
    before = memory.pooled_bytes()
    assert memory.pooled_empty((10, 10)).shape == (10, 10)
    assert memory.pooled_empty((0, 3, 5)).shape == (0, 3, 5)
    assert memory.pooled_bytes() == before


def test_free_blocks_are_let_go_past_the_limit(monkeypatch):
    monkeypatch.setattr(memory, "LIMIT_BYTES", 3 * memory.MIN_BYTES * 4)
    held = memory.pooled_empty((memory.MIN_BYTES,), np.float32)     # 4 MiB, kept in use
    for size in range(1, 6):                                 # five more sizes, each freed at once
        memory.pooled_empty((memory.MIN_BYTES + size,), np.float32)
    assert memory.pooled_bytes() <= memory.LIMIT_BYTES + 4 * memory.MIN_BYTES + 20
    assert address(held) in [address(b) for b in memory._blocks[held.nbytes]]
    memory.release()
    assert memory.pooled_bytes() == held.nbytes               # only the block in use is left


def test_a_larger_free_block_serves_a_request_under_half_its_size_only():
    a = memory.pooled_empty((1536, 1024), np.float32)               # 6 MiB
    where = address(a)
    del a
    b = memory.pooled_empty(BIG, np.float32)                        # 4 MiB fits in it: under twice
    assert address(b) == where and b.shape == BIG and b.flags.c_contiguous
    del b
    c = memory.pooled_empty((512, 1024), np.float32)                # 2 MiB: the 6 MiB block is not lent
    assert address(c) != where


def test_a_limit_of_zero_turns_the_pool_off(monkeypatch):
    monkeypatch.setattr(memory, "LIMIT_BYTES", 0)
    a = memory.pooled_empty(BIG, np.float32)
    assert a.shape == BIG and memory.pooled_bytes() == 0


@pytest.mark.parametrize("text, expected_mb", [("512", 512), ("0", 0), ("-3", 0), ("", 4096),
                                               ("abc", 4096), ("inf", 4096)])
def test_the_limit_from_the_environment(monkeypatch, text, expected_mb):
    monkeypatch.setenv("NINPY_MEMORY_POOL_MB", text)
    if text in ("abc", "inf"):
        with pytest.warns(UserWarning, match="NINPY_MEMORY_POOL_MB"):
            assert memory._limit_from_environment() == expected_mb * 2**20
    else:
        assert memory._limit_from_environment() == expected_mb * 2**20


def test_a_bad_limit_is_one_warning_line_at_import():
    # Python's own format is two lines (file:line: UserWarning: ..., then the source line).
    import os
    import subprocess
    import sys
    from pathlib import Path
    result = subprocess.run([sys.executable, "-c", "import ninpy.memory"], capture_output=True,
                            text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
                            env={**os.environ, "NINPY_MEMORY_POOL_MB": "lots"})
    assert result.returncode == 0
    assert result.stderr.startswith("warning: NINPY_MEMORY_POOL_MB='lots' is not a number")
    assert result.stderr.count("\n") == 1, result.stderr
