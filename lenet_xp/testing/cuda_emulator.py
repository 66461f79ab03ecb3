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
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

from lenet_xp.kernels import SOURCES, name_expressions, source_text
from lenet_xp.kernels.signatures import (
    Param,
    parse_kernels,
    parse_params,
    split_expression,
)
from lenet_xp.testing.cuda_launch import (  # noqa: F401  (KernelFaultError: re-exported)
    EmulatedFunction,
    FaultInfo,
    KernelFaultError,
)

PRELUDE = Path(__file__).with_name("cuda_emulator_prelude.h")
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ("-O2", "-std=c++20", "-shared", "-fPIC", "-pthread", "-ffp-contract=off")
#: ``gpu_math``: as NVRTC compiles for CuPy (multiply-adds fused, denormals flushed to zero:
#: CuPy passes ``-ftz=true``). x86-64 flushes doubles too, a GPU only floats.
GPU_MATH_FLAGS = ("-mfma", "-ffp-contract=fast")


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
                ctypes.POINTER(FaultInfo),
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
