"""Modules: layers that own their parameters, as in torch.nn.

A Module finds its parameters and sub-modules by looking at its attributes (set in __init__), so
`parameters()`, `state_dict()`, `train()`/`eval()` and `to(device)` walk the tree with no registry to
keep in step by hand.
"""
import math
from collections import OrderedDict, namedtuple

import numpy as np

from . import backend
from . import functional as F
from . import random
from .autograd import Tensor, refuse_unimplemented
from .shapes import check_window, pair


class Parameter(Tensor):
    """A tensor a Module learns: requires_grad is on (torch.nn.Parameter)."""

    def __init__(self, data=None, requires_grad=True, *, device=None, dtype=None):
        data = np.empty(0, dtype=np.float32) if data is None else data
        super().__init__(data, requires_grad=requires_grad, device=device, dtype=dtype)

    def __repr__(self):
        return "Parameter" + super().__repr__()[len("Tensor"):]


_IncompatibleKeys = namedtuple("_IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Base class: subclasses set Parameters and Modules as attributes and define forward().

    Every public method takes and returns images as (N, C, H, W), as in torch.nn. NIN keeps its
    activations in F.working_layout() between layers (channels first, (C, N, H, W), on the fast
    path; models.NIN); `_forward_working` is forward in that layout, an internal detail.
    """

    training = True

    def forward(self, *input):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def _forward_working(self, x):
        """forward on an input in F.working_layout(), giving that layout: here by swapping in and
        out of (N, C, H, W) when it is channels first; layers that work per image plane or per
        element take either layout as it is."""
        if F.working_layout() == "NCHW":
            return self.forward(x)
        return F.swap_batch_and_channels(self.forward(F.swap_batch_and_channels(x)))

    # ---- walking the tree -------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return (module for _, module in self.named_children())

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        memo = set() if memo is None else memo
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name,
                                           remove_duplicate)

    def modules(self, remove_duplicate=True):
        return (module for _, module in self.named_modules(remove_duplicate=remove_duplicate))

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        seen = set()
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for module_name, module in modules:
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and not (remove_duplicate and id(value) in seen):
                    seen.add(id(value))
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self, recurse=True):
        """An iterator over the parameters, as in torch (list(...) it to index or count)."""
        return (p for _, p in self.named_parameters(recurse=recurse))

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())

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

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    # ---- saving and loading -----------------------------------------------------------------
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """name -> array (a copy, on the parameters' device), in a stable order."""
        refuse_unimplemented("state_dict", positional_arguments=(args, ()),
                             keep_vars=(keep_vars, False))
        destination = OrderedDict() if destination is None else destination
        for name, p in self.named_parameters():
            destination[prefix + name] = p.data.copy()
        return destination

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Copy arrays into the parameters (kept on their device), in place: each parameter's
        version rises, as torch's copy_ makes it. Names must match unless strict=False; shapes
        must match. Returns (missing_keys, unexpected_keys)."""
        refuse_unimplemented("load_state_dict", assign=(assign, False))
        params = dict(self.named_parameters())
        missing = [name for name in params if name not in state_dict]
        unexpected = [name for name in state_dict if name not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing {missing}, unexpected {unexpected}; "
                           "was the state saved from a model built with other arguments?")
        for name, p in params.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"load_state_dict: {name} has shape {tuple(value.shape)} in the "
                                 f"state but {p.shape} in the model")
            p.data = backend.to_device(value, p.device).astype(p.dtype, copy=True)
            p.bump_version()
        return _IncompatibleKeys(missing, unexpected)


class Conv2d(Module):
    """A 2-D convolution layer, as torch.nn.Conv2d: weight (C_out, C_in, kh, kw), bias (C_out,).

    dilation, groups and padding_mode only at PyTorch's defaults. dtype None is float32 (torch's
    default dtype). init_std (ninpy's): the weights' Gaussian std, None for He's (init_weight);
    torch draws its own initial values another way, so the two start from different numbers.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 init_std=None):
        refuse_unimplemented("Conv2d", dilation=(pair(dilation, "dilation"), (1, 1)),
                             groups=(groups, 1), padding_mode=(padding_mode, "zeros"))
        dtype = np.float32 if dtype is None else dtype
        kh, kw = pair(kernel_size, "kernel_size")
        for kernel, step, pad in zip((kh, kw), pair(stride, "stride"), pair(padding, "padding")):
            check_window(kernel, step, pad)   # here, before a kernel of 0 divides He's std by 0
        self.stride, self.padding = stride, padding
        self.weight = Parameter(init_weight((out_channels, in_channels, kh, kw), init_std, dtype),
                                device=device)
        self.bias = Parameter(np.zeros(out_channels, dtype=dtype), device=device) if bias else None

    def forward(self, input):
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding)

    def _forward_working(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding,
                        layout=F.working_layout())

    def __repr__(self):
        c_out, c_in, kh, kw = self.weight.shape
        return f"Conv2d({c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding})"


def init_weight(shape, std=None, dtype=np.float32):
    """Gaussian weights. std=None picks He's std sqrt(2 / fan_in).

    NIN has no batch norm and nine ReLU layers; He initialisation keeps the activations' scale
    the same from layer to layer, where a fixed small std such as 0.05 shrinks the signal with
    depth. It does not make the authors' lr 0.1 safe: with it, lr 0.1 killed the class maps
    (loss stuck at ln(C)) in the recorded runs, so the recipes train at lr 0.01 (0.04 for
    Fashion-MNIST) after a warm-up (docs/recipes.md).
    """
    fan_in = int(np.prod(shape[1:]))
    if std is None:
        std = math.sqrt(2.0 / fan_in)
    return (random.cpu_generator().standard_normal(shape) * std).astype(dtype)


class ReLU(Module):
    def __init__(self, inplace=False):
        refuse_unimplemented("ReLU", inplace=(inplace, False))

    def forward(self, input):
        return F.relu(input)

    def _forward_working(self, x):   # elementwise: any layout
        return self.forward(x)


class MaxPool2d(Module):
    """torch.nn.MaxPool2d (note its order: return_indices before ceil_mode, unlike F.max_pool2d)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        refuse_unimplemented("MaxPool2d", dilation=(pair(dilation, "dilation"), (1, 1)))
        self.kernel_size, self.stride, self.padding, self.ceil_mode = (
            kernel_size, stride, padding, ceil_mode)
        self.return_indices = return_indices

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    def _forward_working(self, x):   # per image plane: any layout
        return self.forward(x)


class AvgPool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                 divisor_override=None):
        refuse_unimplemented("AvgPool2d", divisor_override=(divisor_override, None))
        self.kernel_size, self.stride, self.padding, self.ceil_mode = (
            kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = count_include_pad

    def forward(self, input):
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)

    def _forward_working(self, x):   # per image plane: any layout
        return self.forward(x)


class GlobalAvgPool2d(Module):
    """(N, C, H, W) -> (N, C): torch's nn.AdaptiveAvgPool2d(1) followed by flatten(1)."""

    def forward(self, input):
        return F.global_avg_pool2d(input)

    def _forward_working(self, x):   # maps in the working layout, logits (N, C) either way
        return F.global_avg_pool2d(x, layout=F.working_layout())


class Dropout(Module):
    def __init__(self, p=0.5, inplace=False):
        refuse_unimplemented("Dropout", inplace=(inplace, False))
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p

    def forward(self, input):
        return F.dropout(input, self.p, self.training)

    def _forward_working(self, x):   # elementwise: any layout
        return self.forward(x)


class Sequential(Module):
    """Modules applied in order; named "0", "1", ... in state_dict, as in torch."""

    def __init__(self, *args):
        for index, module in enumerate(args):
            setattr(self, str(index), module)

    def __iter__(self):
        return (module for _, module in self.named_children())

    def __getitem__(self, idx):
        return [module for _, module in self.named_children()][idx]

    def __len__(self):
        return sum(1 for _ in self.named_children())

    def forward(self, input):
        for module in self:
            input = module(input)
        return input

    def _forward_working(self, x):
        for module in self:
            x = module._forward_working(x)
        return x


class MLPConv(Module):
    """NIN's mlpconv block: a k x k convolution then two 1x1 convolutions, ReLU after each.

    The two 1x1 convolutions are a small two-layer perceptron applied at every pixel to the
    features of the k x k window under it. Each conv runs with its ReLU fused (F.conv2d_relu).
    """

    def __init__(self, in_channels, widths, kernel_size, padding=0, init_std=None,
                 dtype=np.float32):
        c1, c2, c3 = widths
        self.conv = Conv2d(in_channels, c1, kernel_size, padding=padding, init_std=init_std,
                           dtype=dtype)
        self.cccp1 = Conv2d(c1, c2, 1, init_std=init_std, dtype=dtype)
        self.cccp2 = Conv2d(c2, c3, 1, init_std=init_std, dtype=dtype)

    def forward(self, input):
        return self._convs(input, "NCHW")

    def _forward_working(self, x, x_layout=None):
        """forward giving F.working_layout(); x in x_layout (None: the working layout). The first
        convolution reads x as it is (im2col takes either layout): NIN hands its first block the
        (N, C, H, W) images so, with no copy to channels first."""
        return self._convs(x, F.working_layout(), x_layout)

    def _convs(self, x, layout, x_layout=None):
        x_layout = x_layout or layout
        for conv in (self.conv, self.cccp1, self.cccp2):
            x = F.conv2d_relu(x, conv.weight, conv.bias, conv.stride, conv.padding, layout=x_layout,
                              out_layout=layout)
            x_layout = layout
        return x
