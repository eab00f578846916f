"""Class activation maps: where NIN finds the evidence for each class.

NIN has no fully connected layer. Its last 1x1 convolution gives one (h, w) map per class, and the
class's logit is the mean of that map (global average pooling):

    logit[n, c] = mean over (y, x) of maps[n, c, y, x]

so the map itself shows where the evidence for a class lies: a class activation map (Zhou et al.,
2016) that costs nothing beyond the forward pass. Upsampled to the image and drawn over it, it shows
what the network looked at.

    maps, logits = class_activation_maps(model, x)     # (N, C, h, w) and (N, C), NumPy arrays
    heat = upsample(maps[0, logits[0].argmax()], (28, 28))

    python -m ninpy.cam --checkpoint runs/fm --n 16 --out cams.png [--device auto|cpu|gpu|emulated]

The command rebuilds the model and the preprocessing of the run that wrote the checkpoint (with
ninpy.training.Trainer, from the flags saved in it), takes the first n test images and draws a
grid: each image, its true and predicted class, and the predicted class's map as a heatmap over it.
matplotlib is needed only for the drawing (`pip install matplotlib`).
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

from . import backend
from . import functional as F
from .autograd import Tensor, no_grad

__all__ = ["class_activation_maps", "upsample", "softmax", "render", "figure_pixels", "main"]

PROG = "python -m ninpy.cam"
DPI = 100
PANEL = 1.6      # inches per image panel (each example has two: the image, then the overlay)
TITLE = 0.45     # inches of caption (true and predicted class) above each row of panels
HEADER = 0.7     # inches at the top of the figure for its title (1.0 when only 1-2 columns wide)


# ---------------------------------------------------------------------------------------------
# The maps

def class_activation_maps(model, x, batch_size=64):
    """(maps, logits) of a NIN-style model for images x, as NumPy arrays on the host.

    maps (N, C, h, w): model.class_maps(x), one map per class; logits (N, C): their global average
    pool, which is exactly what model(x) returns. x: a Tensor or array of preprocessed images
    (N, C_in, H, W), moved to the model's device and run batch_size images at a time (im2col's
    memory grows with the batch). The model runs in eval mode (no dropout) under no_grad(); its
    training/eval mode is restored afterwards.
    """
    if not callable(getattr(model, "class_maps", None)):
        raise TypeError(f"{type(model).__name__} has no class_maps(x): class activation maps need a "
                        "model whose head is global average pooling (ninpy.models.NIN)")
    params = list(model.parameters())
    device = params[0].device if params else "cpu"
    data = x.data if isinstance(x, Tensor) else x
    if len(data) == 0:
        raise ValueError("class_activation_maps: x holds no images")
    maps, logits = [], []
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            for start in range(0, len(data), batch_size):
                batch = Tensor(backend.to_device(data[start:start + batch_size], device))
                batch_maps = model.class_maps(batch)
                maps.append(batch_maps.numpy())
                logits.append(F.global_avg_pool2d(batch_maps).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(maps), np.concatenate(logits)


def _linear_taps(n_in, n_out):
    """1-D linear interpolation from n_in to n_out samples with half-pixel centres.

    Output sample o sits at source coordinate s = (o + 0.5) * n_in / n_out - 0.5 (clamped to the
    first and last sample): it takes (1 - f) of sample lo and f of sample hi, lo = floor(s), f = s - lo.
    This is PyTorch's interpolate(mode="bilinear", align_corners=False) along one axis.
    """
    s = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(s).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, s - lo


def upsample(map, size):
    """Bilinear resize of map (..., h, w) to (..., H, W); size is H or (H, W).

    Rows first, then columns: out = (1 - fy) * map[lo_y] + fy * map[hi_y], the same along x. NumPy
    or CuPy in, the same module out; float32 stays float32, anything else becomes float64.
    """
    xp = backend.array_module(map)
    map = xp.asarray(map)
    if map.ndim < 2:
        raise ValueError(f"upsample: expected a (..., h, w) map, got shape {map.shape}")
    out_h, out_w = (size, size) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if out_h < 1 or out_w < 1:
        raise ValueError(f"upsample: size must be positive, got {size!r}")
    dtype = map.dtype if map.dtype == np.float32 else np.float64
    out = map.astype(dtype)
    for axis, n_out in ((-2, out_h), (-1, out_w)):
        lo, hi, frac = _linear_taps(out.shape[axis], n_out)
        shape = [1] * out.ndim
        shape[axis] = n_out
        frac = xp.asarray(frac.astype(dtype).reshape(shape))
        a = xp.take(out, xp.asarray(lo), axis=axis)
        b = xp.take(out, xp.asarray(hi), axis=axis)
        out = a + frac * (b - a)
    return out


def softmax(logits):
    """Row-wise softmax of (N, C) logits (NumPy), with the row maximum subtracted for stability."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# The picture

def _grid(n):
    """(rows, columns) of examples: as square as possible."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def _header(cols):
    """Inches above the grid for the title: a narrow figure wraps it onto more lines."""
    return HEADER if cols >= 3 else 1.0


def figure_pixels(n):
    """(width, height) in pixels of the PNG `render` writes for n examples."""
    rows, cols = _grid(n)
    return (round(cols * 2 * PANEL * DPI), round((rows * (PANEL + TITLE) + _header(cols)) * DPI))


def _require_matplotlib(prog=PROG):
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingMatplotlib(f"{prog} draws with matplotlib, which is not installed: "
                                "pip install matplotlib") from None
    return Figure


class MissingMatplotlib(RuntimeError):
    """matplotlib (optional) is needed to draw; the message says how to install it."""


def render(images, true, pred, prob, heat, classes, out, title=""):
    """Write the CAM grid PNG to `out` and return its Path.

    images uint8 (N, C, H, W) (C = 1 or 3), true/pred class indices (N,), prob: the softmax
    probability of the predicted class (N,), heat (N, H, W): the predicted class's map upsampled to
    the image size. Each example is a pair of panels: the image, then the image under its heatmap.
    Each heatmap is divided by its own maximum (the maps are >= 0: ReLU before the pool), so red is
    where that image's evidence for the predicted class is strongest; a map that is zero everywhere
    (a dead class map, the reason a NIN can sit at loss ln(C)) is labelled as such.
    """
    Figure = _require_matplotlib()
    n = len(images)
    rows, cols = _grid(n)
    width, height = figure_pixels(n)
    w_in, h_in = width / DPI, height / DPI
    fig = Figure(figsize=(w_in, h_in), dpi=DPI)
    size, gap = PANEL - 0.1, 0.1  # inches: image side, and the space around it

    lines, fontsize = _wrap(title, w_in, max_lines=3 if cols >= 3 else 4)
    fig.text(0.5, 1 - 0.08 / h_in, "\n".join(lines), ha="center", va="top", fontsize=fontsize)
    for k in range(n):
        r, c = divmod(k, cols)
        x0 = c * 2 * PANEL                              # the cell's left edge, inches
        top = h_in - _header(cols) - r * (PANEL + TITLE)  # the cell's top edge, inches
        picture = np.moveaxis(np.asarray(images[k]), 0, -1)
        grey = picture.shape[-1] == 1
        picture = picture[..., 0] if grey else picture
        peak = float(heat[k].max())
        scaled = heat[k] / peak if peak > 0 else None
        axes = [fig.add_axes(((x0 + gap / 2 + i * PANEL) / w_in, (top - TITLE - size) / h_in,
                              size / w_in, size / h_in)) for i in (0, 1)]
        for ax in axes:
            ax.imshow(picture, cmap="gray" if grey else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        if peak > 0:
            axes[1].imshow(scaled, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
        else:  # a dead map (all zero after the ReLU): nothing to show, and worth saying
            axes[1].text(0.5, 0.5, "map is\nall zero", transform=axes[1].transAxes, ha="center",
                         va="center", fontsize=9, color="white",
                         bbox=dict(facecolor="black", alpha=0.6, edgecolor="none"))
        right = int(true[k]) == int(pred[k])
        centre = (x0 + PANEL) / w_in
        fig.text(centre, (top - 0.04) / h_in, f"true: {classes[true[k]]}", ha="center", va="top",
                 fontsize=9)
        fig.text(centre, (top - 0.22) / h_in, f"predicted: {classes[pred[k]]}, {100 * prob[k]:.0f}%",
                 ha="center", va="top", fontsize=9, color="tab:green" if right else "tab:red",
                 fontweight="bold")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _wrap(text, width_in, max_lines):
    """(lines, font size) of a figure title across width_in inches: 11 pt on up to 2 lines, else
    smaller on up to max_lines (cut with an ellipsis beyond)."""
    import textwrap

    for fontsize, most in ((11, 2), (9, max_lines), (8, max_lines)):
        chars = max(10, int(width_in * 72 / (0.55 * fontsize)))  # an average glyph is ~0.55 em
        lines = [piece for part in text.split("\n") for piece in textwrap.wrap(part, chars)]
        if len(lines) <= most:
            return lines, fontsize
    return lines[:max_lines - 1] + [lines[max_lines - 1][:chars - 1] + "\u2026"], 8


# ---------------------------------------------------------------------------------------------
# The command

class CamError(RuntimeError):
    """A bad argument for the command; the message is one line."""


def load_run(checkpoint_path, dataset=None, device="auto", data_dir=None, download=True):
    """(trainer, state, classes): the model, data and preprocessing of the run behind a checkpoint.

    The Trainer is built in eval-only mode from the flags saved in the checkpoint, so the model, the
    test split and the preprocessing (fitted on the same training images) are exactly the run's.
    Nothing is written.
    """
    from dataclasses import fields

    from . import checkpoint, datasets
    from .training import Config, Trainer

    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise CamError(f"--data-dir {data_dir}: no such folder; give the folder holding the "
                       "datasets (train.py's --data-dir), or drop the flag to use the run's")
    state = checkpoint.load(checkpoint_path)
    saved = dict(state.flags or {})
    if dataset is not None and saved.get("dataset") not in (None, dataset):
        raise CamError(f"--dataset {dataset} differs from the checkpoint's {saved['dataset']} "
                       f"({state.path}); drop --dataset, or give a checkpoint trained on {dataset}")
    dataset = dataset or saved.get("dataset")
    if dataset is None:
        raise CamError(f"{state.path} does not say which dataset it was trained on; give --dataset")
    names = {f.name for f in fields(Config)} - {"dataset", "out", "device", "data_dir", "download"}
    values = {key: saved[key] for key in names if key in saved}
    values.update(device=device, download=download,
                  data_dir=data_dir if data_dir is not None else saved.get("data_dir"))
    config = Config.for_dataset(dataset, **values)
    # The class names: the Trainer keeps only the arrays (a second read hits the .npy cache).
    classes = datasets.load_dataset(dataset, config.data_dir, download=download,
                                    svhn_extra=config.svhn_extra, progress=False).classes
    trainer = Trainer(config, resume=state, eval_only=True, progress=False, log=lambda _: None)
    return trainer, state, classes


def build_parser():
    p = _Parser(prog=PROG, description="Draw NIN's class activation maps for the first test images.")
    p.add_argument("--checkpoint", required=True, metavar="DIR_OR_FILE",
                   help="a train.py --out directory or its checkpoint.npz")
    p.add_argument("--dataset", help="the checkpoint's dataset (default: read from the checkpoint)")
    p.add_argument("--n", type=int, default=16, help="how many test images (default 16)")
    p.add_argument("--out", default="cams.png", help="the PNG to write (default cams.png)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "emulated"), default="auto")
    p.add_argument("--data-dir", help="dataset folder (default: the run's, else $NINPY_DATA or "
                                      "~/.cache/ninpy)")
    p.add_argument("--no-download", action="store_true", help="fail if the dataset is missing")
    return p


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .datasets import DATASETS
    from .download import DataError
    from .training import TrainingError

    try:
        if args.dataset is not None and args.dataset not in DATASETS:
            raise CamError(f"--dataset {args.dataset!r}: unknown; expected one of "
                           f"{', '.join(DATASETS)}")
        if args.n < 1:
            raise CamError(f"--n {args.n}: expected a whole number >= 1")
        _require_matplotlib()  # before the slow part
        trainer, state, classes = load_run(args.checkpoint, args.dataset, args.device,
                                           args.data_dir, not args.no_download)
        images, true = trainer.x_test[:args.n], np.asarray(trainer.y_test[:args.n])
        x = trainer.transform(images)  # the run's preprocessing, on the run's device
        maps, logits = class_activation_maps(trainer.model, x)
        pred = logits.argmax(axis=1)
        prob = softmax(logits.astype(np.float64))[np.arange(len(pred)), pred]
        heat = upsample(maps[np.arange(len(pred)), pred], images.shape[2:])
        right = int((pred == true).sum())
        title = (f"{trainer.config.dataset}: {state.path.parent.name}/{state.path.name}, epoch "
                 f"{state.epoch}; {right} of {len(true)} test images predicted right\n"
                 "heatmap: the predicted class's map, upsampled (red = strongest, per image)")
        out = render(backend.to_device(images, "cpu"), true, pred, prob, heat, classes, args.out,
                     title)
        print(f"wrote {out}: {len(true)} test images, {right} predicted right")
        return 0
    except (CamError, CheckpointError, DataError, TrainingError, backend.DeviceError,
            MissingMatplotlib) as error:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(error).split())}\n")
        return 1
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        sys.stderr.write(f"{PROG}: error: {error.strerror or error}{where}\n")
        return 1
    except Exception as error:
        line = backend.cuda_error_line(error)  # CUDA, cuBLAS, NVRTC, GPU memory: one line
        if line is None:
            raise
        sys.stderr.write(f"{PROG}: error: {line}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
