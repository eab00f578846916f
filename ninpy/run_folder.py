"""The life of a run folder (train.py --out): its lock, the commit of each epoch, what a resume
finds there, the clean-up of a killed run's leftovers, and the signals that stop a run.

    folder = RunFolder.open("runs/fm", state=None)   # lock it; refuse one holding another run
    records = folder.resume_records(state)           # the epochs a resumed checkpoint holds
    folder.commit(save_checkpoint, records, final)   # after each epoch
    folder.release()                                 # or let the process end: the OS drops the lock

The folder holds `checkpoint.npz`, `metrics.jsonl`, `final.json` (and `eval.json` after
--eval-only), plus `.lock`.

Commit: checkpoint first, metrics inside it. An epoch is committed by one atomic rename: that of the
new checkpoint, which carries the metrics record of every epoch it has trained. `metrics.jsonl` and
`final.json` are then rewritten from those records; they are views for people and plotting tools,
never read back. So a run killed at any moment (SIGKILL, disk full, power cut) leaves either the
old checkpoint with views at most one epoch ahead of or behind it, or the new one; a resume
rewrites the views from the checkpoint, and a folder with no checkpoint holds nothing to resume and
may simply be started again. (The other order -- metrics line first, checkpoint last -- leaves a
folder with metrics but no checkpoint when a run dies in epoch 1's save: neither resumable nor,
without deleting files by hand, restartable.)

Lock: `fcntl.flock` on the folder itself, held from open() until release() or the end of the
process. The OS drops it when the process dies however it dies, so a killed run never leaves a
stale lock, and a second run on the same folder is refused at once. The lock is on the folder, not
on a file in it, so deleting a file cannot let a second run in; the folder's inode is checked
after the lock is taken and at every commit, so a folder replaced under the path is noticed. The
holder's pid is written into `.lock` for the refusal message; a `.lock` that is a symbolic link or
not a regular file is refused, never followed (its target would be overwritten).
`--eval-only` takes no lock: it only reads the checkpoint and writes `eval.json` atomically.

Stop signals (StopSignals): Ctrl-C (SIGINT), SIGTERM (`kill`, `timeout`, batch schedulers) and
SIGHUP (a closed terminal) all ask the run to stop after the current step; the trainer then saves a
resumable checkpoint and raises Interrupted. A second signal stops at once without saving. train.py
exits with 128 + the signal's number, as a shell reports a process killed by it: 130 for Ctrl-C,
143 for SIGTERM, 129 for SIGHUP.
"""
import errno
import fcntl
import json
import os
import signal
import stat
from pathlib import Path

from . import checkpoint
from .files import is_temporary_of, require_regular_file, write_atomically

__all__ = ["RunFolder", "RunFolderError", "StopSignals", "METRICS", "FINAL", "EVAL", "LOCK",
           "STOP_SIGNALS", "exit_status", "signal_name", "parse_metrics", "is_intact_record"]

METRICS = "metrics.jsonl"
FINAL = "final.json"
EVAL = "eval.json"
LOCK = ".lock"
RESULTS = (checkpoint.FILENAME, METRICS, FINAL, EVAL)   # files written atomically in the folder
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunFolderError(RuntimeError):
    """The folder cannot hold this run (another run holds it, not a folder, not writable)."""


def exit_status(signum):
    """The exit status of a run stopped by signal `signum`: 128 + its number, as a shell shows."""
    return 128 + int(signum)


class RunFolder:
    """A locked run folder; see the module docstring for what it holds and why in that order."""

    def __init__(self, path, lock_fd=None, created=False):
        self.path = Path(path)
        self._lock_fd = lock_fd      # the folder, opened and flock()ed
        self._created = created

    @classmethod
    def open(cls, out, state=None, eval_only=False, log=print):
        """Lock `out` (created if missing) for a run that starts afresh or resumes `state` there.

        Refuses a folder whose checkpoint is not the one being resumed. A folder with views but no
        checkpoint (a run that died before its first save) is started again, with a note."""
        if out is None:
            if state is None:
                raise RunFolderError("no --out directory given")
            out = state.path.parent
        if not str(out).strip():
            raise RunFolderError("--out '': expected a directory path (e.g. --out runs/mine)")
        path = Path(out).expanduser()
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {path} is a file, not a directory; choose a directory")
        if eval_only:
            return cls(path)
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise RunFolderError(f"--out {path} is not writable ({error.strerror or error}); choose "
                                 "another directory") from None
        folder = cls(path, lock_fd, created)
        try:
            folder._lock()
            folder._check_holds_no_other_run(state, log)
            folder._remove_temporaries()
        except BaseException:
            folder.release(abandon=True)
            raise
        return folder

    def _lock(self):
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise RunFolderError(f"--out {self.path}: cannot lock the folder "
                                     f"({error.strerror or error}); choose another --out") from None
            os.close(self._lock_fd)
            self._lock_fd = None
            holder = _read_pid(self.path / LOCK)
            who = f"process {holder}" if holder else "another process"
            raise RunFolderError(f"--out {self.path} is in use by {who} (another train.py run); wait "
                                 "for it to end, or choose another --out (nothing was changed)") from None
        self.check_still_locked()
        self._write_pid()

    def check_still_locked(self):
        """Raise RunFolderError unless the folder at the path is still the one this run locked
        (renamed or deleted and made again, it would be another folder that another run may hold)."""
        if self._lock_fd is None:  # --eval-only, or released: nothing is held
            return
        try:
            here, held = os.stat(self.path), os.fstat(self._lock_fd)
            same = (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
        except OSError:
            same = False
        if not same:
            raise RunFolderError(f"--out {self.path} was moved, deleted or replaced while this run "
                                 "held it; stopping without writing into whatever is there now")

    def _write_pid(self):
        """Our pid into .lock, which must be a regular file: a symbolic link is not followed."""
        try:
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o666)
        except OSError as error:
            kind = ("a symbolic link" if error.errno == errno.ELOOP else "a folder"
                    if error.errno == errno.EISDIR else None)
            if kind is None:
                raise RunFolderError(f"--out {self.path} is not writable: cannot write {LOCK} "
                                     f"({error.strerror or error}); choose another --out") from None
            raise _not_a_lock_file(self.path, kind) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise _not_a_lock_file(self.path, "a FIFO" if stat.S_ISFIFO(mode)
                                       else "not a regular file")
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def _check_holds_no_other_run(self, state, log):
        existing = self.path / checkpoint.FILENAME
        if existing.exists():
            if state is None or not _same_file(existing, state.path):
                raise RunFolderError(
                    f"--out {self.path} already holds {checkpoint.FILENAME} from another run; "
                    f"continue it with --resume {self.path}, or choose another --out (nothing was "
                    "changed)")
            return
        stale = [name for name in (METRICS, FINAL) if (self.path / name).exists()]
        if stale and state is None:
            log(f"note: --out {self.path} holds {', '.join(stale)} but no checkpoint (a run that "
                "stopped before its first save): starting the run there afresh")

    def _remove_temporaries(self):
        """Temporaries of writes that a killed run never finished (we hold the lock: none is live)."""
        for name in os.listdir(self.path):
            if any(is_temporary_of(name, target) for target in RESULTS):
                try:
                    os.unlink(self.path / name)
                except OSError:
                    pass

    def release(self, abandon=False):
        """Drop the lock. abandon: also remove the folder if open() created it and nothing was
        written there (a start that failed leaves no empty folder behind)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the only descriptor drops the flock
            self._lock_fd = None
        if abandon and self._created:
            try:
                if (self.path / LOCK).is_file() and not (self.path / LOCK).is_symlink():
                    (self.path / LOCK).unlink()
                self.path.rmdir()
            except OSError:
                pass

    # ---- resume ----------------------------------------------------------------------------
    def resume_records(self, state):
        """The metrics records of the epochs `state` holds, and the views rewritten to match.

        Checkpoints carry their records; one written before they did falls back on the
        metrics.jsonl beside it, read leniently (a line that is not UTF-8 or JSON, or whose epoch
        is not a whole number within the checkpoint's, is dropped). Either way a record whose
        metrics are not numbers in their range is dropped as damaged (is_intact_record)."""
        if state.metrics is not None:
            records = [record for record in state.metrics if is_intact_record(record)]
        else:
            records = _read_records(state.path.parent / METRICS, state.epoch)
        self.write_metrics(records)
        return records

    # ---- commit ----------------------------------------------------------------------------
    def commit(self, save_checkpoint, records, final):
        """Commit an epoch: save_checkpoint() (which stores `records`) first, then the views."""
        self.check_still_locked()
        save_checkpoint()
        self.write_metrics(records)
        self.write_final(final)

    def write_metrics(self, records):
        text = "".join(json.dumps(record, allow_nan=True) + "\n" for record in records)
        write_atomically(self.path / METRICS, lambda file: file.write(text.encode()))

    def write_final(self, final):
        text = json.dumps(final, indent=1) + "\n"
        write_atomically(self.path / FINAL, lambda file: file.write(text.encode()))

    def write_eval(self, record):
        self.path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=1) + "\n"
        write_atomically(self.path / EVAL, lambda file: file.write(text.encode()))


def _not_a_lock_file(path, kind):
    return RunFolderError(f"--out {path}: {LOCK} is {kind}, not the regular file a run writes its "
                          f"pid into; remove it (nothing was changed)")


def _read_pid(path):
    """The pid in a .lock file, or None (missing, unreadable, a link or not a regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip() \
            if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    finally:
        os.close(fd)
    return text if text.isdigit() else None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _read_records(path, up_to_epoch):
    """The epoch records 1..up_to_epoch of a metrics.jsonl (none when it cannot be read)."""
    try:
        lines = Path(require_regular_file(path)).read_bytes().splitlines()
    except OSError:  # missing, or a FIFO that would block the read
        return []
    return parse_metrics(lines, up_to_epoch)


def parse_metrics(lines, up_to_epoch=None):
    """The epoch records in metrics.jsonl's lines (bytes), in epoch order.

    A line that is not a UTF-8 JSON object whose epoch is a whole number >= 1 (a torn or damaged
    line, an epoch of NaN, "1", true or 2.5), or whose metrics are not numbers in their range (a
    test_acc of "0.9", null, [1] or 1e308), is skipped; when an epoch appears twice, its last line
    wins; epochs past up_to_epoch are left out.
    """
    by_epoch = {}
    for line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if is_intact_record(record) and (up_to_epoch is None or record["epoch"] <= up_to_epoch):
            by_epoch[record["epoch"]] = record
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


# The metrics of an epoch record and the range of each: what a resume reports and train.py prints
# (a test_acc of 1e308 would print as "inf%", a string would crash the print).
_FRACTIONS = ("train_acc", "test_acc", "val_acc")
_AMOUNTS = ("train_loss", "test_loss", "val_loss", "lr", "seconds", "images_per_s")


def is_intact_record(record):
    """Whether `record` is an epoch record as the trainer writes it: a JSON object whose epoch is a
    whole number >= 1, whose accuracies are numbers in [0, 1] and whose losses, lr, seconds and
    speed are numbers >= 0 (images_per_s may be null: an epoch that took no measurable time)."""
    if not isinstance(record, dict):
        return False
    epoch = record.get("epoch")
    if type(epoch) is not int or epoch < 1:
        return False
    for key in _FRACTIONS + _AMOUNTS:
        if key not in record or (key == "images_per_s" and record[key] is None):
            continue
        value = record[key]
        if type(value) not in (int, float) or not value >= 0:   # NaN fails value >= 0
            return False
        if key in _FRACTIONS and value > 1:
            return False
    return True


# ---------------------------------------------------------------------------------------------
# Stop signals.

class StopSignals:
    """While active, the first SIGINT, SIGTERM or SIGHUP only sets `requested` to its number
    (checked between steps); a second one raises KeyboardInterrupt(signum) at once. Installed only
    from the main thread (elsewhere signals are left alone), and not for a signal that is ignored
    (SIG_IGN, as nohup leaves SIGHUP): the process was started not to stop on it."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def __enter__(self):
        self.requested = None
        try:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS
                              if signal.getsignal(signum) != signal.SIG_IGN}
        except ValueError:  # not the main thread
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt(signum)
        self.requested = signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def signal_name(signum):
    """How a message names the signal: Ctrl-C, SIGTERM, SIGHUP."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name

