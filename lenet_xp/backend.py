"""The one place that knows about NumPy and CuPy.

Everything else asks this module for an array namespace ``xp`` (``numpy`` or ``cupy``),
either from a :class:`Device` or from the arrays it is handed (:func:`get_array_module`).
"""

from __future__ import annotations

import functools
import sys
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
        return numpy if self.kind == "cpu" else _import_cupy()

    @property
    def name(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def __str__(self) -> str:
        return self.name


CPU = Device("cpu")


def _import_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as exc:
        raise DeviceError(f"CuPy is not installed ({exc}); {CUDA_EXTRA_HINT}") from None
    return cupy


@functools.cache
def cuda_unavailable_reason(index: int = 0) -> str | None:
    """Why CUDA device ``index`` cannot be used, or ``None`` when it can.

    Touches the GPU (one tiny allocation), so a missing driver or GPU shows up here
    with CUDA's own words rather than at the first layer. Probed once per process.
    """
    try:
        cupy = _import_cupy()
    except DeviceError as exc:
        return str(exc)
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        if index >= count:
            return f"cuda:{index} requested but only {count} CUDA device(s) are visible"
        with cupy.cuda.Device(index):
            cupy.zeros(1, dtype=cupy.float32) + 1
    except Exception as exc:  # CUDARuntimeError, CUDADriverError, ... all mean "unusable"
        return f"CUDA is not usable: {type(exc).__name__}: {exc}".strip()
    return None


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
    cupy = sys.modules.get("cupy")
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
    cupy = _import_cupy()
    with cupy.cuda.Device(device.index):
        return cupy.asarray(array)


def synchronize(device: Device | str = CPU) -> None:
    """Wait for all queued work on ``device`` (a no-op on the CPU); use before reading a clock."""
    device = get_device(device)
    if device.kind == "cuda":
        cupy = _import_cupy()
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
    return _import_cupy().ElementwiseKernel(in_params, out_params, operation, name)
