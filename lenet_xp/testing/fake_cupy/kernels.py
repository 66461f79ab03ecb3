"""The stand-in's user kernels: ``RawModule``/``RawKernel`` sources run through the CUDA
emulator (:mod:`lenet_xp.testing.cuda_emulator`), ``ElementwiseKernel`` sources compiled with
g++ as one loop; both with CuPy's argument conversion, and recorded during a capture.

Kernels are compiled as NVRTC compiles them for CuPy (multiply-adds fused, denormals flushed)
unless ``$LENET_XP_FAKE_CUDA_MATH=exact``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy

from lenet_xp.testing import cuda_emulator
from lenet_xp.testing.fake_cupy import runtime, streams
from lenet_xp.testing.fake_cupy.array import ndarray

ENV_MATH = "LENET_XP_FAKE_CUDA_MATH"
#: What CuPy converts a Python scalar kernel argument to (``function.pyx``'s ``_pointer``).
_PYTHON_SCALARS = {bool: numpy.bool_, int: numpy.int64, float: numpy.float64}


def gpu_math() -> bool:
    """Whether kernels compile with fused multiply-adds and flushed denormals (the default)."""
    value = os.environ.get(ENV_MATH, "gpu").strip()
    if value not in ("gpu", "exact"):
        raise ValueError(f"{ENV_MATH}={value!r}: use gpu (FMA, flushed denormals) or exact")
    return value == "gpu"


def _nvrtc() -> None:
    if runtime.broken() == "nvrtc":
        raise RuntimeError(
            "CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared "
            "object file: No such file or directory"
        )


def _kernel_argument(value: Any) -> Any:
    """A launch argument as CuPy passes it: a device array's memory, a NumPy scalar as is,
    a Python scalar as CuPy widens it; anything else (a host array) is refused."""
    if value is None or isinstance(value, numpy.generic):
        return value
    if isinstance(value, ndarray):
        here = runtime.current_device()
        if value._memory.device != here:
            raise ValueError(
                f"The device where the array resides ({value._memory.device}) is different "
                f"from the current device ({here}). Peer access is unavailable between these "
                "devices."
            )
        return value._data
    if type(value) in _PYTHON_SCALARS:
        return _PYTHON_SCALARS[type(value)](value)
    raise TypeError(f"Unsupported type {type(value)}")


def _issue(what: str, run: Any, arrays: list[ndarray]) -> None:
    if runtime.capturing():
        streams.record(what, run, [a._memory for a in arrays])
    else:
        run()
        runtime.count_launch()


class RawKernel:
    """One kernel of a :class:`RawModule`: ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, function: Any, name: str) -> None:
        self._function, self.name = function, name

    def __call__(self, grid: Any, block: Any, args: tuple, *, shared_mem: int = 0,
                 enable_cooperative_groups: bool = False) -> None:  # fmt: skip
        if not isinstance(args, tuple):
            raise TypeError(f"args must be a tuple, got {type(args).__name__}")
        converted = tuple(_kernel_argument(a) for a in args)
        self._function.check(converted)
        arrays = [a for a in args if isinstance(a, ndarray)]
        function = self._function
        _issue(
            f"kernel {self.name}",
            lambda: function(grid, block, converted, shared_mem),
            arrays,
        )


class RawModule:
    """As ``cupy.RawModule(code=..., options=..., name_expressions=...)``, emulated."""

    def __init__(self, code: str | None = None, *, path: str | None = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False,
                 enable_cooperative_groups: bool = False, name_expressions: Any = None,
                 jitify: Any = None) -> None:  # fmt: skip
        if code is None:
            raise NotImplementedError("the CuPy stand-in compiles sources (code=...) only")
        if not isinstance(options, tuple):
            raise TypeError(f"options must be a tuple, got {type(options).__name__}")
        self.code, self.options = code, options
        self.name_expressions = None if name_expressions is None else tuple(name_expressions)
        self._module: cuda_emulator.EmulatedModule | None = None

    def get_function(self, name: str) -> RawKernel:
        _nvrtc()
        if self._module is None:
            self._module = cuda_emulator.EmulatedModule(
                "<RawModule>", text=self.code, names=self.name_expressions, gpu_math=gpu_math()
            )
        return RawKernel(self._module.get_function(name), name)


# -- elementwise kernels ---------------------------------------------------------------------
_C_TYPES = {
    "float32": "float", "float64": "double", "int8": "signed char", "uint8": "unsigned char",
    "int16": "short", "uint16": "unsigned short", "int32": "int", "uint32": "unsigned int",
    "int64": "long long", "uint64": "unsigned long long", "bool": "bool",
}  # fmt: skip
_PRELUDE = """#include <cmath>
#include <cstdint>
#include <xmmintrin.h>
using std::sqrt; using std::exp; using std::log; using std::log1p; using std::tanh;
using std::fabs; using std::fmax; using std::fmin; using std::pow; using std::floor;
using std::ceil; using std::sin; using std::cos; using std::isnan; using std::isinf;
"""


class _Param:
    def __init__(self, text: str) -> None:
        words = text.split()
        if len(words) == 3 and words[0] == "raw":
            raise NotImplementedError(f"the CuPy stand-in does not emulate raw params ({text})")
        if len(words) != 2:
            raise ValueError(f"Invalid parameter: {text!r}")
        self.type, self.name = words
        self.placeholder = self.type not in _C_TYPES


def _params(text: str) -> list[_Param]:
    return [_Param(piece) for piece in text.split(",") if piece.strip()]


class ElementwiseKernel:
    """As ``cupy.ElementwiseKernel``: ``operation`` (C) runs once per element, inputs
    broadcast, outputs allocated when not given, type placeholders bound from the arrays."""

    def __init__(self, in_params: str, out_params: str, operation: str, name: str = "kernel",
                 reduce_dims: bool = True, preamble: str = "", no_return: bool = False,
                 return_tuple: bool = False, **kwargs: Any) -> None:  # fmt: skip
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"Invalid kernel name: {name!r}")
        self.in_params, self.out_params = _params(in_params), _params(out_params)
        self.operation, self.name, self.preamble = operation, name, preamble
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self._libraries: dict[tuple, Any] = {}

    def __call__(self, *args: Any, size: int | None = None, block_size: int | None = None,
                 stream: Any = None) -> Any:  # fmt: skip
        _nvrtc()
        if len(args) not in (self.nin, self.nin + self.nout):
            raise TypeError(f"Wrong number of arguments for {self.name!r}")
        for value in args:
            if isinstance(value, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(value)}")
        types = self._bind(args)
        arrays = [a for a in args if isinstance(a, ndarray)]
        shape = numpy.broadcast_shapes(*(a.shape for a in arrays)) if arrays else ()
        outs = list(args[self.nin :])
        for param in self.out_params[len(outs) :]:
            outs.append(ndarray(shape, dtype=types[param.type]))
        for out in outs:
            if out.shape != shape:
                raise ValueError(f"Out shape is mismatched: {out.shape} vs {shape}")
        inputs = [self._frozen(v, p, types) for v, p in zip(args[: self.nin], self.in_params,
                                                            strict=True)]  # fmt: skip
        run = self._runner(types, inputs, outs, shape)
        _issue(f"elementwise kernel {self.name}", run, arrays + outs)
        return outs[0] if self.nout == 1 else tuple(outs)

    def _bind(self, args: tuple) -> dict[str, numpy.dtype]:
        types: dict[str, numpy.dtype] = {k: numpy.dtype(k) for k in _C_TYPES}
        for value, param in zip(args, self.in_params + self.out_params, strict=False):
            if param.placeholder and isinstance(value, ndarray):
                if param.type in types and types[param.type] != value.dtype:
                    raise TypeError(f"Type is mismatched. {param.name} {value.dtype} "
                                    f"{types[param.type]}")  # fmt: skip
                types[param.type] = value.dtype
        for value, param in zip(args, self.in_params, strict=False):
            if param.placeholder and param.type not in types:
                types[param.type] = numpy.asarray(value).dtype
        return types

    @staticmethod
    def _frozen(value: Any, param: _Param, types: dict) -> Any:
        dtype = types[param.type]
        if isinstance(value, ndarray):
            return value
        return numpy.asarray(value, dtype=dtype)  # a host scalar: fixed at launch (and capture)

    def _runner(self, types: dict, inputs: list, outs: list, shape: tuple) -> Any:
        key = tuple(str(types[p.type]) for p in self.in_params + self.out_params)
        if key not in self._libraries:
            self._libraries[key] = self._compile(types)
        function = self._libraries[key]

        def run() -> None:
            buffers = []
            for value, param in zip(inputs, self.in_params, strict=True):
                data = value._data if isinstance(value, ndarray) else value
                buffers.append(numpy.ascontiguousarray(
                    numpy.broadcast_to(data, shape), dtype=types[param.type]))  # fmt: skip
            scratch = [numpy.ascontiguousarray(o._data) for o in outs]
            pointers = (ctypes.c_void_p * len(buffers + scratch))(
                *[b.ctypes.data for b in buffers + scratch]
            )
            function(ctypes.c_longlong(int(numpy.prod(shape))), pointers)
            for out, data in zip(outs, scratch, strict=True):
                if data is not out._data:
                    out._data[...] = data

        return run

    def _compile(self, types: dict) -> Any:
        lines = []
        for index, param in enumerate(self.in_params + self.out_params):
            ctype = _C_TYPES[str(types[param.type])]
            if index < self.nin:
                lines.append(f"    const {ctype} {param.name} = (({ctype}*)p[{index}])[i];")
            else:
                lines.append(f"    {ctype}& {param.name} = (({ctype}*)p[{index}])[i];")
        typedefs = "".join(
            f"typedef {_C_TYPES[str(dtype)]} {name};\n"
            for name, dtype in types.items()
            if name not in _C_TYPES
        )
        ftz = "  unsigned csr = _mm_getcsr(); _mm_setcsr(csr | 0x8040u);\n" if gpu_math() else ""
        restore = "  _mm_setcsr(csr);\n" if gpu_math() else ""
        cpp = (
            f"{_PRELUDE}{typedefs}{self.preamble}\n"
            f'extern "C" void run(long long n, void** p) {{\n{ftz}'
            f"  for (long long i = 0; i < n; ++i) {{\n" + "\n".join(lines) + "\n"
            f"    {self.operation};\n  }}\n{restore}}}\n"
        )
        library = ctypes.CDLL(str(_build(cpp, gpu_math())))
        library.run.restype = None
        library.run.argtypes = [ctypes.c_longlong, ctypes.POINTER(ctypes.c_void_p)]
        return library.run


def _build(cpp: str, fused: bool) -> Path:
    flags = cuda_emulator.CXXFLAGS + (cuda_emulator.GPU_MATH_FLAGS if fused else ())
    key = hashlib.sha256("\0".join([cpp, " ".join(flags)]).encode()).hexdigest()[:24]
    cache = cuda_emulator._default_cache_dir()
    target = cache / f"elementwise-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        source, out = Path(tmp) / "kernel.cpp", Path(tmp) / "lib.so"
        source.write_text(cpp)
        result = subprocess.run(
            [cuda_emulator.CXX, *flags, "-o", str(out), str(source)],
            capture_output=True, text=True,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"the elementwise kernel does not compile:\n{result.stderr}")
        os.replace(out, target)
    return target


class ReductionKernel:
    """As ``cupy.ReductionKernel``: not emulated; using it fails loudly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the CuPy stand-in does not emulate ReductionKernel")
