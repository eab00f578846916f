"""A run folder that survives everything: crashes between the checkpoint and the metrics, disk
full, stop signals, a second run on the same folder, and crafted or damaged files.

Runs are the tiny fake MNIST of test_training.py (3 steps per epoch). Signals and locks go
through real train.py subprocesses; the rest runs in-process where that is cheaper.
"""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from ninpy import checkpoint, data, datasets, plot, run_folder, training
from ninpy.checkpoint import CheckpointError
from ninpy.training import Trainer
from test_training import (QUIET, _config, arrays, env, metrics, one_line_error,  # noqa: F401
                           patched_sources, train, without_timing)

REPO = Path(__file__).resolve().parents[1]
# The warm-up and schedule as flags: a recipe's are fitted to the run's --epochs when it starts, so
# a 1-epoch run resumed to 2 would otherwise differ from a 2-epoch run.
AS_GIVEN = ("--warmup-steps", "2", "--schedule", "step:40,50")


def _finished_run(env, name, epochs):
    out = env["root"] / name
    result = train(env, "--out", str(out), "--epochs", str(epochs), "--seed", "4", *AS_GIVEN)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def two_epochs(env):
    """A finished uninterrupted 2-epoch run (subprocess): what interrupted runs must reproduce."""
    return _finished_run(env, "two-epochs", 2)


@pytest.fixture(scope="module")
def first_of_two(env):
    """The same run stopped after its first epoch (subprocess); tests copy it before changing it."""
    return _finished_run(env, "first-of-two", 1)


def copy_run(source, target, names=("checkpoint.npz", "metrics.jsonl", "final.json")):
    target.mkdir(parents=True)
    for name in names:
        (target / name).write_bytes((source / name).read_bytes())
    return target


def same_run(a, b):
    """Bit-identical checkpoints and equal metrics (timing aside)."""
    x, y = arrays(a / "checkpoint.npz"), arrays(b / "checkpoint.npz")
    assert x.keys() == y.keys()
    for name in x:
        assert np.array_equal(x[name], y[name]), name
    assert without_timing(metrics(a)) == without_timing(metrics(b))
    assert checkpoint.load(a).random == checkpoint.load(b).random


# ---------------------------------------------------------------------------------------------
# 1. No dead end: a crash between an epoch's checkpoint and its metrics, or a disk that fills up.

def test_disk_full_at_the_first_save_leaves_a_folder_that_starts_again(patched_sources, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "run"
    real_savez = np.savez

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        Trainer(_config(patched_sources, out, epochs=2), **QUIET).fit()
    monkeypatch.setattr(np, "savez", real_savez)
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    # Nothing of the failed run can be resumed, and nothing stands in the way of starting again.
    Trainer(_config(patched_sources, out, epochs=1), **QUIET).fit()
    assert [r["epoch"] for r in metrics(out)] == [1] and checkpoint.load(out).epoch == 1


def test_a_crash_after_the_checkpoint_before_the_metrics_loses_no_epoch(env, two_epochs,
                                                                       first_of_two, tmp_path):
    one = copy_run(first_of_two, tmp_path / "one")
    # Killed right after the checkpoint's rename: metrics.jsonl and final.json not yet written.
    (one / "metrics.jsonl").unlink()
    (one / "final.json").unlink()
    result = train(env, "--resume", str(one), "--epochs", "2", data=False)
    assert result.returncode == 0, result.stderr
    same_run(two_epochs, one)


def test_metrics_are_in_the_checkpoint():
    # The design the two tests above rely on: the checkpoint commits the epoch and its records.
    assert "metrics" in checkpoint.Checkpoint.__dataclass_fields__


# ---------------------------------------------------------------------------------------------
# 2. SIGTERM and SIGHUP stop like Ctrl-C: the step finishes, a resumable checkpoint, one line.

def start(env, out, *args):
    return subprocess.Popen(
        [sys.executable, str(env["launcher"]), "--dataset", "mnist", "--device", "cpu",
         "--batch-size", "8", "--epochs", "100", "--lr", "0.01", "--out", str(out), *args],
        cwd=env["root"], env={**env["env"], "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def wait_for_first_epoch(process):
    for line in process.stdout:
        if line.startswith("epoch 1/"):
            return
    raise AssertionError(process.stderr.read())


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_save_a_resumable_checkpoint(env, tmp_path, signum, status):
    out = tmp_path / "run"
    process = start(env, out)
    wait_for_first_epoch(process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert signal.Signals(signum).name in stderr and f"--resume {out}" in stderr
    state = checkpoint.load(out)
    assert state.epoch >= 1
    result = train(env, "--resume", str(out), "--epochs", str(state.epoch + 1), data=False)
    assert result.returncode == 0, result.stderr
    assert [r["epoch"] for r in metrics(out)] == list(range(1, state.epoch + 2))


INTERRUPT_DURING_IMPORT = """
import os, runpy, signal, sys, time
class Interrupt:  # Ctrl-C while train.py imports ninpy.training (and NumPy with it)
    def find_spec(self, name, path, target=None):
        if name in ("numpy", "ninpy.training"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
sys.meta_path.insert(0, Interrupt())
sys.argv = ["train.py", "--dataset", "mnist", "--out", {out!r}]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_ctrl_c_before_training_starts_is_one_line(env, tmp_path):
    script = INTERRUPT_DURING_IMPORT.format(out=str(tmp_path / "run"), train=str(REPO / "train.py"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env["env"],
                            capture_output=True, text=True, timeout=120)
    one_line_error(result, "interrupted", code=130)


# ---------------------------------------------------------------------------------------------
# 3. One run per folder: a second run is refused at once, naming the first one's pid.

def test_a_second_run_on_a_held_folder_is_refused(env, tmp_path):
    out = tmp_path / "run"
    first = start(env, out)
    try:
        wait_for_first_epoch(first)
        before = metrics(out)
        second = train(env, "--out", str(out), "--epochs", "1")
        one_line_error(second, "in use", f"process {first.pid}")
        again = train(env, "--resume", str(out), "--epochs", "50", data=False)
        one_line_error(again, "in use", f"process {first.pid}")
        (out / ".lock").unlink()                # the lock is the folder's: this frees nothing
        third = train(env, "--resume", str(out), "--epochs", "50", data=False)
        one_line_error(third, "in use")
        assert metrics(out)[:len(before)] == before
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143
    records = metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, len(records) + 1))  # no interleaving


def test_deleting_the_lock_file_does_not_let_a_second_run_in(tmp_path):
    # flock conflicts between two open file descriptions even in one process: the second
    # RunFolder.open stands in for a second train.py (the test above runs real ones).
    held = run_folder.RunFolder.open(tmp_path / "run")
    try:
        (tmp_path / "run" / ".lock").unlink()
        with pytest.raises(run_folder.RunFolderError, match="in use by another process"):
            run_folder.RunFolder.open(tmp_path / "run")
    finally:
        held.release()
    run_folder.RunFolder.open(tmp_path / "run").release()   # free again once released


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "folder", "fifo"])
def test_a_lock_file_that_is_not_a_regular_file_is_refused_and_never_followed(tmp_path, kind):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "thesis.tex"
    if kind == "symlink":
        victim.write_text("a user's precious file\n")
        (out / ".lock").symlink_to(victim)
    elif kind == "dangling symlink":
        (out / ".lock").symlink_to(victim)
    elif kind == "folder":
        (out / ".lock").mkdir()
    else:
        os.mkfifo(out / ".lock")
    with pytest.raises(run_folder.RunFolderError, match=r"\.lock is .*remove it") as info:
        run_folder.RunFolder.open(out)
    assert "\n" not in str(info.value)
    if kind == "symlink":
        assert victim.read_text() == "a user's precious file\n"
    else:
        assert not victim.exists()
    assert sorted(os.listdir(out)) == [".lock"]


def test_a_folder_replaced_under_a_run_is_noticed_before_the_next_commit(tmp_path):
    folder = run_folder.RunFolder.open(tmp_path / "run")
    try:
        (tmp_path / "run").rename(tmp_path / "moved")
        (tmp_path / "run").mkdir()              # another run could now lock this one
        saved = []
        with pytest.raises(run_folder.RunFolderError, match="moved, deleted or replaced"):
            folder.commit(lambda: saved.append(1), [], {})
        assert saved == [] and os.listdir(tmp_path / "run") == []
    finally:
        folder.release()


# ---------------------------------------------------------------------------------------------
# 4. Nothing in a file can make us allocate more than the model and the dataset need.

def npy_header(shape, dtype="<f4"):
    """The bytes of a .npy header (format 1.0) announcing `shape` and `dtype`."""
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    text = repr(header).encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@pytest.fixture(scope="module")
def saved_once(first_of_two):
    with zipfile.ZipFile(first_of_two / "checkpoint.npz") as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture
def saved(saved_once, tmp_path):
    """A copy of a real 1-epoch checkpoint, and its entries to craft from."""
    path = tmp_path / "saved" / "checkpoint.npz"
    path.parent.mkdir()
    rewrite(path, saved_once)
    return path, dict(saved_once)


def rewrite(path, entries, compression=zipfile.ZIP_STORED):
    path.unlink(missing_ok=True)
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, blob in entries.items():
            archive.writestr(name, blob)


def meta_of(entries):
    blob = entries["meta.npy"]
    return json.loads(str(np.load(io.BytesIO(blob))[()]))


def with_meta(entries, meta):
    buffer = io.BytesIO()
    np.save(buffer, np.array(json.dumps(meta)))
    return {**entries, "meta.npy": buffer.getvalue()}


def test_a_deflated_giant_array_is_refused_from_its_header(saved, tmp_path):
    path, entries = saved
    zeros = np.zeros(5_000_000, np.float32)  # 20 MB of zeros deflate to ~20 KB
    buffer = io.BytesIO()
    np.save(buffer, zeros)
    rewrite(path, {**entries, "model/features.0.conv.weight.npy": buffer.getvalue()},
            zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(path) as archive:
        assert archive.getinfo("model/features.0.conv.weight.npy").compress_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="more than"):
            checkpoint.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_a_header_claiming_a_trillion_elements_is_refused(saved):
    path, entries = saved
    rewrite(path, {**entries, "model/features.0.conv.weight.npy": npy_header((10 ** 12,)) + b"\0" * 64})
    with pytest.raises(CheckpointError, match="more than"):
        checkpoint.load(path)


def test_every_preset_fits_the_checkpoint_bound():
    from ninpy import models
    for name in models.PRESETS:
        assert models.nin_for(name).num_parameters() <= checkpoint.MAX_PARAMETERS, name


def test_a_checkpoint_that_is_a_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "checkpoint.npz")
    with pytest.raises(CheckpointError, match="FIFO"):
        checkpoint.load(tmp_path / "checkpoint.npz")


@pytest.fixture
def cache(patched_sources, tmp_path):
    """A data dir of its own holding the fake MNIST's raw files and a fresh .npy cache."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in os.listdir(patched_sources / "mnist"):
        if name.endswith(".gz"):
            (folder / name).write_bytes((patched_sources / "mnist" / name).read_bytes())
    reference = datasets.load_dataset("mnist", tmp_path / "data", download=False, progress=False)
    assert (folder / "ninpy-cache.json").exists()
    return tmp_path / "data", folder, reference


def reload(data_dir, match):
    with pytest.warns(UserWarning, match=match):
        return datasets.load_dataset("mnist", data_dir, download=False, progress=False)


def same_dataset(a, b):
    for part in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, part), getattr(b, part)), part


@pytest.mark.parametrize("edit_manifest", [False, True])
def test_a_cache_array_with_a_giant_header_is_rebuilt(cache, edit_manifest):
    data_dir, folder, reference = cache
    (folder / "x_train.npy").write_bytes(npy_header((10 ** 9, 1, 28, 28), "|u1") + b"\0" * 100)
    if edit_manifest:  # the manifest agrees with the giant header: refused from the manifest
        manifest = json.loads((folder / "ninpy-cache.json").read_text())
        manifest["splits"]["train"]["x"]["shape"] = [10 ** 9, 1, 28, 28]
        (folder / "ninpy-cache.json").write_text(json.dumps(manifest))
    same_dataset(reload(data_dir, "rebuilding"), reference)


def test_a_cache_array_that_is_a_fifo_is_rebuilt_without_hanging(cache):
    data_dir, folder, reference = cache
    (folder / "x_test.npy").unlink()
    os.mkfifo(folder / "x_test.npy")

    def hung(signum, frame):
        raise TimeoutError("load_dataset hung on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        loaded = reload(data_dir, "FIFO")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    same_dataset(loaded, reference)


def run_main(argv, capsys):
    """train.py's main in-process; returns (exit status, stderr)."""
    status, _, err = run_main_with_output(argv, capsys)
    return status, err


def run_main_with_output(argv, capsys):
    """train.py's main in-process; returns (exit status, stdout, stderr)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        status = cli.main(argv)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("pad", ["28", "30000", "1000000000"])
def test_a_crop_pad_beyond_the_image_is_one_clear_line(patched_sources, tmp_path, capsys, pad):
    status, err = run_main(["--dataset", "mnist", "--device", "cpu", "--data-dir",
                            str(patched_sources), "--out", str(tmp_path / "run"), "--epochs", "1",
                            "--augment", "crop", "--crop-pad", pad], capsys)
    assert status == 1 and err.count("\n") == 1 and f"--crop-pad {pad}" in err, err
    assert "memory" not in err and "below the image side, 28" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Smaller lies: what a message or a record says is what the file holds.

def test_eval_only_of_a_mid_epoch_checkpoint_names_the_epoch_its_weights_are_in(saved,
                                                                              patched_sources):
    path, entries = saved
    meta = meta_of(entries)        # saved after epoch 1; now: after batch 2 of epoch 2
    meta.update(batch=2, progress={"loss_sum": 4.0, "correct": 5, "seen": 32})
    rewrite(path, with_meta(entries, meta))
    record = Trainer(_config(patched_sources, None, epochs=2), resume=path, eval_only=True,
                     **QUIET).evaluate_only()
    assert (record["epoch"], record["batch"], record["batches"]) == (2, 2, 3)
    assert json.loads((path.parent / "eval.json").read_text())["epoch"] == 2


@pytest.mark.parametrize("test_acc", ["0.9", None, [1], 1e308, -0.5, float("nan")])
def test_a_damaged_metrics_record_in_the_checkpoint_is_dropped_not_a_crash(
        saved, patched_sources, capsys, test_acc):
    path, entries = saved
    meta = meta_of(entries)
    meta["metrics"][0]["test_acc"] = test_acc
    rewrite(path, with_meta(entries, meta))
    status, out, err = run_main_with_output(["--resume", str(path), "--epochs", "1", "--device",
                                             "cpu", "--data-dir", str(patched_sources)], capsys)
    assert status == 0 and err == "", err
    assert "nothing to do" in out and "inf%" not in out and "nan%" not in out
    assert metrics(path.parent) == []           # the damaged record is not shown as a measurement


def test_an_epoch_with_a_non_finite_test_loss_is_not_committed(saved, patched_sources,
                                                              monkeypatch):
    path, _ = saved                             # epoch 1 done; epoch 2's test pass overflows
    out = path.parent
    overflowed = training.Evaluation(float("inf"), 0.1)
    monkeypatch.setattr(Trainer, "evaluate", lambda self, x, y, guard=None: overflowed)
    with pytest.raises(training.TrainingError, match="test loss of epoch 2 is inf") as info:
        Trainer(_config(patched_sources, None, epochs=2), resume=path, **QUIET).fit()
    message = str(info.value)
    assert "not committed" in message and "good" not in message and "(epoch 1: test loss" in message
    assert checkpoint.load(out).epoch == 1 and [r["epoch"] for r in metrics(out)] == [1]


def test_metrics_lines_whose_metrics_are_not_numbers_in_range_are_skipped():
    lines = [b'{"epoch": 1, "test_acc": 0.5, "images_per_s": null}', b'{"epoch": 2, "test_acc": "0.9"}',
             b'{"epoch": 3, "test_acc": null}', b'{"epoch": 4, "train_loss": [1]}',
             b'{"epoch": 5, "val_acc": 1e308}', b'{"epoch": 6, "lr": true}']
    assert [r["epoch"] for r in run_folder.parse_metrics(lines)] == [1]


@pytest.mark.parametrize("saved_on, says", [
    ("cpu", "bit for bit, as an uninterrupted run on the same device, machine and BLAS build with "
            "the same BLAS thread count"),
    ("gpu", "trained on the gpu, this run continues on the cpu"),
])
def test_a_resume_says_exactly_what_it_reproduces(saved, patched_sources, capsys, saved_on, says):
    path, entries = saved
    meta = meta_of(entries)
    meta["flags"]["device"] = saved_on
    rewrite(path, with_meta(entries, meta))
    status, out, err = run_main_with_output(["--resume", str(path), "--epochs", "1", "--device",
                                             "cpu", "--data-dir", str(patched_sources)], capsys)
    assert status == 0, err
    assert says in " ".join(out.split())


def test_a_huge_finite_loss_prints_as_a_number_not_thirty_digits():
    assert training.format_loss(7.6e29) == "7.6e+29" and training.format_loss(2.30258) == "2.3026"


SIGINT_IGNORED = """
import os, runpy, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)   # as a shell without job control starts a job
class Interrupt:  # Ctrl-C while train.py imports ninpy.training
    def find_spec(self, name, path, target=None):
        if name == "ninpy.training":
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
sys.meta_path.insert(0, Interrupt())
sys.argv = [{launcher!r}, *sys.argv[1:]]
runpy.run_path({launcher!r}, run_name="__main__")
"""


def test_an_inherited_ignored_sigint_stays_ignored_in_import_and_training(env, tmp_path):
    script = tmp_path / "ignoring.py"
    script.write_text(SIGINT_IGNORED.format(launcher=str(env["launcher"])))
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(script), "--dataset", "mnist", "--device", "cpu", "--batch-size", "16",
         "--epochs", "2", "--out", str(out), *AS_GIVEN], cwd=env["root"],
        env={**env["env"], "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    wait_for_first_epoch(process)
    process.send_signal(signal.SIGINT)          # in training: ignored as well
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert [r["epoch"] for r in metrics(out)] == [1, 2]


# ---------------------------------------------------------------------------------------------
# 5 and 6. Crafted or damaged metadata: one CheckpointError line, never a traceback or a silent
# acceptance.

def set_path(meta, keys, value):
    target = meta
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return meta


DELETE = object()


@pytest.mark.parametrize("keys, value", [
    (("epoch",), -5), (("epoch",), "1"), (("epoch",), 1.5), (("epoch",), True), (("batch",), -1),
    (("batch",), 8), (("schedule",), []), (("schedule", "epoch"), "x"), (("random",), {}),
    (("random", "cpu"), {"bit_generator": "PCG64", "state": "x"}), (("random", "gpu_seed"), -1),
    (("optimizer", "param_groups"), "groups"), (("optimizer", "param_groups"), []),
    (("optimizer", "param_groups", 0, "lr"), "fast"), (("optimizer", "param_groups", 0, "lr"), -1),
    (("optimizer", "param_groups", 0, "momentum"), 1.5),
    (("optimizer", "param_groups", 0, "nesterov"), "yes"), (("flags",), [1, 2]),
    (("flags", "lr"), {"x": 1}), (("progress",), []), (("metrics",), [{"epoch": 2}]),
    (("metrics",), [{"epoch": 1}, {"epoch": 1}]), (("metrics",), [{"epoch": 1.0}]),
    (("metrics",), "all"), (("optimizer",), DELETE), (("random",), DELETE),
])
def test_crafted_metadata_is_one_checkpoint_error(saved, keys, value):
    path, entries = saved
    rewrite(path, with_meta(entries, set_path(meta_of(entries), keys, value)))
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("flag, value", [
    ("dataset", 5), ("dataset", ["mnist"]), ("momentum", "high"), ("data_dir", 5), ("limit", "abc"),
    ("epochs", -5), ("schedule", 7), ("crop_pad", "4")])
def test_crafted_flags_are_one_line_on_resume(saved, patched_sources, capsys, flag, value):
    path, entries = saved
    meta = meta_of(entries)
    meta["flags"][flag] = value
    rewrite(path, with_meta(entries, meta))
    data_dir = [] if flag == "data_dir" else ["--data-dir", str(patched_sources)]
    status, err = run_main(["--resume", str(path), "--device", "cpu", *data_dir], capsys)
    assert status == 1 and err.count("\n") == 1 and "Traceback" not in err, err


def test_a_batch_beyond_the_epoch_is_refused_before_training(saved, patched_sources, tmp_path):
    path, entries = saved
    meta = meta_of(entries)
    meta.update(batch=10 ** 6, progress={"loss_sum": 1.0, "correct": 1, "seen": 16})
    rewrite(path, with_meta(entries, meta))
    with pytest.raises(CheckpointError, match="batch 1000000"):
        Trainer(_config(patched_sources, None, epochs=2), resume=path, **QUIET)


@pytest.mark.parametrize("entry", ["optim/momentum/999.npy", "optim/momentum/100.npy",
                                   "optim/extra.npy"])
def test_an_unknown_optimiser_entry_is_refused(saved, patched_sources, entry):
    path, entries = saved
    rewrite(path, {**entries, entry: entries["optim/momentum/0.npy"]})
    with pytest.raises(CheckpointError, match="momentum|unexpected entry"):
        Trainer(_config(patched_sources, None, epochs=2), resume=path, **QUIET)


def test_nesterov_that_no_flag_asked_for_is_refused(saved, patched_sources):
    path, entries = saved
    meta = meta_of(entries)
    for group in meta["optimizer"]["param_groups"]:
        group["nesterov"] = True
    rewrite(path, with_meta(entries, meta))
    with pytest.raises(CheckpointError, match="Nesterov"):
        Trainer(_config(patched_sources, None, epochs=2), resume=path, **QUIET)


def test_a_missing_momentum_buffer_is_refused(saved, patched_sources):
    path, entries = saved
    del entries["optim/momentum/3.npy"]
    rewrite(path, entries)
    with pytest.raises(CheckpointError, match="no momentum buffer for parameter.* 3"):
        Trainer(_config(patched_sources, None, epochs=2), resume=path, **QUIET)


def test_eval_only_of_nan_weights_is_an_error(env, saved):
    path, entries = saved
    buffer = io.BytesIO()
    weight = np.load(io.BytesIO(entries["model/features.0.conv.weight.npy"]))
    weight[0] = np.nan
    np.save(buffer, weight)
    rewrite(path, {**entries, "model/features.0.conv.weight.npy": buffer.getvalue()})
    result = train(env, "--resume", str(path), "--eval-only", data=False)
    one_line_error(result, "NaN or inf", code=1)


def test_a_huge_bad_checkpoint_gives_a_short_line(saved):
    from ninpy import models
    path, entries = saved
    blob = entries["model/features.0.conv.bias.npy"]
    rewrite(path, {**entries, **{f"model/extra.{i}.npy": blob for i in range(5000)}})
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(path).restore(models.nin_for("mnist"))
    assert len(str(info.value)) < 600


def test_a_cache_array_with_a_mangled_header_is_rebuilt_not_a_traceback(cache):
    data_dir, folder, reference = cache
    blob = bytearray((folder / "y_test.npy").read_bytes())
    blob[blob.index(b"}")] = ord(" ")           # unclosed: NumPy's fallback parser tokenizes it
    (folder / "y_test.npy").write_bytes(bytes(blob))
    same_dataset(reload(data_dir, "unreadable .npy header"), reference)


def test_a_cache_with_an_empty_split_is_rebuilt(cache):
    """A consistent cache (arrays, CRCs, manifest) of 0 training images: a run would divide by 0."""
    data_dir, folder, reference = cache
    manifest = json.loads((folder / "ninpy-cache.json").read_text())
    for part, array in (("x", np.zeros((0, 1, 28, 28), np.uint8)), ("y", np.zeros(0, np.int64))):
        np.save(folder / f"{part}_train.npy", array)
        manifest["splits"]["train"][part].update(shape=list(array.shape), crc32=zlib.crc32(array))
    (folder / "ninpy-cache.json").write_text(json.dumps(manifest))
    same_dataset(reload(data_dir, "holds 0 images"), reference)


def test_a_cache_of_part_of_a_published_dataset_is_not_used(tmp_path, monkeypatch):
    """A consistent cache of 5 Fashion-MNIST images under the published files' digests would train
    on 5 images silently: it is refused, and rebuilding it needs the raw files."""
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {})   # not Debian's copy: that would rebuild it
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    splits = {}
    for split in ("train", "test"):
        entry = {}
        for part, array in (("x", np.zeros((5, 1, 28, 28), np.uint8)), ("y", np.zeros(5, np.int64))):
            np.save(folder / f"{part}_{split}.npy", array)
            entry[part] = {"shape": list(array.shape), "dtype": str(array.dtype),
                           "crc32": zlib.crc32(array)}
        splits[split] = entry
    sources = {source.filename: source.digest for source in datasets.SOURCES["fashion-mnist"]}
    (folder / "ninpy-cache.json").write_text(json.dumps({
        "format": 1, "sources": sources, "classes": list(map(str, range(10))), "splits": splits}))
    with pytest.warns(UserWarning, match="holds 5 images, the dataset's has 60,000"), \
            pytest.raises(datasets.DataError, match="missing"):
        datasets.load_dataset("fashion-mnist", tmp_path, download=False, progress=False)


def test_a_cache_warning_is_one_line(cache, monkeypatch):
    data_dir, folder, reference = cache
    (folder / "ninpy-cache.json").unlink()

    def disk_full(path, array):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "_atomic_save", disk_full)
    with pytest.warns(UserWarning, match="cannot write the dataset cache") as caught:
        same_dataset(datasets.load_dataset("mnist", data_dir, download=False, progress=False),
                     reference)
    (warning,) = caught
    text = warnings.formatwarning(warning.message, warning.category, warning.filename,
                                  warning.lineno, warning.line)
    assert text.startswith("warning: cannot write the dataset cache") and text.count("\n") == 1


def test_a_malformed_cache_manifest_is_rebuilt(cache):
    data_dir, folder, reference = cache
    (folder / "ninpy-cache.json").write_text("[1, 2]")
    same_dataset(reload(data_dir, "manifest"), reference)
    manifest = json.loads((folder / "ninpy-cache.json").read_text())
    assert isinstance(manifest, dict) and set(manifest["splits"]) == {"train", "test"}


def test_cached_labels_out_of_range_are_rebuilt(cache):
    import zlib
    data_dir, folder, reference = cache
    labels = np.load(folder / "y_train.npy")
    labels[0] = 12
    np.save(folder / "y_train.npy", labels)
    manifest = json.loads((folder / "ninpy-cache.json").read_text())
    manifest["splits"]["train"]["y"]["crc32"] = zlib.crc32(labels)  # a consistent, crafted cache
    (folder / "ninpy-cache.json").write_text(json.dumps(manifest))
    same_dataset(reload(data_dir, "labels span"), reference)


@pytest.mark.parametrize("damage", [b"\xff\xfe not utf-8\n", b'{"epoch": "1"}\n',
                                    b'{"epoch": NaN}\n'])
def test_damaged_metrics_lines_neither_break_resume_nor_plot(env, two_epochs, first_of_two,
                                                             tmp_path, damage):
    one = copy_run(first_of_two, tmp_path / "one")
    with open(one / "metrics.jsonl", "ab") as file:
        file.write(damage)
    assert [r["epoch"] for r in plot.read_metrics(one)] == [1]
    result = train(env, "--resume", str(one), "--epochs", "2", data=False)
    assert result.returncode == 0, result.stderr
    same_run(two_epochs, one)


# ---------------------------------------------------------------------------------------------
# 7. Leftovers, modes, --out "", the skipped batches of a resumed epoch.

def test_a_killed_writes_temporaries_are_removed_by_the_next_run(env, tmp_path, two_epochs):
    run = copy_run(two_epochs, tmp_path / "run")
    for name in (".checkpoint.npz.k2j3.tmp", ".metrics.jsonl.x8.tmp", ".final.json.q.tmp"):
        (run / name).write_bytes(b"half")
    (run / "notes.tmp").write_text("mine")  # not ours: kept
    result = train(env, "--resume", str(run), "--epochs", "2", data=False)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(run)) == [".lock", "checkpoint.npz", "final.json", "metrics.jsonl",
                                       "notes.tmp"]


def test_results_follow_the_umask(patched_sources, tmp_path):
    previous = os.umask(0o022)
    try:
        Trainer(_config(patched_sources, tmp_path / "run", epochs=1), **QUIET).fit()
    finally:
        os.umask(previous)
    for name in ("checkpoint.npz", "metrics.jsonl", "final.json"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o644, name


def test_an_empty_out_is_refused(env, tmp_path):
    one_line_error(train(env, "--out", "", "--epochs", "1"), "--out ''")
    assert not any(name.endswith((".npz", ".jsonl", ".json")) for name in os.listdir(env["root"]))


def test_a_resumed_epoch_preprocesses_only_the_batches_it_trains_on(patched_sources, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(training, "StopSignals", lambda: StopAfter(6))  # stops at epoch 2, batch 1
        with pytest.raises(training.Interrupted):
            Trainer(_config(patched_sources, out, epochs=2, batch_size=16), **QUIET).fit()
    assert (checkpoint.load(out).epoch, checkpoint.load(out).batch) == (1, 1)
    seen = []
    apply = data.Standardize.apply
    monkeypatch.setattr(data.Standardize, "apply", lambda self, x: seen.append(len(x)) or apply(self, x))
    monkeypatch.setattr(data.Standardize, "__call__", data.Standardize.apply)
    trainer = Trainer(_config(patched_sources, None, epochs=2, batch_size=16), resume=out, **QUIET)
    seen.clear()
    trainer.fit()
    assert sum(seen) == 32 + len(trainer.x_test)  # 2 of the 3 training batches, then the test split


class StopAfter:
    """Stands in for StopSignals: asks to stop at the n-th check (each step checks once)."""

    def __init__(self, checks):
        self.checks, self.calls = checks, 0

    @property
    def requested(self):
        self.calls += 1
        return self.calls > self.checks

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_batches_iterate_from_a_start_equals_the_tail_of_the_full_pass():
    x = np.arange(10 * 1 * 4 * 4, dtype=np.uint8).reshape(10, 1, 4, 4)
    y = np.arange(10)
    stream = data.batches(x, y, 3, shuffle=True, seed=2, epoch=1,
                          augment=data.RandomCropFlip(pad=1, flip=True))
    full = list(stream)
    for start in range(len(stream) + 1):
        tail = list(stream.iterate(start=start))
        assert len(tail) == len(full) - start
        for (a, b), (c, d) in zip(tail, full[start:]):
            assert np.array_equal(a, c) and np.array_equal(b, d)


# ---------------------------------------------------------------------------------------------
# The randomised crash test: SIGKILL at random moments, resumed each time, ends bit-identical.

def crash_and_resume(env, straight, folder, kills, seed):
    flags = ["--epochs", "2", "--seed", "4", *AS_GIVEN]
    chooser = random.Random(seed)
    started = time.monotonic()
    kill_times = []
    for _ in range(kills):
        resume = (folder / "checkpoint.npz").exists()
        args = ["--resume", str(folder), "--epochs", "2"] if resume else ["--out", str(folder), *flags]
        base = [] if resume else ["--dataset", "mnist", "--device", "cpu", "--batch-size", "16"]
        process = subprocess.Popen([sys.executable, str(env["launcher"]), *base, *args],
                                   cwd=env["root"], env=env["env"], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        delay = chooser.uniform(0.3, 3.0)
        kill_times.append(round(delay, 2))
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read()
    # Finish the run.
    resume = (folder / "checkpoint.npz").exists()
    result = (train(env, "--resume", str(folder), "--epochs", "2", data=False) if resume
              else train(env, "--out", str(folder), *flags))
    assert result.returncode == 0, (kill_times, result.stderr)
    same_run(straight, folder)
    assert not any(name.endswith(".tmp") for name in os.listdir(folder)), os.listdir(folder)
    return time.monotonic() - started


def test_sigkill_at_random_moments_then_resume_is_bit_identical(env, two_epochs, tmp_path):
    crash_and_resume(env, two_epochs, tmp_path / "run", kills=3, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_sigkill_at_random_moments_then_resume_is_bit_identical_many_times(env, two_epochs,
                                                                           tmp_path, seed, request):
    """60 kills in all (about 2 minutes): only with `pytest -m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("60 random kills take minutes: run them with pytest -m slow")
    crash_and_resume(env, two_epochs, tmp_path / "run", kills=12, seed=100 + seed)

