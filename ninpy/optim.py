"""Stochastic gradient descent and learning-rate schedules, with the same update as torch.optim.

SGD with momentum m, weight decay wd and learning rate lr, for each parameter p with gradient g:
    g <- g + wd * p;   buf <- m * buf + g;   p <- p - lr * (g + m * buf if nesterov else buf)
(buf starts at zero, so the first step has buf = g, exactly as in PyTorch.)
The update itself is a kernel like every other operator's: `sgd_update_many_` in ninpy/reference.py
(the NumPy version, which the CPU uses as is: one `sgd_update_` per tensor) and kernels/sgd.cu on the
GPU, where one launch updates every parameter of a device and dtype (a launch per tensor would cost
the host a few microseconds each, 18 times a step for NIN).
"""
import math

from . import backend
from .functional import kernels_for

_GROUP_DEFAULTS = ("lr", "momentum", "weight_decay", "nesterov")


class SGD:
    """params: an iterable of Parameters, or of dicts {"params": [...], "lr": ..., ...} (groups)."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: lr, momentum and weight_decay must be >= 0, got {lr}, "
                             f"{momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov=True needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])}
                             for group in params]
        listed = [id(p) for group in self.param_groups for p in group["params"]]
        if len(set(listed)) != len(listed):  # it would be updated twice a step (at once on the GPU)
            raise ValueError("SGD: some parameters appear more than once in the parameter groups; "
                             "list each parameter once")
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.momentum_buffers = {}  # id(param) -> buffer, created on the first step

    def parameters(self):
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def step(self):
        """Update every parameter that has a gradient: one sgd_update_many_ call (on the GPU one
        launch) for all the parameters of one device and dtype, whatever their groups."""
        batches = {}  # (device, dtype) -> ([params], [grads], [buffers], [settings])
        for group in self.param_groups:
            settings = tuple(group[key] for key in _GROUP_DEFAULTS)
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.momentum_buffers.get(id(p))
                if buf is None:
                    buf = self.momentum_buffers[id(p)] = backend.array_module(p.data).zeros_like(p.data)
                batch = batches.setdefault((p.device, p.dtype), ([], [], [], []))
                for column, value in zip(batch, (p.data, p.grad, buf, settings)):
                    column.append(value)
        for params, grads, buffers, settings in batches.values():
            kernels_for(params[0]).sgd_update_many_(params, grads, buffers, settings)

    # ---- state: buffers by parameter position, as torch does --------------------------------
    def state_dict(self):
        index = {id(p): i for i, p in enumerate(self.parameters())}
        groups = [{key: group[key] for key in (*_GROUP_DEFAULTS, "initial_lr")} for group in self.param_groups]
        buffers = {index[key]: buf.copy() for key, buf in self.momentum_buffers.items() if key in index}
        return {"param_groups": groups, "momentum_buffers": buffers}

    def load_state_dict(self, state):
        if len(state["param_groups"]) != len(self.param_groups):
            raise ValueError(f"SGD.load_state_dict: the state has {len(state['param_groups'])} "
                             f"parameter groups, this optimiser {len(self.param_groups)}")
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update({key: saved[key] for key in (*_GROUP_DEFAULTS, "initial_lr")})
        params = self.parameters()
        self.momentum_buffers = {}
        for i, buf in state["momentum_buffers"].items():
            p = params[int(i)]
            if tuple(buf.shape) != p.shape:
                raise ValueError(f"SGD.load_state_dict: buffer {i} has shape {tuple(buf.shape)}, "
                                 f"parameter has {p.shape}")
            self.momentum_buffers[id(p)] = backend.to_device(buf, p.device).astype(p.dtype, copy=True)


class _Schedule:
    """Sets each group's lr from its initial_lr and the epoch; call step() once per epoch."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.epoch = 0
        self._apply()

    def lr_at(self, initial_lr, epoch):
        raise NotImplementedError

    def step(self):
        self.epoch += 1
        self._apply()

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(group["initial_lr"], self.epoch)

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = int(state["epoch"])
        self._apply()


class MultiStepLR(_Schedule):
    """lr = initial_lr * gamma^(number of milestones <= epoch): the paper's "divide by 10" steps."""

    def __init__(self, optimizer, milestones, gamma=0.1):
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma
        super().__init__(optimizer)

    def lr_at(self, initial_lr, epoch):
        return initial_lr * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * min(epoch, T_max) / T_max)) / 2."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer)

    def lr_at(self, initial_lr, epoch):
        t = min(epoch, self.T_max) / self.T_max
        return self.eta_min + (initial_lr - self.eta_min) * (1 + math.cos(math.pi * t)) / 2
