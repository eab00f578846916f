"""ninpy/cpu_settings.py and the CPU benchmarks' reports: what ninpy sets before NumPy loads, only
where the user has not chosen, and the commands that measure the CPU path."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
BENCHMARKS = os.path.join(ROOT, "benchmarks")

_PROBE = """
import os, sys
{before}
import ninpy
print(ninpy.cpu_settings.APPLIED, os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


def probe(before="", **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(env_changes)
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-c", _PROBE.format(before=before)], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_openblas_threads_sleep_unless_the_user_chose():
    assert probe() == "['OPENBLAS_THREAD_TIMEOUT=4'] 4"
    assert probe(OPENBLAS_THREAD_TIMEOUT="20") == "[] 20"


def test_numpy_imported_first_gets_the_setting_too():
    assert probe(before="import numpy") == (
        "['OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS already loaded: threads restarted)'] 4")
    assert probe(before="import numpy", OPENBLAS_THREAD_TIMEOUT="20") == "[] 20"


_SPIN = """
import time
{first}
import ninpy
import numpy as np
a = np.ones((400, 400), np.float32)
burnt = []
for _ in range(3):
    a @ a                                  # wakes OpenBLAS's threads
    start = time.process_time()
    time.sleep(0.2)                        # a spinning worker burns CPU time through this sleep
    burnt.append(time.process_time() - start)
print(min(burnt))
"""


@pytest.mark.parametrize("first", ["import numpy", ""], ids=["numpy_first", "ninpy_first"])
def test_blas_threads_sleep_after_a_product_whatever_was_imported_first(first):
    """OpenBLAS's workers spin about 0.1 s after a product unless OPENBLAS_THREAD_TIMEOUT is small:
    the CPU time the process burns while the main thread sleeps shows which one they run with."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env.update(PYTHONPATH=ROOT, OPENBLAS_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _SPIN.format(first=first)], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert float(out) < 0.03, f"OpenBLAS's threads spun for {float(out):.3f} s of CPU time"


def test_blas_report_warns_when_the_kernel_set_is_pinned(monkeypatch):
    sys.path.insert(0, BENCHMARKS)
    try:
        import machine
    finally:
        sys.path.remove(BENCHMARKS)
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    lines = machine.blas_lines()
    assert any(line.startswith("BLAS: ") for line in lines) or "threadpoolctl" in lines[0]
    assert any("OPENBLAS_CORETYPE=Haswell" in line and "env -u OPENBLAS_CORETYPE" in line for line in lines)
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert not any("WARNING" in line for line in machine.blas_lines())


def run_script(name, *args):
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *args], capture_output=True,
                          text=True, check=True, timeout=300).stdout


def test_profile_step_prints_a_row_per_part():
    out = run_script("profile_step.py", "--dataset", "mnist", "--batch-size", "4", "--steps", "1")
    assert "one training step on the CPU" in out and "page faults" in out
    for part in ("GEMMs conv 5x5 1->96 at 28x28", "im2col", "col2im", "max pool forward",
                 "ReLU backward + bias gradient", "autograd, loss, Python (the rest)"):
        assert part in out


@pytest.mark.parametrize("separate", [False, True], ids=["one_process", "separate"])
def test_bench_train_reports_every_round(tmp_path, separate):
    pytest.importorskip("torch")
    out_file = tmp_path / "bench.json"
    out = run_script("bench_train.py", "--batch-size", "2", "--rounds", "2", "--steps", "1",
                     "--json", str(out_file), *(["--separate"] if separate else []))
    result = json.loads(out_file.read_text())
    assert set(result["rounds"]) == {"ninpy", "torch"}
    assert all(len(rounds) == 2 for rounds in result["rounds"].values())
    assert result["separate"] == separate and result["ratio_ninpy_over_torch"] > 0
    assert "ratio ninpy / torch" in out and "BLAS" in out
    assert result["engines"]["ninpy"]["settings_applied"] == (
        [] if "OPENBLAS_THREAD_TIMEOUT" in os.environ else ["OPENBLAS_THREAD_TIMEOUT=4"])


def test_bench_train_times_both_import_orders(tmp_path):
    out_file = tmp_path / "orders.json"
    out = run_script("bench_train.py", "--import-orders", "--batch-size", "2", "--rounds", "1",
                     "--steps", "1", "--json", str(out_file))
    result = json.loads(out_file.read_text())
    applied = {name: facts["settings_applied"] for name, facts in result["engines"].items()}
    assert applied == {"ninpy first": ["OPENBLAS_THREAD_TIMEOUT=4"],
                       "numpy first": ["OPENBLAS_THREAD_TIMEOUT=4 (OpenBLAS already loaded: "
                                       "threads restarted)"],
                       "numpy first, OpenBLAS's timeout": []}
    assert all(len(rounds) == 1 and rounds[0] > 0 for rounds in result["rounds"].values())
    assert "/ ninpy first" in out and "numpy first, OpenBLAS's timeout" in out
