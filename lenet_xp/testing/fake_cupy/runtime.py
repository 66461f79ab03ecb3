"""The stand-in's CUDA runtime: devices, memory pools, and the bookkeeping every strict check
reads (current device, capture, synchronisations, launches); streams, events and graphs are
in :mod:`lenet_xp.testing.fake_cupy.streams`.

Nothing here runs on a GPU: a "device" is a number, and device memory is NumPy memory owned by
a :class:`Memory` block.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lenet_xp.testing.fake_cupy.streams import Stream

#: ``LENET_XP_FAKE_CUDA``: how many devices the stand-in has (``1``; ``2`` for two devices).
ENV_DEVICES = "LENET_XP_FAKE_CUDA"
#: ``LENET_XP_FAKE_CUDA_BROKEN``: ``driver``, ``alloc``, ``cublas`` or ``nvrtc`` makes that part
#: of CUDA fail as it does on a broken machine (no driver, no memory, a library missing).
ENV_BROKEN = "LENET_XP_FAKE_CUDA_BROKEN"
BROKEN_CHOICES = ("driver", "alloc", "cublas", "nvrtc")
#: What every stand-in device says it is.
DEVICE_NAME = "lenet_xp CuPy stand-in (NumPy)"
DEVICE_MEMORY = 80 * 2**30
_ALLOCATION_UNIT = 512  # CuPy's memory pool rounds every allocation up to this


class CUDARuntimeError(RuntimeError):
    """As ``cupy_backends.cuda.api.runtime.CUDARuntimeError``: ``status`` and CUDA's words."""

    def __init__(self, status: int, name: str, text: str) -> None:
        self.status = status
        super().__init__(f"{name}: {text}")


class OutOfMemoryError(MemoryError):
    """As ``cupy.cuda.memory.OutOfMemoryError``."""

    def __init__(self, size: int, total: int, limit: int = 0) -> None:
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes"
            + (f", limit set to: {limit:,} bytes" if limit else "")
            + ")."
        )


class DeviceSynchronized(RuntimeError):  # noqa: N818 - CuPy's name
    """As ``cupyx.DeviceSynchronized``: a synchronisation while ``allow_synchronize(False)``."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or "Device synchronization was detected while disallowed.")


def capture_error() -> CUDARuntimeError:
    """The error of an operation a capture cannot hold; like CUDA, it invalidates the capture
    (its ``end_capture`` then fails too)."""
    stream = _capturing_stream()
    if stream is not None:
        stream.invalidated = True
    return CUDARuntimeError(
        900,
        "cudaErrorStreamCaptureUnsupported",
        "operation not permitted when stream is capturing",
    )


def device_count() -> int:
    """How many devices ``$LENET_XP_FAKE_CUDA`` gives (0 when the stand-in is off)."""
    text = os.environ.get(ENV_DEVICES, "").strip()
    if text in ("", "0"):
        return 0
    if not text.isdigit():
        raise ValueError(f"{ENV_DEVICES}={text!r}: use a number of devices, e.g. 1 or 2")
    return int(text)


def broken() -> str:
    """The part of CUDA that ``$LENET_XP_FAKE_CUDA_BROKEN`` breaks ('' for none)."""
    part = os.environ.get(ENV_BROKEN, "").strip()
    if part and part not in BROKEN_CHOICES:
        raise ValueError(f"{ENV_BROKEN}={part!r}: use one of {', '.join(BROKEN_CHOICES)}")
    return part


# -- process state -------------------------------------------------------------------------
class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.device = 0
        self.streams: dict[int, Stream] = {}  # device -> current stream
        self.allow_sync = True


_thread = _ThreadState()
_counts = {"synchronizations": 0, "launches": 0}


def current_device() -> int:
    return _thread.device


def check_device(index: int) -> None:
    count = device_count()
    if broken() == "driver":
        raise driver_error()
    if not 0 <= index < count:
        raise CUDARuntimeError(101, "cudaErrorInvalidDevice", "invalid device ordinal")


def driver_error() -> CUDARuntimeError:
    return CUDARuntimeError(
        35,
        "cudaErrorInsufficientDriver",
        "CUDA driver version is insufficient for CUDA runtime version",
    )


def _capturing_stream() -> Stream | None:
    """The current stream if it is capturing, else ``None``. Only a stream made current on
    this thread can be capturing: a device's null stream never captures."""
    stream = _thread.streams.get(_thread.device)
    return stream if stream is not None and stream.graph_nodes is not None else None


def capturing() -> bool:
    """Whether work issued now is being captured (the current stream is capturing)."""
    return _capturing_stream() is not None


def declare_synchronize(what: str) -> None:
    """A host wait for the device (``what`` says which call): refused during a capture, raises
    :class:`DeviceSynchronized` under ``cupyx.allow_synchronize(False)``, else counted."""
    if capturing():
        raise capture_error()
    if not _thread.allow_sync:
        raise DeviceSynchronized(f"Device synchronization was detected while disallowed: {what}")
    _counts["synchronizations"] += 1


def synchronizations() -> int:
    """How many host waits for the device this process made (:func:`declare_synchronize`)."""
    return _counts["synchronizations"]


def launches() -> int:
    """How many kernels (array operations, raw kernels, graph launches) were issued eagerly."""
    return _counts["launches"]


def count_launch() -> None:
    _counts["launches"] += 1


# -- memory --------------------------------------------------------------------------------
class Memory:
    """One allocation of device memory: lives as long as an array refers to it, then goes back
    to its pool."""

    _ids = itertools.count(1)

    def __init__(self, device: int, nbytes: int, pool: MemoryPool) -> None:
        self.device, self.nbytes, self.pool = device, nbytes, pool
        self.id = next(Memory._ids)
        self.ptr = self.id << 20  # a fake, unique, aligned address
        weakref.finalize(self, pool._release, device, nbytes)

    def __repr__(self) -> str:
        return f"<device memory #{self.id}: {self.nbytes} bytes on cuda:{self.device}>"


class _Usage:
    def __init__(self) -> None:
        self.used = self.free = self.limit = 0


class MemoryPool:
    """As ``cupy.cuda.MemoryPool``: one pool object, accounts per device (its methods speak
    of the current device); freed blocks stay cached until :meth:`free_all_blocks`.

    A pool other than the default one keeps every block it handed out until
    :meth:`free_all_blocks` (or until the pool itself goes): as in CuPy, a freed block is
    still device memory of the pool, so a graph captured with the pool as its allocator
    (``using_allocator(pool.malloc)``) stays valid while the pool lives. Blocks of the default
    pool are modelled as handed to the next allocation once freed: a graph that touches a
    freed one fails at launch (the bug a reserved pool avoids)."""

    def __init__(self, allocator: Any = None) -> None:
        self._usage: dict[int, _Usage] = {}
        self._kept: list[Memory] | None = []  # None: the default pool

    def _here(self, device: int | None = None) -> _Usage:
        return self._usage.setdefault(current_device() if device is None else device, _Usage())

    def allocate(self, nbytes: int, device: int) -> Memory:
        if broken() == "alloc":
            raise CUDARuntimeError(2, "cudaErrorMemoryAllocation", "out of memory")
        usage = self._here(device)
        size = -(-max(nbytes, 1) // _ALLOCATION_UNIT) * _ALLOCATION_UNIT
        if usage.used + size > (usage.limit or DEVICE_MEMORY):
            raise OutOfMemoryError(size, usage.used + usage.free, usage.limit)
        usage.free -= min(size, usage.free)
        usage.used += size
        memory = Memory(device, size, self)
        if self._kept is not None:
            self._kept.append(memory)
        return memory

    def _release(self, device: int, size: int) -> None:
        usage = self._here(device)
        usage.used -= size
        usage.free += size

    def malloc(self, size: int) -> Any:
        return self.allocate(size, current_device())

    def used_bytes(self) -> int:
        return self._here().used

    def free_bytes(self) -> int:
        return self._here().free

    def total_bytes(self) -> int:
        return self._here().used + self._here().free

    def free_all_blocks(self, stream: Any = None) -> None:
        if self._kept is not None:
            self._kept.clear()  # blocks no array holds are gone: a graph on them fails
        self._here().free = 0

    def n_free_blocks(self) -> int:
        return 1 if self._here().free else 0

    def set_limit(self, size: int | None = None, fraction: float | None = None) -> None:
        if fraction is not None:
            size = int(DEVICE_MEMORY * fraction)
        self._here().limit = int(size or 0)

    def get_limit(self) -> int:
        return self._here().limit


_DEFAULT_POOL = MemoryPool()
_DEFAULT_POOL._kept = None
_allocator: list[Callable[[int], Any] | None] = [None]


def default_pool() -> MemoryPool:
    return _DEFAULT_POOL


def allocate(nbytes: int) -> Memory:
    """Device memory on the current device, from the allocator in use (the default pool,
    or a pool's ``malloc`` under ``cupy.cuda.using_allocator``)."""
    device = current_device()
    check_device(device)
    allocator = _allocator[0]
    if allocator is None:
        return _DEFAULT_POOL.allocate(nbytes, device)
    owner = getattr(allocator, "__self__", None)
    if isinstance(owner, MemoryPool):
        return owner.allocate(nbytes, device)
    raise NotImplementedError("the CuPy stand-in supports MemoryPool.malloc allocators only")


# -- devices -------------------------------------------------------------------------------
class Device:
    """As ``cupy.cuda.Device``: a context that makes device ``id`` current, or ``.use()``."""

    def __init__(self, device: Any = None) -> None:
        if device is None:
            device = current_device()
        self.id = int(device)
        if not self.id >= 0:
            raise ValueError(f"Invalid device ID: {device!r}")
        self._saved: list[int] = []

    def __int__(self) -> int:
        return self.id

    def __index__(self) -> int:
        return self.id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(("cuda", self.id))

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id}>"

    def __enter__(self) -> Device:
        check_device(self.id)
        self._saved.append(_thread.device)
        _thread.device = self.id
        return self

    def __exit__(self, *exc: Any) -> None:
        _thread.device = self._saved.pop()

    def use(self) -> None:
        check_device(self.id)
        _thread.device = self.id

    def synchronize(self) -> None:
        declare_synchronize(f"Device({self.id}).synchronize()")

    @property
    def compute_capability(self) -> str:
        return "90"

    @property
    def mem_info(self) -> tuple[int, int]:
        with self:
            used = _DEFAULT_POOL.total_bytes()
        return DEVICE_MEMORY - used, DEVICE_MEMORY

    @property
    def pci_bus_id(self) -> str:
        return f"0000:{self.id + 1:02x}:00.0"


def properties(index: int) -> dict[str, Any]:
    """As ``cupy.cuda.runtime.getDeviceProperties``: the keys our code reads."""
    check_device(index)
    return {
        "name": DEVICE_NAME.encode(),
        "totalGlobalMem": DEVICE_MEMORY,
        "multiProcessorCount": 132,
        "major": 9,
        "minor": 0,
        "maxThreadsPerBlock": 1024,
        "sharedMemPerBlock": 48 * 1024,
        "regsPerBlock": 65536,
        "warpSize": 32,
        "clockRate": 1980000,
        "pciBusID": index + 1,
    }
