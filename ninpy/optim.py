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
from .autograd import enable_grad, refuse_unimplemented
from .functional import kernels_for

_GROUP_DEFAULTS = ("lr", "momentum", "weight_decay", "nesterov")


class SGD:
    """torch.optim.SGD. params: an iterable of Parameters, or of dicts {"params": [...], "lr": ...}
    (groups). dampening, maximize, foreach, differentiable and fused only at PyTorch's defaults."""

    def __init__(self, params, lr=0.001, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        refuse_unimplemented("SGD", dampening=(dampening, 0), maximize=(maximize, False),
                             foreach=(foreach, None), differentiable=(differentiable, False),
                             fused=(fused, None))
        for name, value in (("learning rate", lr), ("momentum value", momentum),
                            ("weight_decay value", weight_decay)):
            if value < 0:
                raise ValueError(f"Invalid {name}: {value}")
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
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
        """Every group's parameters in one list: the positions the state's buffers are keyed by."""
        return [p for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none=True):
        for p in self.parameters():
            if set_to_none or p.grad is None:
                p.grad = None
            else:
                p.grad[...] = 0

    def step(self, closure=None):
        """Update every parameter that has a gradient: one sgd_update_many_ call (on the GPU one
        launch) for all the parameters of one device and dtype, whatever their groups. In place:
        each parameter's version rises, so a graph that saved it cannot be backpropagated through
        any more, as in PyTorch. closure: called first, with gradients on, to recompute the loss;
        its result is returned."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
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
                p.bump_version()   # changed in place just below
        for params, grads, buffers, settings in batches.values():
            kernels_for(params[0]).sgd_update_many_(params, grads, buffers, settings)
        return loss

    # ---- state: buffers by parameter position, as torch does --------------------------------
    def state_dict(self):
        index = {id(p): i for i, p in enumerate(self.parameters())}
        groups = [{key: group[key] for key in (*_GROUP_DEFAULTS, "initial_lr")} for group in self.param_groups]
        buffers = {index[key]: buf.copy() for key, buf in self.momentum_buffers.items() if key in index}
        return {"param_groups": groups, "momentum_buffers": buffers}

    def load_state_dict(self, state_dict):
        state = state_dict
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
    """Sets each group's lr from its initial_lr and the epoch count; call step() once per epoch.
    last_epoch: only -1 (a fresh schedule); resume with load_state_dict."""

    def __init__(self, optimizer, last_epoch=-1):
        refuse_unimplemented(type(self).__name__, last_epoch=(last_epoch, -1))
        self.optimizer = optimizer
        self.last_epoch = 0
        self._apply()

    def _lr_at(self, initial_lr, epoch):
        raise NotImplementedError

    def step(self, epoch=None):
        refuse_unimplemented(f"{type(self).__name__}.step", epoch=(epoch, None))
        self.last_epoch += 1
        self._apply()

    def _apply(self):
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr_at(group["initial_lr"], self.last_epoch)

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"epoch": self.last_epoch}

    def load_state_dict(self, state_dict):
        self.last_epoch = int(state_dict["epoch"])
        self._apply()


class MultiStepLR(_Schedule):
    """lr = initial_lr * gamma^(number of milestones <= epoch): the paper's "divide by 10" steps."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        self.milestones, self.gamma = sorted(int(m) for m in milestones), gamma
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, initial_lr, epoch):
        return initial_lr * self.gamma ** sum(1 for m in self.milestones if m <= epoch)


class CosineAnnealingLR(_Schedule):
    """lr = eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2, as PyTorch's:
    past T_max the cosine goes on, rising back to initial_lr at 2 * T_max."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        if T_max < 1:
            raise ValueError(f"CosineAnnealingLR: T_max must be >= 1, got {T_max}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, initial_lr, epoch):
        return self.eta_min + (initial_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2
