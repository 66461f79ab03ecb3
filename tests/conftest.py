"""What every test module shares: the GPU and MNIST skips, and two guards for GPU machines.

* ``needs_cuda`` skips a test when no GPU is usable, with a reason that starts with
  :data:`NO_GPU` ("no usable GPU:"). With ``LENET_XP_REQUIRE_CUDA=1`` in the environment
  (a GPU machine's CI), every such skip is a failure instead, so a broken CUDA set-up cannot
  pass as "all skipped". ``needs_no_cuda`` (tests of the no-GPU path: they skip *because* a
  GPU works) and every other skip are left alone.
* A test during which one of our CUDA kernels fell back to array ops
  (:func:`lenet_xp.kernels.fallbacks` grew) fails, naming the kernel and why; mark a test
  that provokes a fallback on purpose with ``@pytest.mark.allow_kernel_fallback``.
* ``DATA`` is the MNIST folder (``$LENET_XP_DATA``, else ``../shared/datasets/mnist``);
  ``needs_mnist`` skips a test when its files are not there.
"""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/gradcheck.py helpers

from lenet_xp.backend import cuda_unavailable_reason, fake_cuda  # noqa: E402
from lenet_xp.kernels import fallbacks  # noqa: E402

#: The prefix of every "no usable GPU" skip reason: what LENET_XP_REQUIRE_CUDA=1 turns into
#: a failure.
NO_GPU = "no usable GPU:"
#: The environment variable that turns "no usable GPU" skips into failures ("1": on).
REQUIRE_CUDA = "LENET_XP_REQUIRE_CUDA"

#: Whether CUDA is the strict CuPy stand-in (``LENET_XP_FAKE_CUDA``): GPU tests then run on the
#: CPU, kernels through the emulator, so the heaviest shrink their data (never their checks).
ON_STAND_IN = fake_cuda()
#: Why CUDA device 0 cannot be used here (one line), or ``None`` when it can.
CUDA_REASON = cuda_unavailable_reason(0)
needs_cuda = pytest.mark.skipif(CUDA_REASON is not None, reason=f"{NO_GPU} {CUDA_REASON}")
needs_no_cuda = pytest.mark.skipif(
    CUDA_REASON is None, reason="a GPU is usable here; this tests the no-GPU path"
)


def _second_gpu_reason() -> str | None:
    """Why there is no usable ``cuda:1``: a "no usable GPU" reason when there is no GPU at
    all, else a "needs 2 GPUs" one (a one-GPU machine is not a broken one)."""
    if CUDA_REASON is not None:
        return f"{NO_GPU} {CUDA_REASON}"
    reason = cuda_unavailable_reason(1)
    return None if reason is None else f"needs 2 GPUs: {reason}"


SECOND_GPU_REASON = _second_gpu_reason()


def needs_two_gpus(test):
    """Skip ``test`` without a usable ``cuda:1``; mark it ``two_gpus`` (``-m two_gpus``)."""
    skip = pytest.mark.skipif(SECOND_GPU_REASON is not None, reason=f"{SECOND_GPU_REASON}")
    return pytest.mark.two_gpus(skip(test))


#: Device names to parametrise a test over: the CPU always, CUDA where a GPU is usable.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

DATA = Path(
    os.environ.get("LENET_XP_DATA", Path(__file__).resolve().parents[2] / "shared/datasets/mnist")
)
needs_mnist = pytest.mark.skipif(
    not (DATA / "train-images-idx3-ubyte.gz").exists(),
    reason=f"MNIST not found in {DATA}; set LENET_XP_DATA to the folder with the four .gz files",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "allow_kernel_fallback: the test may make a CUDA kernel of ours fall back to array ops",
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA device (a GPU or the stand-in)")
    config.addinivalue_line("markers", "two_gpus: needs two CUDA devices")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a CUDA device ``gpu``, so that
    ``-m gpu`` selects exactly the GPU suite (``.ci/run`` runs it on the CuPy stand-in)."""
    for item in items:
        reasons = [str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")]
        if item.get_closest_marker("two_gpus") or any(r.startswith(NO_GPU) for r in reasons):
            item.add_marker(pytest.mark.gpu)


def _require_cuda() -> bool:
    return os.environ.get(REQUIRE_CUDA, "").strip() not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """With ``LENET_XP_REQUIRE_CUDA=1``, a skip whose reason starts with :data:`NO_GPU` (in
    set-up, as ``needs_cuda`` does, or in the test body) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _require_cuda()) or hasattr(report, "wasxfail"):
        return
    if not (isinstance(report.longrepr, tuple) and len(report.longrepr) == 3):
        return
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    if reason.startswith(NO_GPU):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_CUDA}=1 makes this skip a failure: {reason}"


@pytest.fixture(autouse=True)
def _no_kernel_fallback(request: pytest.FixtureRequest):
    """Fail the test if one of our CUDA kernels fell back to array ops while it ran."""
    before = len(fallbacks())
    yield
    new = fallbacks()[before:]
    if new and request.node.get_closest_marker("allow_kernel_fallback") is None:
        what = "; ".join(f"{name} ({reason})" for name, reason in new)
        pytest.fail(f"CUDA kernel fell back to array ops during this test: {what}", pytrace=False)


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 checkpoint that reads real handwriting (~97-98 % on MNIST's test set), trained
    once per test session on the CPU (2 epochs on 30,000 images: about 10 s on 2 cores).
    Skips where MNIST is not there."""
    if not (DATA / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(needs_mnist.kwargs["reason"])
    from lenet_xp import train

    out = tmp_path_factory.mktemp("trained")
    args = ["--device", "cpu", "--data-dir", str(DATA), "--quiet", "--epochs", "2"]
    args += ["--limit-train", "30000", "--limit-test", "100", "--val-size", "0", "--out", str(out)]
    assert train.main(args) == 0
    return out / "last.npz"
