"""Run the package's CUDA kernels (``lenet_xp/kernels/*.cu``) on the CPU, for tests.

:class:`EmulatedModule` compiles ``source_text(file)`` with g++ after
``cuda_emulator_prelude.h`` (what CUDA provides: ``__global__``, ``dim3``, ``threadIdx``,
``__syncthreads`` ...) plus one generated ``extern "C"`` launch wrapper per name expression
(``"im2col<float>"``, ...), and loads the library with :mod:`ctypes`.
:meth:`EmulatedModule.get_function` returns an :class:`EmulatedFunction`, called like a CuPy
``RawKernel``: ``fn(grid, block, args)``, with NumPy arrays for pointers and NumPy scalars
for scalars. Every argument is checked against the kernel's parameter list parsed from the
source (on a GPU a mismatch corrupts memory silently): see :meth:`EmulatedFunction.check`.

Execution (see the prelude): a kernel whose body has no ``__syncthreads`` runs its threads one
after another on the calling thread (fast); one with it runs each block's threads as
coroutines on the calling thread (each with its own stack; ``__syncthreads`` switches to the
next thread, and the block goes on once all of them wait there), so shared-memory reductions
run as on a GPU. A fault in kernel code (segfault, integer division by zero, a thread's stack
overflow) raises :class:`KernelFaultError` instead of killing the process, as does a block
whose threads do not all reach the same ``__syncthreads``. With ``check_bounds`` (or
``$CUDA_EMU_CHECK_BOUNDS=1``) every array is copied between guard pages, and the launch runs
twice (data flush against the guard after it, then against the guard before it), so any
access outside an argument's memory raises :class:`KernelFaultError` naming the argument.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from lenet_xp.kernels import SOURCES, name_expressions, source_text
from lenet_xp.kernels.signatures import (
    Param,
    mismatch,
    parse_kernels,
    parse_params,
    split_expression,
)

PRELUDE = Path(__file__).with_name("cuda_emulator_prelude.h")
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
#: ``gpu_math``: as NVRTC compiles for CuPy (multiply-adds fused, denormals flushed to zero:
#: CuPy passes ``-ftz=true``). x86-64 flushes doubles too, a GPU only floats.
GPU_MATH_FLAGS = ("-mfma", "-ffp-contract=fast")

_MAX_THREADS_PER_BLOCK = 1024
_MAX_BLOCK = (1024, 1024, 64)
_MAX_GRID = (2**31 - 1, 65535, 65535)
_LAUNCH_LOCK = threading.Lock()  # launches change process-wide signal handlers
_PAGE = mmap.PAGESIZE
_PROT_NONE = 0


class KernelFaultError(RuntimeError):
    """A launch failed in kernel code: a fault (out-of-bounds or null access, integer
    division by zero) or a C++ exception (e.g. ``__syncthreads`` outside a threaded launch)."""


def compiler_available() -> str | None:
    """``None`` when the C++ compiler is usable, else why not (for ``pytest.skip``)."""
    if shutil.which(CXX) is None:
        return f"C++ compiler {CXX!r} not found (needed to emulate the CUDA kernels)"
    return None


# -- compiling -------------------------------------------------------------------------------
def _default_cache_dir() -> Path:
    env = os.environ.get("CUDA_EMU_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lenet_xp_cuda_emu"


@cache
def _compiler_version() -> str:
    return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout


def _wrapper(
    symbol: str, expression: str, params: Sequence[Param], threaded: bool, gpu_math: bool
) -> str:
    unpack = "".join(f"  auto a{p.index} = emu::arg<{p.ctype}>(args, {p.index});\n" for p in params)
    call = ", ".join(f"a{p.index}" for p in params)
    runner = "launch_threaded" if threaded else "launch_sequential"
    ftz_on = "  unsigned csr = _mm_getcsr();\n  _mm_setcsr(csr | 0x8040u);\n" if gpu_math else ""
    ftz_off = "  _mm_setcsr(csr);\n" if gpu_math else ""
    return (
        f'extern "C" int {symbol}(const unsigned* dims, void** args, char* err, int errlen,\n'
        f"    emu::FaultInfo* info) {{\n{unpack}{ftz_on}"
        f"  int status = emu::{runner}(dims, [&]() {{ {expression}({call}); }}, err, errlen, "
        f"info);\n{ftz_off}  return status;\n"
        "}\n"
    )


class _FaultInfo(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_longlong),
        ("signal", ctypes.c_longlong),
        ("address", ctypes.c_longlong),
        ("block", ctypes.c_longlong * 3),
        ("thread", ctypes.c_longlong * 3),
    ]


_LIBRARIES: dict[str, ctypes.CDLL] = {}


class EmulatedModule:
    """The kernels of ``file`` (a key of :data:`lenet_xp.kernels.SOURCES`) compiled for the CPU.

    ``text`` replaces the file's source (``source_text(file)``) and ``names`` its name
    expressions (``name_expressions(file)``; for an unknown file, every kernel for float and
    double). ``check_bounds`` (default ``$CUDA_EMU_CHECK_BOUNDS == "1"``) runs every launch on
    guarded copies of the arrays. The library is cached in ``cache_dir`` (default
    ``$CUDA_EMU_CACHE`` or ``~/.cache/lenet_xp_cuda_emu``) under a hash of what is compiled.
    """

    def __init__(
        self,
        file: str,
        text: str | None = None,
        names: Sequence[str] | None = None,
        *,
        check_bounds: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        gpu_math: bool = False,
    ) -> None:
        reason = compiler_available()
        if reason:
            raise RuntimeError(reason)
        self.file = file
        self.gpu_math = gpu_math
        self.flags = CXXFLAGS + (GPU_MATH_FLAGS if gpu_math else ())
        self.source = source_text(file) if text is None else text
        self.check_bounds = (
            os.environ.get("CUDA_EMU_CHECK_BOUNDS", "0") == "1"
            if check_bounds is None
            else bool(check_bounds)
        )
        kernels = parse_kernels(self.source)
        if names is None:
            names = (
                name_expressions(file)
                if file in SOURCES and text is None
                else [
                    f"{k}<{c}>" if d.template_param else k
                    for k, d in kernels.items()
                    for c in (("float", "double") if d.template_param else ("",))
                ]
            )
        self.names = tuple(names)
        self._specs: dict[str, tuple[str, tuple[Param, ...], bool]] = {}
        wrappers = []
        for number, expression in enumerate(self.names):
            kernel_name, ctype = split_expression(expression)
            if kernel_name not in kernels:
                raise ValueError(f"{file}: no __global__ function {kernel_name!r}")
            decl = kernels[kernel_name]
            params = parse_params(decl, ctype)
            symbol = f"emu_launch_{number}_{kernel_name}"
            target = f"{kernel_name}<{ctype}>" if ctype else kernel_name
            wrappers.append(_wrapper(symbol, target, params, decl.uses_syncthreads, gpu_math))
            self._specs[expression] = (symbol, params, decl.uses_syncthreads)
        self.cpp = (
            f'#include "{PRELUDE.name}"\n{"#include <xmmintrin.h>" if gpu_math else ""}\n'
            f'#line 1 "{file}"\n{self.source}\n'
            f'#line 1 "<emulator wrappers>"\n' + "\n".join(wrappers)
        )
        self.library_path = self._build(Path(cache_dir) if cache_dir else _default_cache_dir())
        self._lib = self._load(self.library_path)
        self._functions: dict[str, EmulatedFunction] = {}

    def _build(self, cache_dir: Path) -> Path:
        key = hashlib.sha256(
            "\0".join(
                [PRELUDE.read_text(), self.cpp, " ".join(self.flags), _compiler_version()]
            ).encode()
        ).hexdigest()[:24]
        stem = re.sub(r"\W", "_", self.file)
        target = cache_dir / f"{stem}-{key}.so"
        if target.exists():
            return target
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            cpp = Path(tmp) / f"{stem}.cpp"
            cpp.write_text(self.cpp)
            shutil.copy(PRELUDE, Path(tmp) / PRELUDE.name)
            out = Path(tmp) / "lib.so"
            result = subprocess.run(
                [CXX, *self.flags, "-o", str(out), str(cpp)], capture_output=True, text=True
            )
            if result.returncode != 0:
                raise RuntimeError(f"g++ failed to compile {self.file}:\n{result.stderr}")
            os.replace(out, target)
        return target

    @staticmethod
    def _load(path: Path) -> ctypes.CDLL:
        key = str(path)
        if key not in _LIBRARIES:
            _LIBRARIES[key] = ctypes.CDLL(key)
        return _LIBRARIES[key]

    def get_function(self, name: str) -> EmulatedFunction:
        """The kernel instantiation ``name`` (e.g. ``"im2col<float>"``), callable as
        ``fn(grid, block, args)``."""
        if name not in self._specs:
            raise KeyError(f"{self.file} has no kernel {name!r}; known: {', '.join(self.names)}")
        if name not in self._functions:
            symbol, params, threaded = self._specs[name]
            cfunc = getattr(self._lib, symbol)
            cfunc.restype = ctypes.c_int
            cfunc.argtypes = [
                ctypes.POINTER(ctypes.c_uint),
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.POINTER(_FaultInfo),
            ]
            self._functions[name] = EmulatedFunction(
                name, params, threaded, cfunc, self.check_bounds
            )
        return self._functions[name]


@cache
def _module(file: str, check_bounds: bool | None, gpu_math: bool) -> EmulatedModule:
    return EmulatedModule(file, check_bounds=check_bounds, gpu_math=gpu_math)


def emulated_function(
    file: str, expression: str, check_bounds: bool | None = None, gpu_math: bool = False
) -> Any:
    """``EmulatedModule(file).get_function(expression)`` with the module built once per
    process: a kernel provider for :class:`lenet_xp.kernels.ops.Kernels`."""
    return _module(file, check_bounds, gpu_math).get_function(expression)


# -- launching -------------------------------------------------------------------------------
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
        info = _FaultInfo()
        status = self._cfunc((ctypes.c_uint * 6)(*dims), argv, err, len(err), ctypes.byref(info))
        if status:
            raise KernelFaultError(self._describe(info, err.value.decode(errors="replace"), guards))

    def _describe(self, info: _FaultInfo, message: str, guards) -> str:
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
