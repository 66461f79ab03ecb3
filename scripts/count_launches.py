"""Launches per training step of LeNet-5: the fused step (``--engine kernels``, with cuBLAS
GEMMs; ``--engine graph``, with ours) as issued by our code, at batch 128.

    python scripts/count_launches.py            # GPU if usable, else the CPU emulator

On a GPU the kernels are CuPy's compiled ones; elsewhere they run in the CPU emulator of
``lenet_xp/testing/cuda_emulator.py`` (needs g++), which executes the same sources and launch
arguments, so the count is the same. Each cuBLAS GEMM or reduction counts as one launch
(cuBLAS may split one into two kernels: ``lenet_xp.bench --device cuda --torch`` also prints
CUPTI's count of what the GPU ran). The array-op layers issue about 175 per step.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from lenet_xp.backend import cuda_unavailable_reason, get_device  # noqa: E402
from lenet_xp.data.device_split import DeviceSplit  # noqa: E402
from lenet_xp.kernels.ops import Kernels  # noqa: E402
from lenet_xp.models.lenet5 import LeNet5  # noqa: E402
from lenet_xp.optim.optimizers import Adam  # noqa: E402
from lenet_xp.training.fused import FusedStep  # noqa: E402


def main() -> int:
    batch = 128
    reason = cuda_unavailable_reason()
    device = get_device("cpu" if reason else "cuda")
    xp = device.xp
    if reason:
        from lenet_xp.testing.cuda_emulator import compiler_available, emulated_function

        problem = compiler_available()
        if problem:
            print(f"count_launches: no GPU ({reason}) and no emulator ({problem})", file=sys.stderr)
            return 1
        kernels, where = Kernels(xp, emulated_function), "CPU emulator (no usable GPU)"
    else:
        kernels, where = Kernels(xp), "GPU"
    images = xp.zeros((batch, 1, 28, 28), dtype=xp.float32)
    labels = xp.arange(batch, dtype=xp.int64) % 10
    split = DeviceSplit(images, labels, device)
    print(f"launches per training step at batch {batch} ({where}):")
    for flag, gemm in (("--engine kernels", "cublas"), ("--engine graph", "ours")):
        model = LeNet5(seed=0).to(device)
        fused = FusedStep(
            model, Adam(model.parameters()), split, batch, [1e-3] * 2, 2, gemm, kernels
        )
        print(f"  {flag:<16} ({gemm} GEMMs): {fused.launches_per_step()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
