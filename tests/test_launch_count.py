"""benchmarks/count_launches.py on the emulated device: the launches of a NIN training step stay
within their budget, and the count follows the network's layers, not the batch."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPU_PROBLEM, require_device

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "count_launches.py"
spec = importlib.util.spec_from_file_location("count_launches", SCRIPT)
count_launches = importlib.util.module_from_spec(spec)
spec.loader.exec_module(count_launches)

# Launches of one CIFAR-10 NIN training step (forward, loss, backward, SGD; batch and tally apart),
# as counted today: 26 GEMMs, 2 x 9 bias + ReLU kernels and the rest (docs/gpu-launches.md has the
# table). A change that adds one must say why here.
STEP_BUDGET = 59


@pytest.fixture(scope="module")
def counts():
    require_device("emulated")
    return count_launches.count_emulated("cifar10", batch_size=1)


def test_a_nin_step_stays_within_its_launch_budget(counts):
    step = counts["step"]
    assert sum(step.values()) <= STEP_BUDGET, dict(step)
    assert step["ninpy kernel: sgd_update_many_kernel"] == 1          # every parameter, one launch
    assert step["ninpy kernel: sgd_update_kernel"] == 0
    assert step["ninpy kernel: relu_bias_backward_kernel"] == 9       # ReLU backward and db fused:
    assert step["ninpy kernel: relu_backward_kernel"] == 0            # no separate pass, no sum
    assert step["cupy reduction: add"] == 0
    assert step["cupy copy: copy()"] == 0    # no leaf-gradient copies, none in pooling's backward
    assert not [row for row in step if "astype" in row]
    assert step["ninpy kernel: im2col_kernel"] == 3     # forward only: backward keeps the columns
    assert step["ninpy kernel: dropout_kernel"] == 0    # each dropout follows a pooling, whose
    assert step["cupy elementwise: multiply"] == 0      # kernels draw and apply its mask
    for kernel in ("max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward"):
        assert step[f"ninpy kernel: {kernel}_kernel"] == 1


def test_the_head_and_the_loss_are_one_kernel_each_way(counts):
    """The first convolution reads the (N, C, H, W) images as they are, global average pooling the
    channels-first class maps (no swap either way; one kernel each way), and the mean cross-entropy is one kernel forward and one backward (the autograd seed
    aside), which divides by the count itself: no CuPy mean, no divide."""
    step = counts["step"]
    for kernel in ("global_avg_pool_forward_kernel", "global_avg_pool_backward_kernel",
                   "cross_entropy_mean_kernel", "cross_entropy_backward_kernel"):
        assert step[f"ninpy kernel: {kernel}"] == 1, kernel
    assert step["ninpy kernel: cross_entropy_forward_kernel"] == 0
    assert step["cupy reduction: mean"] == 0
    assert step["cupy elementwise: divide"] == 0 and step["cupy elementwise: true_divide"] == 0
    assert step["cupy copy: x[...] = array"] == 0   # no layout swap: the first convolution reads
                                                    # the images, pooling the class maps, as they are
    assert step["cupy fill: ones_like"] <= 1        # the autograd seed; no scale filled for the loss


def test_no_phase_reads_the_device_or_does_unclassified_work(counts):
    for phase, rows in counts.items():
        assert not [row for row in rows if "device->host" in row or row.startswith("unclassified")], phase


def test_the_count_follows_the_layers_not_the_batch(counts):
    assert count_launches.count_emulated("cifar10", batch_size=3) == counts


@pytest.mark.skipif(GPU_PROBLEM is None, reason="a GPU is usable here: it would count on it")
def test_without_a_gpu_the_device_count_is_refused_in_one_line():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "gpu"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "count_launches: device 'gpu'" in result.stderr
