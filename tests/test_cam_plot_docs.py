"""Class activation maps, training plots and the reading guide (ninpy/cam.py, ninpy/plot.py,
docs/reading-guide.md).

The CAM command runs on a checkpoint written with the real checkpoint API and on a small MNIST test
set written in the real IDX format (with its own digests in the source table, as tests/test_data.py
does), so it goes through the same Trainer set-up as train.py. The command-line errors run in a
subprocess: one line on stderr, a non-zero exit, no traceback.
"""
import ast
import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GPU_PATHS_AND_TF32, tf32, use_device
import ninpy
from ninpy import Tensor, backend, cam, checkpoint, datasets, models, no_grad, plot, recipes
from ninpy.optim import SGD
from ninpy.training import Config

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "reading-guide.md"
plt_image = pytest.importorskip("matplotlib.image")


def tiny_nin(num_classes=5, dtype=np.float32):
    """A small NIN: the same three blocks with few channels (16x16 input -> 4x4 maps)."""
    return models.nin(in_channels=3, num_classes=num_classes,
                      widths=((8, 6, 6), (8, 6, 6), (8, 6, None)), kernel_sizes=(3, 3, 3),
                      dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The maps: shapes and GAP's identity (mean of each class map = that class's logit)

@pytest.mark.parametrize("build, shape, maps_hw", [
    (lambda: tiny_nin(), (3, 3, 16, 16), (4, 4)),
    (lambda: models.nin_for("mnist"), (2, 1, 28, 28), (7, 7)),
], ids=["tiny", "mnist-preset"])
def test_maps_have_one_map_per_class_and_their_means_are_the_logits(build, shape, maps_hw):
    model = build()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    maps, logits = cam.class_activation_maps(model, x)
    n, classes = shape[0], logits.shape[1]
    assert isinstance(maps, np.ndarray) and isinstance(logits, np.ndarray)
    assert maps.shape == (n, classes) + maps_hw and logits.shape == (n, classes)
    assert (maps >= 0).all()  # ReLU before the global pool
    np.testing.assert_allclose(maps.mean(axis=(2, 3)), logits, rtol=1e-5, atol=1e-6)
    # ... and those logits are the model's own forward pass, in eval mode (no dropout)
    model.eval()
    with no_grad():
        forward = model(Tensor(x)).numpy()
    np.testing.assert_allclose(logits, forward, rtol=1e-5, atol=1e-6)


def test_maps_in_float64_batched_and_mode_restored():
    model = tiny_nin(dtype=np.float64).train()
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16))
    first, logits = cam.class_activation_maps(model, Tensor(x))
    again, _ = cam.class_activation_maps(model, x, batch_size=2)  # in two batches
    assert model.training  # put back in training mode
    np.testing.assert_allclose(first, again, rtol=1e-12, atol=1e-12)  # eval mode: no dropout
    np.testing.assert_allclose(first.mean(axis=(2, 3)), logits, rtol=1e-12, atol=1e-12)


def test_maps_need_a_gap_model():
    with pytest.raises(TypeError, match="class_maps"):
        cam.class_activation_maps(object(), np.zeros((1, 3, 8, 8)))


@pytest.mark.parametrize("device", GPU_PATHS_AND_TF32)
def test_maps_on_the_gpu_match_the_cpu(device, monkeypatch):
    device = use_device(device, monkeypatch)
    ninpy.random.manual_seed(0)  # the same weights whichever tests ran before
    model = tiny_nin()
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    cpu_maps, cpu_logits = cam.class_activation_maps(model, x)
    gpu_maps, gpu_logits = cam.class_activation_maps(model.to(device), x)  # x moved to the device
    # TF32 (CUPY_TF32=1) keeps 10 mantissa bits of each product's inputs: ~1e-3 relative to the
    # products summed, not to a map value that cancels, so the error is bounded by the maps' scale
    scale = float(np.abs(cpu_maps).max())
    rtol, atol = (1e-2, 1e-2 * scale) if tf32() else (1e-4, 1e-5)
    np.testing.assert_allclose(gpu_maps, cpu_maps, rtol=rtol, atol=atol)
    np.testing.assert_allclose(gpu_maps.mean(axis=(2, 3)), gpu_logits, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bilinear upsampling

def test_upsample_keeps_size_constants_and_shape():
    m = np.random.default_rng(4).standard_normal((2, 3, 5, 6))
    np.testing.assert_allclose(cam.upsample(m, (5, 6)), m)
    assert cam.upsample(m, 10).shape == (2, 3, 10, 10)
    np.testing.assert_allclose(cam.upsample(np.full((7, 7), 2.5), (28, 28)), 2.5)
    assert cam.upsample(np.ones((7, 7), np.float32), 14).dtype == np.float32
    ramp = cam.upsample(np.arange(4.0)[None, :].repeat(4, 0), (4, 8))
    assert (np.diff(ramp, axis=1) >= 0).all() and ramp.min() == 0 and ramp.max() == 3


def test_upsample_uses_half_pixel_centres():
    """PyTorch's interpolate(mode="bilinear", align_corners=False): output o samples the input at
    (o + 0.5) * h / H - 0.5, clamped to the edge samples."""
    np.testing.assert_allclose(cam.upsample(np.array([[0.0, 1.0]]), (1, 4))[0],
                               [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(cam.upsample(np.array([[0.0, 3.0, 6.0]]), (1, 6))[0],
                               [0.0, 0.75, 2.25, 3.75, 5.25, 6.0])
    np.testing.assert_allclose(cam.upsample(np.array([[0.0], [1.0]]), (4, 3))[:, 0],
                               [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(cam.upsample(np.arange(4.0)[None], (1, 2))[0], [0.5, 2.5])  # down


# ---------------------------------------------------------------------------------------------
# The CAM picture, from a checkpoint and a dataset in the real formats

def idx_gz(array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_run(tmp_path, monkeypatch):
    """A tiny MNIST in IDX files (its digests in SOURCES) and a checkpoint of the MNIST preset."""
    rng = np.random.default_rng(6)
    files = {}
    for prefix, n in (("train", 12), ("t10k", 6)):
        x = np.zeros((n, 28, 28), np.uint8)
        for k in range(n):  # a bright square somewhere on a dark background
            r, c = rng.integers(2, 18, 2)
            x[k, r:r + 8, c:c + 8] = 255
        files[f"{prefix}-images-idx3-ubyte.gz"] = idx_gz(x)
        files[f"{prefix}-labels-idx1-ubyte.gz"] = idx_gz(rng.integers(0, 10, n))
    data_dir = tmp_path / "data"
    (data_dir / "mnist").mkdir(parents=True)
    for name, data in files.items():
        (data_dir / "mnist" / name).write_bytes(data)
    sources = tuple(dataclasses.replace(s, digest=hashlib.md5(files[s.filename]).hexdigest(),
                                        content_md5=None) for s in datasets.SOURCES["mnist"])
    monkeypatch.setitem(datasets.SOURCES, "mnist", sources)

    config = Config.for_dataset("mnist", data_dir=str(data_dir), device="cpu")
    model = models.nin_for("mnist")
    optimizer = SGD(recipes.param_groups(model, config.lr, config.weight_decay, config.bias_lr_mult,
                                         config.last_lr_mult), lr=config.lr, momentum=config.momentum)
    schedule = recipes.make_schedule(optimizer, config.schedule, config.epochs)
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(run / checkpoint.FILENAME, model, optimizer, schedule, epoch=3,
                    flags=config.as_dict())
    return run, data_dir


def test_cam_command_writes_the_grid(mnist_run, tmp_path, capsys):
    run, data_dir = mnist_run
    out = tmp_path / "pictures" / "cams.png"
    code = cam.main(["--checkpoint", str(run), "--n", "5", "--out", str(out), "--device", "cpu",
                     "--no-download"])
    assert code == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    picture = plt_image.imread(out)
    width, height = cam.figure_pixels(5)
    assert picture.shape[:2] == (height, width) and (width, height) == (960, 480)  # 2 rows of 3
    assert picture[..., :3].std() > 0.05  # not blank


def test_cam_command_errors_are_one_line(mnist_run, tmp_path, capsys):
    run, data_dir = mnist_run
    out = str(tmp_path / "c.png")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--checkpoint", str(run), "--dataset", "fashion-mnist"], "differs from the checkpoint's"),
        (["--checkpoint", str(run), "--data-dir", str(tmp_path / "nowhere")], "no such folder"),
        (["--checkpoint", str(run), "--dataset", "imagenet"], "unknown; expected one of"),
        (["--checkpoint", str(run), "--data-dir", str(tmp_path / "empty"), "--no-download"],
         "missing"),
        (["--checkpoint", str(run), "--n", "0"], "--n 0"),
        (["--checkpoint", str(tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz")],
         "truncated or corrupt"),
    ]
    for argv, message in cases:
        assert cam.main(argv + ["--out", out, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not Path(out).exists()


def test_cam_command_cuda_errors_are_one_line(mnist_run, tmp_path, capsys, monkeypatch):
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    run, data_dir = mnist_run

    def failing_maps(model, x):
        raise runtime.CUDARuntimeError(700)  # cudaErrorIllegalAddress, as a GPU run would meet it

    monkeypatch.setattr(cam, "class_activation_maps", failing_maps)
    code = cam.main(["--checkpoint", str(run), "--out", str(tmp_path / "c.png"), "--device", "cpu",
                     "--no-download"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "CUDA error in main (ninpy/cam.py:" in err and "CUDARuntimeError" in err


def run_module(*args, code=None):
    """python -m <args> (or python -c code) from the repository root, ninpy importable."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_cam_bad_checkpoint_path_in_a_subprocess(tmp_path):
    result = run_module("ninpy.cam", "--checkpoint", str(tmp_path / "nowhere"), "--dataset",
                        "mnist", "--out", str(tmp_path / "c.png"))
    assert_one_line_error(result, "no checkpoint at", str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------
# The metrics plot

def write_run(run, epochs=6):
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(1, epochs + 1):
        lines.append(json.dumps({"epoch": e, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e,
                                 "test_loss": 2.2 / e + 0.05, "test_acc": 0.9 - 0.4 / e,
                                 "lr": 0.1 if e <= 4 else 0.01, "images_per_s": 900.0,
                                 "seconds": 10.0}))
    (run / plot.METRICS).write_text("\n".join(lines) + '\n{"epoch": 7, "train_lo')  # torn line
    (run / plot.FINAL).write_text(json.dumps({"dataset": "fashion-mnist", "device": "cpu",
                                              "parameters": 349674}))


def test_plot_writes_the_png(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    assert [r["epoch"] for r in plot.read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert plot.main([str(run)]) == 0
    picture = plt_image.imread(run / "metrics.png")
    assert picture.shape[:2] == plot.figure_pixels()[::-1] == (450, 1500)
    assert picture[..., :3].std() > 0.05
    other = tmp_path / "elsewhere" / "fm.png"
    assert plot.main([str(run / plot.METRICS), "--out", str(other)]) == 0 and other.stat().st_size
    assert "wrote" in capsys.readouterr().out


def test_plot_missing_metrics_in_a_subprocess(tmp_path):
    result = run_module("ninpy.plot", str(tmp_path))
    assert_one_line_error(result, "metrics.jsonl", str(tmp_path))
    assert not (tmp_path / "metrics.png").exists()


def test_plot_empty_metrics_and_no_matplotlib(tmp_path, capsys):
    (tmp_path / plot.METRICS).write_text("")
    assert plot.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no epochs yet" in err
    write_run(tmp_path / "run")
    blocked = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv[0] = 'plot'; "
               "runpy.run_module('ninpy.plot', run_name='__main__')")
    result = run_module(str(tmp_path / "run"), code=blocked)
    assert_one_line_error(result, "pip install matplotlib")


# ---------------------------------------------------------------------------------------------
# The reading guide: every python block runs, in order, in one namespace; what it prints is held to
# the ```text block after it, where there is one, and to the values its comments state

def guide_blocks():
    """[(python source, the text block right after it, or "")] in the guide's order."""
    pattern = r"^```python\n(.*?)^```\n(?:\n```text\n(.*?^)```\n)?"
    return re.findall(pattern, GUIDE.read_text(), re.S | re.M)


def test_reading_guide_snippets_run(capsys):
    blocks = guide_blocks()
    assert len(blocks) >= 8 and sum(1 for _, shown in blocks if shown) >= 8
    text = GUIDE.read_text()
    for name in ("ninpy/autograd.py", "ninpy/functional.py", "ninpy/reference.py", "ninpy/optim.py",
                 "kernels/im2col.cu", "ninpy/gpu_kernels.py", "train.py"):
        assert name in text
    for path in re.findall(r"`((?:ninpy|kernels|tests|docs)/[\w./-]+\.\w+|train\.py)`", text):
        assert (ROOT / path).is_file(), f"the guide names {path}, which does not exist"
    import importlib
    for module, name in re.findall(r"`(reference|cpu_kernels|gpu_kernels|recipes|gemm|optim|nn|models"
                                   r"|functional|autograd|training)\.(\w+)", text):
        assert hasattr(importlib.import_module(f"ninpy.{module}"), name), f"{module}.{name}"
    for cls, name in re.findall(r"`(Tensor|Function|Conv2d|Trainer|SGD)\.(\w+)`", text):
        owner = {"Tensor": "autograd", "Function": "autograd", "Conv2d": "functional",
                 "Trainer": "training", "SGD": "optim"}[cls]
        assert hasattr(getattr(importlib.import_module(f"ninpy.{owner}"), cls), name), f"{cls}.{name}"
    namespace = {"__name__": "reading_guide"}
    stated = 0
    try:
        for index, (block, shown) in enumerate(blocks):
            where = f"{GUIDE.name}, python block {index + 1}"
            lines, block_printed = block.splitlines(), ""
            for statement in ast.parse(block).body:      # one at a time, to see what each prints
                printed = io.StringIO()
                try:
                    with contextlib.redirect_stdout(printed):
                        exec(compile(ast.Module([statement], []), where, "exec"), namespace)
                except Exception as error:
                    pytest.fail(f"python block {index + 1} of {GUIDE} failed: "
                                f"{type(error).__name__}: {error}\n{block}")
                block_printed += printed.getvalue()
                for line in lines[statement.lineno - 1:statement.end_lineno]:
                    stated += check_stated_output(line, printed.getvalue(), namespace, where)
            if shown:
                assert block_printed == shown, f"{where} printed\n{block_printed}\nthe guide shows\n{shown}"
                stated += 1
    finally:
        ninpy.use_kernels("fast")   # the guide switches to the plain path and back; make sure
    assert stated >= 10, f"only {stated} stated outputs were found in the guide"


# What a comment in the guide states: a value (a shape, numbers, an array) at its start.
STATED_VALUE = re.compile(r"#\s*([(\[\d-][\d\s.,()\[\]-]*)")


def _normalised(text):
    """NumPy's print spacing taken out: one space between items, none inside brackets."""
    text = re.sub(r"\s+", " ", text.strip())
    return re.sub(r" \]", "]", re.sub(r"\[ ", "[", text))


def check_stated_output(line, printed, namespace, where):
    """Hold one line of the guide to the value its comment states, and return 1 if it states one:
    `print(...)  # what it prints`; in a loop, `print(..., value)  # each pass's value, a, b, c`;
    `name = ...  # (shape)`. Other comments (prose) are left alone."""
    match = STATED_VALUE.search(line)
    code = line.split("#")[0].strip()
    if not match:
        return 0
    value = match.group(1).strip()
    if code.startswith("print("):
        if line.startswith(" "):                     # inside a loop: one printed line per pass
            values = ", ".join(row.split()[-1] for row in printed.splitlines())
            assert values == value, f"{where}: {line.strip()!r} printed {values!r}"
        else:
            assert _normalised(printed).startswith(_normalised(value)), \
                f"{where}: {line.strip()!r} printed {printed.strip()!r}"
        return 1
    assignment = re.match(r"(\w+) = ", code)
    if assignment and value.startswith("("):
        shape = tuple(namespace[assignment.group(1)].shape)
        assert shape == ast.literal_eval(value), f"{where}: {line.strip()!r} has shape {shape}"
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# The README's recipe table is what train.py does.

def readme_recipe_rows():
    """{dataset: {flag: cell}} from the README table whose header starts "| dataset | `--lr`"."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| dataset | `--lr`"))
    flags = [cell.strip(" `").lstrip("-").replace("-", "_") for cell in lines[start].split("|")[2:-1]]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.split("|")[1:-1]]
        rows[cells[0]] = dict(zip(flags, cells[1:]))
    return rows


def test_readme_recipe_table_matches_the_recipes():
    rows = readme_recipe_rows()
    assert set(rows) == set(recipes.RECIPES)
    for dataset, row in rows.items():
        recipe = recipes.RECIPES[dataset]
        for field, cell in row.items():
            value = getattr(recipe, field)
            assert type(value)(cell) == value, f"README says {dataset} {field} {cell}, recipe {value}"
    shared = {(r.momentum, r.batch_size, r.weight_decay, r.bias_lr_mult)
              for r in recipes.RECIPES.values()}
    assert shared == {(0.9, 128, 1e-4, 2.0)}, "the README's shared settings changed"
