"""The stand-in's modules: ``cupy``, ``cupy.cuda``, ``cupy.cuda.runtime``, ``cupy.random``,
``cupy.lib.stride_tricks`` and ``cupyx``, exposing exactly CuPy's public names
(:mod:`lenet_xp.testing.fake_cupy.names`) with CuPy's keyword arguments: CuPy's own entry
points implemented here, the rest made from NumPy's.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Any

import numpy

from lenet_xp.testing.fake_cupy import array as arrays
from lenet_xp.testing.fake_cupy import kernels, methods, runtime, streams
from lenet_xp.testing.fake_cupy.array import call, ndarray
from lenet_xp.testing.fake_cupy.names import NAMES, VERSION, Module, Ufunc, check_arguments


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
        entry = NAMES["classes"]["cupy.random.Generator"].get(name)
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


methods.attach(CUPY)
