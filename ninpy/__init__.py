"""ninpy: Network In Network from scratch, on NumPy/Numba (CPU) and CuPy with our CUDA kernels (GPU).

    import ninpy
    from ninpy import Tensor, no_grad, nn, optim, models
    import ninpy.functional as F
"""
from . import cpu_settings  # noqa: F401  (first: it sets what OpenBLAS reads when NumPy loads it)
from . import backend, functional, graph, models, nn, optim, random
from .autograd import Function, Tensor, enable_grad, is_grad_enabled, no_grad
from .backend import DeviceError
from .functional import kernel_set, use_kernels
from .gradcheck import GradcheckError, gradcheck
from .random import manual_seed

__version__ = "0.1.0"
__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled", "gradcheck",
           "GradcheckError", "manual_seed", "DeviceError", "use_kernels", "kernel_set", "backend",
           "functional", "graph", "nn", "optim", "models", "random"]
