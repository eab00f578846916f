"""The one process setting ninpy makes for the CPU path: OpenBLAS's threads sleep between products.

Why. After each matrix product OpenBLAS's worker threads busy-wait for the next one (2^28 cycles,
about 0.1 s), taking a core from the Numba kernel that runs next. OPENBLAS_THREAD_TIMEOUT=4
(2^4 cycles) puts them to sleep at once (docs/why-fast.md has what it is worth).

How, whatever was imported first. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when it loads, so:
- ninpy imported before NumPy: setting the variable is enough (`quiet_blas_threads`);
- NumPy imported first (its OpenBLAS already loaded and its threads started with the long timeout):
  OpenBLAS has no setter for the timeout, but it exports the two functions that reach it:
  `openblas_read_env()` reads the variables again, and `blas_thread_shutdown_()` ends the worker
  threads (OpenBLAS's own fork handler calls it); the next product starts them afresh, and a thread
  start takes the timeout from what was read (`_apply_to_loaded_openblas`). Costs one thread start.
Only where the user has not set OPENBLAS_THREAD_TIMEOUT. The variable stays in os.environ, so
processes started from this one inherit it. `APPLIED` lists what this import changed.

What ninpy does NOT change: malloc. Turning glibc's mmap off (mallopt M_MMAP_MAX = 0) would also
end the page faults that ninpy.memory avoids, but for the whole process, PyTorch and every other
library in it included; ninpy keeps its own pool instead (docs/why-fast.md).
"""
import ctypes
import os
import sys

APPLIED = []
TIMEOUT = "4"


def quiet_blas_threads():
    """OPENBLAS_THREAD_TIMEOUT=4 unless the user set it: in the environment, and in an OpenBLAS that
    NumPy has already loaded. True when something changed."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = TIMEOUT
    if "numpy" not in sys.modules:
        APPLIED.append(f"OPENBLAS_THREAD_TIMEOUT={TIMEOUT}")
        return True
    if _apply_to_loaded_openblas():
        APPLIED.append(f"OPENBLAS_THREAD_TIMEOUT={TIMEOUT} (OpenBLAS already loaded: threads restarted)")
        return True
    del os.environ["OPENBLAS_THREAD_TIMEOUT"]     # not applied: do not claim it to child processes
    return False


def _apply_to_loaded_openblas():
    """Make the OpenBLAS in this process re-read its variables and restart its threads; False when
    no OpenBLAS with those two functions is loaded (another BLAS, or none yet)."""
    library = _loaded_openblas()
    if library is None or not all(hasattr(library, name)
                                  for name in ("openblas_read_env", "blas_thread_shutdown_")):
        return False
    library.openblas_read_env()
    library.blas_thread_shutdown_()
    return True


def _loaded_openblas():
    """The OpenBLAS shared library this process has loaded (NumPy's), or None. Read from the
    process's memory map (Linux), so nothing new is loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        if path.endswith(".so") or ".so." in path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


quiet_blas_threads()
