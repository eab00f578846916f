"""One training run, twice: NIN trained by ninpy (train.py's Trainer) and the same NIN in torch.nn.

    python benchmarks/compare_training.py --dataset fashion-mnist --epochs 10 --json cmp.json
    python benchmarks/compare_training.py --dataset fashion-mnist --epochs 2 --limit 2000,1000 \\
        --batch-size 64 --lr 0.01 --threads 1 --parallel      # tests/test_compare_training.py's run

The flags are train.py's (the recipe and its overrides), plus the ones below. What is the same in
both runs: the initial weights (ninpy's, copied into torch), the batches, their order and every
augmentation draw (ninpy.data for (seed, epoch), made once per engine from the same numbers), the
preprocessing, the recipe (per-group lr with the biases' and the class maps' multipliers, weight
decay on weights only, momentum, label smoothing, the warm-up and the epoch schedule: torch's lrs
are set every step from ninpy's own schedule objects), and the dropout masks (torch's dropout
draws ninpy's masks from ninpy.random, in the (C, N, H, W) layout ninpy's NIN keeps). What
differs: each engine's kernels, so the order of float32 sums; the two runs therefore drift apart,
and the table shows whether their accuracy does. Images/s count the training loop only (batches
made, steps taken), as train.py's do. The test loss is the plain cross-entropy on both sides.

Each engine alone in its own process, both at once (--parallel), or one after the other here.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import train  # noqa: E402  (only argparse at import; ninpy loads later, after the thread settings)

ENGINES = ("ninpy", "torch")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def build_parser():
    parser = train.build_parser()
    parser.description = "Train NIN with ninpy and with torch.nn on the same run, side by side."
    parser.set_defaults(dataset="fashion-mnist", device="cpu")
    parser.add_argument("--engines", choices=("both",) + ENGINES, default="both")
    parser.add_argument("--parallel", action="store_true",
                        help="each engine in a process of its own, both at the same time")
    parser.add_argument("--threads", type=train.POSITIVE_INT,
                        help="threads of each engine (BLAS, OpenMP, Numba, torch); default: theirs")
    parser.add_argument("--json", help="write both runs' per-epoch records here")
    return parser


def set_threads(threads):
    """Before NumPy, Numba or torch load: they read these once."""
    if threads is not None:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)


# ---------------------------------------------------------------------------------------------
# The two engines. Each returns {"records": [one dict per epoch], "wall_seconds", "facts"}.

def run_ninpy(config, log):
    """train.py's own loop: Trainer.fit, its records read back from the run folder."""
    import ninpy
    from ninpy import run_folder
    from ninpy.training import Trainer

    started = time.perf_counter()
    trainer = Trainer(replace(config), progress=False, log=lambda line: log(f"ninpy: {line}"))
    trainer.fit()
    records = run_folder.parse_metrics((trainer.out / run_folder.METRICS).read_bytes().splitlines())
    return {"records": records, "wall_seconds": time.perf_counter() - started,
            "facts": {"version": ninpy.__version__}}


def run_torch(config, log):
    """The same run in torch.nn: data, initial weights and lr clock from a ninpy Trainer of the
    same config (its model is never trained), steps and evaluation in torch."""
    import torch
    from ninpy import data, models
    from ninpy.training import Trainer
    from torch_nin import torch_nin

    started = time.perf_counter()
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    with tempfile.TemporaryDirectory() as scratch:
        clock = Trainer(replace(config, out=scratch), progress=False, log=log)  # seeds ninpy.random
        clock.folder.release()
    preset = {**models.PRESETS[config.dataset], "in_channels": clock.in_channels,
              "num_classes": clock.num_classes}
    net = torch_nin(torch, [p.data for p in clock.model.parameters()], **preset,
                    dropout=config.dropout, make_dropout=ninpy_mask_dropout(torch))
    optimizer = torch.optim.SGD(_torch_groups(clock, net), lr=config.lr, momentum=config.momentum)
    records = []
    for epoch in range(config.epochs):
        scheduled = clock.schedule.get_last_lr()  # the epoch's lrs, before the warm-up scales them
        stream = data.batches(clock.x_train, clock.y_train, config.batch_size, shuffle=True,
                              seed=config.seed, epoch=epoch, device="cpu", augment=clock.augment,
                              transform=clock.transform)
        net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        epoch_started = time.perf_counter()
        for index, (xb, yb) in enumerate(stream):
            step = epoch * clock.steps_per_epoch + index
            if step <= clock.warmup.warmup_steps:  # as Trainer._step
                clock.warmup.apply(step, scheduled)
            for theirs, ours in zip(optimizer.param_groups, clock.optimizer.param_groups):
                theirs["lr"] = ours["lr"]
            x, y = torch.from_numpy(xb), torch.from_numpy(yb)
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(yb)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(yb)
        train_seconds = time.perf_counter() - epoch_started
        test_loss, test_acc = _evaluate_torch(torch, net, clock, config.batch_size)
        last_step = epoch * clock.steps_per_epoch + len(stream) - 1
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "test_loss": test_loss, "test_acc": test_acc,
                  "lr": scheduled[0] * clock.warmup.factor(last_step),
                  "images_per_s": seen / train_seconds,
                  "seconds": time.perf_counter() - epoch_started}
        records.append(record)
        clock.schedule.step()
        log(f"torch: epoch {epoch + 1}/{config.epochs}  train loss {record['train_loss']:.4f} acc "
            f"{record['train_acc']:.4f}  test loss {test_loss:.4f} acc {test_acc:.4f}  lr "
            f"{record['lr']:.4g}  {record['images_per_s']:.0f} img/s  {record['seconds']:.0f}s")
    return {"records": records, "wall_seconds": time.perf_counter() - started,
            "facts": {"version": torch.__version__, "threads": torch.get_num_threads()}}


def _torch_groups(clock, net):
    """torch SGD groups holding the parameters of each of ninpy's groups, with their lr and decay."""
    position = {id(p): i for i, p in enumerate(clock.model.parameters())}
    theirs = list(net.parameters())
    return [{"params": [theirs[position[id(p)]] for p in group["params"]], "lr": group["lr"],
             "weight_decay": group["weight_decay"]} for group in clock.optimizer.param_groups]


def _evaluate_torch(torch, net, clock, batch_size):
    """(mean loss, accuracy) over the test split, in eval mode, as Trainer.evaluate (plain loss)."""
    from ninpy import data

    net.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for xb, yb in data.batches(clock.x_test, clock.y_test, batch_size, transform=clock.transform):
            logits = net(torch.from_numpy(xb))
            y = torch.from_numpy(yb)
            loss_sum += torch.nn.functional.cross_entropy(logits, y).item() * len(yb)
            correct += int((logits.argmax(dim=1) == y).sum())
    net.train()
    return loss_sum / len(clock.x_test), correct / len(clock.x_test)


def ninpy_mask_dropout(torch):
    """A torch dropout module factory whose masks are ninpy's: drawn from ninpy.random's generator
    for the (C, N, H, W) activations of ninpy's NIN (functional._dropout_mask), then made (N, C, H, W)."""
    import numpy as np
    from ninpy import random as nrandom

    class NinpyMaskDropout(torch.nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            if not self.training or self.p == 0.0:
                return x
            n, c, h, w = x.shape
            keep = nrandom.cpu_generator().random((c, n, h, w), dtype=np.float32) >= self.p
            mask = keep.astype(np.float32) * np.float32(1.0 / (1.0 - self.p))
            return x * torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2, 3)))

    return NinpyMaskDropout


RUNNERS = {"ninpy": run_ninpy, "torch": run_torch}


# ---------------------------------------------------------------------------------------------

def compare(config, engines=ENGINES, log=print):
    """Run the engines one after the other in this process; {engine: run}."""
    return {name: RUNNERS[name](config, log) for name in engines}


def compare_in_processes(argv, engines):
    """Each engine in a child process of its own, all at once; {engine: run}."""
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        children = {}
        for name in engines:
            out = os.path.join(scratch, f"{name}.json")
            args = [a for a in argv if a != "--parallel"] + ["--engines", name, "--json", out]
            children[name] = (subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args]),
                              out)
        for name, (child, out) in children.items():
            if child.wait() != 0:
                raise SystemExit(f"compare_training.py: the {name} run failed (exit {child.returncode})")
            with open(out) as f:
                runs[name] = json.load(f)["engines"][name]
    return runs


def agreement(runs):
    """Per epoch: the test accuracy and loss of ninpy minus torch's."""
    pairs = zip(runs["ninpy"]["records"], runs["torch"]["records"])
    return [{"epoch": a["epoch"], "test_acc": a["test_acc"] - b["test_acc"],
             "test_loss": a["test_loss"] - b["test_loss"]} for a, b in pairs]


def table(runs):
    """The per-epoch records side by side, as a Markdown table."""
    names = [name for name in ENGINES if name in runs]
    head = (["epoch"] + [f"{n} test acc" for n in names] + [f"{n} test loss" for n in names]
            + [f"{n} train loss" for n in names] + [f"{n} img/s" for n in names])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for epoch_records in zip(*(runs[n]["records"] for n in names)):
        cells = ([str(epoch_records[0]["epoch"])]
                 + [f"{100 * r['test_acc']:.2f}%" for r in epoch_records]
                 + [f"{r['test_loss']:.4f}" for r in epoch_records]
                 + [f"{r['train_loss']:.4f}" for r in epoch_records]
                 + [f"{r['images_per_s']:.0f}" for r in epoch_records])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu_model():
    """lscpu's model name (platform.processor() is often empty on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume or args.eval_only:
        parser.error("--resume and --eval-only are train.py's; a comparison always starts afresh")
    if args.device != "cpu":
        parser.error(f"--device {args.device}: the comparison runs on the CPU (--device cpu)")
    set_threads(args.threads)
    import ninpy  # noqa: F401  (before NumPy: ninpy/cpu_settings.py)
    from ninpy.training import TrainingError

    engines = ENGINES if args.engines == "both" else (args.engines,)
    if "torch" in engines:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise SystemExit("compare_training.py: PyTorch is not installed (pip install torch)")
    with tempfile.TemporaryDirectory(prefix="compare-training-") as scratch:
        if args.out is None:  # ninpy's run folder: a scratch one unless --out keeps it
            args.out = os.path.join(scratch, "ninpy")
        try:
            config = train.make_config(args)
            if args.parallel:
                runs = compare_in_processes(argv, engines)
            else:
                runs = compare(config, engines, log=lambda line: print(line, flush=True))
        except TrainingError as error:
            raise SystemExit(f"compare_training.py: error: {error}")
    from machine import machine_line
    if len(runs) == 2:
        print(table(runs))
        worst = max(abs(d["test_acc"]) for d in agreement(runs))
        print(f"largest test-accuracy difference in any epoch: {100 * worst:.2f} points; wall "
              + ", ".join(f"{n} {runs[n]['wall_seconds']:.0f} s" for n in runs))
    if args.json:
        result = {"command": "python benchmarks/compare_training.py " + " ".join(argv),
                  "config": config.as_dict(), "cpu": cpu_model(), "machine": machine_line(),
                  "threads": args.threads, "parallel": args.parallel, "engines": runs,
                  "difference": agreement(runs) if len(runs) == 2 else None}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
