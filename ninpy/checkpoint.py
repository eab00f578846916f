"""Checkpoints: one `.npz` file holding everything a run needs to continue exactly.

    save(path, model, optimizer, schedule, epoch, batch=0, progress=None, flags=None)
    state = load(path)          # a Checkpoint; then state.restore(model, optimizer, schedule)

Layout of the archive (plain arrays only, read back with `allow_pickle=False`):

    model/<parameter name>      each parameter, as in model.state_dict()
    optim/momentum/<index>      SGD momentum buffers, by the parameter's position in the optimiser
    meta                        a 0-d unicode array: one JSON object with the format tag, epoch,
                                batch (batches done in that epoch; 0 at an epoch boundary), the
                                optimiser's groups, the schedule, ninpy.random's state, the running
                                sums of a half-done epoch, and the flags the run was started with

`save` writes a temporary file in the same directory, flushes and fsyncs it, then renames it onto
the target (`os.replace`, atomic on one file system): a crash leaves either the old checkpoint or the
new one, never half of one. Every failure to read one is a CheckpointError with a one-line message.
"""
import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import backend
from . import random as nrandom

__all__ = ["CheckpointError", "Checkpoint", "save", "load", "FILENAME", "FORMAT"]

FILENAME = "checkpoint.npz"
FORMAT = "ninpy-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message names the file and what to do."""


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

    def restore(self, model, optimizer=None, schedule=None, restore_random=True):
        """Load the saved state into live objects (kept on their devices)."""
        try:
            model.load_state_dict(self.model)
            if optimizer is not None:
                optimizer.load_state_dict(self.optimizer)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{self.path}: does not fit this model/optimiser ({error}); was it "
                                  "saved for another dataset or model?") from None
        if schedule is not None:
            schedule.load_state_dict(self.schedule)
        if restore_random:
            nrandom.set_state(self.random)


def _host(array):
    return backend.to_device(array, "cpu")


def save(path, model, optimizer, schedule, epoch, batch=0, progress=None, flags=None):
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
    arrays["meta"] = np.array(json.dumps(meta))
    _atomic_savez(path, arrays)
    return path


def _atomic_savez(path, arrays):
    directory = path.parent if str(path.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                                             dir=directory)
    except OSError as error:
        raise CheckpointError(f"cannot write a checkpoint in {directory}: {error.strerror or error}; "
                              "choose a writable --out") from None
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from None
        raise
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def resolve(path):
    """A checkpoint path from a file or a run directory (DIR/checkpoint.npz)."""
    path = Path(path).expanduser()
    return path / FILENAME if path.is_dir() else path


def load(path):
    """Read a checkpoint file (or DIR/checkpoint.npz). Raises CheckpointError with one clear line."""
    path = resolve(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: give the --out directory of an earlier run "
                              f"or its {FILENAME}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file; give a run directory or its {FILENAME}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "meta" not in archive.files:
                raise CheckpointError(f"{path} is not a ninpy checkpoint (no 'meta' entry); give the "
                                      f"{FILENAME} written by train.py")
            meta = json.loads(str(archive["meta"][()]))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a ninpy checkpoint (format tag "
                                      f"{meta.get('format') if isinstance(meta, dict) else None!r})")
            if meta.get("version") != VERSION:
                raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this "
                                      f"ninpy reads version {VERSION}")
            model = {name[len("model/"):]: archive[name] for name in archive.files
                     if name.startswith("model/")}
            buffers = {int(name.rsplit("/", 1)[1]): archive[name] for name in archive.files
                       if name.startswith("optim/momentum/")}
    except CheckpointError:
        raise
    except PermissionError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, TypeError,
            UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(error).__name__}: {error}); "
                              "resume from an intact checkpoint or start a new run") from None
    try:
        return Checkpoint(path=path, epoch=int(meta["epoch"]), batch=int(meta["batch"]),
                          model=model,
                          optimizer={"param_groups": meta["optimizer"]["param_groups"],
                                     "momentum_buffers": buffers},
                          schedule=meta["schedule"], random=meta["random"],
                          flags=meta.get("flags", {}), progress=meta.get("progress", {}))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: checkpoint metadata is incomplete ({error!r}); resume from "
                              "an intact checkpoint or start a new run") from None
