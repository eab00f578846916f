"""The data layer: downloads, the five readers, the cache, preprocessing, batches and augmentation.

Every reader runs on small files the tests write in the real formats (pickled CIFAR batches in a
tar.gz, SVHN MATLAB files, gzipped IDX). Their digests differ from the published ones, so the tests
pass their own source table (`sources=`) instead of weakening verification. Downloads run against
a loopback HTTP server with Range support. The real-data test reads Debian's Fashion-MNIST.
"""
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import GPU_PATHS_AND_TF32, tf32, use_device
from ninpy import backend, datasets, download as download_module
from ninpy.data import (Augmentations, GcnZca, RandomCropFlip, RandomErase, Standardize, batches,
                        crop_flip, erase_boxes, fit_gcn_zca, gcn, random_crop_flip,
                        split_validation)
from ninpy.datasets import DataError, load_dataset
from ninpy.download import download

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """No sleep between retries; no system copy of Fashion-MNIST unless a test asks for one."""
    monkeypatch.setattr(download_module, "BACKOFF", 0.0)
    monkeypatch.setattr(download_module, "TIMEOUT", 5.0)
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {})


def md5(data):
    return hashlib.md5(data).hexdigest()


def test_sources(name, files, urls=None):
    """SOURCES[name] with the digests of the test's own files (and optionally other URLs)."""
    out = []
    for source in datasets.SOURCES[name]:
        if source.filename not in files:
            out.append(source)
            continue
        out.append(dataclasses.replace(source, digest=md5(files[source.filename]), content_md5=None,
                                       urls=source.urls if urls is None else urls(source.filename)))
    return tuple(out)


test_sources.__test__ = False  # a helper, not a test


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


# ---------------------------------------------------------------------------------------------
# Small files in the real formats.

def tar_gz(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def cifar10_files(rng, per_batch=3):
    """cifar-10-python.tar.gz with five training batches, a test batch and batches.meta."""
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    members, xs, ys = {}, {"train": [], "test": []}, {"train": [], "test": []}
    parts = [(f"data_batch_{i}", "train") for i in range(1, 6)] + [("test_batch", "test")]
    for member, split in parts:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": member.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"img%d.png" % i for i in range(per_batch)]}
        members[f"cifar-10-batches-py/{member}"] = pickle.dumps(batch, protocol=2)
        xs[split].append(data.reshape(-1, 3, 32, 32))
        ys[split].append(labels)
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(
        {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, protocol=2)
    expected = {split: (np.concatenate(xs[split]), np.concatenate(ys[split])) for split in xs}
    return {"cifar-10-python.tar.gz": tar_gz(members)}, expected, [n.decode() for n in names]


def cifar100_files(rng, n=5):
    names = [b"class%d" % i for i in range(100)]
    members, expected = {}, {}
    for split in ("train", "test"):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, n)]
        members[f"cifar-100-python/{split}"] = pickle.dumps(
            {b"filenames": [b"x"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
             b"coarse_labels": [v // 5 for v in fine], b"data": data})
        expected[split] = (data.reshape(-1, 3, 32, 32), np.array(fine))
    members["cifar-100-python/meta"] = pickle.dumps(
        {b"fine_label_names": names, b"coarse_label_names": [b"super%d" % i for i in range(20)]})
    return {"cifar-100-python.tar.gz": tar_gz(members)}, expected, [n.decode() for n in names]


def svhn_file(rng, n):
    """A .mat file as SVHN writes it: X (32, 32, 3, N) uint8, y (N, 1) with 10 for the digit 0."""
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    digits = np.arange(n) % 10
    y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"X": x, "y": y})
    return buffer.getvalue(), x, digits


def idx_bytes(array, magic_type=0x08):
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def mnist_files(rng, n_train=7, n_test=4):
    files, expected = {}, {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        files[f"{prefix}-images-idx3-ubyte.gz"] = idx_bytes(x)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = idx_bytes(y)
        expected[split] = (x[:, None], y.astype(np.int64))
    return files, expected


# ---------------------------------------------------------------------------------------------
# Readers.

def test_cifar10_reads_the_python_tar(tmp_path):
    files, expected, names = cifar10_files(np.random.default_rng(0))
    write(tmp_path / "cifar10", files)
    ds = load_dataset("cifar10", tmp_path, download=False, sources=test_sources("cifar10", files))
    assert ds.x_train.dtype == np.uint8 and ds.x_train.shape == (15, 3, 32, 32)
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    np.testing.assert_array_equal(ds.y_train, expected["train"][1])
    np.testing.assert_array_equal(ds.x_test, expected["test"][0])
    np.testing.assert_array_equal(ds.y_test, expected["test"][1])
    assert list(ds.classes) == names and ds.num_classes == 10 and ds.in_channels == 3


def test_cifar100_reads_fine_labels(tmp_path):
    files, expected, names = cifar100_files(np.random.default_rng(1))
    write(tmp_path / "cifar100", files)
    sources = test_sources("cifar100", files)
    ds = load_dataset("CIFAR-100", tmp_path, download=False, sources=sources)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    np.testing.assert_array_equal(ds.y_test, expected["test"][1])
    assert ds.num_classes == 100 and list(ds.classes) == names


def test_svhn_reads_mat_files_label_10_is_zero_and_extra_is_optional(tmp_path):
    rng = np.random.default_rng(2)
    (train, x_train, d_train), (test, _, d_test), (extra, x_extra, d_extra) = (
        svhn_file(rng, 12), svhn_file(rng, 5), svhn_file(rng, 3))
    files = {"train_32x32.mat": train, "test_32x32.mat": test, "extra_32x32.mat": extra}
    sources = test_sources("svhn", files)
    write(tmp_path / "svhn", {"train_32x32.mat": train, "test_32x32.mat": test})
    ds = load_dataset("svhn", tmp_path, download=False, sources=sources)
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(ds.y_train, d_train)
    np.testing.assert_array_equal(ds.y_test, d_test)
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9
    # X[h, w, c, n] is pixel (h, w) of channel c of image n.
    np.testing.assert_array_equal(ds.x_train[4, 2, 7, 11], x_train[7, 11, 2, 4])
    with pytest.raises(DataError, match="extra_32x32.mat"):
        load_dataset("svhn", tmp_path, download=False, sources=sources, svhn_extra=True)
    write(tmp_path / "svhn", {"extra_32x32.mat": extra})
    ds = load_dataset("svhn", tmp_path, download=False, sources=sources, svhn_extra=True)
    assert ds.x_train.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train[12:], x_extra.transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(ds.y_train[12:], d_extra)


def test_mnist_reads_gzipped_idx(tmp_path):
    files, expected = mnist_files(np.random.default_rng(3))
    write(tmp_path / "mnist", files)
    ds = load_dataset("mnist", tmp_path, download=False, sources=test_sources("mnist", files))
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    np.testing.assert_array_equal(ds.y_test, expected["test"][1])
    assert ds.in_channels == 1 and ds.classes == tuple("0123456789")
    assert ds.limit(2).x_train.shape == (2, 1, 28, 28) and ds.limit(2).y_test.shape == (2,)


def test_recompressed_copy_in_a_system_dir_is_verified_by_content(tmp_path, monkeypatch):
    """Like Debian's Fashion-MNIST: other gzip bytes, same IDX inside; cache goes to data_dir."""
    files, expected = mnist_files(np.random.default_rng(4))
    recompressed = {name: gzip.compress(gzip.decompress(data), compresslevel=1, mtime=12345)
                    for name, data in files.items()}
    system = tmp_path / "system"
    write(system, recompressed)
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"fashion-mnist": (str(system),)})
    sources = tuple(dataclasses.replace(source, digest=md5(files[source.filename]),
                                        content_md5=md5(gzip.decompress(files[source.filename])))
                    for source in datasets.SOURCES["fashion-mnist"])
    assert all(md5(recompressed[s.filename]) != s.digest for s in sources)
    ds = load_dataset("fashion_mnist", tmp_path / "data", download=False, sources=sources)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    assert (tmp_path / "data" / "fashion-mnist" / "x_train.npy").exists()
    assert sorted(os.listdir(system)) == sorted(files)  # nothing written into the system dir

    cut = recompressed["t10k-labels-idx1-ubyte.gz"][:-9]
    (system / "t10k-labels-idx1-ubyte.gz").write_bytes(cut)
    (tmp_path / "data" / "fashion-mnist" / "ninpy-cache.json").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*mismatch.*reinstall"):
        load_dataset("fashion-mnist", tmp_path / "data", download=False, sources=sources)


# ---------------------------------------------------------------------------------------------
# Broken files: an error that names the file and what to do, never garbage.

def test_bad_digest_names_file_expected_and_got(tmp_path):
    files, _ = mnist_files(np.random.default_rng(5))
    sources = test_sources("mnist", files)
    files["train-labels-idx1-ubyte.gz"] = files["train-labels-idx1-ubyte.gz"][:-5]  # truncated
    write(tmp_path / "mnist", files)
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, download=False, sources=sources)
    message = str(error.value)
    expected_md5 = next(s.digest for s in sources if s.filename == "train-labels-idx1-ubyte.gz")
    assert str(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz") in message
    assert expected_md5 in message and md5(files["train-labels-idx1-ubyte.gz"]) in message
    assert "delete it" in message and error.value.kind == "digest"


@pytest.mark.parametrize("damage, match", [
    (lambda data: data[: len(data) // 2], "not a readable CIFAR"),
    (lambda data: b"not a tar at all", "not a readable CIFAR"),
])
def test_corrupt_cifar_archive_with_matching_digest(tmp_path, damage, match):
    files, _, _ = cifar10_files(np.random.default_rng(6))
    files = {name: damage(data) for name, data in files.items()}
    write(tmp_path / "cifar10", files)
    with pytest.raises(DataError, match=match) as error:
        load_dataset("cifar10", tmp_path, download=False, sources=test_sources("cifar10", files))
    assert "cifar-10-python.tar.gz" in str(error.value) and "delete it" in str(error.value)


def test_cifar_archive_missing_a_batch(tmp_path):
    files, _, _ = cifar10_files(np.random.default_rng(7))
    with tarfile.open(fileobj=io.BytesIO(files["cifar-10-python.tar.gz"])) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()
                   if not m.name.endswith("data_batch_3")}
    files = {"cifar-10-python.tar.gz": tar_gz(members)}
    write(tmp_path / "cifar10", files)
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False, sources=test_sources("cifar10", files))


@pytest.mark.parametrize("name, data, match", [
    ("train-images-idx3-ubyte.gz", idx_bytes(np.zeros((7, 28, 28)), magic_type=0x0D), "magic"),
    ("train-images-idx3-ubyte.gz", gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 7, 28, 28)
                                                  + bytes(100)), "promises"),
    ("train-labels-idx1-ubyte.gz", idx_bytes(np.zeros((7, 28, 28))), "1-d IDX label"),
    ("train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(6)), "6 labels for the 7 images"),
    ("train-labels-idx1-ubyte.gz", idx_bytes(np.full(7, 11)), "labels span"),
    ("t10k-images-idx3-ubyte.gz", gzip.compress(bytes(5000))[:-20], "not a complete gzip"),
], ids=["magic", "size", "labels-3d", "count", "range", "gzip"])
def test_corrupt_idx_with_matching_digest(tmp_path, name, data, match):
    files, _ = mnist_files(np.random.default_rng(8))
    files[name] = data
    write(tmp_path / "mnist", files)
    with pytest.raises(DataError, match=match) as error:
        load_dataset("mnist", tmp_path, download=False, sources=test_sources("mnist", files))
    assert name in str(error.value)


def test_corrupt_svhn_mat(tmp_path):
    rng = np.random.default_rng(9)
    files = {"train_32x32.mat": b"MATLAB garbage" * 20, "test_32x32.mat": svhn_file(rng, 2)[0]}
    write(tmp_path / "svhn", files)
    with pytest.raises(DataError, match="train_32x32.mat.*not a readable SVHN"):
        load_dataset("svhn", tmp_path, download=False, sources=test_sources("svhn", files))


def test_unknown_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'imagenet'.*cifar10.*cifar100.*svhn.*mnist"
                                        ".*fashion-mnist"):
        load_dataset("imagenet", tmp_path)


def test_missing_files_without_download_names_files_urls_and_directory(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, download=False)
    message = str(error.value)
    assert error.value.kind == "missing"
    for source in datasets.SOURCES["mnist"]:
        assert source.filename in message and source.urls[0] in message
    assert str(tmp_path / "mnist") in message


def test_offline_names_files_urls_and_directory(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    files, _ = mnist_files(np.random.default_rng(10))
    base = f"http://127.0.0.1:{port}/"
    sources = test_sources("mnist", files, urls=lambda name: (base + name,))
    with pytest.raises(DataError) as error:
        load_dataset("mnist", tmp_path, sources=sources, progress=False)
    message = str(error.value)
    assert error.value.kind == "offline"
    assert all(name in message and base + name in message for name in files)
    assert str(tmp_path / "mnist") in message and "network" in message
    assert "Connection refused" in message
    assert not list((tmp_path / "mnist").glob("*.gz"))


def test_unwritable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot write the download there.*writable data directory"):
        load_dataset("mnist", blocker, progress=False)


# ---------------------------------------------------------------------------------------------
# The .npy cache.

def test_second_load_reads_the_cache_without_touching_raw_files(tmp_path, monkeypatch):
    files, _, _ = cifar10_files(np.random.default_rng(11))
    write(tmp_path / "cifar10", files)
    sources = test_sources("cifar10", files)
    first = load_dataset("cifar10", tmp_path, download=False, sources=sources)
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").unlink()
    monkeypatch.setattr(datasets, "_READERS", {})  # any attempt to parse would fail
    second = load_dataset("cifar10", tmp_path, download=False, sources=sources)
    for field in ("x_train", "y_train", "x_test", "y_test", "classes"):
        np.testing.assert_array_equal(getattr(second, field), getattr(first, field))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped byte"])
def test_corrupt_cache_is_rebuilt_from_the_raw_files(tmp_path, damage):
    files, expected = mnist_files(np.random.default_rng(12))
    write(tmp_path / "mnist", files)
    sources = test_sources("mnist", files)
    load_dataset("mnist", tmp_path, download=False, sources=sources)
    cached = tmp_path / "mnist" / "x_train.npy"
    data = bytearray(cached.read_bytes())
    if damage == "garbage":
        data = b"\x93NUMPY garbage"
    elif damage == "truncated":
        data = data[:-100]
    else:
        data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="rebuilding"):
        ds = load_dataset("mnist", tmp_path, download=False, sources=sources)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    np.testing.assert_array_equal(np.load(cached), expected["train"][0])  # the cache is whole again


def test_cache_of_other_sources_is_not_reused(tmp_path):
    files, _ = mnist_files(np.random.default_rng(13))
    write(tmp_path / "mnist", files)
    load_dataset("mnist", tmp_path, download=False, sources=test_sources("mnist", files))
    other, expected = mnist_files(np.random.default_rng(14))
    write(tmp_path / "mnist", other)
    ds = load_dataset("mnist", tmp_path, download=False, sources=test_sources("mnist", other))
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NINPY_DATA", str(tmp_path))
    assert datasets.default_data_dir() == tmp_path
    monkeypatch.delenv("NINPY_DATA")
    assert datasets.default_data_dir() == Path.home() / ".cache" / "ninpy"


# ---------------------------------------------------------------------------------------------
# Downloads against a loopback server that supports Range requests.

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        data = server.files.get(self.path)
        asked = self.headers.get("Range")
        server.log.append((self.path, asked))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if asked and not server.ignore_range:
            start = int(asked.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in server.cut_once:  # send half, then drop the connection
            server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.log, httpd.cut_once, httpd.ignore_range = {}, [], set(), False
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    httpd.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


PAYLOAD = np.random.default_rng(15).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_download_success(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    path = download(server.base + "/f.bin", tmp_path / "f.bin", md5(PAYLOAD), progress=False)
    assert path.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    download(server.base + "/f.bin", tmp_path / "g.bin", sha, "sha256", progress=False)
    assert (tmp_path / "g.bin").read_bytes() == PAYLOAD


def test_download_digest_mismatch_leaves_nothing_in_place(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    with pytest.raises(DataError) as error:
        download(server.base + "/f.bin", tmp_path / "f.bin", "0" * 32, progress=False)
    message = str(error.value)
    assert "f.bin" in message and "0" * 32 in message and md5(PAYLOAD) in message
    assert error.value.kind == "digest"
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_interrupted_transfer_resumes_with_range_and_verifies(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    server.cut_once.add("/f.bin")
    download(server.base + "/f.bin", tmp_path / "f.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.log[0] == ("/f.bin", None)
    assert server.log[1] == ("/f.bin", f"bytes={len(PAYLOAD) // 2}-")


def test_server_ignoring_range_restarts_from_zero(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    server.ignore_range = True
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:1000])  # an earlier, interrupted run
    download(server.base + "/f.bin", tmp_path / "f.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert server.log == [("/f.bin", "bytes=1000-")]


def test_stale_partial_file_of_other_bytes_is_downloaded_again(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(b"\xff" * 1000)
    download(server.base + "/f.bin", tmp_path / "f.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert [asked for _, asked in server.log] == ["bytes=1000-", None]


def test_complete_partial_file_is_verified_and_moved(tmp_path, server):
    server.files["/f.bin"] = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download(server.base + "/f.bin", tmp_path / "f.bin", md5(PAYLOAD), progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD


def test_http_error_names_the_file(tmp_path, server):
    with pytest.raises(DataError, match=r"nope.bin: .*HTTP 404.*put it at") as error:
        download(server.base + "/nope.bin", tmp_path / "nope.bin", "0" * 32, progress=False)
    assert error.value.kind == "http" and len(server.log) == 1  # a 404 is not retried


def test_load_dataset_downloads_with_mirror_fallback_then_uses_the_cache(tmp_path, server):
    files, expected = mnist_files(np.random.default_rng(16))
    server.files.update({"/mirror/" + name: data for name, data in files.items()})
    server.cut_once.add("/mirror/train-images-idx3-ubyte.gz")
    sources = test_sources("mnist", files, urls=lambda name: (server.base + "/gone/" + name,
                                                              server.base + "/mirror/" + name))
    ds = load_dataset("mnist", tmp_path, sources=sources, progress=False)
    np.testing.assert_array_equal(ds.x_train, expected["train"][0])
    np.testing.assert_array_equal(ds.y_test, expected["test"][1])
    assert sorted(p.name for p in (tmp_path / "mnist").glob("*.gz")) == sorted(files)
    requests = len(server.log)
    load_dataset("mnist", tmp_path, sources=sources, progress=False)
    assert len(server.log) == requests


def test_download_digest_mismatch_through_load_dataset(tmp_path, server):
    files, _ = mnist_files(np.random.default_rng(17))
    sources = test_sources("mnist", files, urls=lambda name: (server.base + "/" + name,))
    server.files.update({"/" + name: data for name, data in files.items()})
    server.files["/t10k-images-idx3-ubyte.gz"] = files["t10k-images-idx3-ubyte.gz"][:-1] + b"!"
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: md5 mismatch"):
        load_dataset("mnist", tmp_path, sources=sources, progress=False)
    assert not (tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz").exists()


# ---------------------------------------------------------------------------------------------
# Batches and augmentation.

def collect(iterator):
    xs, ys = zip(*iterator)
    return np.concatenate(xs), np.concatenate(ys)


def test_batches_are_a_pure_function_of_seed_and_epoch():
    x = np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1) * np.ones((1, 1, 4, 4), np.uint8)
    y = np.arange(50)
    augment = partial(random_crop_flip, pad=1, flip=True)
    run = partial(batches, x, y, 8, shuffle=True, seed=3, device="cpu", augment=augment)
    a, b = collect(run(epoch=2)), collect(run(epoch=2))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    epoch2 = run(epoch=2)
    np.testing.assert_array_equal(collect(epoch2)[0], collect(epoch2)[0])  # iterable twice
    c = collect(run(epoch=3))
    assert not np.array_equal(a[1], c[1])
    assert sorted(a[1]) == list(range(50)) and sorted(c[1]) == list(range(50))
    assert not np.array_equal(collect(run(epoch=2, seed=4))[1], a[1])


def test_batches_sizes_order_and_drop_last():
    x, y = np.zeros((10, 1, 2, 2), np.uint8), np.arange(10)
    plain = batches(x, y, 4)
    assert len(plain) == 3 and [len(b[1]) for b in plain] == [4, 4, 2]
    np.testing.assert_array_equal(collect(plain)[1], y)  # no shuffle: the stored order
    dropped = batches(x, y, 4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and [len(b[1]) for b in dropped] == [4, 4]
    xb, yb = next(iter(batches(x, y, 4, transform=lambda v: v.astype(np.float32) + 1)))
    assert xb.dtype == np.float32 and yb.dtype == np.int64 and (xb == 1).all()


def test_crop_reproduces_the_expected_window_and_flip_mirrors():
    rng = np.random.default_rng(18)
    batch = rng.integers(1, 256, (3, 2, 5, 6), dtype=np.uint8)
    pad, oy, ox = 2, np.array([0, 2, 4]), np.array([4, 1, 0])
    out = crop_flip(batch, pad, oy, ox)
    padded = np.pad(batch, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for n in range(3):
        np.testing.assert_array_equal(out[n], padded[n, :, oy[n]:oy[n] + 5, ox[n]:ox[n] + 6])
    assert out.dtype == batch.dtype
    # Offset (0, 4): the top two rows are padding, the window starts at column 2 of the image.
    assert (out[0, :, :2] == 0).all()
    np.testing.assert_array_equal(out[0, :, 2:, :4], batch[0, :, :3, 2:])
    flipped = crop_flip(batch, pad, oy, ox, flips=np.array([True, False, True]))
    np.testing.assert_array_equal(flipped[0], out[0, :, :, ::-1])
    np.testing.assert_array_equal(flipped[1], out[1])
    np.testing.assert_array_equal(flipped[2], out[2, :, :, ::-1])
    centred = crop_flip(batch, pad, np.full(3, pad), np.full(3, pad), np.ones(3, bool))
    np.testing.assert_array_equal(centred, batch[..., ::-1])


def test_random_crop_flip_shapes_and_draws():
    batch = np.random.default_rng(19).random((16, 3, 8, 8)).astype(np.float32)
    out = random_crop_flip(batch, pad=3, flip=True, rng=np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.float32
    again = random_crop_flip(batch, pad=3, flip=True, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(random_crop_flip(batch, pad=0, flip=False,
                                                   rng=np.random.default_rng(1)), batch)
    # Every output window is one of the (2*pad+1)^2 crops of the padded image, maybe mirrored.
    padded = np.pad(batch, ((0, 0), (0, 0), (3, 3), (3, 3)))
    for n in range(16):
        windows = [padded[n, :, i:i + 8, j:j + 8] for i in range(7) for j in range(7)]
        windows += [w[..., ::-1] for w in windows]
        assert any(np.array_equal(out[n], w) for w in windows)


def erased_by_loop(batch, top, left, heights, widths):
    """erase_boxes written image by image, the reference."""
    out = batch.copy()
    for n in range(len(batch)):
        out[n, :, top[n]:top[n] + heights[n], left[n]:left[n] + widths[n]] = 0
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_erase_boxes_matches_a_loop_over_images(n, h, w, seed):
    rng = np.random.default_rng(seed)
    batch = rng.integers(1, 256, (n, 2, h, w), dtype=np.uint8)
    heights, widths = rng.integers(0, h + 1, n), rng.integers(1, w + 1, n)
    top, left = rng.integers(0, h - heights + 1), rng.integers(0, w - widths + 1)
    out = erase_boxes(batch, top, left, heights, widths)
    assert out.dtype == batch.dtype
    np.testing.assert_array_equal(out, erased_by_loop(batch, top, left, heights, widths))


@pytest.mark.parametrize("h, w", [(28, 28), (32, 32), (5, 3), (1, 1)])
def test_random_erase_rectangles_have_the_drawn_area_and_lie_inside(h, w):
    erase = RandomErase(p=1.0)
    top, left, heights, widths = erase.boxes(erase.draw(4000, np.random.default_rng(3)), h, w)
    assert (heights >= 1).all() and (widths >= 1).all()
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + heights <= h).all() and (left + widths <= w).all()
    if h * w >= 28 * 28:   # rounding aside, 2% to 33% of the image, aspect ratio 0.3 to 3.3
        area = heights * widths / (h * w)
        assert 0.015 < area.min() and area.max() < 0.40 and 0.12 < area.mean() < 0.2
        assert (heights / widths).min() > 0.2 and (heights / widths).max() < 4.5   # small ones round
    some = RandomErase(p=0.25).boxes(RandomErase(p=0.25).draw(4000, np.random.default_rng(4)), h, w)
    assert 0.22 < (some[2] > 0).mean() < 0.28     # p: the fraction of images erased


def test_random_erase_blackens_one_rectangle_and_leaves_the_rest():
    batch = np.random.default_rng(5).integers(1, 256, (64, 3, 28, 28), dtype=np.uint8)
    out = RandomErase(p=0.5)(batch, rng=np.random.default_rng(6))
    draws = RandomErase(p=0.5).draw(64, np.random.default_rng(6))
    np.testing.assert_array_equal(out, erased_by_loop(batch, *RandomErase.boxes(draws, 28, 28)))
    erased = (out == 0).all(axis=1).any(axis=(1, 2))
    assert 15 < erased.sum() < 50
    np.testing.assert_array_equal(out[~erased], batch[~erased])
    np.testing.assert_array_equal(RandomErase(p=0.0)(batch, rng=np.random.default_rng(6)), batch)
    with pytest.raises(ValueError, match="erase probability"):
        RandomErase(p=1.5)


def test_a_resumed_epoch_replays_every_augmentations_draws():
    x = np.random.default_rng(7).integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    y = np.arange(40)
    augment = Augmentations(RandomCropFlip(pad=1, flip=True), RandomErase(p=0.7))
    epoch = batches(x, y, 8, shuffle=True, seed=2, epoch=1, augment=augment)
    whole = list(epoch)
    for start in (1, 3):
        for (xa, ya), (xb, yb) in zip(whole[start:], epoch.iterate(start)):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)


# ---------------------------------------------------------------------------------------------
# Preprocessing and validation split.

def test_standardize_gives_zero_mean_unit_std_per_channel():
    rng = np.random.default_rng(20)
    x = np.stack([rng.normal(m, s, (300, 6, 6)) for m, s in [(30, 5), (120, 40), (200, 10)]], 1)
    x = np.clip(x, 0, 255).astype(np.uint8)
    norm = Standardize().fit(x)
    z = norm(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)
    restored = Standardize().load_state_dict(norm.state_dict())
    np.testing.assert_array_equal(restored(x[:5]), z[:5])


def test_gcn_scales_each_centred_image_to_norm_55():
    x = np.random.default_rng(21).integers(0, 256, (10, 3, 4, 4), dtype=np.uint8)
    z = gcn(x).reshape(10, -1)
    np.testing.assert_allclose(z.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 55, rtol=1e-5)
    assert np.isfinite(gcn(np.full((2, 1, 3, 3), 7, np.uint8))).all()  # flat image: no 0/0


def test_gcn_zca_decorrelates():
    rng = np.random.default_rng(22)
    dim, n = 3 * 4 * 4, 4000
    mixing = rng.normal(size=(dim, dim)) * 0.1 + np.eye(dim)  # correlated pixels
    x = np.clip(rng.normal(size=(n, dim)) @ mixing * 30 + 128, 0, 255).astype(np.uint8)
    x = x.reshape(n, 3, 4, 4)
    g = gcn(x).reshape(n, -1).astype(np.float64)
    before = np.cov(g, rowvar=False, bias=True)
    zca = fit_gcn_zca(x)
    z = zca(x)
    assert z.dtype == np.float32 and z.shape == x.shape
    after = np.cov(z.reshape(n, -1), rowvar=False, bias=True)
    # Whitening W = U diag(1/sqrt(s + 0.1)) U^T leaves covariance U diag(s / (s + 0.1)) U^T.
    s, u = np.linalg.eigh(before)
    np.testing.assert_allclose(after, (u * (s / (s + 0.1))) @ u.T, atol=2e-4)
    # GCN removes each image's mean, so the all-ones direction has no variance left; the rest comes
    # out white: no correlation between pixels, unit variance.
    ones = np.full(dim, 1 / np.sqrt(dim))
    assert s[0] < 1e-6 and np.abs(u[:, 0] @ ones) > 1 - 1e-6
    np.testing.assert_allclose(after, np.eye(dim) - np.outer(ones, ones), atol=0.01)
    correlation = before / np.sqrt(np.outer(np.diag(before), np.diag(before)))
    assert np.abs(correlation - np.eye(dim)).max() > 0.2  # (it was correlated before)
    np.testing.assert_allclose(z.reshape(n, -1).mean(axis=0), 0, atol=1e-3)
    again = GcnZca.from_state_dict(zca.state_dict())
    np.testing.assert_array_equal(again(x[:3]), zca(x[:3]))


def test_split_validation_is_seeded_and_disjoint():
    x, y = np.arange(100).reshape(100, 1, 1, 1), np.arange(100)
    xt, yt, xv, yv = split_validation(x, y, 20, seed=5)
    assert len(yt) == 80 and len(yv) == 20
    assert sorted(np.concatenate([yt, yv])) == list(range(100))
    np.testing.assert_array_equal(xt.ravel(), yt)
    assert np.all(np.diff(yt) > 0)  # the training part keeps its order
    np.testing.assert_array_equal(split_validation(x, y, 20, seed=5)[3], yv)
    assert not np.array_equal(split_validation(x, y, 20, seed=6)[3], yv)
    with pytest.raises(ValueError, match="n_val"):
        split_validation(x, y, 100)


@pytest.mark.parametrize("device", GPU_PATHS_AND_TF32)
def test_gpu_batches_augmentation_and_preprocessing_match_the_cpu(device, monkeypatch):
    device = use_device(device, monkeypatch)
    xp = backend.module_of_device(device)
    rng = np.random.default_rng(23)
    x = rng.integers(0, 256, (37, 3, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 10, 37)
    norm = Standardize().fit(x)
    assert np.allclose(Standardize().fit(xp.asarray(x)).mean, norm.mean)
    augment = Augmentations(RandomCropFlip(pad=2, flip=True), RandomErase(p=0.5))
    run = partial(batches, x, y, 8, shuffle=True, seed=1, epoch=4, augment=augment, transform=norm)
    for (xc, yc), (xg, yg) in zip(run(device="cpu"), run(device=device)):
        assert backend.device_of(xg) == device and backend.device_of(yg) == device
        np.testing.assert_allclose(backend.to_device(xg, "cpu"), xc, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(backend.to_device(yg, "cpu"), yc)
    x = rng.integers(0, 256, (500, 3, 4, 4), dtype=np.uint8)
    zca = fit_gcn_zca(x)
    # applying the whitening is one float32 product: in TF32 (CUPY_TF32=1) its inputs keep 10
    # mantissa bits, ~5e-4 relative each, summed over 48 terms
    atol = 2e-2 if tf32() else 1e-3
    np.testing.assert_allclose(backend.to_device(zca(xp.asarray(x)), "cpu"), zca(x), atol=atol)
    np.testing.assert_allclose(fit_gcn_zca(xp.asarray(x)).whitening, zca.whitening, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Real data: Debian's Fashion-MNIST.

@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason=f"{DEBIAN_FASHION} missing "
                    "(apt-get install dataset-fashion-mnist)")
def test_debian_fashion_mnist_loads_verified(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {"fashion-mnist": (str(DEBIAN_FASHION),)})
    for source in datasets.SOURCES["fashion-mnist"]:  # digests: the published content, bit for bit
        datasets._verify(DEBIAN_FASHION / source.filename, source, tmp_path)
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64
    assert ds.y_train.min() == 0 and ds.y_train.max() == 9 and set(ds.y_test) == set(range(10))
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert ds.num_classes == 10 and ds.in_channels == 1 and ds.classes[9] == "Ankle boot"
    assert (tmp_path / "fashion-mnist" / "x_train.npy").exists()
