"""Checkpoints: one `.npz` file holding everything a run needs to continue exactly.

    save(path, model, optimizer, schedule, epoch, batch=0, progress=None, flags=None, metrics=None)
    state = load(path)          # a Checkpoint; then state.restore(model, optimizer, schedule)

Layout of the archive (plain arrays only, read back with `allow_pickle=False`):

    model/<parameter name>      each parameter, as in model.state_dict()
    optim/momentum/<index>      SGD momentum buffers, by the parameter's position in the optimiser
    meta                        a 0-d unicode array: one JSON object with the format tag, epoch,
                                batch (batches done in that epoch; 0 at an epoch boundary), the
                                optimiser's groups, the schedule, ninpy.random's state, the running
                                sums of a half-done epoch, the flags the run was started with, and
                                the metrics record of every epoch done (metrics.jsonl is rebuilt
                                from them: docs/run-folder.md)

`save` writes a temporary file in the same directory, flushes and fsyncs it, then renames it onto
the target (ninpy.files.write_atomically): a crash leaves either the old checkpoint or the new one,
never half of one.

`load` trusts nothing in the file. Why `.npz` and not safetensors: an `.npz` is a zip of `.npy`
files, and each `.npy` starts with a small header giving its dtype and shape, so the headers can be
read and bounded (`_read_entries`) before a byte of data is allocated -- the one property
safetensors was made for -- without a new dependency, and the file stays readable with `np.load`
alone. Every array must be float32/float64 with no negative dimension, and the whole archive may
hold at most the elements of the largest NIN preset twice (weights + momentum). Each entry must
appear once, stored or deflated, be exactly as long as its header says, and is read to its end so
that its CRC-32 is checked (`np.load` stops at the end of the data and never checks it). Then
every metadata field is checked for type and range (`_check_meta`), and every weight for NaN/inf.
Every failure to read a checkpoint is a CheckpointError with a one-line message of bounded length.
"""
import json
import math
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backend
from . import random as nrandom
from .files import read_npy_header, require_regular_file, write_atomically

__all__ = ["CheckpointError", "Checkpoint", "save", "load", "FILENAME", "FORMAT"]

FILENAME = "checkpoint.npz"
FORMAT = "ninpy-checkpoint"
VERSION = 1

# Bounds on what a checkpoint may make us allocate, checked from the headers before any data is
# read. No NIN preset has more than 2,000,000 parameters (SVHN: 1,986,026; tests hold every preset
# to this), and a checkpoint holds each parameter at most twice (weight + momentum buffer).
MAX_PARAMETERS = 2_000_000
MAX_ELEMENTS = 2 * MAX_PARAMETERS
MAX_ENTRIES = 1 + 2 * 64          # meta + weights and buffers of up to 64 parameter tensors
MAX_META_CHARS = 4_000_000        # the JSON metadata (mostly per-epoch metrics: ~250 characters each)
MAX_EPOCHS = 1_000_000            # bounds for epoch and batch counters
MAX_BATCHES = 1_000_000_000
MESSAGE_LIMIT = 300               # characters of an embedded error or value in a message
FLOAT_DTYPES = (np.dtype("<f4"), np.dtype("<f8"))


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the file and what to do."""


def _short(value, limit=MESSAGE_LIMIT):
    """str(value) cut to `limit` characters: a crafted file must not produce a megabyte-long line."""
    text = str(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


@dataclass
class Checkpoint:
    """What load() returns: arrays on the host, the rest as plain Python values."""
    path: Path
    epoch: int                      # epochs completed
    batch: int                      # batches of epoch `epoch` already done (0 at a boundary)
    model: dict                     # name -> array
    optimizer: dict                 # as optim.SGD.state_dict()
    schedule: dict
    random: dict                    # as ninpy.random.get_state()
    flags: dict = field(default_factory=dict)
    progress: dict = field(default_factory=dict)   # running sums of a half-done epoch
    metrics: list = None            # the metrics record of each epoch done; None in older files

    def restore(self, model, optimizer=None, schedule=None, restore_random=True):
        """Load the saved state into live objects (kept on their devices)."""
        try:
            model.load_state_dict(self.model)
            if optimizer is not None:
                self._check_buffers(len(optimizer.parameters()))
                optimizer.load_state_dict(self.optimizer)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{self.path}: does not fit this model/optimiser "
                                  f"({_short(error)}); was it saved for another dataset or "
                                  "model?") from None
        if schedule is not None:
            schedule.load_state_dict(self.schedule)
        if restore_random:
            nrandom.set_state(self.random)

    def _check_buffers(self, count):
        """Every momentum buffer must belong to a parameter of the optimiser."""
        extra = sorted(i for i in self.optimizer["momentum_buffers"] if i >= count)
        if extra:
            raise CheckpointError(f"{self.path}: momentum buffer optim/momentum/{extra[0]} for a "
                                  f"parameter that does not exist (the optimiser has {count}); the "
                                  "file was edited or damaged: resume from an intact checkpoint")

    def missing_buffers(self, count):
        """The parameters (by position, of `count`) without a momentum buffer although training
        had begun: SGD makes every buffer at its first step, so a missing one was lost, and
        training on would silently restart that parameter's momentum at zero."""
        if not (self.epoch or self.batch):
            return []
        return sorted(set(range(count)) - set(self.optimizer["momentum_buffers"]))


def _host(array):
    return backend.to_device(array, "cpu")


def save(path, model, optimizer, schedule, epoch, batch=0, progress=None, flags=None,
         metrics=None):
    """Write a checkpoint atomically to `path`; returns the Path. Raises CheckpointError."""
    path = Path(path)
    arrays = {f"model/{name}": _host(value) for name, value in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, buf in optim_state["momentum_buffers"].items():
        arrays[f"optim/momentum/{int(index)}"] = _host(buf)
    meta = {
        "format": FORMAT, "version": VERSION, "epoch": int(epoch), "batch": int(batch),
        "optimizer": {"param_groups": optim_state["param_groups"]},
        "schedule": schedule.state_dict() if schedule is not None else {},
        "random": nrandom.get_state(),
        "progress": progress or {},
        "flags": flags or {},
    }
    if metrics is not None:
        meta["metrics"] = list(metrics)
    arrays["meta"] = np.array(json.dumps(meta))
    try:
        write_atomically(path, lambda file: np.savez(file, **arrays))
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}; free "
                              "some space or choose a writable --out") from None
    return path


def resolve(path):
    """A checkpoint path from a file or a run directory (DIR/checkpoint.npz)."""
    path = Path(path).expanduser()
    return path / FILENAME if path.is_dir() else path


def load(path):
    """Read a checkpoint file (or DIR/checkpoint.npz). Raises CheckpointError with one clear line."""
    path = resolve(path)
    if not path.exists():
        again = (f" (a run there that stopped before its first save has none: start it again with "
                 f"--out {path.parent})" if path.parent.is_dir() and path.name == FILENAME else "")
        raise CheckpointError(f"no checkpoint at {path}: give the --out directory of an earlier run "
                              f"or its {FILENAME}{again}")
    todo = "resume from an intact checkpoint or start a new run"
    try:
        require_regular_file(path)
        with open(path, "rb") as file, zipfile.ZipFile(file) as archive:
            arrays = _read_entries(archive, path)
        meta = json.loads(str(arrays.pop("meta")[()]))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            tag = meta.get("format") if isinstance(meta, dict) else None
            raise CheckpointError(f"{path} is not a ninpy checkpoint (format tag "
                                  f"{_short(tag, 80)!r})")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {_short(meta.get('version'), 40)!r}, "
                                  f"this ninpy reads version {VERSION}")
        model = {name[len("model/"):]: array for name, array in arrays.items()
                 if name.startswith("model/")}
        buffers = {int(name[len("optim/momentum/"):]): array for name, array in arrays.items()
                   if name.startswith("optim/momentum/")}
    except CheckpointError:
        raise
    except _BadEntry as error:
        raise CheckpointError(f"{path}: {error}; it was not written by train.py, or was damaged: "
                              f"{todo}") from None
    except PermissionError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    except _UNREADABLE as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}: "
                              f"{_short(error)}); {todo}") from None
    try:
        _check_meta(meta)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged ({_short(error)}); "
                              f"{todo}") from None
    for name, array in [*(("model/" + k, v) for k, v in model.items()),
                        *((f"optim/momentum/{k}", v) for k, v in buffers.items())]:
        if not np.isfinite(array).all():
            raise CheckpointError(f"{path}: {_short(name, 80)} holds NaN or inf, so the model cannot "
                                  f"predict or train from it; {todo}")
    return Checkpoint(path=path, epoch=meta["epoch"], batch=meta["batch"], model=model,
                      optimizer={"param_groups": meta["optimizer"]["param_groups"],
                                 "momentum_buffers": buffers},
                      schedule=meta["schedule"], random=meta["random"], flags=meta["flags"],
                      progress=meta["progress"], metrics=meta.get("metrics"))


# ---------------------------------------------------------------------------------------------
# What a checkpoint may hold: its entries' headers (before reading them) and its metadata.

class _BadEntry(Exception):
    """An archive entry that a checkpoint cannot hold (its name, dtype or size)."""


# What reading a damaged archive can raise, from zipfile (a bad CRC, a member compressed or
# encrypted in a way it does not support, a cut stream, a mangled directory) and zlib, and from
# json: each becomes the one "truncated or corrupt" line.
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, TypeError,
               UnicodeDecodeError, RecursionError, json.JSONDecodeError, NotImplementedError,
               RuntimeError, OverflowError, struct.error)
MAX_DIMENSIONS = 8                  # a NIN weight has at most 4


def _read_entries(archive, path):
    """{entry name without .npy: array} of every entry, each checked before and as it is read.

    Before a member's data is read: its name is one a checkpoint holds and appears once (zipfile
    would silently give the last of two), it is stored or deflated and not encrypted, and its .npy
    header announces a float32/float64 array (or the metadata string) whose dimensions are
    non-negative and whose size keeps the archive within MAX_ELEMENTS. The member's length must
    be exactly header + data, and it is read to its end, so zipfile checks its CRC-32: NumPy alone
    stops at the data's end and never does (a changed header-length byte would shift the weights
    silently).
    """
    entries = archive.infolist()
    if len(entries) > MAX_ENTRIES:
        raise _BadEntry(f"{len(entries)} entries, a checkpoint has at most {MAX_ENTRIES}")
    if "meta.npy" not in archive.namelist():
        raise CheckpointError(f"{path} is not a ninpy checkpoint (no 'meta' entry); give the "
                              f"{FILENAME} written by train.py")
    seen = set()
    for entry in entries:
        if entry.filename in seen:
            raise _BadEntry(f"entry {_short(entry.filename, 80)!r} appears twice, so which one "
                            "holds the state is ambiguous")
        seen.add(entry.filename)
        name = entry.filename[:-len(".npy")] if entry.filename.endswith(".npy") else None
        if name is None or not (name == "meta" or _is_array_name(name)):
            raise _BadEntry(f"unexpected entry {_short(entry.filename, 80)!r} (a checkpoint holds "
                            "meta, model/<name> and optim/momentum/<index>)")
    arrays, total = {}, 0
    for entry in entries:
        name = entry.filename[:-len(".npy")]
        if entry.flag_bits & 0x1:
            raise _BadEntry(f"entry {name!r} is encrypted")
        if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _BadEntry(f"entry {name!r} uses zip compression method {entry.compress_type} "
                            "(a checkpoint is stored or deflated)")
        with archive.open(entry) as member:
            shape, fortran, dtype = _read_header(member, name)
            header_bytes = member.tell()
            count = math.prod(shape)
            if name == "meta":
                if shape != () or dtype.kind != "U" or dtype.itemsize // 4 > MAX_META_CHARS:
                    raise _BadEntry(f"'meta' is {dtype} {shape}, expected a string of at most "
                                    f"{MAX_META_CHARS:,} characters")
            else:
                if dtype not in FLOAT_DTYPES:
                    raise _BadEntry(f"entry {name!r} has dtype {dtype}, expected float32 or "
                                    "float64")
                total += count
                if total > MAX_ELEMENTS:
                    raise _BadEntry(f"its arrays hold more than {MAX_ELEMENTS:,} numbers (entry "
                                    f"{name!r} has shape {_short(shape, 80)}), more than any NIN "
                                    "model needs")
            nbytes = count * dtype.itemsize
            if entry.file_size != header_bytes + nbytes:
                raise _BadEntry(f"entry {name!r} is {entry.file_size:,} bytes, but its header "
                                f"announces {header_bytes:,} + {nbytes:,}")
            data = member.read(nbytes)
            if len(data) != nbytes or member.read(1):  # read to the end: the CRC is checked
                raise EOFError(f"entry {name!r} ends before its {nbytes:,} bytes of data")
        array = np.frombuffer(data, dtype, count)
        array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
        arrays[name] = array.copy()  # writable, and C-ordered like every array the model holds
    return arrays


def _read_header(member, name):
    """(shape, fortran_order, dtype) of the entry's .npy header, at most MAX_DIMENSIONS of them."""
    try:
        shape, fortran, dtype = read_npy_header(member)
    except ValueError as error:
        raise _BadEntry(f"entry {name!r}: {error}") from None
    if len(shape) > MAX_DIMENSIONS:
        raise _BadEntry(f"entry {name!r} has {len(shape)} dimensions, a checkpoint's arrays at "
                        f"most {MAX_DIMENSIONS}")
    return shape, fortran, dtype


def _is_array_name(name):
    if name.startswith("model/"):
        return len(name) > len("model/")
    if name.startswith("optim/momentum/"):
        index = name[len("optim/momentum/"):]
        return index.isdigit() and index.isascii() and int(index) < MAX_ENTRIES
    return False


def _require(condition, message):
    if not condition:
        raise ValueError(message)


def _whole(record, key, low, high):
    """record[key] must be an int (not a bool) in [low, high]."""
    value = record[key]
    _require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
             f"{key} {_short(value, 60)!r}: expected a whole number in {low}..{high}")
    return value


def _number(record, key, low=0.0, high=math.inf, high_inclusive=True):
    """record[key] must be a finite int or float in [low, high] (or [low, high))."""
    value = record[key]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and low <= value and (value <= high if high_inclusive else value < high)
    _require(ok, f"{key} {_short(value, 60)!r}: expected a finite number in [{low}, {high}"
                 f"{']' if high_inclusive else ')'}")
    return value


def _mapping(record, key):
    value = record[key]
    _require(isinstance(value, dict), f"{key}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_meta(meta):
    """Raise ValueError (or KeyError) naming the first field that is missing, of the wrong type or
    out of range; what passes can be used without further checks."""
    epoch = _whole(meta, "epoch", 0, MAX_EPOCHS)
    batch = _whole(meta, "batch", 0, MAX_BATCHES)
    groups = _mapping(meta, "optimizer")["param_groups"]
    _require(isinstance(groups, list) and groups, "param_groups: expected a non-empty list")
    for group in groups:
        _require(isinstance(group, dict), "param_groups: expected a list of JSON objects")
        for key in ("lr", "initial_lr", "weight_decay"):
            _number(group, key)
        _number(group, "momentum", 0.0, 1.0, high_inclusive=False)
        _require(isinstance(group["nesterov"], bool), "nesterov: expected true or false")
    _whole(_mapping(meta, "schedule"), "epoch", 0, MAX_EPOCHS)
    _check_random(_mapping(meta, "random"))
    progress = _mapping(meta, "progress")
    if batch:  # a half-done epoch: its running sums are used
        seen = _whole(progress, "seen", 1, MAX_BATCHES)
        _whole(progress, "correct", 0, seen)
        _number(progress, "loss_sum")
        for key in ("train_seconds", "eval_seconds"):
            if key in progress:
                _number(progress, key)
    flags = _mapping(meta, "flags")
    for key, value in flags.items():
        _require(isinstance(value, (str, int, float, bool, list, type(None))),
                 f"flags.{_short(key, 40)}: expected a plain value, got {type(value).__name__}")
    if "metrics" in meta:
        # One record per epoch done, in order; a run resumed from a checkpoint older than the
        # records (whose metrics.jsonl was lost) may lack some early ones.
        records = meta["metrics"]
        _require(isinstance(records, list) and len(records) <= epoch,
                 f"metrics: expected a list of at most {epoch} epoch record(s)")
        previous = 0
        for record in records:
            number = record.get("epoch") if isinstance(record, dict) else None
            _require(type(number) is int and previous < number <= epoch,
                     f"metrics: a record's epoch is {_short(number, 40)!r}, expected epochs in "
                     f"increasing order up to {epoch}")
            previous = number


def _check_random(state):
    """ninpy.random's state: a valid PCG64 state (tried on a throwaway generator) and GPU counters."""
    _whole(state, "gpu_seed", 0, 2 ** 32 - 1)
    _whole(state, "gpu_offset", 0, 2 ** 63 - 1)
    try:
        np.random.PCG64().state = state["cpu"]
    except (TypeError, ValueError, KeyError, OverflowError) as error:
        raise ValueError(f"random.cpu is not a PCG64 state ({_short(error, 80)})") from None
