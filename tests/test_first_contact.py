"""What a newcomer runs first: the README's quick CPU run learns, and a short run is the recipe
shortened (its step counts fitted to the run), with no class-map warning while the lr warms up.
"""
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ninpy import datasets, recipes
from ninpy.training import Config, Trainer, TrainingError

REPO = Path(__file__).resolve().parents[1]
# Training images of each dataset's full run (the recipe's epochs are over these).
FULL_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "svhn": 73_257, "mnist": 60_000,
                    "fashion-mnist": 60_000}


@pytest.mark.parametrize("dataset", sorted(recipes.RECIPES))
def test_full_length_recipes_keep_their_warmup(dataset):
    recipe = recipes.RECIPES[dataset]
    steps = recipe.epochs * math.ceil(FULL_TRAIN_SIZES[dataset] / recipe.batch_size)
    assert recipes.fit_warmup(recipe.warmup_steps, steps) == recipe.warmup_steps


def test_a_short_runs_warmup_is_at_most_half_of_it():
    assert recipes.fit_warmup(1000, 80) == 40
    assert recipes.fit_warmup(1000, 2000) == 1000
    assert recipes.fit_warmup(0, 80) == 0


def test_a_short_run_gets_the_step_schedule_shrunk_in_proportion():
    assert recipes.fit_schedule("step:200,230", 260, 20) == "step:15,18"
    assert recipes.fit_schedule("step:40,50", 60, 6) == "step:4,5"
    assert recipes.fit_schedule("step:200,230", 260, 1) == "step:1"  # never epoch 0
    assert recipes.fit_schedule("step:200,230", 260, 300) == "step:200,230"  # longer: as given
    assert recipes.fit_schedule("cosine", 40, 4) == "cosine"  # spans the run's epochs already


@pytest.mark.parametrize("dataset", sorted(recipes.RECIPES))
def test_the_config_fits_the_schedule_unless_a_flag_sets_it(dataset):
    recipe = recipes.RECIPES[dataset]
    assert Config.for_dataset(dataset).schedule == recipe.schedule
    short = Config.for_dataset(dataset, epochs=recipe.epochs // 10).schedule
    assert short == recipes.fit_schedule(recipe.schedule, recipe.epochs, recipe.epochs // 10)
    if recipe.schedule.startswith("step"):
        assert short != recipe.schedule
    assert Config.for_dataset(dataset, epochs=2, schedule="step:1").schedule == "step:1"


# ---------------------------------------------------------------------------------------------
# In-process runs on a small random Fashion-MNIST (48 training images, batch 16: 3 steps an epoch).

@pytest.fixture
def tiny_fashion(monkeypatch):
    rng = np.random.default_rng(0)
    ds = datasets.Dataset("fashion-mnist", rng.integers(0, 256, (48, 1, 28, 28), dtype=np.uint8),
                          rng.integers(0, 10, 48), rng.integers(0, 256, (16, 1, 28, 28), dtype=np.uint8),
                          rng.integers(0, 10, 16), tuple(str(k) for k in range(10)))
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: ds)


def trainer(tmp_path, messages=None, **overrides):
    config = Config.for_dataset("fashion-mnist", **{**dict(
        device="cpu", epochs=2, batch_size=16, out=str(tmp_path / "run")), **overrides})
    log = messages.append if messages is not None else (lambda message: None)
    return Trainer(config, progress=False, log=log)


def test_a_short_run_reaches_the_recipes_lr(tiny_fashion, tmp_path):
    run = trainer(tmp_path)
    assert run.config.warmup_steps == 3  # the recipe's 1,000 steps, fitted to this 6-step run
    run.fit()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["lr"] == pytest.approx(0.04)  # the peak, on the last step of epoch 1
    saved = json.loads((tmp_path / "run" / "final.json").read_text())["flags"]
    assert saved["warmup_steps"] == 3  # a resumed run keeps the warm-up it started with


def test_a_warmup_set_by_a_flag_is_kept(tiny_fashion, tmp_path):
    assert trainer(tmp_path, warmup_steps=100).config.warmup_steps == 100


def test_no_class_map_warning_while_the_lr_warms_up(tiny_fashion, tmp_path):
    messages = []
    run = trainer(tmp_path, messages, warmup_steps=100)  # the lr is still rising after epoch 1
    run._warn_if_dead(0, math.log(10), 0.1)
    run._warn_if_partly_dead(0, (2, 7))
    assert messages == []
    with pytest.raises(TrainingError, match="before the lr reached its peak") as stop:
        run._stop_if_dead(0, tuple(range(10)))
    assert "lower" not in str(stop.value).lower()  # a lower lr would not help a net not yet at it


def test_class_map_warnings_once_the_lr_has_peaked(tiny_fashion, tmp_path):
    messages = []
    run = trainer(tmp_path, messages, warmup_steps=3)  # the peak is the last step of epoch 1
    run._warn_if_dead(0, math.log(10), 0.1)
    run._warn_if_partly_dead(0, (2, 7))
    assert len(messages) == 2 and all("Lower --lr" in m for m in messages)
    with pytest.raises(TrainingError, match="lower --lr"):
        run._stop_if_dead(0, tuple(range(10)))


# ---------------------------------------------------------------------------------------------
# The README's quick CPU run, exactly as the README gives it, on the real Fashion-MNIST.

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def readme_quick_run():
    """The argv of the one `python train.py ... --device cpu` command in the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
                if line.startswith("python train.py") and "--device cpu" in line]
    assert len(commands) == 1, f"expected one quick CPU run in the README, found {commands}"
    return shlex.split(commands[0])


def test_the_readme_quick_run_is_a_shortened_recipe():
    argv = readme_quick_run()
    assert argv[:2] == ["python", "train.py"] and "--out" in argv
    flags = {argv[i] for i in range(2, len(argv)) if argv[i].startswith("--")}
    # The run's length, its data, where it goes, and the class maps' lr multiplier (the authors'
    # 0.1x keeps them alive at a small batch); every other number is the recipe's.
    assert flags <= {"--dataset", "--device", "--epochs", "--limit", "--batch-size",
                     "--last-lr-mult", "--out"}, flags


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_readme_quick_run_reaches_80_percent(tmp_path):
    argv = readme_quick_run()  # run from tmp_path, so its --out lands there
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *argv[2:], "--progress", "off"], cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "NINPY_DATA": str(tmp_path / "data")},
        capture_output=True, text=True,
        timeout=2700)  # minutes on a quiet 2-core machine; much longer when other jobs share it
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr
    final = json.loads((tmp_path / argv[argv.index("--out") + 1] / "final.json").read_text())
    assert final["test_acc"] >= 0.80, final
