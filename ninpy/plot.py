"""Training curves of a run: loss, accuracy and learning rate per epoch, from its metrics.jsonl.

    python -m ninpy.plot runs/fm                  # writes runs/fm/metrics.png
    python -m ninpy.plot runs/fm --out fm.png

train.py appends one JSON object per epoch to RUN_DIR/metrics.jsonl (epoch, train_loss, train_acc,
test_loss, test_acc, lr, images_per_s, seconds, and val_loss / val_acc with --val-split). This
draws three panels side by side: loss (train, test, val), accuracy in % (the best test epoch
marked) and the learning rate (log scale when it spans a factor of 10 or more). It can be run
while training goes on: a half-written last line is skipped. matplotlib is needed
(`pip install matplotlib`).
"""
import argparse
import json
import math
import sys
from pathlib import Path

from .files import require_regular_file
from .run_folder import FINAL, METRICS, parse_metrics

__all__ = ["read_metrics", "plot_metrics", "figure_pixels", "PlotError", "main"]

PROG = "python -m ninpy.plot"
DPI = 100
SIZE = (15.0, 4.5)  # inches: three panels side by side


class PlotError(RuntimeError):
    """No metrics to plot, or no matplotlib; the message is one line saying what to do."""


def figure_pixels():
    """(width, height) in pixels of the PNG plot_metrics writes."""
    return round(SIZE[0] * DPI), round(SIZE[1] * DPI)


def read_metrics(path):
    """The epochs of a metrics.jsonl (or of RUN_DIR/metrics.jsonl), in epoch order.

    A line that is not a UTF-8 JSON object whose epoch is a whole number >= 1 (a torn or damaged
    line) is skipped; when an epoch appears twice, its last line wins. Raises PlotError when there
    is no file or no epoch in it.
    """
    path = Path(path).expanduser()
    todo = f"give the --out directory of a train.py run (it writes {METRICS} after each epoch)"
    if not path.exists():
        raise PlotError(f"{path} does not exist; {todo}")
    if path.is_dir():
        if not (path / METRICS).is_file():
            raise PlotError(f"{path} holds no {METRICS}; {todo}")
        path = path / METRICS
    try:
        lines = require_regular_file(path).read_bytes().splitlines()  # a FIFO would block
    except OSError as error:
        raise PlotError(f"cannot read {path}: {error.strerror or error}") from None
    records = parse_metrics(lines)
    if not records:
        raise PlotError(f"{path} holds no epochs yet ({len(lines)} line(s), none a metrics "
                        "record); train.py writes one line when each epoch ends")
    return records


def _series(records, key, scale=1.0):
    """(epochs, values) of the records that have a finite number under key."""
    points = [(r["epoch"], r[key] * scale) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


_STYLE = {"train": dict(color="tab:blue"), "test": dict(color="tab:orange"),
          "val": dict(color="tab:green", linestyle="--")}


def plot_metrics(records, out, title="", num_classes=None):
    """Draw loss, accuracy and learning rate per epoch into the PNG `out`; returns its Path.

    num_classes: when given, the loss panel marks ln(C), the loss of a uniform guess, where a NIN
    whose class maps died sits.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"{PROG} draws with matplotlib, which is not installed: "
                        "pip install matplotlib") from None
    fig = Figure(figsize=SIZE, dpi=DPI)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    marker = "o" if len(records) <= 30 else None
    for split in ("train", "test", "val"):
        for ax, key, scale in ((loss_ax, f"{split}_loss", 1.0), (acc_ax, f"{split}_acc", 100.0)):
            epochs, values = _series(records, key, scale)
            if epochs:
                ax.plot(epochs, values, label=split, marker=marker, markersize=3, **_STYLE[split])

    if num_classes:
        loss_ax.axhline(math.log(num_classes), color="grey", linestyle=":", linewidth=1,
                        label=f"ln {num_classes} (uniform guess)")
    epochs, acc = _series(records, "test_acc", 100.0)
    if epochs:
        best = max(range(len(acc)), key=acc.__getitem__)
        acc_ax.plot([epochs[best]], [acc[best]], marker="*", markersize=12, color="tab:red",
                    linestyle="none", label=f"best test {acc[best]:.2f}% (epoch {epochs[best]})")
    epochs, lr = _series(records, "lr")
    if epochs:
        lr_ax.plot(epochs, lr, color="tab:purple", marker=marker, markersize=3, drawstyle="steps-post")
        positive = [v for v in lr if v > 0]
        if positive and min(positive) == min(lr) and max(lr) / min(positive) >= 10:
            lr_ax.set_yscale("log")
        elif max(lr) == min(lr) > 0:  # a constant lr: show it against zero, not a 1e-3 wide band
            lr_ax.set_ylim(0, 1.25 * max(lr))

    for ax, name in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy (%)"),
                     (lr_ax, "learning rate (weights)")):
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax is not lr_ax:
            ax.legend(fontsize=9)
        if len(records) < 10:  # a short run: whole epochs only on the axis
            ax.set_xticks([r["epoch"] for r in records])
    fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.84, wspace=0.22)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _read_final(run_dir):
    try:
        final = json.loads((Path(run_dir) / FINAL).read_text())
    except (OSError, ValueError):
        return {}
    return final if isinstance(final, dict) else {}


def _title(run_dir, records, final):
    """The run's name, and what final.json says about it when it is there."""
    title = str(run_dir)
    parts = [str(final["dataset"])] if "dataset" in final else []
    if isinstance(final.get("parameters"), int):
        parts.append(f"{final['parameters']:,} parameters")
    if "device" in final:
        parts.append(f"device {final['device']}")
    if parts:
        title += ": " + ", ".join(parts)
    last = records[-1]
    if isinstance(last.get("test_acc"), (int, float)):
        title += f" (epoch {last['epoch']}: test accuracy {100 * last['test_acc']:.2f}%)"
    return title


def _num_classes(final):
    from .models import PRESETS  # the dataset's class count, as the model was built
    return PRESETS.get(final.get("dataset"), {}).get("num_classes")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def main(argv=None):
    p = _Parser(prog=PROG, description="Plot loss, accuracy and learning rate of a train.py run.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train.py --out directory (or its "
                                                      "metrics.jsonl)")
    p.add_argument("--out", help="the PNG to write (default RUN_DIR/metrics.png)")
    args = p.parse_args(argv)
    source = Path(args.run_dir).expanduser()
    run_dir = source.parent if source.is_file() else source
    try:
        records = read_metrics(source)
        final = _read_final(run_dir)
        out = plot_metrics(records, args.out or run_dir / "metrics.png",
                           _title(run_dir, records, final), _num_classes(final))
    except PlotError as error:
        sys.stderr.write(f"{PROG}: error: {error}\n")
        return 1
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        sys.stderr.write(f"{PROG}: error: cannot write the plot: {error.strerror or error}{where}\n")
        return 1
    print(f"wrote {out} ({len(records)} epoch(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
