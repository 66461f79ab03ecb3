"""The fused training step (lenet_xp.training.fused) on the CPU, its CUDA kernels run by the
emulator (lenet_xp/testing/cuda_emulator.py): the whole orchestration, buffer layouts and launch
arguments checked against the array-op layers, before any GPU sees them. ``test_gpu_fused.py``
runs the same comparisons with the kernels compiled for a real GPU.
"""

import numpy as np
import pytest
from fused_check import assert_same_training, fused_epoch, make_split, reference_epoch

from lenet_xp.kernels.ops import Kernels
from lenet_xp.models.lenet5 import LeNet5
from lenet_xp.optim.optimizers import SGD, Adam
from lenet_xp.testing.cuda_emulator import compiler_available, emulated_function
from lenet_xp.training.fused import FusedStep, supports

NO_COMPILER = compiler_available()
pytestmark = pytest.mark.skipif(bool(NO_COMPILER), reason=str(NO_COMPILER))
TOL = {"float32": (2e-4, 2e-5), "float64": (1e-9, 1e-11)}


def emulated() -> Kernels:
    return Kernels(np, provider=emulated_function)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_epoch_with_cublas_gemms_matches_the_layers(dtype):
    """300 images in batches of 128: two full batches and a short one of 44, shifted."""
    split = make_split("cpu", dtype)
    ref = reference_epoch(split, dtype, batch=128, shift=2)
    fused = fused_epoch(split, dtype, batch=128, shift=2, gemm="cublas", kernels=emulated())
    assert_same_training(ref, fused, *TOL[dtype])


def test_fused_epoch_with_our_gemm_matches_the_layers():
    """Our GEMM (split-K weight gradients, bias gradients against a ones vector, fused bias,
    ReLU and ReLU-mask epilogues) in a whole step: 20 images in batches of 8 (8, 8, 4)."""
    split = make_split("cpu", "float64", n=20)
    ref = reference_epoch(split, "float64", batch=8, shift=1)
    fused = fused_epoch(split, "float64", batch=8, shift=1, gemm="ours", kernels=emulated())
    assert_same_training(ref, fused, *TOL["float64"])


def test_adamw_and_a_second_epoch_match_the_layers():
    split = make_split("cpu", "float64", n=150)
    ref = reference_epoch(split, "float64", batch=64, shift=0, adamw=True)
    fused = fused_epoch(split, "float64", 64, 0, "cublas", kernels=emulated(), adamw=True)
    assert_same_training(ref, fused, *TOL["float64"])
    # The optimizer's state is the flat buffers': a checkpoint of it has the right step.
    state = fused[2].optimizer.state_dict()
    assert state["steps"] == 3 and state["step.0"] == 3
    np.testing.assert_array_equal(state["exp_avg.0"], fused[2].flat["m"][:150].reshape(6, 1, 5, 5))


@pytest.mark.parametrize("gemm", ["cublas", "ours"])
def test_one_step_is_at_most_40_launches(gemm):
    split = make_split("cpu", "float32", n=16)
    model = LeNet5(seed=0)
    fused = FusedStep(model, Adam(model.parameters()), split, 16, [1e-3] * 4, 2, gemm, emulated())
    launches = fused.launches_per_step()
    assert 25 <= launches <= 40, launches


def test_an_lr_table_too_short_for_the_epoch_is_refused():
    split = make_split("cpu", "float32", n=40)
    model = LeNet5(seed=0)
    fused = FusedStep(
        model, Adam(model.parameters()), split, 16, [1e-3] * 2, 0, "cublas", emulated()
    )
    fused.begin_epoch(np.arange(40))
    with pytest.raises(ValueError, match="lr_of_step has 2 steps"):
        fused.run_epoch()


def test_what_the_fused_step_cannot_train_is_named():
    model = LeNet5(seed=0)
    assert "Adam" in supports(model, SGD(model.parameters(), lr=0.1))
    assert supports(model, Adam(model.parameters())) is None
    with pytest.raises(ValueError, match="not SGD"):
        FusedStep(model, SGD(model.parameters(), lr=0.1), make_split("cpu", "float32", 8), 8, [0.1])


def test_the_count_launches_script_reports_both_flavours_within_40():
    import re
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "count_launches.py"
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    counts = [int(n) for n in re.findall(r"GEMMs\): (\d+)", proc.stdout)]
    assert len(counts) == 2 and all(25 <= n <= 40 for n in counts), proc.stdout


def test_every_launch_is_checked_against_the_kernels_declaration():
    """On a GPU a float64 array passed for a ``float*`` is silent garbage: our launcher
    refuses it (and a wrong scalar type, and a non-contiguous array) before any launch."""
    launched = []
    kernels = Kernels(np, provider=lambda file, expression: lambda g, b, a: launched.append(a))
    x = np.zeros((2, 3, 4, 4), np.float32)
    kernels.im2col(x, 3, 3, 1, 1, 4, 4)
    assert len(launched) == 1
    bias_act = kernels._fn("dense.cu", "bias_act", np.float32)
    y, bias = np.zeros((4, 8), np.float32), np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"argument 0 \(float\* y\): expects an array of float32"):
        bias_act((1,), (32,), (y.astype(np.float64), bias, np.int32(8), np.int32(4), np.int32(1)))
    with pytest.raises(TypeError, match="expects a numpy.int32 scalar, got Python int"):
        bias_act((1,), (32,), (y, bias, 8, np.int32(4), np.int32(1)))
    with pytest.raises(TypeError, match="C-contiguous"):
        bias_act((1,), (32,), (y.T, bias, np.int32(8), np.int32(4), np.int32(1)))
    assert len(launched) == 1
