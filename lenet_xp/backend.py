"""The one place that knows about NumPy and CuPy.

Everything else asks this module for an array namespace ``xp`` (``numpy`` or ``cupy``),
either from a :class:`Device` or from the arrays it is handed (:func:`get_array_module`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy

CUDA_EXTRA_HINT = (
    'pip install "lenet_xp[cuda12]" (CUDA 12.x driver) or "lenet_xp[cuda13]" (CUDA 13.x)'
)


class DeviceError(RuntimeError):
    """A device was asked for that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Device:
    """A compute device: ``kind`` is ``"cpu"`` or ``"cuda"``; ``index`` is the GPU ordinal."""

    kind: str
    index: int = 0

    @property
    def xp(self) -> ModuleType:
        """The array namespace of this device: ``numpy`` or ``cupy``."""
        return numpy if self.kind == "cpu" else import_cupy()

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __str__(self) -> str:
        return self.name


CPU = Device("cpu")


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


@functools.cache
def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device ``index`` cannot be used (one line), or ``None`` when it can.

    Touches the GPU as training will (an allocation, a 2x2 matmul through cuBLAS, a tiny
    elementwise kernel compiled by NVRTC), so a missing driver, GPU or CUDA library shows up
    here, in one line with CUDA's own words, rather than as a traceback at the first layer.
    Probed once per process.
    """
    try:
        cupy = import_cupy()
    except DeviceError as exc:
        return str(exc)
    return probe_steps(_cuda_probe_steps(cupy, index))


def get_device(spec: str | Device = "auto", *, announce: bool = False) -> Device:
    """Resolve ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` to a usable :class:`Device`.

    ``auto`` picks CUDA when CuPy imports and a GPU answers, else the CPU; with
    ``announce=True`` it prints one line saying which. Asking for CUDA explicitly when it
    is unusable raises :class:`DeviceError` with a one-line reason.
    """
    if isinstance(spec, Device):
        return spec
    text = spec.strip().lower()
    if text == "cpu":
        return CPU
    if text == "auto":
        reason = cuda_unavailable_reason(0)
        device = CPU if reason else Device("cuda", 0)
        if announce:
            why = f" ({reason})" if reason else ""
            print(f"device: auto -> {device}{why}", file=sys.stderr)
        return device
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise DeviceError(f"bad device {spec!r}: use cpu, cuda, cuda:N or auto")
        index = int(index_text)
        reason = cuda_unavailable_reason(index)
        if reason:
            raise DeviceError(f"--device {text}: {reason}. Use --device cpu to train on the CPU.")
        return Device("cuda", index)
    raise DeviceError(f"bad device {spec!r}: use cpu, cuda, cuda:N or auto")


#: OpenBLAS multiplies small matrices (M*N*K up to about 1e6) without packing them first, which
#: is several times faster for LeNet's skinny GEMMs (6 or 16 rows, 25 or 150 deep); on the CPU,
#: long GEMMs are therefore cut into blocks of this many columns. GPUs want one big launch.
CPU_GEMM_BLOCK = 4096


def is_gpu(xp: ModuleType) -> bool:
    """Whether the namespace ``xp`` computes on a GPU (CuPy) rather than the CPU (NumPy)."""
    return xp is not numpy


def gemm_block(xp: ModuleType) -> int | None:
    """Column-block width for GEMMs in namespace ``xp`` (``None``: do not split)."""
    return None if is_gpu(xp) else CPU_GEMM_BLOCK


def get_array_module(*arrays: Any) -> ModuleType:
    """``cupy`` if any argument is a CuPy array, else ``numpy`` (like ``cupy.get_array_module``)."""
    cupy = import_cupy() if fake_cuda() else sys.modules.get("cupy")
    if cupy is not None:
        return cupy.get_array_module(*arrays)
    return numpy


def device_of(array: Any) -> Device:
    """The :class:`Device` an array lives on."""
    if get_array_module(array) is numpy:
        return CPU
    return Device("cuda", array.device.id)


def asnumpy(array: Any) -> numpy.ndarray:
    """A host (NumPy) copy of ``array``; NumPy arrays and scalars pass through."""
    if get_array_module(array) is numpy:
        return numpy.asarray(array)
    return array.get()


def to_device(array: Any, device: Device | str) -> Any:
    """``array`` on ``device`` (no copy when it is already there)."""
    device = get_device(device)
    if device.kind == "cpu":
        return asnumpy(array)
    cupy = import_cupy()
    with cupy.cuda.Device(device.index):
        return cupy.asarray(array)


def use_device(device: Device | str) -> contextlib.AbstractContextManager[Any]:
    """A context in which new arrays and kernels go to ``device``: ``cupy.cuda.Device(index)``
    for a GPU (CuPy otherwise works on device 0 whatever ``--device cuda:N`` says), nothing for
    the CPU. Wrap a whole run in it: data, model, training, evaluation, checkpoints."""
    device = get_device(device)
    if device.kind == "cpu":
        return contextlib.nullcontext()
    return import_cupy().cuda.Device(device.index)


def synchronize(device: Device | str = CPU) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU); use before reading a clock."""
    device = get_device(device)
    if device.kind == "cuda":
        cupy = import_cupy()
        with cupy.cuda.Device(device.index):
            cupy.cuda.get_current_stream().synchronize()


def default_rng(seed: int | None, device: Device | str = CPU) -> Any:
    """A seeded random generator of ``device``'s namespace (``xp.random.default_rng``)."""
    device = get_device(device)
    return device.xp.random.default_rng(seed)


def host_rng(seed: int | None) -> numpy.random.Generator:
    """A seeded NumPy generator: initial weights and shuffling come from here on every device,
    so the same seed gives the same weights and batch order on the CPU and the GPU."""
    return numpy.random.default_rng(seed)


def host_zeros(shape: tuple[int, ...] | int, dtype: str = "float32") -> numpy.ndarray:
    """A zero-filled host array (initial biases, buffers); move it with :func:`to_device`."""
    return numpy.zeros(shape, dtype=dtype)


def host_view(buffer: Any, shape: tuple[int, ...], dtype: str) -> numpy.ndarray:
    """A host array over ``buffer`` (e.g. shared memory), without copying."""
    return numpy.ndarray(shape, dtype=dtype, buffer=buffer)


def tune_host_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc ``mallopt``); ``True`` if applied.

    A training step allocates and frees the same few-megabyte arrays hundreds of times per
    second. By default glibc serves each from fresh ``mmap`` pages and returns them on free, so
    every step pays thousands of page faults (``python -m lenet_xp.bench --plain-malloc``
    shows the cost: about 1.6x slower epochs here). Raising
    the mmap and trim thresholds makes freed blocks come straight back: reuse, no faults.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    )


def cuda_elementwise(in_params: str, out_params: str, operation: str, name: str) -> Any:
    """A fused CUDA kernel (``cupy.ElementwiseKernel``, compiled on first call): one launch
    instead of one per NumPy-style operation. Only for CuPy arrays; needs CuPy."""
    return import_cupy().ElementwiseKernel(in_params, out_params, operation, name)
