"""Network In Network (Lin, Chen, Yan, ICLR 2014), built by one parametrised function.

Three mlpconv blocks, pooling and dropout between them, and a classifier that is only global average
pooling: the last 1x1 convolution has one output map per class and each map's mean is that class's
logit. Dataset presets choose the arguments; they add no layers of their own.
"""
import numpy as np

from . import functional as F
from . import nn

# The authors' CIFAR-10 layout (their released Caffe model): widths of each block's three convs.
CIFAR_WIDTHS = ((192, 160, 96), (192, 192, 192), (192, 192, None))


class NIN(nn.Module):
    """blocks: mlpconv -> pool -> dropout -> mlpconv -> pool -> dropout -> mlpconv -> GAP.

    Between its layers NIN keeps the activations in F.working_layout(): channels first,
    (C, N, H, W), on the fast path, where every convolution is then one GEMM over the batch with
    no layout copy (functional.Conv2d); (N, C, H, W) on the plain path (reference.py). Pooling and
    dropout work per image plane or per element, so they take either layout as it is. Every
    public entry takes (N, C, H, W), `model.features(x)` included; the working layout is the
    modules' private `_forward_working`. The layout story: docs/design.md, "Array layouts".
    """

    def __init__(self, in_channels, num_classes, widths, kernel_sizes, pools, dropout, init_std,
                 dtype):
        blocks, channels = [], in_channels
        for index, (block_widths, k) in enumerate(zip(widths, kernel_sizes)):
            block_widths = tuple(num_classes if w is None else w for w in block_widths)
            blocks.append(nn.MLPConv(channels, block_widths, k, padding=k // 2, init_std=init_std,
                                     dtype=dtype))
            channels = block_widths[-1]
            if index < len(pools):
                blocks.append(_pool(pools[index]))
                blocks.append(nn.Dropout(dropout))
        self.features = nn.Sequential(*blocks)
        self.gap = nn.GlobalAvgPool2d()

    def class_maps(self, x):
        """The last block's output: one (H, W) map per class (the class activation maps), (N, K, H, W)."""
        maps = self._working_maps(x)
        return maps if F.working_layout() == "NCHW" else F.swap_batch_and_channels(maps)

    def _features_working(self, x, layers=None):
        """self.features (or the iterator `layers` over what is left of it) on x in the working
        layout, with each pooling and the dropout that
        follows it (__init__ puts one after each) run as one operator: F.max_pool2d_dropout or
        F.avg_pool2d_dropout, one kernel each way on the GPU instead of two, the same numbers
        (docs/gpu-launches.md). The modules themselves stay apart: state_dict, train()/eval() and
        `model.features(x)` (which runs them one by one) are unchanged."""
        layers = iter(self.features) if layers is None else layers
        for layer in layers:
            if isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
                x = _pooling_with_its_dropout(layer, next(layers, None), x)
            else:
                x = layer._forward_working(x)
        return x

    def forward(self, x):
        # global average pooling reads the maps in the working layout: no swap back to (N, K, H, W)
        return self.gap._forward_working(self._working_maps(x))

    def _working_maps(self, x):
        """The class maps in F.working_layout(), from the images x (N, C, H, W). The first mlpconv
        reads the images as they are and gives the working layout (its first convolution's im2col
        takes either layout), so they are never copied to channels first."""
        layers = iter(self.features)
        first = next(layers)                       # an MLPConv: NIN.__init__ puts one first
        return self._features_working(first._forward_working(x, x_layout="NCHW"), layers)


def _pooling_with_its_dropout(pool, dropout, x):
    """The pooling module `pool`, then the nn.Dropout `dropout`, on x (any layout: both work per
    plane or per element), as one operator."""
    if not isinstance(dropout, nn.Dropout):
        raise TypeError(f"NIN's features: its {type(pool).__name__} must be followed by a Dropout "
                        f"(NIN.__init__ puts one after each pooling), got {type(dropout).__name__}")
    window = (x, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)
    if isinstance(pool, nn.MaxPool2d):
        return F.max_pool2d_dropout(*window, p=dropout.p, training=dropout.training)
    return F.avg_pool2d_dropout(*window, pool.count_include_pad, p=dropout.p,
                                training=dropout.training)


def _pool(kind):
    """3x3 stride 2 with ceil mode, as in the Caffe model (32 -> 16 -> 8, 28 -> 14 -> 7)."""
    if kind == "max":
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)
    if kind == "avg":
        return nn.AvgPool2d(3, stride=2, ceil_mode=True)
    raise ValueError(f"unknown pool {kind!r}; expected 'max' or 'avg'")


def nin(in_channels=3, num_classes=10, widths=CIFAR_WIDTHS, kernel_sizes=(5, 5, 3),
        pools=("max", "avg"), dropout=0.5, init_std=None, dtype=np.float32):
    """Network In Network. Defaults: the authors' CIFAR-10 model (966,986 parameters).

    widths: three (c1, c2, c3) per block; None stands for num_classes (the last block's last conv).
    kernel_sizes: the spatial kernel of each block's first conv (padded to keep the size).
    pools: the pooling after blocks 1 and 2. init_std: None for He initialisation (see
    nn.init_weight), or a fixed Gaussian std (the authors used 0.05).
    """
    return NIN(in_channels, num_classes, widths, kernel_sizes, pools, dropout, init_std, dtype)


# Dataset presets: the authors' variants. Only the arguments of nin() differ.
PRESETS = {
    "cifar10": dict(in_channels=3, num_classes=10),
    "cifar100": dict(in_channels=3, num_classes=100),
    "svhn": dict(in_channels=3, num_classes=10,
                 widths=((128, 96, 64), (320, 256, 128), (384, 256, None)), kernel_sizes=(5, 5, 5)),
    "mnist": dict(in_channels=1, num_classes=10,
                  widths=((96, 64, 48), (128, 96, 48), (128, 96, None)), kernel_sizes=(5, 5, 5)),
}
PRESETS["fashion-mnist"] = PRESETS["mnist"]


def nin_for(dataset, **overrides):
    """The authors' NIN variant for a dataset name (see PRESETS), with optional overrides."""
    if dataset not in PRESETS:
        raise ValueError(f"no NIN preset for dataset {dataset!r}; known: {', '.join(PRESETS)}")
    return nin(**{**PRESETS[dataset], **overrides})
