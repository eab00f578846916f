"""benchmarks/gpu_check.py without a GPU: its dry run, its one-line refusal, and how it reads each
step's output into the report (on made-up step outputs in the real formats)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPU_PROBLEM, require_device

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120)


def test_dry_run_lists_every_step_within_8_minutes(tmp_path):
    result = run(str(tmp_path / "report"), "--dry-run", "--data-dir", "/data")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [
        "gpu tests, fp32", "gpu tests, CUPY_TF32=1", "bench_gpu", "fashion-mnist", "cam", "data"]
    assert "CUPY_TF32=1 -m pytest -m gpu" in lines[1]
    assert "--device gpu" in lines[3] and "--data-dir /data" in lines[3] and "--no-download" in lines[3]
    assert "ninpy.cam" in lines[4] and "--device gpu" in lines[4]
    assert "nothing was run" in lines[-1]
    assert sum(step.limit_s for step in gpu_check.plan(tmp_path, None)) <= gpu_check.TOTAL_LIMIT_S
    assert gpu_check.TOTAL_LIMIT_S < gpu_check.PROMISE_S == 8 * 60
    assert not (tmp_path / "report").exists()


class _NeverEndingProcess:
    """A step that ignores Ctrl-C: records the waits gpu_check gives it."""

    def __init__(self, *args, **kwargs):
        self.waits, self.returncode = [], None

    def communicate(self, timeout=None):
        self.waits.append(timeout)
        if timeout is not None:
            raise subprocess.TimeoutExpired("step", timeout)
        return "", None

    def send_signal(self, signum):
        pass

    def kill(self):
        self.returncode = -9


def test_a_step_ends_within_its_limit_grace_period_included(monkeypatch):
    """Ctrl-C comes GRACE_S before the limit, so the steps' limits add up to the promise."""
    processes = []
    monkeypatch.setattr(gpu_check.subprocess, "Popen",
                        lambda *a, **k: processes.append(_NeverEndingProcess()) or processes[-1])
    result = gpu_check.run_step(gpu_check.Step("stubborn", ["true"], 60), 60)
    assert result["status"] == "stopped after its 60 s"
    waits = processes[0].waits
    assert waits[-1] is None  # after the kill: it has already ended
    assert sum(waits[:-1]) <= 60, waits


def test_missing_data_is_one_line_saying_how_to_stage_it(tmp_path, monkeypatch):
    from ninpy import datasets

    monkeypatch.setattr(datasets, "SYSTEM_DIRS", {})
    problem = gpu_check.data_problem(tmp_path)
    assert problem.startswith("Fashion-MNIST is not on this machine") and "\n" not in problem
    assert "--data-dir" in problem and "load_dataset('fashion-mnist'" in problem


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_the_whole_sequence_runs_on_the_emulator(tmp_path):
    """CI's dry run: every step's command, the data check and the report, on the emulated device
    (one epoch of 64 images, a 2-image CAM)."""
    require_device("emulated")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "report"), "--emulated"],
                            capture_output=True, text=True, timeout=400,
                            env={**os.environ, "NINPY_DATA": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(next((tmp_path / "report").glob("*-emulated.json")).read_text())
    steps = report["steps"]
    assert list(steps) == ["gpu tests, fp32", "gpu tests, CUPY_TF32=1", "bench_gpu", "fashion-mnist",
                           "cam"]
    assert steps["bench_gpu"]["status"] == "not run on the emulated device"
    for name in ("gpu tests, fp32", "gpu tests, CUPY_TF32=1", "fashion-mnist", "cam"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["gpu tests, fp32"]["result"].get("failed", 0) == 0
    assert len(steps["fashion-mnist"]["result"]["test_acc_by_epoch"]) == 1


@pytest.mark.skipif(GPU_PROBLEM is None, reason="a GPU is usable here: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_claims_nothing(tmp_path):
    result = run(str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == [
        f"gpu_check: no usable GPU here, so nothing was checked ({GPU_PROBLEM})"]
    assert not (tmp_path / "report").exists()


def test_a_step_past_its_limit_is_stopped_with_ctrl_c():
    step = gpu_check.Step("sleep", [sys.executable, "-c", "import time\ntry:\n time.sleep(60)\n"
                                    "except KeyboardInterrupt:\n print('saved')"], 1)
    result = gpu_check.run_step(step, 1)
    # "saved" shows that Ctrl-C reached the step: a sleep left to finish (or killed) prints nothing
    assert result["status"] == "stopped after its 1 s" and result["tail"] == ["saved"]


def test_pytest_counts():
    tail = ["....", "12 passed, 3 skipped, 40 deselected in 40.12s"]
    assert gpu_check.pytest_counts(tail) == {"passed": 12, "skipped": 3, "deselected": 40}


def test_time_to_90_percent_counts_every_epochs_seconds():
    records = [{"epoch": 1, "test_acc": 0.85, "seconds": 10.0},
               {"epoch": 2, "test_acc": 0.901, "seconds": 12.5},
               {"epoch": 3, "test_acc": 0.92, "seconds": 11.0}]
    assert gpu_check.time_to_accuracy(records) == {"epoch": 2, "seconds": 22.5}
    assert gpu_check.time_to_accuracy(records[:1]) is None


def test_the_report_reads_bench_gpu_json(tmp_path):
    r = {"device": "GPU X", "ninpy": {"images_per_s": 3000.0, "peak_bytes_in_use_during_step": 5},
         "torch": {"images_per_s": 6000.0, "max_memory_allocated": 7}}
    (tmp_path / "b.json").write_text(json.dumps({"results": {"fp32": r}}))
    summary = gpu_check.bench_summary(tmp_path / "b.json")
    assert summary["fp32"]["ninpy_over_torch"] == 0.5
    assert summary["fp32"]["ninpy_peak_bytes"] == 5 and summary["fp32"]["torch_peak_bytes"] == 7
    assert gpu_check.bench_summary(tmp_path / "missing.json") == {}
    report = {"date": "2026-01-01", "machine": "gpu-x", "device": "GPU X", "versions": "CuPy 14",
              "steps": {"bench_gpu": {"status": "ok", "seconds": 50, "command": "bench_gpu.py",
                                      "tail": ["done"], "result": summary}}}
    text = gpu_check.markdown(report)
    assert text.startswith("# GPU check, 2026-01-01, gpu-x") and "| bench_gpu | ok | 50 |" in text
