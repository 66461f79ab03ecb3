"""The backend: device names, moves between devices, clear CUDA errors, and the rule that
only the backend takes NumPy for array math."""

import ast
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CUDA_REASON, needs_no_cuda

from lenet_xp import LeNet5
from lenet_xp.backend import (
    CPU,
    CUDA_EXTRA_HINT,
    DeviceError,
    asnumpy,
    default_rng,
    get_array_module,
    get_device,
    probe_steps,
    to_device,
    use_device,
)
from lenet_xp.backend.cuda import _cuda_probe_steps

PACKAGE = Path(__file__).resolve().parents[1] / "lenet_xp"
# Host-side file formats: bytes on disk in, host arrays out; never on the training path.
# Host-side I/O: files, pictures, ONNX graphs and HTTP bodies are NumPy arrays by nature.
HOST_IO_MODULES = {
    "backend/__init__.py", "backend/cuda.py", "data/mnist.py", "storage/checkpoint.py",
    "data/images.py", "predict.py", "export.py", "models/onnx.py", "web/api.py",
    "training/evaluation.py",  # classify: host pictures in, host probabilities out
    "kernels/signatures.py",  # kernels' C types as NumPy dtypes: metadata, no array math
}  # fmt: skip
#: The CuPy stand-in and the kernel emulator, and the compiled CPU kernels, are NumPy underneath
#: by design (the ops call the latter only for NumPy arrays: ``native.fits``).
HOST_PACKAGES = ("testing", "native")
HAS_CUPY = importlib.util.find_spec("cupy") is not None


def test_cpu_and_auto_resolve(capsys):
    assert get_device("cpu") is CPU and get_device(" CPU ") is CPU
    device = get_device("auto", announce=True)
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"device: auto -> {device}")
    if CUDA_REASON:
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
    env = {k: v for k, v in os.environ.items() if k != "LENET_XP_FAKE_CUDA"}  # no stand-in
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    first, second = out.stdout.strip().splitlines()
    assert 'pip install "lenet_xp[cuda12]"' in first and "lenet_xp[cuda13]" in first
    assert second == "cpu"


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
@needs_no_cuda
def test_cupy_without_gpu_gives_cudas_reason():
    with pytest.raises(DeviceError) as info:
        get_device("cuda:0")
    message = str(info.value)
    assert "CUDA is not usable" in message and "--device cpu" in message
    assert "\n" not in message


LIBRARIES_HINT = 'the CUDA libraries come with pip install "lenet_xp[cuda12]"'


def test_probe_names_the_first_failing_step_in_one_line():
    ran = []

    def compile_error():
        raise RuntimeError("nvrtc: error: failed to load\n  builtins\n" + "log " * 500)

    steps = [
        ("finding cuda:0", lambda: ran.append("find"), ""),
        ("compiling an elementwise kernel (NVRTC)", compile_error, f"; {LIBRARIES_HINT}"),
        ("never reached", lambda: ran.append("late"), ""),
    ]
    message = probe_steps(steps)
    assert ran == ["find"]  # stops at the first failure
    assert message.startswith(
        "CUDA is not usable: compiling an elementwise kernel (NVRTC) failed: "
        "RuntimeError: nvrtc: error: failed to load builtins log"
    )
    assert message.endswith(LIBRARIES_HINT)  # the hint survives the cut of a long log
    assert "\n" not in message and len(message) < 500
    wrong = [("a 2x2 matmul (cuBLAS)", lambda: "gave [[0.0, 0.0], [0.0, 0.0]]", "")]
    assert probe_steps(wrong) == (
        "CUDA is not usable: a 2x2 matmul (cuBLAS) failed: gave [[0.0, 0.0], [0.0, 0.0]]"
    )
    assert probe_steps([("finding cuda:0", lambda: None, "")]) is None


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
def test_each_real_probe_step_says_what_it_checks():
    """The real checks, one by one: allocation, cuBLAS matmul and NVRTC kernel all pass on a
    usable GPU; where one fails, it says so in one line, the library steps with the fix, and
    the first failure is what :func:`cuda_unavailable_reason` reports."""
    from lenet_xp.backend import import_cupy

    cupy = import_cupy()

    steps = _cuda_probe_steps(cupy, 0)
    libraries = ["a 2x2 matmul (cuBLAS)", "compiling an elementwise kernel (NVRTC)"]
    assert [what for what, _, _ in steps] == ["finding cuda:0", "allocating on cuda:0", *libraries]
    messages = [probe_steps([step]) for step in steps]
    failures = [message for message in messages if message is not None]
    assert (failures[0] if failures else None) == CUDA_REASON
    for (what, _, _), message in zip(steps, messages, strict=True):
        if message is not None:
            assert message.startswith(f"CUDA is not usable: {what} failed: ")
            assert "\n" not in message
            with_fix = message.endswith(f"; the CUDA libraries come with {CUDA_EXTRA_HINT}")
            assert with_fix == (what in libraries), message


def test_use_device_on_the_cpu_is_a_no_op():
    for spec in ("cpu", CPU):
        context = use_device(spec)
        assert isinstance(context, contextlib.nullcontext)
        with context as entered:
            assert entered is None
            assert get_array_module(np.zeros(2)) is np
    with pytest.raises(DeviceError, match="use cpu, cuda, cuda:N or auto"):
        use_device("tpu")


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
def test_use_device_cuda_enters_that_gpu_or_says_why_not():
    from lenet_xp.backend import import_cupy

    cupy = import_cupy()

    if CUDA_REASON is not None:
        with pytest.raises(DeviceError) as info:
            use_device("cuda:0")
        assert "CUDA is not usable" in str(info.value) and "\n" not in str(info.value)
        return
    with use_device("cuda:0"):
        assert cupy.cuda.Device().id == 0 and cupy.zeros(1).device.id == 0


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
        if str(path.relative_to(PACKAGE)) not in HOST_IO_MODULES
        and path.relative_to(PACKAGE).parts[0] not in HOST_PACKAGES
        and _numpy_imports(path)
    }
    assert offenders == {}
    assert _numpy_imports(PACKAGE / "backend" / "__init__.py")  # the check itself can see an import


@pytest.mark.skipif(not HAS_CUPY, reason="CuPy is not installed")
def test_a_machine_without_a_driver_is_named_as_such():
    """CUDA's own words for "no driver" are "driver version is insufficient"; the one line
    says what is really missing (when the driver reports version 0, i.e. there is none)."""
    from lenet_xp.backend import import_cupy

    cupy = import_cupy()

    try:
        version = cupy.cuda.runtime.driverGetVersion()
    except Exception as exc:
        pytest.skip(f"driver version unknown here: {exc}")
    if version != 0:
        pytest.skip(f"an NVIDIA driver (version {version}) is installed here")
    from lenet_xp.backend import cuda_unavailable_reason

    reason = cuda_unavailable_reason(0)
    assert reason is not None and "no NVIDIA driver is installed" in reason and "\n" not in reason


def test_physical_cores_count_hyperthreads_once(monkeypatch, tmp_path):
    """Two cores of two hyperthreads each (sysfs's topology): 4 logical, 2 physical; a CPU
    without topology files counts on its own."""
    from lenet_xp.backend import host

    for cpu, core in enumerate([0, 0, 1, 1, None]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        if core is not None:
            (topology / "physical_package_id").write_text("0\n")
            (topology / "core_id").write_text(f"{core}\n")
        else:
            topology.rmdir()
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(host, "Path", lambda path: tmp_path / path.split("/cpu/")[1])
    assert host.host_cores() == 4 and host.host_cores(physical=True) == 2
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: {0, 1, 4})
    assert host.host_cores(physical=True) == 2  # cpu4: no sysfs, one core of its own
    assert host.host_cores() == 3
