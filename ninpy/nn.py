"""Modules: layers that own their parameters, as in torch.nn.

A Module finds its parameters and sub-modules by looking at its attributes (set in __init__), so
`parameters()`, `state_dict()`, `train()`/`eval()` and `to(device)` walk the tree with no registry to
keep in step by hand.
"""
import math
from collections import OrderedDict

import numpy as np

from . import backend
from . import functional as F
from . import random
from .autograd import Tensor
from .shapes import check_window, pair


class Parameter(Tensor):
    """A tensor a Module learns: requires_grad is on."""

    def __init__(self, data, device=None, dtype=None):
        super().__init__(data, requires_grad=True, device=device, dtype=dtype)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


class Module:
    """Base class: subclasses set Parameters and Modules as attributes and define forward()."""

    training = True

    def forward(self, *args):
        raise NotImplementedError

    def __call__(self, *args):
        return self.forward(*args)

    # ---- walking the tree -------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix=""):
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield (f"{prefix}.{name}" if prefix else name), value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- modes, devices, gradients ----------------------------------------------------------
    def train(self, mode=True):
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move every parameter to `device` in place (the Parameter objects stay the same)."""
        device = backend.resolve_device(device)
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ---- saving and loading -----------------------------------------------------------------
    def state_dict(self):
        """name -> array (a copy, on the parameters' device), in a stable order."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state):
        """Copy arrays into the parameters (kept on their device); names and shapes must match."""
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing {missing}, unexpected {unexpected}; "
                           "was the state saved from a model built with other arguments?")
        for name, p in params.items():
            value = state[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the "
                                 f"state but {p.shape} in the model")
            p.data = backend.to_device(value, p.device).astype(p.dtype, copy=True)


class Conv2d(Module):
    """A 2-D convolution layer: weight (C_out, C_in, k, k), bias (C_out,)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 init_std=None, dtype=np.float32):
        kh, kw = pair(kernel_size, "kernel_size")
        for kernel, step, pad in zip((kh, kw), pair(stride, "stride"), pair(padding, "padding")):
            check_window(kernel, step, pad)   # here, before a kernel of 0 divides He's std by 0
        self.stride, self.padding = stride, padding
        self.weight = Parameter(init_weight((out_channels, in_channels, kh, kw), init_std, dtype))
        self.bias = Parameter(np.zeros(out_channels, dtype=dtype)) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def __repr__(self):
        c_out, c_in, kh, kw = self.weight.shape
        return f"Conv2d({c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding})"


def init_weight(shape, std=None, dtype=np.float32):
    """Gaussian weights. std=None picks He's std sqrt(2 / fan_in).

    NIN has no batch norm and nine ReLU layers; He initialisation keeps the activations' scale
    the same from layer to layer, so it trains from scratch at the paper's learning rate instead
    of stalling at loss ln(C) (which a fixed small std such as 0.05 can do: the signal shrinks
    with depth and the class maps die).
    """
    fan_in = int(np.prod(shape[1:]))
    if std is None:
        std = math.sqrt(2.0 / fan_in)
    return (random.cpu_generator().standard_normal(shape) * std).astype(dtype)


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class MaxPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        self.kernel_size, self.stride, self.padding, self.ceil_mode = (
            kernel_size, stride, padding, ceil_mode)

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode)


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
        self.kernel_size, self.stride, self.padding, self.ceil_mode = (
            kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = count_include_pad

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)


class GlobalAvgPool2d(Module):
    def forward(self, x):
        return F.global_avg_pool2d(x)


class Dropout(Module):
    def __init__(self, p=0.5):
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class Sequential(Module):
    """Modules applied in order; named "0", "1", ... in state_dict, as in torch."""

    def __init__(self, *modules):
        for index, module in enumerate(modules):
            setattr(self, str(index), module)

    def __iter__(self):
        return (module for _, module in self.named_children())

    def __getitem__(self, index):
        return [module for _, module in self.named_children()][index]

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def forward(self, x):
        for module in self:
            x = module(x)
        return x


class MLPConv(Module):
    """NIN's mlpconv block: a k x k convolution then two 1x1 convolutions, ReLU after each.

    The two 1x1 convolutions are a small two-layer perceptron applied at every pixel to the
    features of the k x k window under it. Each conv runs with its ReLU fused (F.conv2d_relu).
    layout: "NCHW", "CNHW" for channels-first input and output, or "working": whichever
    F.working_layout() says, what models.NIN passes (docs/design.md, "Array layouts").
    """

    def __init__(self, in_channels, widths, kernel_size, padding=0, init_std=None,
                 dtype=np.float32, layout="NCHW"):
        c1, c2, c3 = widths
        self.layout = layout
        self.conv = Conv2d(in_channels, c1, kernel_size, padding=padding, init_std=init_std,
                           dtype=dtype)
        self.cccp1 = Conv2d(c1, c2, 1, init_std=init_std, dtype=dtype)
        self.cccp2 = Conv2d(c2, c3, 1, init_std=init_std, dtype=dtype)

    def forward(self, x):
        layout = F.working_layout() if self.layout == "working" else self.layout
        for conv in (self.conv, self.cccp1, self.cccp2):
            x = F.conv2d_relu(x, conv.weight, conv.bias, conv.stride, conv.padding, layout)
        return x
