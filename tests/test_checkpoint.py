"""Checkpoints: round trip of every piece of state, atomic writes, and one clear error per bad file."""
import io
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

import ninpy
from ninpy import checkpoint, models, optim
from ninpy import random as nrandom
from ninpy.checkpoint import CheckpointError
from ninpy.recipes import param_groups


def small_net(seed=0, widths=((4, 3, 3), (4, 3, None))):
    ninpy.manual_seed(seed)
    return models.nin(in_channels=1, num_classes=3, widths=widths,
                      kernel_sizes=(3, 3), pools=("max",))


def trained(seed=0, widths=((4, 3, 3), (4, 3, None))):
    """A model, SGD with momentum buffers and a schedule a few epochs in."""
    model = small_net(seed, widths)
    sgd = optim.SGD(param_groups(model, 0.1, 1e-4), lr=0.1, momentum=0.9)
    schedule = optim.MultiStepLR(sgd, [2, 4])
    for p in model.parameters():
        p.grad = np.full(p.shape, 0.5, p.dtype)
    sgd.step()
    for _ in range(3):
        schedule.step()
    return model, sgd, schedule


def test_round_trip_restores_model_optimizer_schedule_random_and_metadata(tmp_path):
    model, sgd, schedule = trained()
    ninpy.manual_seed(7)
    nrandom.cpu_generator().random(5)           # move the generator away from a fresh seed
    path = checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=3, batch=5,
                           progress={"loss_sum": 1.25, "correct": 4, "seen": 10},
                           flags={"dataset": "mnist", "lr": 0.1})
    expected_draws = nrandom.cpu_generator().random(4)

    state = checkpoint.load(path)
    assert (state.epoch, state.batch) == (3, 5)
    assert state.flags == {"dataset": "mnist", "lr": 0.1}
    assert state.progress == {"loss_sum": 1.25, "correct": 4, "seen": 10}

    model2, sgd2, _ = trained(seed=1)           # other weights, other buffers
    schedule2 = optim.MultiStepLR(sgd2, [2, 4])
    ninpy.manual_seed(99)
    state.restore(model2, sgd2, schedule2)
    for (name, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert np.array_equal(a.data, b.data), name
    assert schedule2.last_epoch == 3 and schedule2.get_last_lr() == schedule.get_last_lr()
    saved, loaded = sgd.state_dict(), sgd2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["momentum_buffers"].keys() == loaded["momentum_buffers"].keys()
    for key, buf in saved["momentum_buffers"].items():
        assert np.array_equal(buf, loaded["momentum_buffers"][key])
    assert np.array_equal(nrandom.cpu_generator().random(4), expected_draws)


def test_a_directory_means_its_checkpoint_npz(tmp_path):
    model, sgd, schedule = trained()
    checkpoint.save(tmp_path / checkpoint.FILENAME, model, sgd, schedule, epoch=1)
    assert checkpoint.load(tmp_path).epoch == 1


def test_archive_holds_plain_arrays_only(tmp_path):
    model, sgd, schedule = trained()
    path = checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=1)
    with np.load(path, allow_pickle=False) as archive:
        names = set(archive.files)
        meta = json.loads(str(archive["meta"][()]))
        assert all(archive[name].dtype != object for name in names)
    assert {f"model/{name}" for name, _ in model.named_parameters()} <= names
    assert meta["format"] == checkpoint.FORMAT and meta["epoch"] == 1


def test_failed_write_leaves_the_old_checkpoint_byte_identical_and_no_temporary(tmp_path,
                                                                               monkeypatch):
    model, sgd, schedule = trained()
    path = checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=1)
    before = path.read_bytes()

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(CheckpointError, match="No space left"):
        checkpoint.save(path, model, sgd, schedule, epoch=2)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


def test_interrupt_during_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model, sgd, schedule = trained()
    path = checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=1)
    before = path.read_bytes()

    def interrupted(file, **arrays):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, model, sgd, schedule, epoch=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.npz"]


def test_unwritable_directory_is_a_checkpoint_error(tmp_path):
    model, sgd, schedule = trained()
    with pytest.raises(CheckpointError, match="cannot write"):
        checkpoint.save(tmp_path / "missing" / "c.npz", model, sgd, schedule, epoch=1)


def _valid(tmp_path):
    model, sgd, schedule = trained()
    return checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=1)


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b[:100], "truncated or corrupt"),
    (lambda b: b"", "truncated or corrupt"),
    (lambda b: b"not a zip file at all" * 10, "truncated or corrupt"),
])
def test_truncated_or_garbage_file_is_one_clear_error(tmp_path, damage, match):
    path = _valid(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_flipped_bytes_inside_an_array_are_detected(tmp_path):
    path = _valid(tmp_path)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model/features.0.conv.weight.npy")
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data[start:start + 8] = b"\xff" * 8      # inside the stored array: the CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


def _with_entry_replaced(path, name, array):
    """Rewrite the checkpoint at `path` with entry `name` (e.g. "optim/momentum/0") holding `array`;
    every other member is copied byte for byte."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            members[info.filename] = archive.read(info)
    buffer = io.BytesIO()
    np.save(buffer, array)
    assert name + ".npy" in members
    members[name + ".npy"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)


@pytest.mark.parametrize("entry", ["model/features.0.conv.weight", "optim/momentum/0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_weights_or_momentum_is_refused(tmp_path, entry, bad):
    """A momentum buffer with NaN or inf would poison the first step after a resume as surely as
    such a weight: both are refused on load, naming the entry."""
    path = _valid(tmp_path)
    with np.load(path) as archive:
        array = archive[entry].copy()
    array.flat[array.size // 2] = bad
    _with_entry_replaced(path, entry, array)
    with pytest.raises(CheckpointError, match=f"{entry} holds NaN or inf") as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value)


def test_npz_without_meta_is_not_a_ninpy_checkpoint(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a ninpy checkpoint"):
        checkpoint.load(path)


def test_pickled_object_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, meta=np.array(json.dumps({"format": checkpoint.FORMAT, "version": 1})),
             **{"model/x": np.array([{"evil": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="dtype object, expected float32") as info:
        checkpoint.load(path)
    assert "allow_pickle" not in str(info.value)    # NumPy's advice to load unsafely is not ours


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path / "nope.npz")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(tmp_path)


def test_checkpoint_of_another_model_does_not_fit(tmp_path):
    path = _valid(tmp_path)
    ninpy.manual_seed(0)
    other = models.nin(in_channels=1, num_classes=5, widths=((4, 3, 3), (4, 3, None)),
                       kernel_sizes=(3, 3), pools=("max",))
    with pytest.raises(CheckpointError, match="does not fit"):
        checkpoint.load(path).restore(other)


# ---------------------------------------------------------------------------------------------
# Every member is read to its end, so its CRC-32 is checked; what zipfile or NumPy's header parser
# cannot read is the same one line as any other damage.

def _wide(tmp_path):
    """A checkpoint with an entry of 9 kB, larger than what zipfile reads ahead (4 kB): NumPy
    alone then stops reading it before its end, where zipfile would check its CRC."""
    model, sgd, schedule = trained(widths=((4, 3, 3), (48, 48, None)))
    return checkpoint.save(tmp_path / "c.npz", model, sgd, schedule, epoch=1)


ENTRY = "model/features.3.cccp1.weight.npy"   # the 48x48 1x1 convolution: 9,344 bytes


def _data_offset(path, name=ENTRY):
    """Where the member's bytes (its .npy file) start in the archive."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    assert info.file_size > 8192
    local = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_length = int.from_bytes(local[26:28], "little")
    extra_length = int.from_bytes(local[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and len(message) < 800
    return message


def test_a_changed_header_length_byte_is_refused_not_loaded_as_other_weights(tmp_path):
    path = _wide(tmp_path)
    data = bytearray(path.read_bytes())
    at = _data_offset(path) + 8                 # after b"\x93NUMPY\x01\x00": the header's length
    assert data[at] == 118
    data[at] = 114                              # NumPy would read the weights 4 bytes early
    path.write_bytes(bytes(data))
    _one_line_error(path, "announces|CRC")


def test_a_duplicate_entry_is_refused_rather_than_the_last_one_winning(tmp_path):
    path = _wide(tmp_path)
    with zipfile.ZipFile(path) as archive:
        entries = [(name, archive.read(name)) for name in archive.namelist()]
    other = io.BytesIO()
    np.save(other, np.zeros_like(np.load(io.BytesIO(dict(entries)[ENTRY]))))
    path.unlink()
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "w") as archive:
        for name, blob in entries + [(ENTRY, other.getvalue())]:
            archive.writestr(name, blob)
    _one_line_error(path, "appears twice")


def _set_flag_bits(path, name, bits, method=None):
    """OR `bits` into the member's general-purpose flags (and set its compression method), in its
    local header and its central-directory record, as a damaged or foreign zip would have them."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    records = [i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"]
    central = next(i for i in records if data[i + 46:i + 46 + len(name)] == name.encode())
    for flags_at in (info.header_offset + 6, central + 8):
        data[flags_at] |= bits
        if method is not None:
            data[flags_at + 2:flags_at + 4] = method.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("bits, method, match", [
    (0x01, None, "encrypted"),                  # zipfile: "is encrypted, password required"
    (0x20, None, "truncated or corrupt"),       # zipfile: NotImplementedError (patched data)
    (0x00, 99, "compression method 99"),        # zipfile: NotImplementedError (AES)
])
def test_encrypted_or_unsupported_entries_are_one_line(tmp_path, bits, method, match):
    path = _wide(tmp_path)
    _set_flag_bits(path, ENTRY, bits, method)
    _one_line_error(path, match)


def test_a_mangled_npy_header_is_one_line_not_a_tokenizer_traceback(tmp_path):
    path = _wide(tmp_path)
    data = bytearray(path.read_bytes())
    start = _data_offset(path) + 10             # the header's text: "{'descr': '<f4', ...}"
    end = data.index(b"}", start)
    data[end] = ord(" ")                        # unclosed: NumPy's fallback parser tokenizes it
    path.write_bytes(bytes(data))
    _one_line_error(path, "unreadable .npy header")


def test_a_negative_dimension_cannot_lift_the_allocation_bound(tmp_path):
    """(-1, N) would make the running total negative and let a deflated giant entry past it."""
    path = _valid(tmp_path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    negative = io.BytesIO()
    np.lib.format.write_array_header_1_0(negative, {"descr": "<f4", "fortran_order": False,
                                                    "shape": (-1, 5_000_000)})
    giant = io.BytesIO()
    np.save(giant, np.zeros(8_000_000, np.float32))      # deflates to a few kB
    entries = {"model/a.npy": negative.getvalue(), "model/b.npy": giant.getvalue(), **entries}
    path.unlink()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, blob in entries.items():
            archive.writestr(name, blob)
    tracemalloc.start()
    try:
        _one_line_error(path, "negative")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000
