"""The stand-in's modules: ``cupy``, ``cupy.cuda``, ``cupy.cuda.runtime``, ``cupy.random``,
``cupy.lib.stride_tricks`` and ``cupyx``, exposing exactly CuPy's public names
(``cupy_names.json``) with CuPy's keyword arguments.

A name CuPy has is: an implementation of our own (below), NumPy's function run as one device
operation (:func:`lenet_xp.testing.fake_cupy.array.call`), NumPy's scalar type or constant,
or, where none of these applies, a function that raises ``NotImplementedError`` when called
(never a silent fallback). A name CuPy lacks is an ``AttributeError``, as on a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import types
from collections.abc import Callable
from typing import Any

import numpy

from lenet_xp.testing.cupy_names import SNAPSHOT
from lenet_xp.testing.fake_cupy import array as arrays
from lenet_xp.testing.fake_cupy import kernels, runtime, streams
from lenet_xp.testing.fake_cupy.array import call, ndarray

_NAMES: dict[str, Any] = json.loads(SNAPSHOT.read_text())
VERSION: str = _NAMES["version"]

#: Functions that run on cuBLAS for floating types: refused inside a stream capture.
_CUBLAS = {"matmul", "dot", "tensordot", "inner", "vdot", "einsum", "kron"}
#: Functions whose result size depends on the data: CuPy reads a count back (a sync).
_SYNCING = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}
#: Methods of ndarray that write the array in place.
_INPLACE_METHODS = {"fill", "sort", "partition", "put"}


class UnimplementedError(NotImplementedError):
    pass


def _unimplemented(qualname: str) -> Callable[..., Any]:
    def missing(*args: Any, **kwargs: Any) -> Any:
        raise UnimplementedError(
            f"{qualname} exists in CuPy {VERSION} but the lenet_xp stand-in does not "
            "implement it: add it to lenet_xp/testing/fake_cupy"
        )

    missing.__name__ = qualname.rpartition(".")[2]
    return missing


def check_arguments(qualname: str, params: list | None, args: tuple, kwargs: dict) -> None:
    """``TypeError`` (as Python's) when CuPy's signature ``params`` refuses the call's
    keyword names or its number of positional arguments."""
    if params is None:
        return
    by_name = {name: kind for name, kind, _ in params}
    if "VAR_KEYWORD" not in by_name.values():
        for key in kwargs:
            if by_name.get(key) not in ("POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"):
                raise TypeError(f"{qualname}() got an unexpected keyword argument '{key}'")
    if "VAR_POSITIONAL" not in by_name.values():
        positional = [n for n, k, _ in params if k in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
        if len(args) > len(positional):
            raise TypeError(
                f"{qualname}() takes {len(positional)} positional arguments "
                f"but {len(args)} were given"
            )


def _check_cublas(name: str, args: tuple) -> None:
    if runtime.broken() == "cublas":
        raise RuntimeError(
            "CuPy failed to load libcublas.so.12: OSError: libcublas.so.12: cannot open "
            "shared object file: No such file or directory"
        )
    floating = any(isinstance(a, ndarray) and a.dtype.kind in "fc" for a in args)
    if floating and runtime.capturing():
        runtime.capture_error()  # CUDA invalidates the capture
        raise NotImplementedError(
            "calling cuBLAS API during stream capture is currently unsupported"
        )


class Function:
    """NumPy's function ``name`` as CuPy's: CuPy's keywords, one device operation."""

    def __init__(self, qualname: str, function: Callable[..., Any], params: list | None) -> None:
        self.qualname, self.function, self.params = qualname, function, params
        self.__name__ = qualname.rpartition(".")[2]

    def __repr__(self) -> str:
        return f"<stand-in function {self.qualname}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        check_arguments(self.qualname, self.params, args, kwargs)
        if self.__name__ in _CUBLAS:
            _check_cublas(self.__name__, args)
        if self.__name__ in _SYNCING or (self.__name__ == "where" and len(args) == 1):
            runtime.declare_synchronize(f"{self.qualname}()")
        return call(self.qualname, self.function, args, kwargs)


class Ufunc(Function):
    """NumPy's ufunc as CuPy's: operands must be device arrays or scalars."""

    def __init__(self, qualname: str, ufunc: numpy.ufunc, params: list | None) -> None:
        super().__init__(qualname, ufunc, params)
        self.nin, self.nout = ufunc.nin, ufunc.nout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        if isinstance(out, tuple):
            if len(out) != 1:
                raise ValueError("The 'out' parameter must have exactly one array value")
            kwargs["out"] = out[0]
        for value in (*args, kwargs.get("out")):
            if value is not None and not isinstance(value, (ndarray, int, float, complex,
                                                               bool, numpy.generic)):  # fmt: skip
                raise TypeError(f"Unsupported type {type(value)}")
        return super().__call__(*args, **kwargs)

    def at(self, a: ndarray, indices: Any, b: Any = None) -> None:
        extra = () if b is None else (b,)
        arrays.inplace(f"{self.qualname}.at", self.function.at, a, (indices, *extra), {})

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return call(f"{self.qualname}.reduce", self.function.reduce, args, kwargs)

    def accumulate(self, *args: Any, **kwargs: Any) -> Any:
        return call(f"{self.qualname}.accumulate", self.function.accumulate, args, kwargs)

    def outer(self, *args: Any, **kwargs: Any) -> Any:
        return call(f"{self.qualname}.outer", self.function.outer, args, kwargs)


# -- cupy's own entry points -----------------------------------------------------------------
def asarray(a: Any, dtype: Any = None, order: Any = None, *, copy: Any = None,
            blocking: bool = False) -> ndarray:  # fmt: skip
    if isinstance(a, ndarray):
        if copy:
            return call("cupy.asarray", numpy.array, (a,), {"dtype": dtype, "order": order})
        if dtype is None or numpy.dtype(dtype) == a.dtype:
            return a
        return call("cupy.asarray", numpy.asarray, (a,), {"dtype": dtype, "order": order})
    return arrays.from_host(a, dtype, order)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K",
          subok: bool = False, ndmin: int = 0, *, blocking: bool = False) -> ndarray:  # fmt: skip
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or numpy.dtype(dtype) == obj.dtype) and obj.ndim >= ndmin:
            return obj
        return call("cupy.array", numpy.array, (obj,), {"dtype": dtype, "ndmin": ndmin,
                                                        "order": order})  # fmt: skip
    return arrays.from_host(numpy.array(obj, dtype=dtype, ndmin=ndmin), None, order)


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None, *,
            blocking: bool = True) -> numpy.ndarray:  # fmt: skip
    if isinstance(a, ndarray):
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


def get_array_module(*args: Any) -> types.ModuleType:
    return CUPY if any(isinstance(a, ndarray) for a in args) else numpy


def get_default_memory_pool() -> runtime.MemoryPool:
    return runtime.default_pool()


def get_current_stream(device_id: int | None = None) -> streams.Stream:
    return streams.current_stream(device_id)


@contextlib.contextmanager
def using_allocator(allocator: Any = None):
    saved = runtime._allocator[0]
    runtime._allocator[0] = allocator
    try:
        yield
    finally:
        runtime._allocator[0] = saved


def set_allocator(allocator: Any = None) -> None:
    runtime._allocator[0] = allocator


@contextlib.contextmanager
def allow_synchronize(allow: bool):
    saved = runtime._thread.allow_sync
    runtime._thread.allow_sync = bool(allow)
    try:
        yield
    finally:
        runtime._thread.allow_sync = saved


# -- cupy.random ----------------------------------------------------------------------------
class Generator:
    """As ``cupy.random.Generator``: NumPy's generator, its draws made on the device."""

    def __init__(self, bit_generator: Any = None, seed: Any = None) -> None:
        self._numpy = numpy.random.default_rng(seed)

    def __getattr__(self, name: str) -> Any:
        entry = _NAMES["classes"]["cupy.random.Generator"].get(name)
        if entry is None or not hasattr(self._numpy, name):
            raise AttributeError(f"'Generator' object has no attribute '{name}'")
        method = getattr(self._numpy, name)
        qualname = f"cupy.random.Generator.{name}"

        def draw(*args: Any, **kwargs: Any) -> Any:
            check_arguments(qualname, entry["params"], args, kwargs)
            return call(qualname, method, args, kwargs)

        return draw


def default_rng(seed: Any = None) -> Generator:
    return Generator(seed=seed)


# -- building the modules ----------------------------------------------------------------------
class Module(types.ModuleType):
    """A module exposing exactly CuPy's public names for ``qualname``."""

    def __init__(self, qualname: str, own: dict[str, Any], numpy_source: Any = None) -> None:
        super().__init__(qualname)
        self._names = _NAMES["modules"][qualname]
        self._own, self._numpy_source = own, numpy_source

    def __dir__(self) -> list[str]:
        return sorted(self._names)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name not in self._names:
            raise AttributeError(f"module '{self.__name__}' has no attribute '{name}'")
        value = self._resolve(name, self._names[name])
        setattr(self, name, value)
        return value

    def _resolve(self, name: str, entry: dict) -> Any:
        qualname = f"{self.__name__}.{name}"
        if name in self._own:
            return self._own[name]
        found = getattr(self._numpy_source, name, None) if self._numpy_source else None
        kind = entry["kind"]
        if found is not None and kind == "ufunc" and isinstance(found, numpy.ufunc):
            return Ufunc(qualname, found, entry.get("params"))
        if found is not None and kind == "function" and callable(found):
            return Function(qualname, found, entry.get("params"))
        scalar_types = (numpy.generic, numpy.dtype)
        if kind == "class" and isinstance(found, type) and issubclass(found, scalar_types):
            return found
        if kind == "class" and found in (numpy.finfo, numpy.iinfo):
            return found
        if found is not None and kind == "value":
            return found
        if kind == "module":
            raise AttributeError(f"the stand-in does not provide {qualname}")
        if kind == "class":
            return _unimplemented(qualname)
        return _unimplemented(qualname)


def _runtime_module() -> Module:
    def get_device_count() -> int:
        if runtime.broken() == "driver":
            raise runtime.driver_error()
        return runtime.device_count()

    def set_device(device: int) -> None:
        runtime.Device(device).use()

    def device_synchronize() -> None:
        runtime.declare_synchronize("cupy.cuda.runtime.deviceSynchronize()")

    def mem_get_info() -> tuple[int, int]:
        return runtime.Device().mem_info

    own = {
        "CUDARuntimeError": runtime.CUDARuntimeError,
        "getDeviceCount": get_device_count,
        "getDevice": runtime.current_device,
        "setDevice": set_device,
        "driverGetVersion": lambda: 0 if runtime.broken() == "driver" else 12080,
        "runtimeGetVersion": lambda: 12080,
        "getDeviceProperties": runtime.properties,
        "deviceSynchronize": device_synchronize,
        "memGetInfo": mem_get_info,
        "streamIsCapturing": lambda ptr: (
            streams.current_stream().ptr == ptr and runtime.capturing()
        ),
        "is_hip": False,
    }
    module = Module("cupy.cuda.runtime", own)
    for name, entry in module._names.items():  # CUDA's constants are plain ints
        if entry["kind"] == "value" and name not in own:
            own[name] = _runtime_constant(name)
    return module


@functools.cache
def _runtime_constant(name: str) -> Any:
    import cupy_backends.cuda.api.runtime as real  # imports without a GPU

    return getattr(real, name)


def _cuda_module(runtime_module: Module) -> Module:
    def is_available() -> bool:
        try:
            return runtime_module.getDeviceCount() > 0
        except runtime.CUDARuntimeError:
            return False

    memory = types.ModuleType("cupy.cuda.memory")
    memory.OutOfMemoryError = runtime.OutOfMemoryError
    memory.MemoryPool = runtime.MemoryPool
    own = {
        "Device": runtime.Device,
        "Stream": streams.Stream,
        "Event": streams.Event,
        "Graph": streams.Graph,
        "MemoryPool": runtime.MemoryPool,
        "runtime": runtime_module,
        "memory": memory,
        "get_current_stream": get_current_stream,
        "get_device_id": runtime.current_device,
        "get_elapsed_time": streams.elapsed_ms,
        "is_available": is_available,
        "using_allocator": using_allocator,
        "set_allocator": set_allocator,
        "get_allocator": lambda: runtime._allocator[0],
        "Function": kernels.RawKernel,
        "Module": kernels.RawModule,
    }
    return Module("cupy.cuda", own)


def _build() -> tuple[Module, Module]:
    cuda = _cuda_module(_runtime_module())
    random = Module(
        "cupy.random", {"default_rng": default_rng, "Generator": Generator}, numpy.random
    )
    stride_tricks = Module("cupy.lib.stride_tricks", {}, numpy.lib.stride_tricks)
    lib = Module("cupy.lib", {"stride_tricks": stride_tricks})
    own = {
        "ndarray": ndarray,
        "asarray": asarray,
        "array": array,
        "asnumpy": asnumpy,
        "get_array_module": get_array_module,
        "get_default_memory_pool": get_default_memory_pool,
        "cuda": cuda,
        "random": random,
        "lib": lib,
        "ElementwiseKernel": kernels.ElementwiseKernel,
        "RawModule": kernels.RawModule,
        "RawKernel": kernels.RawKernel,
        "ReductionKernel": kernels.ReductionKernel,
        "__version__": VERSION,
    }
    cupy = Module("cupy", own, numpy)
    cupy.__version__ = VERSION
    cupyx = Module(
        "cupyx",
        {
            "allow_synchronize": allow_synchronize,
            "DeviceSynchronized": runtime.DeviceSynchronized,
        },
    )
    return cupy, cupyx


CUPY, CUPYX = _build()


def cupy_ufunc(name: str) -> Ufunc | None:
    """CuPy's ufunc ``name`` (for NumPy's ufunc dispatch), or ``None``."""
    entry = CUPY._names.get(name)
    return getattr(CUPY, name) if entry and entry["kind"] == "ufunc" else None


def cupy_function(function: Any) -> Any:
    """CuPy's function of the same module path and name as the NumPy ``function`` (NumPy's
    ``__array_function__`` dispatch, as CuPy resolves it), or ``None``."""
    found: Any = CUPY
    try:
        for part in (getattr(function, "__module__", "") or "").split(".")[1:]:
            found = getattr(found, part)
        found = getattr(found, function.__name__)
    except AttributeError:
        return None
    return None if found is function else found


def _attach_methods() -> None:
    """Give :class:`ndarray` every method CuPy's has: NumPy's method as one operation."""
    for name, entry in _NAMES["classes"]["cupy.ndarray"].items():
        if name.startswith("_") or name in ndarray.__dict__:
            continue
        if entry["kind"] != "method" or not hasattr(numpy.ndarray, name):
            setattr(ndarray, name, _unimplemented(f"cupy.ndarray.{name}"))
            continue
        setattr(ndarray, name, _method(name, entry["params"]))


def _method(name: str, params: list | None) -> Callable[..., Any]:
    numpy_method = getattr(numpy.ndarray, name)
    qualname = f"cupy.ndarray.{name}"

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        check_arguments(qualname, params, args, kwargs)
        if name == "dot":
            _check_cublas(name, (self, *args))
        if name in _INPLACE_METHODS:
            arrays.inplace(qualname, numpy_method, self, args, kwargs)  # no bool(): a read
            return None
        return call(qualname, numpy_method, (self, *args), kwargs)

    method.__name__ = name
    return method


_BINARY = {
    "add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
    "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul",
    "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
    "lshift": "left_shift", "rshift": "right_shift",
}  # fmt: skip
_COMPARE = {"lt": "less", "le": "less_equal", "gt": "greater", "ge": "greater_equal",
            "eq": "equal", "ne": "not_equal"}  # fmt: skip
_UNARY = {"neg": "negative", "pos": "positive", "abs": "absolute", "invert": "invert"}


def _attach_operators() -> None:
    def binary(ufunc: str) -> tuple[Callable, Callable, Callable]:
        def forward(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            return getattr(CUPY, ufunc)(self, other)

        def reflected(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            return getattr(CUPY, ufunc)(other, self)

        def inplace(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            getattr(CUPY, ufunc)(self, other, out=self)
            return self

        return forward, reflected, inplace

    for op, ufunc in _BINARY.items():
        forward, reflected, inplace = binary(ufunc)
        setattr(ndarray, f"__{op}__", forward)
        setattr(ndarray, f"__r{op}__", reflected)
        setattr(ndarray, f"__i{op}__", inplace)
    for op, ufunc in _COMPARE.items():
        setattr(ndarray, f"__{op}__", binary(ufunc)[0])
    for op, ufunc in _UNARY.items():
        setattr(ndarray, f"__{op}__", lambda self, u=ufunc: getattr(CUPY, u)(self))
    ndarray.__hash__ = None  # type: ignore[assignment]


_attach_methods()
_attach_operators()
