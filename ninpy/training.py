"""The training loop behind train.py: data, model, SGD, metrics, checkpoints, exact resume, faults.

    config = Config(dataset="fashion-mnist", out="runs/fmnist", **recipe fields)
    trainer = Trainer(config)                  # or Trainer(config, resume="runs/fmnist")
    trainer.fit()                              # epochs; metrics.jsonl, checkpoint.npz, final.json

One epoch: the batches of ninpy.data for (seed, epoch) (shuffled, augmented on the training
device, preprocessed), forward, cross-entropy, backward, SGD step; then the test split under
no_grad() with model.eval(). After every epoch the run folder commits it (ninpy.run_folder: the
checkpoint, which carries the metrics, then metrics.jsonl and final.json rewritten from them).

Exact resume. Everything random is a function of saved state: the batch order and augmentation
draws of epoch e are a pure function of (seed, e) (ninpy.data), dropout draws come from
ninpy.random whose state is in the checkpoint, and the learning rate is a function of the epoch
and step. So `Trainer(config, resume=...)` continues with the same numbers an uninterrupted run
would have produced: bit for bit on the same device, machine and BLAS build with the same BLAS
thread count (docs/design.md, Determinism). A checkpoint written on Ctrl-C in the middle of an
epoch records how many batches were done and the epoch's running sums; the resumed run replays the
epoch's batch stream (skipping the batches already trained on) so the remaining batches and draws
are identical.

Faults. A NaN/inf loss stops the run with the step named (TrainingError) and nothing is written:
the last checkpoint stays as it was. So does an epoch whose mean training, test or validation loss
is not finite: it is never committed, and so every checkpoint a run writes holds finite metrics.
A finite but huge loss (7.6e29 after --lr 1e4) is a measurement, committed like any other; the
messages that name the last checkpoint give its epoch and test loss rather than calling it good.
Once the lr has reached its peak (not during the warm-up, when a net that has not learnt yet is no
sign of anything), a training loss that sits at ln(C) for a whole epoch gets a warning (the class maps died), and so do class maps that are zero on every test
image while the others live (those classes can no longer be predicted). Ctrl-C, SIGTERM or SIGHUP
finishes the current step, saves a resumable checkpoint and raises Interrupted; a second one stops at
once without saving. A checkpoint whose state this run cannot continue (a batch count beyond the
epoch, an optimiser setting the flags never ask for) is a CheckpointError before anything is trained.
"""
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from . import backend, checkpoint, data, datasets, memory, models, run_folder
from . import functional as F
from . import random as nrandom
from . import recipes
from .autograd import Tensor, no_grad
from .optim import SGD
from .run_folder import EVAL, FINAL, METRICS, RunFolder, StopSignals

__all__ = ["Config", "Trainer", "TrainingError", "Interrupted", "FIXED_KEYS", "TUNABLE_KEYS", "RUN_KEYS",
           "METRICS", "FINAL"]


class TrainingError(RuntimeError):
    """A run cannot go on (bad option, unusable --out, NaN loss); the message is one line."""


class Interrupted(Exception):
    """A stop signal: `saved` is the checkpoint written, `signum` the signal (SIGINT for Ctrl-C)."""

    def __init__(self, message, saved=None, signum=signal.SIGINT):
        super().__init__(message)
        self.saved = saved
        self.signum = signum


@dataclass
class Config:
    """Every setting of a run. The recipe fields default to recipes.RECIPES[dataset] via for_dataset."""
    dataset: str
    out: str = None
    device: str = "auto"
    epochs: int = None
    batch_size: int = None
    lr: float = None
    momentum: float = None
    weight_decay: float = None
    bias_lr_mult: float = None
    last_lr_mult: float = None
    schedule: str = None
    warmup_steps: int = None
    dropout: float = None
    label_smoothing: float = None
    augment: str = None
    erase: float = None
    crop_pad: int = None
    preprocess: str = None
    seed: int = 0
    data_dir: str = None
    limit: int = None
    val_split: int = 0
    svhn_extra: bool = False
    download: bool = True

    @classmethod
    def for_dataset(cls, dataset, **values):
        """A Config whose unset (None) recipe fields come from the dataset's recipe; those counted
        in steps stay None until the Trainer knows the run's length and fits them to it."""
        if not isinstance(dataset, str) or dataset not in recipes.RECIPES:
            raise TrainingError(f"--dataset {dataset!r}: expected one of {', '.join(recipes.RECIPES)}")
        recipe = recipes.recipe_for(dataset)
        config = cls(dataset=dataset, **{k: v for k, v in values.items() if v is not None})
        for name, default in recipe.as_dict().items():
            if getattr(config, name) is None and name not in recipes.FITTED_TO_RUN:
                setattr(config, name, default)
        if values.get("schedule") is None and isinstance(config.epochs, int):
            config.schedule = recipes.fit_schedule(recipe.schedule, recipe.epochs, config.epochs)
        return config

    def as_dict(self):
        return asdict(self)

    def validate(self):
        """Raise TrainingError naming the first setting that cannot work."""
        def bad(flag, value, expected):
            raise TrainingError(f"--{flag.replace('_', '-')} {value!r}: expected {expected}")
        if self.dataset not in recipes.RECIPES:
            bad("dataset", self.dataset, f"one of {', '.join(recipes.RECIPES)}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            bad("epochs", self.epochs, "a whole number >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad("batch_size", self.batch_size, "a whole number >= 1")
        for name in ("lr", "weight_decay", "bias_lr_mult", "last_lr_mult"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                bad(name, value, "a finite number >= 0")
        if self.lr <= 0:
            bad("lr", self.lr, "a number > 0")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            bad("momentum", self.momentum, "a number in [0, 1)")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int)
                                              or self.warmup_steps < 0):
            bad("warmup_steps", self.warmup_steps, "a whole number >= 0")
        if self.augment not in recipes.AUGMENT_MODES:
            bad("augment", self.augment, f"one of {', '.join(recipes.AUGMENT_MODES)}")
        if not isinstance(self.crop_pad, int) or self.crop_pad < 0:
            bad("crop_pad", self.crop_pad, "a whole number >= 0")
        if self.preprocess not in recipes.PREPROCESS_MODES:
            bad("preprocess", self.preprocess, f"one of {', '.join(recipes.PREPROCESS_MODES)}")
        try:
            recipes.parse_schedule(self.schedule)
        except ValueError as error:
            raise TrainingError(str(error)) from None
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", self.seed, "a whole number >= 0")
        if self.limit is not None and not _is_limit(self.limit):
            bad("limit", self.limit, "a whole number >= 1, or two ([train, test])")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            bad("dropout", self.dropout, "a probability in [0, 1)")
        if not (isinstance(self.label_smoothing, (int, float)) and 0 <= self.label_smoothing < 1):
            bad("label_smoothing", self.label_smoothing, "a number in [0, 1)")
        if not (isinstance(self.erase, (int, float)) and 0 <= self.erase <= 1):
            bad("erase", self.erase, "a probability in [0, 1]")
        if not isinstance(self.val_split, int) or self.val_split < 0:
            bad("val_split", self.val_split, "a whole number >= 0")
        for name in ("data_dir", "out"):  # a checkpoint's flags are read back from JSON
            if not isinstance(getattr(self, name), (str, type(None))):
                bad(name, getattr(self, name), "a folder path")
        if self.svhn_extra and self.dataset != "svhn":
            raise TrainingError(f"--svhn-extra applies to --dataset svhn only, not {self.dataset}")
        return self


def format_loss(value):
    """A loss for a message: 4 decimals, or 4 significant digits once it is too large for that to
    be readable (7.6e+29, not 30 digits)."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def _is_limit(value):
    """An int >= 1, or a pair of them (train, test)."""
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and all(_is_limit(v) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# The settings that fix the data and the model: a resumed run must keep them.
FIXED_KEYS = ("dataset", "batch_size", "preprocess", "seed", "limit", "val_split", "svhn_extra")
# Optimisation settings a resumed run may change (e.g. a lower lr after a divergence); the run is
# then no longer the same as an uninterrupted one, and train.py says so.
TUNABLE_KEYS = ("lr", "momentum", "weight_decay", "bias_lr_mult", "last_lr_mult", "schedule",
                "warmup_steps", "dropout", "label_smoothing", "augment", "crop_pad", "erase")
RUN_KEYS = FIXED_KEYS + TUNABLE_KEYS
# epochs, device, out, data_dir and download may change freely.


# ---------------------------------------------------------------------------------------------

@dataclass
class _EpochTally:
    """An epoch's running sums. Loss and hits stay device arrays so that a step needs no sync;
    a checkpoint written in mid-epoch saves them (as_progress) and a resumed run starts from them."""
    loss_sum: object        # sum over the images seen of their loss (float64 array)
    correct: object         # images classified right (int64 array)
    seen: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    next_batch: int = 0     # the first batch not yet trained on

    @classmethod
    def start(cls, xp, progress, first):
        """Zero, or the sums a mid-epoch checkpoint saved (progress) when resuming at batch first."""
        return cls(xp.asarray(progress.get("loss_sum", 0.0), np.float64),
                   xp.asarray(progress.get("correct", 0), np.int64), int(progress.get("seen", 0)),
                   float(progress.get("train_seconds", 0.0)),
                   float(progress.get("eval_seconds", 0.0)), first)

    def add(self, loss, logits, labels):
        self.loss_sum = self.loss_sum + loss.astype(np.float64) * len(labels)
        self.correct = self.correct + (logits.argmax(axis=1) == labels).sum()
        self.seen += len(labels)

    def means(self):
        """(mean loss, accuracy) over the images seen."""
        return float(self.loss_sum) / self.seen, int(self.correct) / self.seen

    def summary(self, seconds_now):
        """The progress bar's fields, seconds_now being this session's training time so far."""
        loss, acc = self.means()
        rate = self.seen / max(self.train_seconds + seconds_now, 1e-9)
        return {"loss": f"{loss:.4f}", "acc": f"{acc:.4f}", "img_s": f"{rate:.0f}"}

    def as_progress(self):
        return {"loss_sum": float(self.loss_sum), "correct": int(self.correct), "seen": self.seen,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds}


class _StopForInterrupt(Exception):
    pass


class Evaluation(NamedTuple):
    """A pass over a split: mean loss, accuracy, and the classes whose map was 0 on every image."""
    loss: float
    accuracy: float
    dead_classes: tuple = ()


class Trainer:
    """One run: builds everything in __init__ (errors surface before any training), then fit()."""

    def __init__(self, config, resume=None, eval_only=False, progress=None, log=None):
        """config: a Config (recipe fields filled). resume: a checkpoint file, run directory or
        a loaded checkpoint.Checkpoint.
        eval_only: only evaluate (needs resume; --out is not required to be empty).
        progress: show tqdm bars (None: only when stderr is a terminal). log: print function."""
        self.config = config.validate()
        self.eval_only = eval_only
        self.progress = progress
        self.log = log or (lambda message: tqdm.write(message, file=sys.stdout))
        self.device = backend.resolve_device(config.device)

        if resume is None or isinstance(resume, checkpoint.Checkpoint):
            self.state = resume
        else:
            self.state = checkpoint.load(resume)
        if eval_only and self.state is None:
            raise TrainingError("--eval-only needs --resume DIR_OR_FILE: the checkpoint to evaluate")
        self.folder = RunFolder.open(config.out, self.state, eval_only, log=self.log)
        self.out = self.folder.path
        try:
            self._set_up()
        except BaseException:
            self.folder.release(abandon=True)  # no lock held, and no empty folder left behind
            raise

    def _set_up(self):
        config = self.config
        self._load_data()
        nrandom.manual_seed(config.seed)
        self.model = models.nin_for(config.dataset, in_channels=self.in_channels,
                                    num_classes=self.num_classes,
                                    dropout=config.dropout).to(self.device)
        self.optimizer = SGD(recipes.param_groups(self.model, config.lr, config.weight_decay,
                                                  config.bias_lr_mult, config.last_lr_mult),
                             lr=config.lr, momentum=config.momentum)
        self.schedule = recipes.make_schedule(self.optimizer, config.schedule, config.epochs)
        self.steps_per_epoch = math.ceil(len(self.x_train) / config.batch_size)
        # A short run gets the recipe shortened, not its first steps (recipes.fit_warmup).
        if config.warmup_steps is None:  # the recipe's, fitted to this run (none of it given)
            config.warmup_steps = recipes.fit_warmup(recipes.RECIPES[config.dataset].warmup_steps,
                                                     config.epochs * self.steps_per_epoch)
        self.warmup = recipes.WarmupSchedule(self.optimizer, config.warmup_steps)
        self.start_epoch, self.start_batch, self.partial = 0, 0, {}
        if self.state is not None:
            # The config's optimiser settings win over the saved ones (they are equal unless the
            # user changed one on resume): keep them across the restore of the SGD state.
            settings = [{k: g[k] for k in ("initial_lr", "momentum", "weight_decay")}
                        for g in self.optimizer.param_groups]
            self._check_state_fits()
            self.state.restore(self.model, self.optimizer, self.schedule)
            for group, kept in zip(self.optimizer.param_groups, settings):
                group.update(kept)
            self.schedule.load_state_dict(self.state.schedule)  # lrs from the kept initial_lr
            self.start_epoch, self.start_batch = self.state.epoch, self.state.batch
            self.partial = self.state.progress if self.state.batch else {}

    def _check_state_fits(self):
        """What checkpoint.load cannot judge alone: the batch count against this run's epoch
        length, and SGD settings that train.py has no flag for (and so never writes)."""
        state, path = self.state, self.state.path
        if state.batch > self.steps_per_epoch:
            raise checkpoint.CheckpointError(
                f"{path}: saved after batch {state.batch} of an epoch, but an epoch of this run has "
                f"{self.steps_per_epoch} batches; was the checkpoint edited, or --limit changed? "
                "Resume from an intact checkpoint")
        missing = state.missing_buffers(len(self.optimizer.parameters()))
        if missing and not self.eval_only:
            raise checkpoint.CheckpointError(
                f"{path}: no momentum buffer for parameter(s) {', '.join(map(str, missing[:10]))}"
                f"{', ...' if len(missing) > 10 else ''} although training had begun; the file was "
                "edited or damaged: resume from an intact checkpoint")
        if any(group["nesterov"] for group in state.optimizer["param_groups"]):
            raise checkpoint.CheckpointError(
                f"{path}: its optimiser uses Nesterov momentum, which train.py never sets (no flag "
                "asks for it); the file was edited or written by another tool: resume from a "
                "checkpoint that train.py wrote")

    # ---- set-up ----------------------------------------------------------------------------
    def _load_data(self):
        c = self.config
        ds = datasets.load_dataset(c.dataset, c.data_dir, download=c.download,
                                   svhn_extra=c.svhn_extra, progress=self.progress is not False)
        if isinstance(c.limit, int):
            ds = ds.limit(c.limit)
        elif c.limit is not None:  # [train, test]: the first N of each split separately
            n_train, n_test = c.limit
            ds = replace(ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
                         x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test])
        self.num_classes, self.in_channels = ds.num_classes, ds.in_channels
        x_train, y_train = ds.x_train, ds.y_train
        self.x_val = self.y_val = None
        if c.val_split:
            if c.val_split >= len(x_train):
                raise TrainingError(f"--val-split {c.val_split}: expected fewer than the "
                                    f"{len(x_train)} training images")
            x_train, y_train, self.x_val, self.y_val = data.split_validation(
                x_train, y_train, c.val_split, seed=c.seed)
        if c.preprocess == "gcn-zca":
            self.transform = data.fit_gcn_zca(x_train)
        else:
            self.transform = data.Standardize().fit(x_train)
        crop, flip = recipes.parse_augment(c.augment)
        side = min(x_train.shape[2:])
        if crop and c.crop_pad >= side:
            raise TrainingError(f"--crop-pad {c.crop_pad}: expected a whole number below the image "
                                f"side, {side} (a shift of {side} or more pixels leaves a blank "
                                "image)")
        augments = [data.RandomCropFlip(pad=c.crop_pad if crop else 0, flip=flip)] if crop or flip else []
        if c.erase:   # after the crop, so that the erased rectangle lies inside the image seen
            augments.append(data.RandomErase(p=c.erase))
        self.augment = data.Augmentations(*augments) if len(augments) > 1 else (augments or [None])[0]
        to = partial(backend.to_device, device=self.device)  # the whole uint8 set lives on the device
        self.x_train, self.y_train = to(x_train), y_train
        self.x_test, self.y_test = to(ds.x_test), ds.y_test
        if self.x_val is not None:
            self.x_val = to(self.x_val)

    def num_parameters(self):
        return self.model.num_parameters()

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, x, y, guard=None):
        """Loss, accuracy and dead classes of the model in eval mode over (x, y), under no_grad().

        A logit is the mean of a ReLU'd class map, so it is 0 only where the whole map is: a class
        whose logit is 0 on every image has a dead map. The loss is the plain cross-entropy whatever
        --label-smoothing trains with, so that runs with and without it compare.
        """
        self.model.eval()
        memory.release()   # training's arrays have other sizes than evaluation's: let them go, so
        xp = backend.array_module(x)   # the pool holds one phase's memory at a time (ninpy/memory.py)
        loss_sum, correct = xp.zeros((), np.float64), xp.zeros((), np.int64)
        alive = xp.zeros(self.num_classes, dtype=bool)
        with no_grad():
            for xb, yb in data.batches(x, y, self.config.batch_size, device=self.device,
                                       transform=self.transform):
                if guard is not None and guard.requested:
                    raise _StopForInterrupt
                logits = self.model(Tensor(xb))
                loss_sum = loss_sum + F.cross_entropy(logits, yb).data.astype(np.float64) * len(yb)
                correct = correct + (logits.data.argmax(axis=1) == yb).sum()
                alive = alive | (logits.data > 0).any(axis=0)
        self.model.train()
        memory.release()
        dead = tuple(int(k) for k in np.flatnonzero(~backend.to_device(alive, "cpu")))
        return Evaluation(float(loss_sum) / len(x), int(correct) / len(x), dead)

    def evaluate_only(self):
        """--eval-only: test (and validation) loss and accuracy of the checkpoint; writes eval.json."""
        test = self.evaluate(self.x_test, self.y_test)
        if not math.isfinite(test.loss):
            raise TrainingError(f"the test loss of {self.state.path} is {test.loss}: its weights "
                                "overflow on these images, so its accuracy means nothing; "
                                "evaluate an earlier checkpoint")
        # A checkpoint saved in mid-epoch holds the weights after batch `batch` of epoch epoch + 1.
        state = self.state
        record = {"epoch": state.epoch + 1 if state.batch else state.epoch,
                  **({"batch": state.batch, "batches": self.steps_per_epoch} if state.batch else {}),
                  "test_loss": test.loss, "test_acc": test.accuracy,
                  "dataset": self.config.dataset, "device": self.device,
                  "checkpoint": str(state.path), "test_images": len(self.x_test)}
        if self.x_val is not None:
            val = self.evaluate(self.x_val, self.y_val)
            record["val_loss"], record["val_acc"] = val.loss, val.accuracy
        try:
            self.folder.write_eval(record)
        except OSError as error:
            self.log(f"warning: could not write {self.out / EVAL} ({error.strerror or error})")
        return record

    # ---- training --------------------------------------------------------------------------
    def fit(self):
        """Train from the start (or the checkpoint) to config.epochs; returns final.json's dict."""
        try:
            return self._fit()
        finally:
            self.folder.release()  # a later run may take the folder as soon as this one is done

    def _fit(self):
        c = self.config
        # The metrics of the epochs the checkpoint holds (later, unsaved ones are dropped).
        self._records = self.folder.resume_records(self.state) if self.state is not None else []
        if self.start_epoch >= c.epochs:
            self.log(f"the checkpoint has already trained {self.start_epoch} epoch(s) "
                     f"(--epochs {c.epochs}): nothing to do")
            final = self._final(self._records[-1] if self._records else {})
            self.folder.write_final(final)
            return final
        record = None
        # Overflow / NaN warnings from NumPy would be noise: non-finite losses are caught below.
        with StopSignals() as guard, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for epoch in range(self.start_epoch, c.epochs):
                record = self._epoch(epoch, guard)
        return self._final(record)

    def _epoch(self, epoch, guard):
        """One epoch: its training steps, the test (and validation) pass, then metrics + checkpoint."""
        first = self.start_batch if epoch == self.start_epoch else 0
        scheduled = self.schedule.get_last_lr()  # the epoch's lrs, before a warm-up scales them
        tally = _EpochTally.start(backend.array_module(self.x_train),
                                  self.partial if first else {}, first)
        stream = data.batches(self.x_train, self.y_train, self.config.batch_size, shuffle=True,
                              seed=self.config.seed, epoch=epoch, device=self.device,
                              augment=self.augment, transform=self.transform)
        bar = tqdm(total=len(stream), initial=first, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                   unit="batch", leave=False, file=sys.stderr,
                   disable=(not sys.stderr.isatty()) if self.progress is None else not self.progress)
        try:
            self._train_steps(epoch, stream, first, scheduled, tally, guard, bar)
            eval_started = time.perf_counter()
            test = self.evaluate(self.x_test, self.y_test, guard)
            val = self.evaluate(self.x_val, self.y_val, guard) if self.x_val is not None else None
            tally.eval_seconds += time.perf_counter() - eval_started
        except _StopForInterrupt:
            self._interrupt(epoch, tally.next_batch, tally.as_progress(), guard.requested)
        finally:
            bar.close()
        return self._end_epoch(epoch, len(stream), scheduled, tally, test, val)

    def _train_steps(self, epoch, stream, first, scheduled, tally, guard, bar):
        """SGD steps on the epoch's batches from batch `first` on, summed into tally."""
        check_every = 1 if self.device == "cpu" else 25  # reading a GPU loss costs a sync
        pending = []  # (batch index, loss array) not yet checked for NaN/inf
        self.model.train()
        started = time.perf_counter()
        stopped = False
        # Batches done before the checkpoint are skipped, only their augmentation draws replayed.
        for index, (xb, yb) in enumerate(stream.iterate(start=first), start=first):
            tally.next_batch = index
            stopped = guard.requested
            if stopped:
                break
            loss = self._step(epoch * self.steps_per_epoch + index, scheduled, xb, yb, tally)
            pending.append((index, loss))
            bar.update(1)
            if len(pending) >= check_every:
                self._check_finite(pending, epoch)
                pending = []
                bar.set_postfix(**tally.summary(time.perf_counter() - started), refresh=False)
        else:
            tally.next_batch = len(stream)
        self._check_finite(pending, epoch)
        tally.train_seconds += time.perf_counter() - started
        if stopped:
            raise _StopForInterrupt

    def _step(self, step, scheduled, xb, yb, tally):
        """One SGD step on a batch; returns its loss, still on the device (reading it would sync)."""
        if step <= self.warmup.warmup_steps:
            self.warmup.apply(step, scheduled)  # at the last warm-up step the factor is 1 again
        logits = self.model(Tensor(xb))
        loss = F.cross_entropy(logits, yb, label_smoothing=self.config.label_smoothing)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        tally.add(loss.data, logits.data, yb)
        return loss.data

    def _end_epoch(self, epoch, steps, scheduled, tally, test, val):
        """Check for dead class maps, then write the epoch's metrics line, final.json, checkpoint."""
        train_loss, train_acc = tally.means()
        self._check_finite_epoch(epoch, {"training loss": train_loss, "test loss": test.loss,
                                         **({"validation loss": val.loss} if val else {})})
        self._warn_if_dead(epoch, train_loss, train_acc)
        self._stop_if_dead(epoch, test.dead_classes)
        self._warn_if_partly_dead(epoch, test.dead_classes)
        last_step = epoch * self.steps_per_epoch + steps - 1
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                  "test_loss": test.loss, "test_acc": test.accuracy,
                  "lr": scheduled[0] * self.warmup.factor(last_step),  # that of the last step
                  "images_per_s": (tally.seen / tally.train_seconds if tally.train_seconds > 0
                                   else None),
                  "seconds": tally.train_seconds + tally.eval_seconds}
        if val is not None:
            record["val_loss"], record["val_acc"] = val.loss, val.accuracy
        self._records.append(record)
        self.schedule.step()
        # The checkpoint carries the records: it commits the epoch (ninpy/run_folder.py says why).
        self.folder.commit(partial(checkpoint.save, self.out / checkpoint.FILENAME, self.model,
                                   self.optimizer, self.schedule, epoch + 1, flags=self._flags(),
                                   metrics=self._records),
                           self._records, self._final(record))
        self.log(f"epoch {epoch + 1}/{self.config.epochs}  train loss {format_loss(train_loss)} acc "
                 f"{train_acc:.4f}  test loss {format_loss(test.loss)} acc {test.accuracy:.4f}  "
                 f"lr {record['lr']:.4g}  "
                 f"{record['images_per_s'] or 0:.0f} img/s  {record['seconds']:.0f}s")
        return record

    def _flags(self):
        # "out" is where the run really lives: a resumed run without --out writes into the
        # directory it was resumed from, and its checkpoint and final.json should say so.
        return {**self.config.as_dict(), "out": str(self.out)}

    def _check_finite(self, pending, epoch):
        if not pending:
            return
        values = backend.to_device(backend.array_module(pending[0][1]).stack(
            [loss for _, loss in pending]), "cpu")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            index = pending[bad[0]][0]
            raise TrainingError(
                f"the loss became {values[bad[0]]} at epoch {epoch + 1}, batch {index + 1} (step "
                f"{epoch * self.steps_per_epoch + index + 1}): training diverged; "
                f"{self._last_checkpoint()}. Lower --lr (now {self.config.lr}) or lengthen "
                "--warmup-steps")

    def _check_finite_epoch(self, epoch, losses):
        """An epoch whose mean losses (name -> value) are not all finite is not committed: its
        checkpoint would hold weights whose every prediction is meaningless."""
        bad = [(name, value) for name, value in losses.items() if not math.isfinite(value)]
        if bad:
            name, value = bad[0]
            raise TrainingError(
                f"the {name} of epoch {epoch + 1} is {value}: the weights overflow, so the epoch is "
                f"not committed; {self._last_checkpoint()}. Lower --lr (now {self.config.lr}) or "
                "lengthen --warmup-steps")

    def _last_checkpoint(self):
        """What a message says of the checkpoint in --out: where it is and what its last epoch
        measured (never "good": a finite loss can still be absurd), or that there is none."""
        path = self.out / checkpoint.FILENAME
        if not path.exists():
            return "no checkpoint was written"
        last = self._records[-1] if getattr(self, "_records", None) else None
        measured = (f" (epoch {last['epoch']}: test loss {format_loss(last['test_loss'])})"
                    if last and "test_loss" in last else "")
        return f"the last checkpoint, {path}{measured}, is untouched"

    def _warming_up(self, epoch):
        """True while the lr has not yet reached its peak at the end of this epoch: a net that has
        not learnt yet is no sign of dead class maps, and a lower lr would not help it."""
        return self.warmup.factor((epoch + 1) * self.steps_per_epoch - 1) < 1.0

    def _warn_if_dead(self, epoch, train_loss, train_acc):
        chance = recipes.ln_classes(self.num_classes)
        if self._warming_up(epoch):
            return
        if abs(train_loss - chance) < 0.02 and train_acc < 1.5 / self.num_classes:
            self.log(f"warning: the training loss sat at ln({self.num_classes}) = {chance:.4f} for all "
                     f"of epoch {epoch + 1} (accuracy {train_acc:.3f}): the class maps have died and "
                     f"every class scores the same. Lower --lr (now {self.config.lr}), lengthen "
                     "--warmup-steps, or check the initialisation")

    def _stop_if_dead(self, epoch, dead):
        """All class maps zero on every test image (so the loss is exactly ln C): no gradient can
        revive them, so stop like a NaN, before this epoch's state replaces the last checkpoint."""
        chance = recipes.ln_classes(self.num_classes)
        if len(dead) == self.num_classes and self._warming_up(epoch):
            raise TrainingError(
                f"the class maps died in epoch {epoch + 1}, before the lr reached its peak "
                f"(--lr {self.config.lr} after --warmup-steps {self.config.warmup_steps}): every "
                f"one is zero on every test image (test loss ln({self.num_classes}) = {chance:.4f}) "
                "and no gradient can revive them; lengthen --warmup-steps, or check the data and "
                "the initialisation")
        if len(dead) == self.num_classes:
            kept = (f"{self._last_checkpoint()}; resume it with a lower lr: python train.py "
                    f"--resume {self.out} --lr {self.config.lr / 2:g}"
                    if (self.out / checkpoint.FILENAME).exists()
                    else "no checkpoint was written; lower --lr or lengthen --warmup-steps")
            raise TrainingError(
                f"the class maps died in epoch {epoch + 1}: every one is zero on every test image "
                f"(test loss ln({self.num_classes}) = {chance:.4f}), and no gradient can "
                f"revive them (lr {self.config.lr}); {kept}")

    def _warn_if_partly_dead(self, epoch, dead):
        """Some class maps zero on every test image while others live: those classes cannot win,
        and a map that is zero everywhere gets no gradient through its ReLU, so it comes back only
        if the layers below it change enough (docs/recipes.md, CI section: of the five maps dead
        after epoch 1, two came back and three never did)."""
        if not dead or len(dead) == self.num_classes:  # all dead: _stop_if_dead has stopped the run
            return
        if self._warming_up(epoch):
            return
        shown = ", ".join(map(str, dead[:10])) + (", ..." if len(dead) > 10 else "")
        slower = (", or slow the class maps with --last-lr-mult 0.1"
                  if self.config.last_lr_mult > 0.1 else "")
        self.log(f"warning: after epoch {epoch + 1}, {len(dead)} of {self.num_classes} class maps "
                 f"(classes {shown}) are zero on every test image: those classes are never "
                 "predicted, and a map at zero gets no gradient through its ReLU. Lower --lr (now "
                 f"{self.config.lr}) or lengthen --warmup-steps{slower}")

    def _interrupt(self, epoch, batch, progress, requested):
        # `requested` is the signal's number (a test's stand-in guard may just say True)
        signum = requested if type(requested) is not bool and requested in run_folder.STOP_SIGNALS \
            else signal.SIGINT
        self.folder.check_still_locked()
        path = checkpoint.save(self.out / checkpoint.FILENAME, self.model, self.optimizer,
                               self.schedule, epoch, batch=batch, progress=progress,
                               flags=self._flags(), metrics=self._records)
        raise Interrupted(f"{run_folder.signal_name(signum)}: stopped in epoch {epoch + 1} after "
                          f"batch {batch}; saved {path}. Continue with: python train.py --resume "
                          f"{self.out}", saved=path, signum=signum)

    def _final(self, record):
        """final.json's dict: the last epoch's metrics plus what describes the run."""
        return {**(record or {}), "dataset": self.config.dataset, "device": self.device,
                "parameters": self.num_parameters(), "epochs": self.config.epochs,
                "train_images": len(self.x_train), "test_images": len(self.x_test),
                "flags": self._flags()}
