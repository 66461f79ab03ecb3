"""The one place that knows about NumPy and CuPy.

Everything else asks this module for an array namespace ``xp`` (``numpy`` or ``cupy``),
either from a :class:`Device` or from the arrays it is handed (:func:`get_array_module`).
Beside it: finding CuPy and probing a GPU (:mod:`.cuda`), tuning the host's allocator
(:mod:`.host`).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy

from lenet_xp.backend.cuda import (
    CUDA_EXTRA_HINT,
    DeviceError,
    cuda_device_count,
    cuda_elementwise,
    cuda_unavailable_reason,
    fake_cuda,
    import_cupy,
    import_nccl,
    probe_steps,
)
from lenet_xp.backend.host import host_cores, tune_host_allocator

__all__ = [
    "CPU", "CUDA_EXTRA_HINT", "Device", "DeviceError", "asnumpy", "cuda_device_count",
    "cuda_elementwise",
    "cuda_unavailable_reason", "default_rng", "device_of", "fake_cuda", "gemm_block",
    "get_array_module", "get_device", "host_cores", "host_rng", "host_view", "host_zeros",
    "import_cupy", "import_nccl",
    "is_gpu", "probe_steps", "synchronize", "to_device", "tune_host_allocator", "use_device",
]  # fmt: skip


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
    if all(type(array) is numpy.ndarray for array in arrays):  # the CPU's hot path: no lookups
        return numpy
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
