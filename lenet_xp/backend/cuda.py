"""Finding CuPy (or its stand-in, ``$LENET_XP_FAKE_CUDA``) and probing a GPU: why a CUDA
device cannot be used, in one line with CUDA's own words (:func:`cuda_unavailable_reason`)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

import numpy

CUDA_EXTRA_HINT = (
    'pip install "lenet_xp[cuda12]" (CUDA 12.x driver) or "lenet_xp[cuda13]" (CUDA 13.x)'
)


class DeviceError(RuntimeError):
    """A device was asked for that cannot be used; the message says why and what to do."""


def fake_cuda() -> bool:
    """Whether ``$LENET_XP_FAKE_CUDA`` puts the strict CuPy stand-in (NumPy underneath) where
    CuPy would be: every GPU code path then runs on the CPU (:mod:`lenet_xp.testing`)."""
    return os.environ.get("LENET_XP_FAKE_CUDA", "").strip() not in ("", "0")


def import_cupy() -> ModuleType:
    """CuPy (or, with ``$LENET_XP_FAKE_CUDA``, its stand-in); :class:`DeviceError` if absent."""
    if fake_cuda():
        from lenet_xp.testing.fake_cupy import cupy as stand_in

        return stand_in
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(f"CuPy is not installed ({exc}); {CUDA_EXTRA_HINT}") from None
    return cupy


def import_nccl() -> ModuleType | None:
    """CuPy's NCCL bindings (``cupy.cuda.nccl``; the stand-in's own with
    ``$LENET_XP_FAKE_CUDA``), or ``None`` where CuPy has no NCCL."""
    if fake_cuda():
        from lenet_xp.testing.fake_cupy import nccl
    else:
        try:
            from cupy.cuda import nccl
        except ImportError:
            return None
    return nccl if getattr(nccl, "available", True) else None


def cuda_device_count() -> int:
    """Usable CUDA GPUs here (0 without CuPy, a driver or a GPU; the stand-in's devices with
    ``$LENET_XP_FAKE_CUDA``)."""
    if cuda_unavailable_reason(0) is not None:
        return 0
    return int(import_cupy().cuda.runtime.getDeviceCount())


#: How long a reason quoted from CUDA may be: a compiler log can run to pages.
_REASON_CHARS = 300


def _one_line(text: str, limit: int = _REASON_CHARS) -> str:
    """``text`` with every run of whitespace (newlines included) as one space, cut to ``limit``."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: A probe step: ``(what it does, check, hint)``. ``check()`` returns ``None`` when it worked,
#: else a reason (or raises); ``hint`` (may be empty) says what to do when it fails.
ProbeStep = tuple[str, Callable[[], str | None], str]


def probe_steps(steps: Iterable[ProbeStep]) -> str | None:
    """Run the steps in order; the first that fails (returns a reason or raises) gives one
    line: ``CUDA is not usable: <what> failed: <reason, CUDA's own words><hint>``. ``None``
    when every step passes. Reasons are put on one line and cut short; hints are kept whole.
    """
    for what, check, hint in steps:
        try:
            problem = check()
        except Exception as exc:  # CUDARuntimeError, CUDADriverError, CompileException, ...
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            return f"CUDA is not usable: {what} failed: {_one_line(problem)}{hint}"
    return None


def _driver_version(cupy: ModuleType) -> int | None:
    """The CUDA driver's version (0: no driver installed), or ``None`` if unknown."""
    try:
        return int(cupy.cuda.runtime.driverGetVersion())
    except Exception:  # a broken installation: say nothing more than CUDA does
        return None


def _cuda_probe_steps(cupy: ModuleType, index: int) -> list[ProbeStep]:
    """What training needs of CUDA device ``index``, smallest first: the driver and the
    device, an allocation, cuBLAS (a 2x2 float32 matmul) and NVRTC (compiling an
    elementwise kernel); results are checked too."""
    libraries = f"; the CUDA libraries come with {CUDA_EXTRA_HINT}"

    def device_count() -> str | None:
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:
            if _driver_version(cupy) == 0:  # CUDA then says "driver version is insufficient"
                return f"no NVIDIA driver is installed (CUDA: {type(exc).__name__}: {exc})"
            raise
        return None if index < count else f"only {count} CUDA device(s) are visible"

    def allocate() -> None:
        with cupy.cuda.Device(index):
            cupy.asarray(numpy.ones(1, dtype=numpy.float32)).get()  # no kernel: a copy each way

    def matmul() -> str | None:
        a = numpy.array([[1, 2], [3, 4]], dtype=numpy.float32)
        with cupy.cuda.Device(index):
            product = (cupy.asarray(a) @ cupy.asarray(a)).get()
        expected = a @ a
        return None if (product == expected).all() else f"gave {product.tolist()}"

    def kernel() -> str | None:
        with cupy.cuda.Device(index):
            add_one = cupy.ElementwiseKernel("T x", "T y", "y = x + 1", "lenet_xp_probe")
            value = add_one(cupy.asarray(numpy.full(2, 41, dtype=numpy.float32))).get()
        return None if (value == 42).all() else f"gave {value.tolist()} for 41 + 1"

    return [
        (f"finding cuda:{index}", device_count, ""),
        (f"allocating on cuda:{index}", allocate, ""),
        ("a 2x2 matmul (cuBLAS)", matmul, libraries),
        ("compiling an elementwise kernel (NVRTC)", kernel, libraries),
    ]


def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device ``index`` cannot be used (one line), or ``None`` when it can.

    Touches the GPU as training will (an allocation, a 2x2 matmul through cuBLAS, a tiny
    elementwise kernel compiled by NVRTC), so a missing driver, GPU or CUDA library shows up
    here, in one line with CUDA's own words, rather than as a traceback at the first layer.
    Probed once per process (and per ``$LENET_XP_FAKE_CUDA`` setting: CuPy or its stand-in).
    """
    return _probe(index, os.environ.get("LENET_XP_FAKE_CUDA", ""))


@functools.cache
def _probe(index: int, stand_in: str) -> str | None:
    """:func:`cuda_unavailable_reason`, once per device and ``stand_in`` setting."""
    try:
        cupy = import_cupy()
    except DeviceError as exc:
        return str(exc)
    return probe_steps(_cuda_probe_steps(cupy, index))


def cuda_elementwise(in_params: str, out_params: str, operation: str, name: str) -> Any:
    """A fused CUDA kernel (``cupy.ElementwiseKernel``, compiled on first call): one launch
    instead of one per NumPy-style operation. Only for CuPy arrays; needs CuPy."""
    return import_cupy().ElementwiseKernel(in_params, out_params, operation, name)
