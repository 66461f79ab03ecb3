"""Every CUDA source of the package compiles with NVRTC, without a GPU or a driver.

NVRTC comes as a wheel (``nvidia-cuda-nvrtc-cu12``, in the ``test`` extra), so a kernel that
does not compile is caught here, on any CPU machine, before it can reach a GPU.
"""

import re
from pathlib import Path

import pytest

from lenet_xp import kernels
from lenet_xp.kernels import SOURCES, KernelCompileError, compile_check, name_expressions


def _nvrtc_reason() -> str | None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # ImportError, or the library itself is missing
        return f"NVRTC is not available ({type(exc).__name__}: {exc}); pip install -e '.[test]'"
    return None


NO_NVRTC = _nvrtc_reason()
needs_nvrtc = pytest.mark.skipif(bool(NO_NVRTC), reason=str(NO_NVRTC))
KERNEL_DIR = Path(kernels.__file__).parent


@needs_nvrtc
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("file", sorted(SOURCES))
def test_every_kernel_source_compiles(file, arch):
    ptx = compile_check(file, arch)
    for expression in name_expressions(file):
        name = expression.split("<")[0]
        assert f".entry _Z{len(name)}{name}I" in ptx, f"{expression} missing from the PTX"
    assert f".target sm_{arch[-2:]}" in ptx


@needs_nvrtc
def test_a_broken_kernel_fails_with_its_file_and_line():
    text = kernels.source_text("pool.cu")
    broken = text.replace("out[idx] = activate(best, act);", "out[idx] = best", 1)
    assert broken != text
    line = broken[: broken.index("out[idx] = best\n")].count("\n") + 1
    with pytest.raises(KernelCompileError) as info:
        compile_check("pool.cu", "compute_80", text=broken)
    message = str(info.value)
    assert "pool.cu" in message and "error" in message
    # NVRTC reports the missing ';' at the line after the broken statement at the latest.
    reported = [int(n) for n in re.findall(r"pool\.cu\((\d+)\)", message)]
    assert reported and min(reported) in (line, line + 1)


@needs_nvrtc
def test_a_type_error_in_one_instantiation_fails():
    text = kernels.source_text("optim.cu").replace("const T m =", "const T* m =", 1)
    with pytest.raises(KernelCompileError, match="optim.cu"):
        compile_check("optim.cu", "compute_90", text=text)


def test_every_cu_file_and_kernel_is_registered():
    """A source or a kernel missing from SOURCES would never be compiled or tested."""
    on_disk = {path.name for path in KERNEL_DIR.glob("*.cu")}
    assert on_disk == set(SOURCES)
    for file, names in SOURCES.items():
        text = (KERNEL_DIR / file).read_text()
        defined = set(re.findall(r"__global__\s+void\s+(\w+)\s*\(", text))
        assert defined == set(names), file


#: Threads per block each kernel is launched with (lenet_xp.kernels.ops).
_BLOCK_THREADS = {
    "softmax_cross_entropy": kernels.LOSS_THREADS,
    "subsample_grads": kernels.SUBSAMPLE_THREADS,
    "gemm": kernels.GEMM_TILE**2,
}


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("file", sorted(SOURCES))
def test_every_kernel_fits_the_launch_limits(file, arch):
    """Compiled as CuPy compiles them (``-ftz=true``) to machine code, with ``-Xptxas -v``:
    registers x threads per block within the 65,536 registers of a block, static shared memory
    within 48 KiB, no register spills."""
    usage = kernels.resource_usage(file, arch)
    assert set(usage) == set(name_expressions(file))
    for expression, (registers, smem, spill) in usage.items():
        threads = _BLOCK_THREADS.get(expression.split("<")[0], kernels.THREADS)
        assert registers * threads <= 65536, (expression, registers, threads)
        assert smem <= 48 * 1024 and spill == 0, (expression, smem, spill)
