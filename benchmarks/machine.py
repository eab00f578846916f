"""What the CPU benchmarks print about the machine: cores, the BLAS NumPy runs, and its kernel set.

NumPy's matrix products run in OpenBLAS, which picks a kernel set for the CPU at load time. The
environment variable OPENBLAS_CORETYPE overrides that choice; some machines set it to an older set
(Haswell on an AVX-512 part halves sgemm). A benchmark must not silently measure that: the warning
below says so, and how to run without it (for the benchmark command only).
"""
import os
import platform


def blas_lines():
    """Lines naming each BLAS NumPy loaded (threadpoolctl), and a warning when the kernel set is pinned."""
    import numpy  # noqa: F401  (loads the BLAS, so threadpoolctl can see it)
    try:
        import threadpoolctl
    except ImportError:
        return ["BLAS: unknown (pip install threadpoolctl to see which BLAS and kernel set NumPy runs)"]
    lines = []
    for pool in threadpoolctl.threadpool_info():
        if pool.get("user_api") != "blas":
            continue
        lines.append(f"BLAS: {pool['internal_api']} {pool.get('version')}, kernel set "
                     f"{pool.get('architecture')}, {pool['num_threads']} threads "
                     f"({os.path.basename(pool['filepath'])})")
    pinned = os.environ.get("OPENBLAS_CORETYPE")
    if pinned:
        lines.append(f"WARNING: OPENBLAS_CORETYPE={pinned} pins OpenBLAS to that kernel set, which "
                     "can be far slower than the CPU's own (Haswell on AVX-512 halves sgemm). To "
                     "measure the machine, run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python ...")
    return lines


def machine_line():
    return f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
