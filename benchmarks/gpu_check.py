#!/usr/bin/env python
"""Everything only a GPU can check, in one command that fits in 8 minutes, written to one report.

    python benchmarks/gpu_check.py                     # report: docs/gpu/<date>-<machine>.md (+ .json)
    python benchmarks/gpu_check.py OUT_DIR --data-dir DIR   # Fashion-MNIST from DIR, report in OUT_DIR
    python benchmarks/gpu_check.py --dry-run           # the steps, their time limits, the data check
    python benchmarks/gpu_check.py OUT_DIR --emulated  # every step on the emulated device, small (CI)

For a machine with a GPU, CuPy and (optionally) PyTorch installed and no network. The steps, each
with a time limit, and all of them within 8 minutes:
1. the tests marked `gpu`, in float32, then again with CUPY_TF32=1 (TF32 matmuls);
2. benchmarks/bench_gpu.py: images/s against PyTorch, peak GPU memory (fp32 and TF32);
3. train.py on Fashion-MNIST on the GPU, the recipe over 10 epochs: the time to 90% test accuracy
   (the data must already be on disk: --data-dir, $NINPY_DATA, ~/.cache/ninpy or Debian's package);
4. `python -m ninpy.cam` on that run's checkpoint, on the GPU.
Before any step it checks that Fashion-MNIST is on disk (the machine may have no network) and, if
not, says in one line how to stage it. A step that runs out of time gets Ctrl-C (a training run
keeps the epochs it finished) and GRACE_S more seconds to stop, both within its limit, and is
reported as stopped. Without a usable GPU it says so in one line and exits 0, measuring and writing
nothing.

--emulated runs the same sequence on the emulated device (ninpy/emulator.py) with tiny sizes, into
OUT_DIR: CI's dry run of the commands, the data check and the report. It measures nothing about a
GPU: the tests marked `gpu` skip there, and bench_gpu (CuPy's events, memory pool and CUDA graphs)
is not run.
"""
import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMISE_S = 8 * 60
TOTAL_LIMIT_S = PROMISE_S - 30  # less the start-up, the data check and the report
GRACE_S = 20  # a stopped step's time to save and exit, inside its limit
FASHION_EPOCHS = 10
STAGE_HINT = ("stage it first: on a machine with network run `python -c \"from ninpy import datasets; "
              "datasets.load_dataset('fashion-mnist', 'DIR')\"`, copy DIR/fashion-mnist to this "
              "machine and pass --data-dir DIR (on Debian: apt-get install dataset-fashion-mnist)")


@dataclass
class Step:
    name: str
    argv: list
    limit_s: int
    env: dict = field(default_factory=dict)


def plan(work, data_dir, device="gpu"):
    """The steps, in order; `work` is a scratch folder for the benchmark's JSON, the training run
    and the CAM picture. device "emulated": the same commands on the emulator, with tiny sizes."""
    python = sys.executable
    data = ["--data-dir", str(data_dir)] if data_dir else []
    run = work / "fashion-mnist"
    small = device == "emulated"
    tests = [python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    tests += ["tests/test_gpu.py"] if small else []  # they skip there: one file shows the command
    bench = [python, "benchmarks/bench_gpu.py", "--rounds", "3", "--op-repeats", "10",
             "--json", str(work / "bench_gpu.json")]
    fashion = [python, "train.py", "--dataset", "fashion-mnist", "--device", device,
               "--epochs", "1" if small else str(FASHION_EPOCHS), "--no-download", "--progress", "off",
               "--out", str(run), *data]
    fashion += ["--limit", "64,32", "--batch-size", "32"] if small else []
    return [
        Step("gpu tests, fp32", tests, 100, {"CUPY_TF32": "0"}),
        Step("gpu tests, CUPY_TF32=1", tests, 80, {"CUPY_TF32": "1"}),
        Step("bench_gpu", None if small else bench, 110),
        Step("fashion-mnist", fashion, 130),
        Step("cam", [python, "-m", "ninpy.cam", "--checkpoint", str(run), "--device", device,
                     "--no-download", "--out", str(work / "cams.png"), *data, *(["--n", "2"] * small)],
             30),
    ]


def data_problem(data_dir):
    """None when Fashion-MNIST loads from disk (no network needed), else one line: what is missing
    and how to stage it."""
    sys.path.insert(0, str(ROOT))
    from ninpy import datasets

    try:
        datasets.load_dataset("fashion-mnist", data_dir, download=False, progress=False)
    except datasets.DataError as error:
        return f"Fashion-MNIST is not on this machine ({str(error).splitlines()[0]}); {STAGE_HINT}"
    return None


def run_step(step, seconds):
    """Run a step for at most `seconds`, its grace period included; returns {status, seconds,
    command, output tail}. At seconds - GRACE_S it gets Ctrl-C, at `seconds` it is killed."""
    started = time.perf_counter()
    command = " ".join(step.argv[1:] if step.argv[0] == sys.executable else step.argv)
    process = subprocess.Popen(step.argv, cwd=ROOT, env={**os.environ, **step.env}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    grace = min(GRACE_S, seconds / 2)
    try:
        output, _ = process.communicate(timeout=seconds - grace)
        status = "ok" if process.returncode == 0 else f"exit {process.returncode}"
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # train.py saves its checkpoint and stops
        try:
            output, _ = process.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        status = f"stopped after its {seconds:.0f} s"
    lines = (output or "").strip().splitlines()
    return {"status": status, "seconds": round(time.perf_counter() - started, 1),
            "command": command, "tail": lines[-15:]}


# ---------------------------------------------------------------------------------------------
# What each step's output says.

def pytest_counts(tail):
    """'12 passed, 3 skipped in 40.1s' -> {"passed": 12, "skipped": 3}."""
    counts = {}
    for line in tail[-3:]:
        for number, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line):
            counts[kind] = int(number)
    return counts


def bench_summary(path):
    """Per precision: ninpy and PyTorch images/s, their ratio, and peak memory in bytes."""
    try:
        results = json.loads(Path(path).read_text())["results"]
    except (OSError, ValueError, KeyError):
        return {}
    summary = {}
    for precision, r in results.items():
        ninpy, torch = r["ninpy"], r.get("torch")
        summary[precision] = {
            "device": r["device"], "ninpy_images_per_s": ninpy["images_per_s"],
            "torch_images_per_s": torch["images_per_s"] if torch else None,
            "ninpy_over_torch": ninpy["images_per_s"] / torch["images_per_s"] if torch else None,
            "ninpy_peak_bytes": ninpy["peak_bytes_in_use_during_step"],
            "torch_peak_bytes": torch["max_memory_allocated"] if torch else None}
    return summary


def time_to_accuracy(records, target=0.90):
    """Seconds of training and testing until the first epoch at `target` test accuracy, or None."""
    elapsed = 0.0
    for record in records:
        elapsed += record.get("seconds") or 0.0
        if record.get("test_acc", 0.0) >= target:
            return {"epoch": record["epoch"], "seconds": round(elapsed, 1)}
    return None


def fashion_summary(run):
    try:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return {}
    return {"test_acc_by_epoch": [round(r["test_acc"], 4) for r in records],
            "seconds_by_epoch": [round(r["seconds"], 1) for r in records],
            "time_to_90_percent": time_to_accuracy(records)}


# ---------------------------------------------------------------------------------------------
# The report.

def markdown(report):
    lines = [f"# GPU check, {report['date']}, {report['machine']}", "",
             f"`python benchmarks/gpu_check.py`: {report['device']}; {report['versions']}. "
             "Numbers from this one run.", "", "| step | status | seconds | result |",
             "|---|---|---|---|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step['seconds']} | "
                     f"{json.dumps(step.get('result', {}))} |")
    for name, step in report["steps"].items():
        lines += ["", f"## {name}", "", f"`{step['command']}`", "", "```", *step["tail"], "```"]
    return "\n".join(lines) + "\n"


def machine_name(cupy):
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return name, re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", nargs="?", default=str(ROOT / "docs" / "gpu"),
                   help="folder of the report (default docs/gpu)")
    p.add_argument("--data-dir", help="dataset folder holding fashion-mnist (default: train.py's)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the steps, their limits and whether the data is there; run nothing")
    p.add_argument("--emulated", action="store_true",
                   help="run every step on the emulated device, small (a dry run for CI)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = "emulated" if args.emulated else "gpu"
    if args.dry_run:
        for step in plan(Path("SCRATCH"), args.data_dir, device):
            env = " ".join(f"{k}={v}" for k, v in step.env.items())
            command = " ".join(step.argv[1:]) if step.argv else "not run on the emulator"
            print(f"{step.name}: at most {step.limit_s} s: {env + ' ' if env else ''}{command}")
        print(f"data: {data_problem(args.data_dir) or 'Fashion-MNIST is on disk'}")
        print(f"dry run: nothing was run; at most {TOTAL_LIMIT_S} s in all, grace periods included")
        return 0
    sys.path.insert(0, str(ROOT))
    from ninpy import backend

    problem = backend.gpu_problem() if device == "gpu" else None
    if problem is not None:
        print(f"gpu_check: no usable GPU here, so nothing was checked ({problem})")
        return 0
    problem = data_problem(args.data_dir)  # before any step: the machine may have no network
    if problem is not None:
        print(f"gpu_check: {problem}", file=sys.stderr)
        return 1
    if device == "gpu":
        import cupy

        name, slug = machine_name(cupy)
        versions = f"CuPy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
    else:
        backend.resolve_device("emulated")
        name, slug, versions = "the emulated device (no GPU)", "emulated", "ninpy/emulator.py"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # the run, its checkpoint, the CAM picture
    print(f"gpu_check: scratch files in {work}", flush=True)
    report = {"date": date, "machine": slug, "device": name, "versions": versions, "steps": {}}
    deadline = time.perf_counter() + TOTAL_LIMIT_S
    for step in plan(work, args.data_dir, device):
        left = deadline - time.perf_counter()
        if step.argv is None:
            report["steps"][step.name] = {"status": f"not run on the {device} device", "seconds": 0,
                                          "command": "", "tail": []}
            continue
        if left < 5:
            report["steps"][step.name] = {"status": "not run: out of time", "seconds": 0,
                                          "command": " ".join(step.argv[1:]), "tail": []}
            continue
        print(f"gpu_check: {step.name} (at most {min(step.limit_s, left):.0f} s)", flush=True)
        result = run_step(step, min(step.limit_s, left))
        if step.name.startswith("gpu tests"):
            result["result"] = pytest_counts(result["tail"])
        elif step.name == "bench_gpu":
            result["result"] = bench_summary(work / "bench_gpu.json")
        elif step.name == "fashion-mnist":
            result["result"] = fashion_summary(work / "fashion-mnist")
        report["steps"][step.name] = result
    path = out_dir / f"{date}-{slug}.md"
    path.write_text(markdown(report))
    path.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: wrote {path} and {path.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
