"""Damaged files never lie: flip bits in and cut a small checkpoint and a small dataset cache, and
every outcome is the original content or the one documented line, never a traceback or other data.

Seeded, so a failure names its mutation and repeats. CI runs a bounded number of mutations (a few
seconds each part); NINPY_FUZZ_MUTATIONS=N runs N of each kind, e.g. 9000 as the adversarial round
that found the holes these tests close:

    NINPY_FUZZ_MUTATIONS=9000 python -m pytest tests/test_file_fuzz.py
"""
import os
import random
import warnings

import numpy as np
import pytest

from ninpy import checkpoint, datasets
from ninpy.checkpoint import CheckpointError
from test_checkpoint import trained
from test_data import mnist_files, test_sources, write

MUTATIONS = int(os.environ.get("NINPY_FUZZ_MUTATIONS", "300"))


def mutations(blob, seed, count=MUTATIONS, head=0):
    """(what, damaged bytes): `count` single-bit flips, then `count // 4` cuts. head: half of the
    flips fall in the first `head` bytes (a .npy header, where a flip is the most telling)."""
    rng = random.Random(seed)
    for index in range(count):
        bit = rng.randrange(min(head, len(blob)) * 8 if index % 2 and head else len(blob) * 8)
        damaged = bytearray(blob)
        damaged[bit // 8] ^= 1 << (bit % 8)
        yield f"bit {bit} flipped", bytes(damaged)
    for _ in range(count // 4):
        length = rng.randrange(len(blob))
        yield f"cut to {length} bytes", blob[:length]


# ---------------------------------------------------------------------------------------------
# The checkpoint: an entry larger than zipfile's read-ahead, momentum buffers, metrics records.

def content(state):
    """Everything a loaded checkpoint gives a run, as comparable values."""
    return ({name: array.tobytes() for name, array in state.model.items()},
            {index: array.tobytes() for index, array in state.optimizer["momentum_buffers"].items()},
            state.optimizer["param_groups"], state.epoch, state.batch, state.schedule, state.random,
            state.flags, state.progress, state.metrics)


def test_a_damaged_checkpoint_loads_unchanged_or_is_one_line(tmp_path):
    model, sgd, schedule = trained(widths=((4, 3, 3), (48, 48, None)))
    path = checkpoint.save(tmp_path / "checkpoint.npz", model, sgd, schedule, epoch=2, batch=1,
                           progress={"loss_sum": 3.5, "correct": 2, "seen": 4},
                           flags={"dataset": "mnist", "lr": 0.1},
                           metrics=[{"epoch": 1, "test_acc": 0.5}, {"epoch": 2, "test_acc": 0.25}])
    original = path.read_bytes()
    expected = content(checkpoint.load(path))
    outcomes = {"same": 0, "refused": 0}
    for what, damaged in mutations(original, seed=2023):
        path.write_bytes(damaged)
        try:
            state = checkpoint.load(path)
        except CheckpointError as error:
            message = str(error)
            assert "\n" not in message and str(path) in message and len(message) < 800, what
            outcomes["refused"] += 1
        except Exception as error:  # the failure this test exists to catch: say which mutation
            raise AssertionError(f"{what}: {type(error).__name__}: {error}") from error
        else:
            assert content(state) == expected, f"{what}: loaded other content"
            outcomes["same"] += 1
    assert outcomes["refused"] > outcomes["same"] > 0   # both kinds happen: the test can tell


# ---------------------------------------------------------------------------------------------
# The dataset cache: every mutation of an array or the manifest ends in the same arrays (read from
# the intact cache, or rebuilt from the raw files with one warning line).

CACHE_FILES = ("x_train.npy", "y_train.npy", "x_test.npy", "y_test.npy", "ninpy-cache.json")


def test_a_damaged_dataset_cache_gives_the_same_arrays_or_one_warning_line(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # each rebuild's durability is not under test
    files, _ = mnist_files(np.random.default_rng(0), n_train=40, n_test=12)
    folder = tmp_path / "mnist"
    write(folder, files)
    sources = test_sources("mnist", files)

    def load():
        return datasets.load_dataset("mnist", tmp_path, download=False, sources=sources,
                                     progress=False)

    reference = load()
    cached = {name: (folder / name).read_bytes() for name in CACHE_FILES}
    rng = random.Random(23)
    per_file = max(MUTATIONS // len(CACHE_FILES), 1)
    for name in CACHE_FILES:
        head = 128 if name.endswith(".npy") else 0   # np.save's header: 128 bytes
        for what, damaged in mutations(cached[name], rng.random(), per_file, head):
            for other, blob in cached.items():
                (folder / other).write_bytes(damaged if other == name else blob)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    loaded = load()
                except Exception as error:
                    raise AssertionError(f"{name}, {what}: {type(error).__name__}: "
                                         f"{error}") from error
            for part in ("x_train", "y_train", "x_test", "y_test"):
                assert np.array_equal(getattr(loaded, part), getattr(reference, part)), \
                    f"{name}, {what}: other {part}"
            for warning in caught:
                assert "\n" not in str(warning.message) and "rebuil" in str(warning.message), \
                    f"{name}, {what}: {warning.message}"
