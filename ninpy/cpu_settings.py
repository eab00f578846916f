"""The one process setting ninpy makes for the CPU path, applied when ninpy is imported (before NumPy).

Spinning BLAS threads. After each matrix product OpenBLAS's worker threads busy-wait for the next
one (2^28 cycles, about 0.1 s), taking a core from the Numba kernel that runs next.
OPENBLAS_THREAD_TIMEOUT=4 (2^4 cycles) puts them to sleep at once: a NIN step at batch 128 on
2 cores went from 1042 to 965 ms with it alone (benchmarks/profile_step.py). OpenBLAS reads it when it loads, which is why ninpy/__init__.py imports this module
before anything imports NumPy; if NumPy is already loaded, or the variable is set, nothing changes.
The variable stays in os.environ, so processes started from this one inherit it.
`APPLIED` lists what this import changed.

What ninpy does NOT change: malloc. Turning glibc's mmap off (mallopt M_MMAP_MAX = 0) would also
end the page faults that ninpy.memory avoids, but for the whole process, PyTorch and every other
library in it included; ninpy keeps its own pool instead (docs/why-fast.md).
"""
import os
import sys

APPLIED = []


def quiet_blas_threads():
    """OPENBLAS_THREAD_TIMEOUT=4 unless set, if OpenBLAS has not loaded yet (it reads it then)."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ or "numpy" in sys.modules:
        return False
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = "4"
    APPLIED.append("OPENBLAS_THREAD_TIMEOUT=4")
    return True


quiet_blas_threads()
