#!/usr/bin/env python
"""Train, resume or evaluate Network In Network on one of five datasets.

    python train.py --dataset cifar10 --device gpu                  # the default recipe, runs/cifar10
    python train.py --dataset fashion-mnist --device cpu --epochs 5 --out runs/fm
    python train.py --resume runs/fm --epochs 10                    # continue where it stopped
    python train.py --resume runs/fm --eval-only                    # test accuracy of the checkpoint

Unset flags take the dataset's recipe (ninpy/recipes.py, docs/recipes.md); a run shorter than the
recipe's gets its warm-up fitted to its length. --device auto (the default) takes the GPU when it is
usable, else says why in one line and trains on the CPU. Every expected failure (bad flag, no usable
GPU, missing data, unusable --out, NaN loss, GPU out of memory, a CUDA error, ...) is one line on
stderr and a non-zero exit; Ctrl-C, SIGTERM and SIGHUP save a resumable checkpoint and exit with
128 + the signal's number (130, 143, 129), as docs/run-folder.md explains. A resumed run gives the
numbers of an uninterrupted one bit for bit on the same device, machine and BLAS build with the
same BLAS thread count (docs/design.md, Determinism).
"""
import sys

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
try:  # these take ~0.1 s; main() then holds stop signals until the other imports are done
    import argparse
    import signal
except KeyboardInterrupt:  # Ctrl-C at once: one line, as later on
    sys.stderr.write("train.py: interrupted; nothing new was saved\n")
    sys.exit(EXIT_INTERRUPTED)
DATASETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        sys.stderr.write(f"train.py: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def _number(kind, low, low_inclusive=True, high=None, high_inclusive=False):
    """An argparse type: kind(text), finite, >= low (or > low), < high (or <= high); the error
    names the rule."""
    rule = (f"{'>=' if low_inclusive else '>'} {low}"
            + (f" and {'<=' if high_inclusive else '<'} {high}" if high is not None else ""))
    noun = "a whole number" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value != value or value in (float("inf"), float("-inf")) or \
                (value < low if low_inclusive else value <= low) or \
                (high is not None and (value > high if high_inclusive else value >= high)):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {noun} {rule}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _limit(text):
    """--limit N or N,M."""
    parts = [POSITIVE_INT(part) for part in text.split(",")]
    if len(parts) > 2:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or N,M")
    return parts[0] if len(parts) == 1 else parts


POSITIVE_INT, COUNT = _number(int, 1), _number(int, 0)
POSITIVE, NON_NEGATIVE, FRACTION = _number(float, 0, False), _number(float, 0), _number(float, 0, True, 1)


def build_parser():
    p = _Parser(description="Train Network In Network (Lin, Chen, Yan 2014) with ninpy.",
                epilog="Recipe defaults per dataset: docs/recipes.md.")
    p.add_argument("--dataset", choices=DATASETS, help="required unless --resume")
    p.add_argument("--device", choices=("auto", "cpu", "gpu", "emulated"), default=None,
                   help="auto: the GPU when usable, else the CPU (default auto); emulated: the GPU "
                        "code path on the CPU, slowly (docs/emulator.md)")
    p.add_argument("--epochs", type=POSITIVE_INT, help="total epochs to train (recipe)")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="(recipe: 128)")
    p.add_argument("--lr", type=POSITIVE, help="base learning rate of the weights (recipe)")
    p.add_argument("--momentum", type=FRACTION, help="(recipe: 0.9)")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, help="on weights, not biases (recipe: 1e-4)")
    p.add_argument("--bias-lr-mult", type=NON_NEGATIVE, help="lr multiplier of biases (recipe: 2)")
    p.add_argument("--last-lr-mult", type=NON_NEGATIVE,
                   help="lr multiplier of the last 1x1 convolution (recipe: 0.1; fashion-mnist 1)")
    p.add_argument("--schedule", help="step:E1,E2 (lr x0.1 at those epochs), cosine or constant")
    p.add_argument("--warmup-steps", type=COUNT,
                   help="raise the lr linearly over the first N steps (recipe: 500; "
                        "fashion-mnist 1000; 0 = none)")
    p.add_argument("--dropout", type=_number(float, 0, True, 1),
                   help="dropout probability after blocks 1 and 2 (recipe: 0.5; fashion-mnist 0)")
    p.add_argument("--label-smoothing", type=FRACTION,
                   help="of the training loss, as PyTorch's cross_entropy: the target is (1 - eps) "
                        "onehot + eps / classes (recipe: 0)")
    p.add_argument("--augment", choices=("none", "crop", "flip", "crop+flip"),
                   help="crop: random translation by up to --crop-pad pixels (recipe)")
    p.add_argument("--crop-pad", type=COUNT, help="padding of the random crop (recipe)")
    p.add_argument("--erase", type=_number(float, 0, True, 1, True),
                   help="random erasing: the probability that an image gets one black rectangle of "
                        "2-33%% of its area (recipe: 0)")
    p.add_argument("--preprocess", choices=("standardize", "gcn-zca"),
                   help="per-channel standardisation, or the paper's GCN + ZCA (recipe)")
    p.add_argument("--seed", type=COUNT, help="seeds weights, batch order, augmentation, dropout (0)")
    p.add_argument("--data-dir", help="dataset folder (default $NINPY_DATA or ~/.cache/ninpy)")
    p.add_argument("--no-download", action="store_true", help="never download; fail if missing")
    p.add_argument("--out", help="run directory: metrics.jsonl, checkpoint.npz, final.json "
                                 "(default runs/<dataset>; with --resume, the checkpoint's)")
    p.add_argument("--resume", metavar="DIR_OR_FILE", help="continue (or --eval-only) a checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate --resume's checkpoint")
    p.add_argument("--limit", type=_limit, metavar="N[,M]",
                   help="use the first N examples of each split (N,M: N training, M test)")
    p.add_argument("--val-split", type=COUNT,
                   help="hold out N training images as a validation set (reported as val_*)")
    p.add_argument("--svhn-extra", action="store_true", help="SVHN: add the 531k extra images")
    p.add_argument("--kernels", choices=("fast", "reference"), default=None,
                   help="fast: Numba / CUDA (default, or $NINPY_KERNELS); reference: the plain "
                        "NumPy path of ninpy/reference.py, CPU only, to read and step through")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar on stderr (auto: when it is a terminal)")
    return p


# flag name -> Config field, for the flags a user may give
_FIELDS = {"dataset": "dataset", "epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
           "momentum": "momentum", "weight_decay": "weight_decay", "bias_lr_mult": "bias_lr_mult",
           "last_lr_mult": "last_lr_mult", "schedule": "schedule", "warmup_steps": "warmup_steps",
           "dropout": "dropout", "label_smoothing": "label_smoothing",
           "augment": "augment", "crop_pad": "crop_pad", "erase": "erase", "preprocess": "preprocess", "seed": "seed",
           "data_dir": "data_dir", "out": "out", "limit": "limit", "val_split": "val_split"}


def make_config(args, saved_flags=None):
    """The Config from the flags given, the checkpoint's flags (when resuming) and the recipe."""
    from ninpy.training import FIXED_KEYS, RUN_KEYS, Config, TrainingError

    given = {field: getattr(args, flag) for flag, field in _FIELDS.items()
             if getattr(args, flag) is not None}
    if args.svhn_extra:
        given["svhn_extra"] = True
    if saved_flags:
        changed = [key for key in RUN_KEYS
                   if key in given and key in saved_flags and given[key] != saved_flags[key]]
        for key in changed:
            flag = f"--{key.replace('_', '-')}"
            if key in FIXED_KEYS:
                raise TrainingError(
                    f"{flag} {given[key]!r} differs from the checkpoint's {saved_flags[key]!r}: it "
                    "fixes the data or the model, so a resumed run keeps it (drop the flag, or start "
                    "a new run with another --out)")
            print(f"note: resuming with {flag} {given[key]!r} instead of the checkpoint's "
                  f"{saved_flags[key]!r}; the run is no longer the same as an uninterrupted one",
                  flush=True)
        values = {key: saved_flags[key] for key in RUN_KEYS if key in saved_flags}
        values.update({key: given[key] for key in changed})
        values["epochs"] = given.get("epochs", saved_flags.get("epochs"))
        values["data_dir"] = given.get("data_dir", saved_flags.get("data_dir"))
        values["out"] = given.get("out")
    else:
        if "dataset" not in given:
            raise TrainingError("--dataset is required (one of " + ", ".join(DATASETS) +
                                "), unless --resume gives a checkpoint")
        values = dict(given)
        values.setdefault("out", f"runs/{given['dataset']}")
    values["device"] = args.device or "auto"
    values["download"] = not args.no_download
    dataset = values.pop("dataset")
    return Config.for_dataset(dataset, **values)


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt(signum)


def main(argv=None):
    # While NumPy and ninpy are imported (a second or so), stop signals are only noted: an
    # interrupted import fails with misleading errors (NumPy's "Importing the C-extensions failed").
    # A stop signal this process inherited as ignored (nohup ignores SIGHUP; a shell without job
    # control starts background jobs with SIGINT ignored) stays ignored throughout, as Python
    # itself leaves an ignored SIGINT alone; ninpy.run_folder.StopSignals does the same.
    noted = []
    stop_signals = [signum for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
                    if signal.getsignal(signum) != signal.SIG_IGN]
    previous = {signum: signal.signal(signum, lambda signum, frame: noted.append(signum))
                for signum in stop_signals}
    try:
        args = build_parser().parse_args(argv)  # parsed first, so --help and flag errors are instant
        import ninpy.training  # noqa: F401  (the slow imports)
    finally:
        # Then, until training installs its own handlers, SIGTERM and SIGHUP act like Ctrl-C.
        for signum in stop_signals:
            signal.signal(signum, previous[signum] if signum == signal.SIGINT else _stop_like_ctrl_c)
    try:
        if noted:
            raise KeyboardInterrupt(noted[0])
        return _main(args)
    except KeyboardInterrupt as stop:
        sys.stderr.write("train.py: interrupted; nothing new was saved\n")
        return _signal_exit(stop)


def _signal_exit(stop):
    """128 + the number of the signal behind a KeyboardInterrupt (SIGINT when it does not say)."""
    signum = stop.args[0] if stop.args and isinstance(stop.args[0], int) else signal.SIGINT
    return 128 + int(signum)


def _main(args):
    # Imported after parsing, so --help and flag errors are instant.
    import ninpy
    from ninpy import backend, checkpoint
    from ninpy.backend import DeviceError
    from ninpy.gpu_kernels import KERNEL_DIR, KernelCompileError
    from ninpy.checkpoint import CheckpointError
    from ninpy.download import DataError
    from ninpy.run_folder import RunFolderError, exit_status
    from ninpy.training import Interrupted, Trainer, TrainingError, format_loss

    kernel_root = f"{KERNEL_DIR.parent}/"  # error messages then name kernels/FILE.cu:LINE
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    config = None
    try:
        state = checkpoint.load(args.resume) if args.resume is not None else None
        if args.eval_only and state is None:
            raise TrainingError("--eval-only needs --resume DIR_OR_FILE: the checkpoint to evaluate")
        config = make_config(args, state.flags if state is not None else None)
        if args.kernels is not None:
            ninpy.use_kernels(args.kernels)
        config.device = choose_device(config.device)
        trainer = Trainer(config, resume=state, eval_only=args.eval_only, progress=progress)
        plain = " (the plain path: reference.py's NumPy)" if ninpy.kernel_set() == "reference" else ""
        print(f"NIN for {config.dataset}: {trainer.num_parameters():,} parameters, device "
              f"{trainer.device}{plain}, {len(trainer.x_train):,} training / {len(trainer.x_test):,} "
              f"test images", flush=True)
        if args.eval_only:
            r = trainer.evaluate_only()
            when = (f"epoch {r['epoch']}, after batch {r['batch']} of {r['batches']}" if "batch" in r
                    else f"epoch {r['epoch']}")
            print(f"{when}: test loss {format_loss(r['test_loss'])}, test accuracy "
                  f"{100 * r['test_acc']:.2f}% ({r['test_images']:,} images)")
            return 0
        if state is not None:
            print(resume_note(state, trainer.device), flush=True)
        print(f"recipe: lr {config.lr} (biases x{config.bias_lr_mult}, last 1x1 "
              f"x{config.last_lr_mult}), momentum {config.momentum}, weight decay "
              f"{config.weight_decay}, batch {config.batch_size}, {config.epochs} epochs, schedule "
              f"{config.schedule}, warm-up {config.warmup_steps} of {config.epochs * trainer.steps_per_epoch} "
              f"steps, dropout {config.dropout}, label smoothing {config.label_smoothing}, "
              f"augment {config.augment}, erase {config.erase}, "
              f"preprocess {config.preprocess}; writing to {trainer.out}", flush=True)
        final = trainer.fit()
        if "test_acc" in final:
            print(f"done: test accuracy {100 * final['test_acc']:.2f}% after epoch "
                  f"{final['epoch']}; {trainer.out}")
        return 0
    except (DataError, DeviceError, CheckpointError, TrainingError, RunFolderError) as error:
        sys.stderr.write(f"train.py: error: {_one_line(error)}\n")
        return EXIT_ERROR
    except MemoryError as error:
        return _out_of_memory(error, config)
    except KernelCompileError as error:  # names kernels/FILE.cu:LINE
        sys.stderr.write(f"train.py: error: {_one_line(error).replace(kernel_root, '')}\n")
        return EXIT_ERROR
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        sys.stderr.write(f"train.py: error: {error.strerror or error}{where}\n")
        return EXIT_ERROR
    except Interrupted as stop:
        sys.stderr.write(f"train.py: {stop}\n")
        return exit_status(stop.signum)
    except KeyboardInterrupt as stop:
        sys.stderr.write("train.py: interrupted; nothing new was saved (an earlier checkpoint, if "
                         "any, is intact)\n")
        return _signal_exit(stop)
    except Exception as error:
        if backend.is_out_of_memory(error):  # cuBLAS's or the CUDA runtime's way of saying it
            return _out_of_memory(error, config)
        line = backend.cuda_error_line(error)  # CUDA, cuBLAS, NVRTC: one line naming the operation
        if line is None:
            raise
        sys.stderr.write(f"train.py: error: {line}\n")
        return EXIT_ERROR


def resume_note(state, device):
    """What a resumed run can promise: the numbers of an uninterrupted run, bit for bit, only where
    every sum is done in the same order (docs/design.md, Determinism)."""
    where = f"after epoch {state.epoch}" + (f", batch {state.batch}" if state.batch else "")
    saved_on = state.flags.get("device")
    if saved_on in ("cpu", "gpu", "emulated") and saved_on != device:
        return (f"note: resuming {where}; the checkpoint was trained on the {saved_on}, this run "
                f"continues on the {device}, whose sums round differently: the numbers will "
                "differ from an uninterrupted run's in the last digits")
    return (f"resuming {where}: the same numbers, bit for bit, as an uninterrupted run on the same "
            "device, machine and BLAS build with the same BLAS thread count (OPENBLAS_NUM_THREADS; "
            "docs/design.md, Determinism)")


def _out_of_memory(error, config):
    """One line for running out of GPU or host memory, naming the setting to lower."""
    from ninpy import backend

    batch = f" (now {config.batch_size})" if config is not None else ""
    where = "the GPU" if backend.is_cuda_error(error) else "the machine"
    sys.stderr.write(f"train.py: error: {where} ran out of memory ({_one_line(error)}); lower "
                     f"--batch-size{batch}\n")
    return EXIT_ERROR


def choose_device(device):
    """"cpu" or "gpu" for --device; "auto" falls back to the CPU with one line saying why."""
    from ninpy import backend, kernel_set

    if kernel_set() == "reference":
        if device == "gpu":
            raise backend.DeviceError("--kernels reference runs on the CPU only; drop --device gpu "
                                      "(or pass --device cpu)")
        return "cpu"
    if device != "auto":
        return device
    problem = backend.gpu_problem()
    if problem is not None:
        print(f"note: training on the CPU; {problem}", flush=True)
        return "cpu"
    return "gpu"


def _one_line(error):
    """The error's message on one line (a few data errors list files on further lines)."""
    return " ".join(str(error).split())


if __name__ == "__main__":
    sys.exit(main())
