"""The backend: device names, moves between devices, clear CUDA errors, and the rule that
only the backend takes NumPy for array math."""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lenet_xp import LeNet5
from lenet_xp.backend import (
    CPU,
    DeviceError,
    asnumpy,
    cuda_unavailable_reason,
    default_rng,
    get_array_module,
    get_device,
    to_device,
)

PACKAGE = Path(__file__).resolve().parents[1] / "lenet_xp"
# Host-side file formats: bytes on disk in, host arrays out; never on the training path.
HOST_IO_MODULES = {"backend.py", "mnist.py", "checkpoint.py", "images.py"}
HAS_CUPY = importlib.util.find_spec("cupy") is not None
GPU_REASON = cuda_unavailable_reason() if HAS_CUPY else "CuPy is not installed"


def test_cpu_and_auto_resolve(capsys):
    assert get_device("cpu") is CPU and get_device(" CPU ") is CPU
    device = get_device("auto", announce=True)
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"device: auto -> {device}")
    if GPU_REASON:
        assert device is CPU and "\n" not in line


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "tpu", ""])
def test_nonsense_device_names_are_rejected(spec):
    with pytest.raises(DeviceError, match="use cpu, cuda, cuda:N or auto"):
        get_device(spec)


def test_cuda_without_cupy_names_the_extra():
    # A child interpreter in which `import cupy` fails, as on a machine without CuPy.
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "from lenet_xp.backend import get_device, DeviceError\n"
        "try:\n    get_device('cuda')\nexcept DeviceError as e:\n    print(e)\n"
        "print(get_device('auto'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.strip().splitlines()
    assert 'pip install "lenet_xp[cuda12]"' in first and "lenet_xp[cuda13]" in first
    assert second == "cpu"


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
@pytest.mark.skipif(not GPU_REASON, reason="a GPU is usable here; this tests the no-GPU path")
def test_cupy_without_gpu_gives_cudas_reason():
    with pytest.raises(DeviceError) as info:
        get_device("cuda:0")
    message = str(info.value)
    assert "CUDA is not usable" in message and "--device cpu" in message
    assert "\n" not in message


def test_moves_and_namespaces_on_cpu():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(x, "cpu") is x or np.shares_memory(to_device(x, "cpu"), x)
    assert get_array_module(x) is np and asnumpy(x) is x
    rng_a, rng_b = default_rng(5, "cpu"), default_rng(5, "cpu")
    np.testing.assert_array_equal(rng_a.random(4), rng_b.random(4))


def test_model_to_cpu_keeps_values():
    model = LeNet5(seed=0)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    model.to("cpu")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def _numpy_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [n for n in names if n == "numpy" or n.startswith("numpy.")]
    return found


def test_only_the_backend_imports_numpy():
    """Layers take ``xp`` from their inputs, so a GPU run cannot silently fall back to NumPy."""
    offenders = {
        str(path.relative_to(PACKAGE)): _numpy_imports(path)
        for path in PACKAGE.rglob("*.py")
        if path.name not in HOST_IO_MODULES and _numpy_imports(path)
    }
    assert offenders == {}
    assert _numpy_imports(PACKAGE / "backend.py")  # the check itself can see an import
