"""Launching the emulated CUDA kernels (:mod:`.cuda_emulator` compiles them): grid and block
checked against CUDA's limits, every argument against the kernel's parameters, arrays
optionally between guard pages, and a fault in kernel code raised as
:class:`KernelFaultError`."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lenet_xp.kernels.signatures import Param, mismatch

_MAX_THREADS_PER_BLOCK = 1024
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)
_LAUNCH_LOCK = threading.Lock()  # launches change process-wide signal handlers
_PAGE = mmap.PAGESIZE
_PROT_NONE = 0


class KernelFaultError(RuntimeError):
    """A launch failed in kernel code: a fault (out-of-bounds or null access, integer
    division by zero) or a C++ exception (e.g. ``__syncthreads`` outside a threaded launch)."""


class FaultInfo(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_longlong),
        ("signal", ctypes.c_longlong),
        ("address", ctypes.c_longlong),
        ("block", ctypes.c_longlong * 3),
        ("thread", ctypes.c_longlong * 3),
    ]


def _dims(value: Any, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    items = (value,) if isinstance(value, (int, np.integer)) else value
    if not isinstance(items, (tuple, list)) or not 1 <= len(items) <= 3:
        raise ValueError(f"{what} must be an int or a tuple of 1 to 3 ints, got {value!r}")
    dims = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
            raise ValueError(f"{what} must hold ints, got {value!r}")
        dims.append(int(item))
    dims += [1] * (3 - len(dims))
    for axis, (size, limit) in enumerate(zip(dims, limits, strict=True)):
        if not 1 <= size <= limit:
            raise ValueError(f"{what}[{axis}] = {size} outside 1..{limit}")
    return dims[0], dims[1], dims[2]


def _extent(array: np.ndarray) -> tuple[int, int]:
    """Byte range ``[lo, hi)`` of the memory an array's elements occupy."""
    start = array.ctypes.data
    if array.size == 0:
        return start, start
    lo = start + sum(s * (n - 1) for s, n in zip(array.strides, array.shape, strict=True) if s < 0)
    hi = start + sum(s * (n - 1) for s, n in zip(array.strides, array.shape, strict=True) if s > 0)
    return lo, hi + array.itemsize


class _Libc:
    lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


class _Guarded:
    """``nbytes`` of data between two inaccessible guard pages, flush against one of them."""

    def __init__(self, nbytes: int, flush_end: bool, lo: int, align: int) -> None:
        # data = lo (mod align), so every member keeps the alignment it had
        body = -(-(nbytes + align) // _PAGE) * _PAGE
        self.total = body + 2 * _PAGE
        libc = _Libc.lib
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        base = libc.mmap(None, self.total, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise MemoryError("mmap failed for a guarded kernel argument")
        self.base = base
        libc.mprotect(base, _PAGE, _PROT_NONE)
        libc.mprotect(base + _PAGE + body, _PAGE, _PROT_NONE)
        self.front = (base, base + _PAGE)
        self.back = (base + _PAGE + body, base + self.total)
        if flush_end:
            self.data = self.back[0] - nbytes
            self.data -= (self.data - lo) % align
        else:
            self.data = self.front[1] + (lo - self.front[1]) % align
        self.nbytes = nbytes

    def free(self) -> None:
        _Libc.lib.munmap(self.base, self.total)


class EmulatedFunction:
    """One kernel instantiation; ``fn(grid, block, args, shared_mem=0)`` launches it.

    ``name`` ("im2col<float>"), ``params`` (:class:`Param` each), ``threaded`` (runs a
    block's threads as coroutines: the body uses ``__syncthreads``), ``launches`` (count so
    far).
    """

    def __init__(self, name, params, threaded, cfunc, check_bounds) -> None:
        self.name = name
        self.params: tuple[Param, ...] = params
        self.threaded: bool = threaded
        self.check_bounds: bool = check_bounds
        self.launches = 0
        self._cfunc = cfunc

    def __repr__(self) -> str:
        signature = ", ".join(p.decl for p in self.params)
        return f"<EmulatedFunction {self.name}({signature})>"

    def check(self, args: Sequence[Any]) -> None:
        """Raise ``TypeError`` (naming the kernel, argument index and parameter) unless
        ``args`` match the parameters exactly: a pointer takes ``None`` or a NumPy array of
        the pointee's dtype (C-contiguous unless the kernel takes its strides, see
        :data:`STRIDED_PARAMS`; writeable unless ``const``); a scalar takes a NumPy scalar of
        exactly the C type's dtype (``numpy.int32`` for ``int``, ``numpy.int64`` for ``long
        long``, ``numpy.float64`` for ``double``; no Python numbers, no 0-d arrays)."""
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.name}: takes {len(self.params)} arguments "
                f"({', '.join(p.decl for p in self.params)}), got {len(args)}"
            )
        for param, value in zip(self.params, args, strict=True):
            problem = mismatch(param, value)
            if problem:
                raise TypeError(f"{self.name}: argument {param.index} ({param.decl}): {problem}")

    def __call__(self, grid: Any, block: Any, args: Sequence[Any], shared_mem: int = 0) -> None:
        self.check(args)
        if shared_mem:
            raise ValueError(f"{self.name}: dynamic shared memory is not emulated")
        grid3 = _dims(grid, "grid", _MAX_GRID)
        block3 = _dims(block, "block", _MAX_BLOCK)
        if block3[0] * block3[1] * block3[2] > _MAX_THREADS_PER_BLOCK:
            raise ValueError(f"{self.name}: block {block3} has more than 1024 threads")
        with _LAUNCH_LOCK:
            if self.check_bounds:
                self._launch_guarded(grid3 + block3, args)
            else:
                self._launch(grid3 + block3, args, [_address(v) for v in args], None)
        self.launches += 1

    def _launch(self, dims, args, addresses, guards) -> None:
        holders = []
        for param, value, address in zip(self.params, args, addresses, strict=True):
            if param.pointer:
                holders.append(ctypes.c_void_p(address))
            else:
                holders.append(ctypes.create_string_buffer(value.tobytes(), value.itemsize))
        argv = (ctypes.c_void_p * max(1, len(holders)))(*[ctypes.addressof(h) for h in holders])
        err = ctypes.create_string_buffer(512)
        info = FaultInfo()
        status = self._cfunc((ctypes.c_uint * 6)(*dims), argv, err, len(err), ctypes.byref(info))
        if status:
            raise KernelFaultError(self._describe(info, err.value.decode(errors="replace"), guards))

    def _describe(self, info: FaultInfo, message: str, guards) -> str:
        where = (
            f"block ({info.block[0]}, {info.block[1]}, {info.block[2]}) "
            f"thread ({info.thread[0]}, {info.thread[1]}, {info.thread[2]})"
        )
        text = f"{self.name}: {message} in {where}"
        if info.kind != 2:
            return text
        address = info.address
        text += f" at address {address:#x}"
        if 0 <= address < _PAGE:
            return text + ": a null pointer (an argument passed as None?)"
        for param, guard in guards or ():
            if guard.front[0] <= address < guard.front[1]:
                return text + (
                    f": {guard.data - address} bytes before the start of argument "
                    f"{param.index} ({param.decl})"
                )
            if guard.back[0] <= address < guard.back[1]:
                over = address - (guard.data + guard.nbytes)
                return text + (
                    f": {over} bytes past the end of argument {param.index} ({param.decl}, "
                    f"{guard.nbytes} bytes)"
                )
        return text

    def _launch_guarded(self, dims, args) -> None:
        """Run on copies of the arrays between guard pages: first flush against the guard
        after each (catches overruns; results discarded), then against the guard before
        (catches underruns; results copied back). Arrays whose memory overlaps share one
        copy, so in-place aliasing behaves as with the originals."""
        arrays = [
            (i, value, *_extent(value))
            for i, value in enumerate(args)
            if isinstance(value, np.ndarray)
        ]
        groups: list[list] = []  # [lo, hi, [(index, array, lo, hi)...]]
        for item in sorted(arrays, key=lambda a: a[2]):
            if groups and item[2] < groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], item[3])
                groups[-1][2].append(item)
            else:
                groups.append([item[2], item[3], [item]])
        for flush_end in (True, False):
            guards, addresses = [], [_address(v) for v in args]
            try:
                for lo, hi, members in groups:
                    align = max(array.itemsize for _, array, _, _ in members)
                    guard = _Guarded(hi - lo, flush_end, lo, align)
                    guards.append((members, guard))
                    for _, _array, a_lo, a_hi in members:
                        ctypes.memmove(guard.data + (a_lo - lo), a_lo, a_hi - a_lo)
                    for index, array, _, _ in members:
                        addresses[index] = guard.data + (array.ctypes.data - lo)
                named = [
                    (self.params[index], guard)
                    for members, guard in guards
                    for index, *_ in members
                ]
                self._launch(dims, args, addresses, named)
                if not flush_end:
                    for (lo, _hi, _members), (members, guard) in zip(groups, guards, strict=True):
                        for index, _array, a_lo, a_hi in members:
                            if not self.params[index].const:
                                ctypes.memmove(a_lo, guard.data + (a_lo - lo), a_hi - a_lo)
            finally:
                for _, guard in guards:
                    guard.free()


def _address(value: Any) -> int | None:
    return value.ctypes.data if isinstance(value, np.ndarray) else None
