"""The five datasets NIN is trained on: where each comes from, how it is checked, how it is read.

    ds = load_dataset("cifar10")   # ds.x_train uint8 (50000, 3, 32, 32), ds.y_train int64 (50000,)

For each dataset the `SOURCES` table lists the raw files as their authors publish them (official URL
first, then mirrors) with the published digest. `load_dataset` does, in order:

1. the parsed arrays cached as `.npy` in `<data_dir>/<name>/`, when they are there and intact;
2. else the raw files: in `<data_dir>/<name>/`, then in a system copy (Debian's Fashion-MNIST in
   /usr/share/datasets/fashion-mnist), then downloaded (`ninpy.download`); every raw file's digest
   is checked before it is read, and a file that fails is an error naming it and what to do;
3. parses them (pickled CIFAR batches in a tar.gz, SVHN MATLAB files, gzipped IDX), checks shapes
   and labels, and writes the `.npy` cache for next time.

Images come out as uint8 NCHW, labels as int64 in 0..num_classes-1 (SVHN's label 10 is digit 0).
"""
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .download import DataError, download as fetch, file_digest
from .files import read_npy_header, require_regular_file, write_atomically
from . import notices

__all__ = ["DataError", "Dataset", "Source", "DATASETS", "SOURCES", "SYSTEM_DIRS",
           "default_data_dir", "load_dataset", "read_idx"]


@dataclass(frozen=True)
class Source:
    """One raw file of a dataset as its authors publish it.

    `content_md5` is the md5 of the gunzipped bytes: it accepts a copy that a repackager compressed
    again (Debian's Fashion-MNIST files hold the published IDX bytes in a different gzip stream).
    """
    filename: str
    urls: tuple             # the authors' URL first, then mirrors
    digest: str             # published digest of the file's bytes
    algorithm: str = "md5"
    splits: tuple = ("train", "test")   # the splits this file holds
    content_md5: str = None


@dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset in memory: uint8 images (N, C, H, W) and int64 labels, and the class names."""
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def in_channels(self):
        return self.x_train.shape[1]

    @property
    def image_size(self):
        return self.x_train.shape[2:]

    def limit(self, n):
        """The first `n` examples of the training and of the test split (for quick runs)."""
        return replace(self, x_train=self.x_train[:n], y_train=self.y_train[:n],
                       x_test=self.x_test[:n], y_test=self.y_test[:n])


_CIFAR = "https://www.cs.toronto.edu/~kriz/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"
_MNIST = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")
_FASHION = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/")


def _idx_sources(bases, digests):
    """The four gzipped IDX files of an MNIST-like dataset: {filename: (md5, content md5)}."""
    return tuple(Source(name, tuple(base + name for base in bases), md5,
                        splits=("train",) if name.startswith("train") else ("test",),
                        content_md5=content)
                 for name, (md5, content) in digests.items())


SOURCES = {
    "cifar10": (Source("cifar-10-python.tar.gz", (_CIFAR + "cifar-10-python.tar.gz",),
                       "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (Source("cifar-100-python.tar.gz", (_CIFAR + "cifar-100-python.tar.gz",),
                        "eb9058c3a382ffc7106e4002c42a8d85"),),
    "svhn": (Source("train_32x32.mat", (_SVHN + "train_32x32.mat",),
                    "e26dedcc434d2e4c54c9b2d4a06d0373", splits=("train",)),
             Source("test_32x32.mat", (_SVHN + "test_32x32.mat",),
                    "eb5a983be6a315427106f1b164d9cef3", splits=("test",)),
             Source("extra_32x32.mat", (_SVHN + "extra_32x32.mat",),
                    "a93ce644f1a588dc4d68dda5feec44a7", splits=("extra",))),
    # md5 of the .gz as published (torchvision's table), and of the IDX bytes inside.
    "mnist": _idx_sources(_MNIST, {
        "train-images-idx3-ubyte.gz": ("f68b3c2dcbeaaa9fbdd348bbdeb94873",
                                       "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte.gz": ("d53e105ee54ea40749a09fcbcd1e9432",
                                       "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte.gz": ("9fb629c4189551a2d022fa330f9573f3",
                                      "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte.gz": ("ec29112dd5afa0611ce80d1b7f02629c",
                                      "27ae3e4e09519cfbb04c329615203637")}),
    # .gz md5 as in the authors' README; Debian recompresses the files, so its copies match the
    # content md5 instead (checked with md5sum on the gunzipped files of dataset-fashion-mnist).
    "fashion-mnist": _idx_sources(_FASHION, {
        "train-images-idx3-ubyte.gz": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                                       "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte.gz": ("25c81989df183df01b3e8a0aad5dffbe",
                                       "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte.gz": ("bef4ecab320f06d8554ea6380940ec79",
                                      "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte.gz": ("bb300cfdad3c16e7a12a480ee83cd310",
                                      "15d484375f8d13e6eb1aabb0c3f46965")}),
}
DATASETS = tuple(SOURCES)

# Read-only places where a system package may already hold the raw files (checked after data_dir).
SYSTEM_DIRS = {"fashion-mnist": ("/usr/share/datasets/fashion-mnist",)}
_SYSTEM_HINT = {"fashion-mnist": "reinstall Debian's dataset-fashion-mnist package"}

_DIGITS = tuple(str(digit) for digit in range(10))
_FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                    "Sneaker", "Bag", "Ankle boot")
_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist"}
_CACHE_FORMAT = 1


def default_data_dir():
    """Where datasets live unless told otherwise: $NINPY_DATA, else ~/.cache/ninpy."""
    return Path(os.environ.get("NINPY_DATA") or "~/.cache/ninpy").expanduser()


def load_dataset(name, data_dir=None, download=True, svhn_extra=False, *, sources=None,
                 progress=True):
    """Load a dataset by name: "cifar10", "cifar100", "svhn", "mnist" or "fashion-mnist".

    data_dir: the directory holding one folder per dataset (default `default_data_dir()`).
    download: fetch missing raw files from the official URLs; if False, a missing file is an error.
    svhn_extra: for SVHN, append the 531,131 "extra" images to the training split.
    sources: a replacement for SOURCES[name] (tests use it for small files with their own digests).
    """
    key = _ALIASES.get(str(name).strip().lower().replace("_", "-"), str(name).strip().lower()
                       .replace("_", "-"))
    if key not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; the known ones are: {', '.join(DATASETS)}",
                        kind="unknown")
    sources = tuple(SOURCES[key] if sources is None else sources)
    directory = Path(data_dir if data_dir is not None else default_data_dir()).expanduser() / key
    splits = ("train", "test") + (("extra",) if key == "svhn" and svhn_extra else ())

    cache = _Cache(directory, sources, key)
    arrays, classes = cache.load(splits)
    missing = [split for split in splits if split not in arrays]
    if missing:
        needed = [source for source in sources if set(source.splits) & set(missing)]
        files = _obtain(key, needed, directory, download, progress)
        parsed, classes = _READERS[key](files, missing)
        arrays.update(parsed)
        cache.save(parsed, classes)

    x_train, y_train = arrays["train"]
    if "extra" in arrays:
        x_train = np.concatenate([x_train, arrays["extra"][0]])
        y_train = np.concatenate([y_train, arrays["extra"][1]])
    x_test, y_test = arrays["test"]
    return Dataset(key, x_train, y_train, x_test, y_test, tuple(classes))


# ---------------------------------------------------------------------------------------------
# Raw files: find, verify, download.

def _obtain(key, sources, directory, download, progress):
    """{filename: Path} of verified raw files, downloading what is missing when allowed."""
    files, missing = {}, []
    for source in sources:
        path = _find(key, source, directory)
        if path is None:
            missing.append(source)
        else:
            files[source.filename] = path
    if missing and not download:
        raise _missing_error(key, missing, directory, "downloading is off", offline=False)
    for index, source in enumerate(missing):
        path, problems = None, []
        for url in source.urls:
            try:
                path = fetch(url, directory / source.filename, source.digest, source.algorithm,
                             progress=progress)
                break
            except OSError as error:  # writing, not the network: the network is DataError
                raise DataError(f"{directory / source.filename}: cannot write the download there "
                                f"({error}). Choose a writable data directory (data_dir, "
                                "--data-dir or $NINPY_DATA)", kind="io") from None
            except DataError as error:
                if error.kind not in ("offline", "http"):
                    raise  # digest mismatch or truncation: the message already says what to do
                problems.append(error)
        if path is None:
            if all(problem.kind == "offline" for problem in problems):
                reason = problems[-1].reason or problems[-1]
                raise _missing_error(key, missing[index:], directory,
                                     f"cannot reach the server: {reason}")
            raise DataError(f"{key}: no URL of {source.filename} worked:\n"
                            + "\n".join(f"  {problem}" for problem in problems), kind="http")
        files[source.filename] = path
    return files


def _find(key, source, directory):
    """The verified local copy of `source` (data dir first, then system dirs), or None."""
    candidates = [(directory / source.filename, None)]
    candidates += [(Path(folder) / source.filename, _SYSTEM_HINT.get(key))
                   for folder in SYSTEM_DIRS.get(key, ())]
    for path, hint in candidates:
        if path.is_file():
            _verify(path, source, directory, hint)
            return path
    return None


def _verify(path, source, directory, hint=None):
    """Raise DataError unless `path` holds the published bytes (or gunzips to the published IDX)."""
    got = file_digest(path, source.algorithm)
    if got == source.digest.lower():
        return
    if source.content_md5 is not None and _gunzip_md5(path) == source.content_md5:
        return
    size = path.stat().st_size
    todo = (f"{hint}, or put a good copy at {directory / source.filename}" if hint else
            f"delete it and run again to download it, or put a good copy there "
            f"(from {source.urls[0]})")
    raise DataError(f"{path}: {source.algorithm} mismatch: expected {source.digest}, got {got} "
                    f"({size} bytes: truncated or corrupted). To fix it: {todo}", kind="digest")


def _gunzip_md5(path):
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as file:
            for chunk in iter(lambda: file.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def _missing_error(key, missing, directory, why, offline=True):
    listing = "\n".join(f"  {source.filename}  from {' or '.join(source.urls)}"
                        for source in missing)
    todo = "Check the network connection, or download" if offline else "Download"
    return DataError(f"{key}: {len(missing)} raw file(s) missing from {directory} and not "
                     f"downloaded ({why}). {todo} them yourself and put them in {directory}:\n"
                     f"{listing}", kind="offline" if offline else "missing")


def _corrupt(path, what):
    return DataError(f"{path}: {what}. The file passed its digest check, so it is not the "
                     f"published file: delete it and run again to download it again", kind="format")


# ---------------------------------------------------------------------------------------------
# Readers: {filename: Path}, splits -> ({split: (x uint8 NCHW, y int64)}, class names)

def _check(path, x, y, num_classes, shape, label_path=None):
    """The checks every reader ends with: image shape, one label per image, labels in range."""
    label_path = path if label_path is None else label_path
    if x.ndim != 4 or x.shape[1:] != shape:
        raise _corrupt(path, f"images have shape {x.shape}, expected (N, *{shape})")
    if y.shape != (len(x),):
        raise _corrupt(label_path, f"{len(y)} labels for {len(x)} images")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise _corrupt(label_path, f"labels span {y.min()}..{y.max()}, "
                                   f"expected 0..{num_classes - 1}")
    return np.ascontiguousarray(x, dtype=np.uint8), y.astype(np.int64)


_PICKLE_GLOBALS = {("_codecs", "encode"), ("copyreg", "_reconstructor"),
                   ("copy_reg", "_reconstructor")}


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and NumPy arrays); refuses anything else."""

    def find_class(self, module, name):
        if module.split(".")[0] == "numpy" or (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _read_cifar(files, splits, *, members, label_key, meta, names_key):
    (path,) = files.values()
    wanted = {meta, *(member for split in splits for member in members[split])}
    try:
        blobs = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:  # one pass in archive order: no seeking back in the gzip stream
                if member.name in wanted:
                    blobs[member.name] = tar.extractfile(member).read()
        absent = sorted(wanted - set(blobs))
        if absent:
            raise KeyError(f"no member {', '.join(absent)}")

        def unpickle(member):
            return _NumpyUnpickler(io.BytesIO(blobs.pop(member)), encoding="bytes").load()

        classes = tuple(name.decode() for name in unpickle(meta)[names_key])
        out = {}
        for split in splits:
            batches = [unpickle(member) for member in members[split]]
            x = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
            y = np.concatenate([np.asarray(b[label_key], np.int64) for b in batches])
            out[split] = _check(path, x.reshape(len(x), 3, 32, 32), y, len(classes), (3, 32, 32))
    except (tarfile.TarError, EOFError, zlib.error, OSError, KeyError, TypeError, ValueError,
            pickle.UnpicklingError) as error:
        raise _corrupt(path, f"not a readable CIFAR python archive ({type(error).__name__}: "
                             f"{error})") from None
    return out, classes


def _cifar_reader(folder, train_members, test_member, meta, label_key, names_key):
    def read(files, splits):
        return _read_cifar(files, splits, label_key=label_key, names_key=names_key,
                           meta=f"{folder}/{meta}",
                           members={"train": [f"{folder}/{m}" for m in train_members],
                                    "test": [f"{folder}/{test_member}"]})
    return read


def _read_svhn(files, splits):
    import scipy.io
    out = {}
    for split in splits:
        path = files[f"{split}_32x32.mat"]
        try:
            mat = scipy.io.loadmat(path, variable_names=["X", "y"])
            x, y = mat["X"], mat["y"]
        except (ValueError, OSError, KeyError, NotImplementedError, TypeError) as error:
            raise _corrupt(path, f"not a readable SVHN .mat file ({type(error).__name__}: "
                                 f"{error})") from None
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
            raise _corrupt(path, f"X has shape {x.shape} and dtype {x.dtype}, expected "
                                 "(32, 32, 3, N) uint8")
        y = np.asarray(y, np.int64).reshape(-1)
        if len(y) and (y.min() < 1 or y.max() > 10):
            raise _corrupt(path, f"labels span {y.min()}..{y.max()}, expected 1..10")
        y[y == 10] = 0  # SVHN writes digit 0 as label 10
        out[split] = _check(path, x.transpose(3, 2, 0, 1), y, 10, (3, 32, 32))
    return out, _DIGITS


_IDX_TYPES = {0x08: np.uint8}


def read_idx(path):
    """Read a gzipped IDX file (MNIST's format): magic 0 0 type ndim, big-endian sizes, data."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise _corrupt(path, f"not a complete gzip file ({error})") from None
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_TYPES or not data[3]:
        raise _corrupt(path, f"bad IDX magic number {data[:4].hex()} (expected 0000080N)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _corrupt(path, f"IDX header cut short ({len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) != header + int(np.prod(shape)):
        raise _corrupt(path, f"IDX holds {len(data) - header} data bytes, its header {shape} "
                             f"promises {int(np.prod(shape))}")
    return np.frombuffer(data, _IDX_TYPES[data[2]], offset=header).reshape(shape).copy()


def _idx_reader(classes):
    def read(files, splits):
        out = {}
        for split in splits:
            prefix = "train" if split == "train" else "t10k"
            images = files[f"{prefix}-images-idx3-ubyte.gz"]
            labels = files[f"{prefix}-labels-idx1-ubyte.gz"]
            x, y = read_idx(images), read_idx(labels)
            if x.ndim != 3:
                raise _corrupt(images, f"expected a 3-d IDX image file (magic 00000803), "
                                       f"got {x.ndim}-d")
            if y.ndim != 1:
                raise _corrupt(labels, f"expected a 1-d IDX label file (magic 00000801), "
                                       f"got {y.ndim}-d")
            if len(x) != len(y):
                raise _corrupt(labels, f"{len(y)} labels for the {len(x)} images of {images.name}")
            out[split] = _check(images, x[:, None], y, len(classes), (1, 28, 28), labels)
        return out, classes
    return read


_READERS = {
    "cifar10": _cifar_reader("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                             "test_batch", "batches.meta", b"labels", b"label_names"),
    "cifar100": _cifar_reader("cifar-100-python", ["train"], "test", "meta", b"fine_labels",
                              b"fine_label_names"),
    "svhn": _read_svhn,
    "mnist": _idx_reader(_DIGITS),
    "fashion-mnist": _idx_reader(_FASHION_CLASSES),
}


# ---------------------------------------------------------------------------------------------
# The .npy cache: x_<split>.npy, y_<split>.npy and a manifest with their shapes and CRC-32s.
#
# Nothing in the cache is trusted: a manifest that is not what save() writes, or an array whose
# header, size, CRC or labels disagree with it, is rebuilt from the raw files (with a warning). The
# manifest's shapes are bounded by what the dataset can hold (_GEOMETRY) and each file's header and
# size are checked against them before it is read, so no cache file can make us allocate more
# than the real dataset needs, and only regular files are opened (a FIFO would block forever). A
# split of the published files must hold exactly their number of images (a cache of fewer would
# train on part of the data silently), and no split may be empty.

# Image shape, number of classes and the most images each split holds, per dataset.
_GEOMETRY = {
    "cifar10": ((3, 32, 32), 10, {"train": 50000, "test": 10000}),
    "cifar100": ((3, 32, 32), 100, {"train": 50000, "test": 10000}),
    "svhn": ((3, 32, 32), 10, {"train": 73257, "test": 26032, "extra": 531131}),
    "mnist": ((1, 28, 28), 10, {"train": 60000, "test": 10000}),
    "fashion-mnist": ((1, 28, 28), 10, {"train": 60000, "test": 10000}),
}


# The published files' digests, as this module defines them (tests replace SOURCES with their
# own small files; their caches are held to "at least one image" instead of the real counts).
_PUBLISHED = {key: {source.filename: source.digest for source in sources}
              for key, sources in SOURCES.items()}


class _Cache:
    def __init__(self, directory, sources, key):
        self.directory = directory
        self.manifest_path = directory / "ninpy-cache.json"
        self.sources = {source.filename: source.digest for source in sources}
        self.image_shape, self.num_classes, self.max_images = _GEOMETRY[key]
        # The published files hold exactly _GEOMETRY's counts; other sources (tests' small files)
        # at least one image per split.
        self.exact = self.sources == _PUBLISHED[key]

    def _manifest(self, warn=False):
        """The manifest when it is one save() wrote for these sources, else None (with a warning
        when warn and the file is there but malformed)."""
        try:
            require_regular_file(self.manifest_path)
            manifest = json.loads(self.manifest_path.read_bytes().decode("utf-8"))
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
            if manifest.get("format") != _CACHE_FORMAT or manifest.get("sources") != self.sources:
                return None  # another format or other raw files: rebuilt quietly
            self._check_manifest(manifest)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
            if warn:
                notices.warn(f"{self.manifest_path}: unreadable cache manifest ({error}); "
                              "rebuilding the cache from the raw files", stacklevel=4)
            return None
        return manifest

    def _check_manifest(self, manifest):
        """Raise ValueError unless every split entry has the shapes and dtypes save() writes."""
        classes = manifest["classes"]
        if not (isinstance(classes, list) and len(classes) == self.num_classes
                and all(isinstance(name, str) for name in classes)):
            raise ValueError(f"'classes' is not a list of {self.num_classes} names")
        splits = manifest["splits"]
        if not isinstance(splits, dict):
            raise ValueError("'splits' is not a JSON object")
        for split, entry in splits.items():
            if split not in self.max_images or not isinstance(entry, dict):
                raise ValueError(f"unexpected split {split!r}")
            x, y = entry["x"], entry["y"]
            n = x["shape"][0] if isinstance(x, dict) and isinstance(x.get("shape"), list) \
                and x["shape"] else None
            most = self.max_images[split]
            least = most if self.exact else 1
            if type(n) is int and not least <= n <= most:
                raise ValueError(f"split {split!r} holds {n:,} images, the dataset's has "
                                 + (f"{most:,}" if self.exact else f"1 to {most:,}"))
            if not (type(n) is int
                    and x["shape"] == [n, *self.image_shape] and x["dtype"] == "uint8"
                    and isinstance(y, dict) and y.get("shape") == [n] and y.get("dtype") == "int64"
                    and all(type(part.get("crc32")) is int for part in (x, y))):
                raise ValueError(f"split {split!r}: shapes, dtypes or CRCs are not those of "
                                 f"{self.max_images[split]:,} images at most of {self.image_shape}")

    def load(self, splits):
        """({split: (x, y)} for each intact cached split, class names or None)."""
        manifest = self._manifest(warn=True)
        if manifest is None:
            return {}, None
        out = {}
        for split in splits:
            entry = manifest["splits"].get(split)
            if entry is None:
                continue
            try:
                x, y = (self._load_array(f"{part}_{split}.npy", entry[part]) for part in "xy")
                if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                    raise ValueError(f"labels span {y.min()}..{y.max()}, expected "
                                     f"0..{self.num_classes - 1}")
            except (OSError, ValueError, KeyError, EOFError) as error:
                notices.warn(f"{self.directory}: cached {split} split unreadable ({error}); "
                              "rebuilding it from the raw files", stacklevel=3)
                continue
            out[split] = (x, y)
        return out, manifest["classes"]

    def _load_array(self, filename, entry):
        """The array, once its header and size match the (already bounded) manifest entry."""
        path = self.directory / filename
        require_regular_file(path)
        with open(path, "rb") as file:
            try:
                shape, fortran, dtype = read_npy_header(file)
            except ValueError as error:
                raise ValueError(f"{filename}: {error}") from None
            if list(shape) != entry["shape"] or str(dtype) != entry["dtype"] or fortran:
                raise ValueError(f"{filename} has shape {shape} {dtype}, the manifest says "
                                 f"{entry['shape']} {entry['dtype']}")
            expected = file.tell() + math.prod(shape) * dtype.itemsize
            if os.fstat(file.fileno()).st_size != expected:
                raise ValueError(f"{filename} is not {expected} bytes long, as its header implies")
            array = np.fromfile(file, dtype, math.prod(shape)).reshape(shape)
        if zlib.crc32(array) != entry["crc32"]:
            raise ValueError(f"{filename} fails its CRC-32 check")
        return array

    def save(self, arrays, classes):
        """Write each split's arrays (temporary file, then rename), then the manifest."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            manifest = self._manifest() or {"format": _CACHE_FORMAT, "sources": self.sources,
                                            "splits": {}}
            manifest["classes"] = list(classes)
            for split, pair in arrays.items():
                entry = {}
                for part, array in zip("xy", pair):
                    _atomic_save(self.directory / f"{part}_{split}.npy", array)
                    entry[part] = {"shape": list(array.shape), "dtype": str(array.dtype),
                                   "crc32": zlib.crc32(np.ascontiguousarray(array))}
                manifest["splits"][split] = entry
            text = json.dumps(manifest, indent=1).encode()
            write_atomically(self.manifest_path, lambda file: file.write(text))
        except OSError as error:
            notices.warn(f"cannot write the dataset cache in {self.directory} ({error}); the raw "
                          "files will be parsed again next time", stacklevel=3)


def _atomic_save(path, array):
    write_atomically(path, lambda file: np.save(file, array, allow_pickle=False))
