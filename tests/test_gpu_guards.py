"""The guards of tests/conftest.py, run for real: pytest in a child process on a generated test
file beside a copy of our conftest.

* ``LENET_XP_REQUIRE_CUDA=1`` turns "no usable GPU" skips into failures (and nothing else);
* a test during which a CUDA kernel of ours fell back to array ops fails, naming the kernel.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import CUDA_REASON, REQUIRE_CUDA

CONFTEST = Path(__file__).with_name("conftest.py")


def run_pytest(folder: Path, source: str, require_cuda: bool) -> tuple[int, dict[str, str], str]:
    """Run pytest on ``source`` (a test module) in ``folder``, beside a copy of our conftest.

    Returns ``(exit status, {test name: "passed" | "failed" | "error" | "skipped"}, output)``.
    """
    folder.mkdir()
    shutil.copy(CONFTEST, folder / "conftest.py")
    (folder / "test_generated.py").write_text(textwrap.dedent(source))
    env = {k: v for k, v in os.environ.items() if k != REQUIRE_CUDA}
    if require_cuda:
        env[REQUIRE_CUDA] = "1"
    report = folder / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={report}", "test_generated.py"]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = (
            {"failure": "failed"}.get(kinds[0], kinds[0]) if kinds else "passed"
        )
    return proc.returncode, outcomes, proc.stdout + proc.stderr


GPU_TESTS = """
    import pytest
    from conftest import CUDA_REASON, NO_GPU, needs_cuda, needs_no_cuda

    @needs_cuda
    def test_marked():
        pass

    def test_skips_in_its_body():
        if CUDA_REASON:
            pytest.skip(f"{NO_GPU} {CUDA_REASON}")

    @needs_no_cuda
    def test_of_the_no_gpu_path():
        pass

    def test_skips_for_another_reason():
        pytest.skip("not about GPUs")
"""


def test_require_cuda_turns_no_gpu_skips_into_failures(tmp_path):
    rc_plain, plain, out_plain = run_pytest(tmp_path / "plain", GPU_TESTS, require_cuda=False)
    rc_required, required, out = run_pytest(tmp_path / "required", GPU_TESTS, require_cuda=True)
    assert plain["test_skips_for_another_reason"] == "skipped"
    assert required["test_skips_for_another_reason"] == "skipped"
    if CUDA_REASON is None:  # a usable GPU: the GPU tests run, the no-GPU path test skips
        expected = {"test_marked": "passed", "test_skips_in_its_body": "passed"}
        expected["test_of_the_no_gpu_path"] = "skipped"
        assert rc_plain == rc_required == 0, out
        for outcomes in (plain, required):
            assert {name: outcomes[name] for name in expected} == expected
        return
    assert rc_plain == 0, out_plain
    assert plain["test_marked"] == plain["test_skips_in_its_body"] == "skipped"
    assert plain["test_of_the_no_gpu_path"] == "passed"
    assert rc_required == 1, out
    assert required["test_marked"] == "error"  # a skip in set-up becomes a set-up failure
    assert required["test_skips_in_its_body"] == "failed"
    assert required["test_of_the_no_gpu_path"] == "passed"  # skips for the opposite reason
    assert f"{REQUIRE_CUDA}=1 makes this skip a failure: no usable GPU: {CUDA_REASON}" in out


def test_a_kernel_fallback_fails_the_test_and_names_the_kernel(tmp_path):
    source = """
        import pytest
        from lenet_xp.kernels import record_fallback

        def test_falls_back():
            record_fallback("demo_kernel", "NVRTC could not be loaded")

        @pytest.mark.allow_kernel_fallback
        def test_falls_back_on_purpose():
            record_fallback("other_kernel", "expected here")

        def test_after_a_fallback_elsewhere():
            pass
    """
    rc, outcomes, out = run_pytest(tmp_path / "run", source, require_cuda=False)
    assert rc == 1, out
    assert outcomes == {
        "test_falls_back": "error",  # fails in the guard's teardown
        "test_falls_back_on_purpose": "passed",
        "test_after_a_fallback_elsewhere": "passed",  # an earlier test's fallback is not its own
    }
    assert "fell back to array ops during this test: demo_kernel (NVRTC could not be loaded)" in out
