"""Writing and reading files safely: atomic replacement, the user's umask, regular files only.

    write_atomically(path, lambda file: file.write(data))   # the old file or the new one, never half
    require_regular_file(path)                               # raise OSError for a FIFO, device, folder
    shape, fortran_order, dtype = read_npy_header(file)     # or ValueError, whatever the bytes

`write_atomically` writes a temporary file `.<name>.<random>.tmp` in the target's folder, flushes and
fsyncs it, gives it the mode a plain `open()` would have (0666 less the umask: 0644 normally;
`tempfile.mkstemp` alone makes it 0600, unreadable to other users and tools), renames it onto the
target (atomic on one file system) and fsyncs the folder so the rename survives a power cut. A
killed process can leave its temporary behind: `is_temporary_of` names them so that the next run
in the folder can remove them.

`read_npy_header` reads the header that starts every `.npy` file (its dtype and shape) so that a
reader can bound what the data will cost before reading it; the checkpoint and the dataset cache
both do.
"""
import os
import stat
import tempfile
import tokenize
import warnings
from pathlib import Path

import numpy as np

__all__ = ["write_atomically", "require_regular_file", "is_temporary_of", "umask_mode",
           "read_npy_header"]

TEMPORARY_SUFFIX = ".tmp"


def umask_mode(mode=0o666):
    """`mode` less the process's umask: the mode open() gives a new file."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mode & ~mask


def write_atomically(path, write):
    """Call write(binary file) on a temporary next to `path`, then rename it onto `path`.

    Raises OSError (disk full, no permission, ...) with the target unchanged and no temporary left.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX,
                                         dir=folder)
    try:
        os.fchmod(handle, umask_mode())
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    _fsync_folder(folder)
    return path


def _fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic


def is_temporary_of(filename, target_name):
    """Whether `filename` is a temporary that write_atomically(…/target_name) leaves when killed."""
    return filename.startswith(f".{target_name}.") and filename.endswith(TEMPORARY_SUFFIX)


def require_regular_file(path):
    """Raise OSError unless `path` is a regular file (a FIFO would block a read, a device is endless)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "not a regular file")
        raise OSError(f"{path} is {kind}, not a regular file")
    return path


def read_npy_header(file):
    """(shape, fortran_order, dtype) of the .npy header at `file`'s position, leaving the file at
    the first byte of data. Raises ValueError, with a message of bounded length, for anything but
    a version 1.0 or 2.0 header of an array whose dimensions are whole numbers >= 0.

    NumPy's own parser lets other errors and warnings out of a mangled header (its fallback for
    Python 2 headers runs Python's tokenizer: tokenize.TokenError) and accepts negative
    dimensions, which would turn a running total of elements negative.
    """
    try:
        # A header that makes NumPy warn (a deprecated dtype alias, a Python 2 header) is not one
        # np.save writes today: refused like any other, not printed as NumPy's warning.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            version = np.lib.format.read_magic(file)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
            elif version == (2, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
            else:
                raise ValueError(f".npy format version {version}, expected 1.0 or 2.0")
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError, RecursionError,
            OverflowError, UnicodeDecodeError, Warning) as error:
        text = " ".join(str(error).split())   # NumPy's messages can run over several lines
        text = text if len(text) <= 200 else text[:200] + "..."
        raise ValueError(f"unreadable .npy header ({type(error).__name__}: {text})") from None
    if min(shape, default=0) < 0:
        raise ValueError(f".npy header announces shape {str(shape)[:100]}: a dimension is "
                         "negative")
    return shape, fortran_order, dtype
