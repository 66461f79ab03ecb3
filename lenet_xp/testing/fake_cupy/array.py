"""The stand-in's device array and the one way every operation on it runs (:func:`call`).

A :class:`ndarray` holds a NumPy array over device memory it does not share with the host:
NumPy cannot see it (``numpy.asarray(x)`` is a ``TypeError``, as in CuPy), host arrays cannot
be mixed into its operations, and reading it on the host (``get``, ``float``, ``item``, ...)
is a counted synchronisation. During a stream capture an operation is not run: it is recorded
(with the Python scalars and host values it saw) and its new arrays hold garbage until the
graph is launched, as on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy

from lenet_xp.testing.fake_cupy import runtime, streams


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: ``_data`` (a NumPy array over ``_memory``) is never handed to NumPy
    code outside the stand-in."""

    __array_priority__ = 100  # NumPy defers operators to us (then refuses them, as CuPy)

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None,
                 strides: Any = None, order: str = "C") -> None:  # fmt: skip
        host = numpy.empty(shape, dtype=dtype, order=order)
        self._memory = runtime.allocate(host.nbytes)
        self._data = _poisoned(host) if runtime.capturing() else host

    @classmethod
    def _wrap(cls, data: numpy.ndarray, memory: runtime.Memory) -> ndarray:
        array = cls.__new__(cls)
        array._data, array._memory = data, memory
        return array

    # -- what an array is ------------------------------------------------------------------
    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    itemsize = property(lambda self: self._data.itemsize)
    nbytes = property(lambda self: self._data.nbytes)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)
    T = property(lambda self: call("transpose", numpy.transpose, (self,), {}))
    mT = property(  # noqa: N815 - CuPy's name
        lambda self: call("swapaxes", numpy.swapaxes, (self, -1, -2), {})
    )

    @property
    def device(self) -> runtime.Device:
        return runtime.Device(self._memory.device)

    @property
    def data(self) -> Any:
        from types import SimpleNamespace

        from lenet_xp.testing.fake_cupy import nccl

        offset = self._data.__array_interface__["data"][0] - _base_address(self._data)
        pointer = self._memory.ptr + offset
        nccl.register(pointer, self)  # what the stand-in's NCCL finds a pointer's array by
        return SimpleNamespace(ptr=pointer, device_id=self._memory.device, mem=self._memory)

    @property
    def base(self) -> Any:
        return None

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        runtime.declare_synchronize("repr(ndarray)")
        return repr(self._data).replace("array(", "array(", 1)

    def __str__(self) -> str:
        runtime.declare_synchronize("str(ndarray)")
        return str(self._data)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    # -- refusals and host reads -------------------------------------------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> numpy.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        from lenet_xp.testing.fake_cupy import namespace

        found = namespace.cupy_ufunc(ufunc.__name__)
        if found is None or method != "__call__":
            return NotImplemented
        return found(*inputs, **kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from lenet_xp.testing.fake_cupy import namespace

        found = namespace.cupy_function(func)
        if found is None:
            return NotImplemented
        return found(*args, **kwargs)

    def get(self, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> numpy.ndarray:  # fmt: skip
        """A host copy: a synchronisation."""
        runtime.declare_synchronize("ndarray.get()")
        host = numpy.array(self._data, order=order, copy=True)
        if out is not None:
            out[...] = host
            return out
        return host

    def item(self, *args: Any) -> Any:
        runtime.declare_synchronize("ndarray.item()")
        return self._data.item(*args)

    def tolist(self) -> Any:
        runtime.declare_synchronize("ndarray.tolist()")
        return self._data.tolist()

    def __float__(self) -> float:
        runtime.declare_synchronize("float(ndarray)")
        return float(self._data)

    def __int__(self) -> int:
        runtime.declare_synchronize("int(ndarray)")
        return int(self._data)

    def __bool__(self) -> bool:
        runtime.declare_synchronize("bool(ndarray)")
        return bool(self._data)

    def __complex__(self) -> complex:
        runtime.declare_synchronize("complex(ndarray)")
        return complex(self._data)

    def __index__(self) -> int:
        if self.ndim != 0 or self.dtype.kind not in "iub":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        runtime.declare_synchronize("operator.index(ndarray)")
        return int(self._data)

    def set(self, arr: numpy.ndarray, stream: Any = None) -> None:
        """Copy the host array ``arr`` in (shape and dtype must match, as in CuPy)."""
        if not isinstance(arr, numpy.ndarray):
            raise TypeError(f"Only numpy.ndarray can be set to cupy.ndarray, got {type(arr)}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError("Shape or dtype mismatch")
        frozen = arr.copy()
        write(self, "ndarray.set", lambda data: numpy.copyto(data, frozen))

    # -- indexing ------------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> Any:
        if _is_mask(key):
            runtime.declare_synchronize("boolean-mask indexing (needs the count on the host)")
        return call("__getitem__", _getitem, (self, key), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        if _is_mask(key):
            runtime.declare_synchronize("boolean-mask assignment")
        inplace("__setitem__", _setitem, self, (key, value), {})


def _getitem(data: numpy.ndarray, key: Any) -> Any:
    return data[key]


def _setitem(data: numpy.ndarray, key: Any, value: Any) -> None:
    data[key] = value


def _is_mask(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, ndarray) and k.dtype == numpy.bool_ for k in keys)


def _base_address(data: numpy.ndarray) -> int:
    while isinstance(data.base, numpy.ndarray):
        data = data.base
    return data.__array_interface__["data"][0]


def _poisoned(data: numpy.ndarray) -> numpy.ndarray:
    """``data`` filled as uninitialised device memory reads: NaN for floats, a pattern else."""
    if data.dtype.kind in "fc":
        data.fill(numpy.nan)
    elif data.dtype.kind != "V":
        data.reshape(-1).view(numpy.uint8).fill(0xA5) if data.flags.c_contiguous else data.fill(0)
    return data


# -- operands ------------------------------------------------------------------------------
class _Operands:
    """The device arrays found in an operation's arguments (for device checks, recording)."""

    def __init__(self) -> None:
        self.arrays: list[ndarray] = []

    def unwrap(self, value: Any, host_ok: bool, what: str) -> Any:
        if isinstance(value, ndarray):
            self.arrays.append(value)
            return value._data
        if isinstance(value, numpy.ndarray):
            if host_ok:
                return value.copy()  # a host value used now is frozen into a capture
            raise TypeError(f"Unsupported type {type(value)}")
        if isinstance(value, (list, tuple)):
            items = [self.unwrap(v, host_ok, what) for v in value]
            return type(value)(items) if isinstance(value, tuple) else items
        if isinstance(value, dict):
            return {k: self.unwrap(v, host_ok, what) for k, v in value.items()}
        return value

    def memories(self) -> list[runtime.Memory]:
        return [a._memory for a in self.arrays]

    def check_devices(self, what: str) -> None:
        """CuPy launches on the current device: an operand elsewhere is an error."""
        here = runtime.current_device()
        for array in self.arrays:
            if array._memory.device != here:
                raise ValueError(
                    f"The device where the array resides ({array._memory.device}) is "
                    f"different from the current device ({here}). Peer access is unavailable "
                    f"between these devices. ({what})"
                )


def _shares(result: numpy.ndarray, operands: _Operands) -> ndarray | None:
    for array in operands.arrays:
        if numpy.may_share_memory(result, array._data):
            return array
    return None


def _wrap_result(result: Any, operands: _Operands, what: str) -> tuple[Any, list[ndarray]]:
    """Device arrays for the NumPy results, and those of them in new device memory (written
    by the operation, so replayed by a graph). No closure: arrays must die when dropped."""
    fresh: list[ndarray] = []
    return _wrap(result, operands, what, fresh), fresh


def _wrap(value: Any, operands: _Operands, what: str, fresh: list[ndarray]) -> Any:
    if isinstance(value, numpy.generic):
        value = numpy.asarray(value)
    if isinstance(value, numpy.ndarray):
        owner = _shares(value, operands)
        if owner is not None:  # a view: no kernel, same memory
            return ndarray._wrap(value, owner._memory)
        operands.check_devices(what)
        data = numpy.ascontiguousarray(value) if value.ndim else value.copy()
        array = ndarray._wrap(data, runtime.allocate(data.nbytes))
        fresh.append(array)
        return array
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v, operands, what, fresh) for v in value)
    return value


def call(what: str, function: Callable[..., Any], args: tuple, kwargs: dict,
         host_ok: bool = False) -> Any:  # fmt: skip
    """Run the NumPy ``function`` on device arrays as one device operation: operands checked
    (no host arrays unless ``host_ok``; all on the current device), results as device arrays.
    An ``out=`` array is written in place. While a stream captures, nothing runs: the
    operation is recorded and its new arrays are left uninitialised."""
    operands = _Operands()
    np_args = operands.unwrap(args, host_ok, what)
    np_kwargs = operands.unwrap(kwargs, host_ok, what)
    if "out" in kwargs and kwargs["out"] is not None:
        operands.check_devices(what)
        return _call_out(what, function, np_args, np_kwargs, operands, kwargs["out"])
    try:
        with _quiet_if_capturing():  # during a capture the operands may hold garbage
            result = function(*np_args, **np_kwargs)
    except IndexError:
        if not runtime.capturing():
            raise
        # A captured gather's indices hold garbage until the graph runs (as on a GPU): only
        # the result's shape matters now; the replay runs the real indices (and fails there,
        # more strictly than a GPU, if they are out of range).
        result = function(*_zero_integers(np_args), **_zero_integers(np_kwargs))
    wrapped, fresh = _wrap_result(result, operands, what)
    if fresh:
        _issue(what, function, np_args, np_kwargs, operands, fresh)
    return wrapped


def _quiet_if_capturing() -> Any:
    """No NumPy warnings for values computed during a capture (garbage until replay)."""
    if not runtime.capturing():
        return contextlib.nullcontext()
    return numpy.errstate(all="ignore")


def _zero_integers(value: Any) -> Any:
    """``value`` with every integer array replaced by zeros (indices valid for any axis)."""
    if isinstance(value, numpy.ndarray) and value.dtype.kind in "iu":
        return numpy.zeros_like(value)
    if isinstance(value, (list, tuple)):
        items = [_zero_integers(v) for v in value]
        return type(value)(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {k: _zero_integers(v) for k, v in value.items()}
    return value


#: Operations that only allocate: no kernel on a GPU (nothing counted, nothing captured;
#: what they return during a capture holds garbage, as any new device memory).
_ALLOCATIONS = {"cupy.empty", "cupy.empty_like"}


def _issue(what, function, np_args, np_kwargs, operands, fresh) -> None:
    if what in _ALLOCATIONS:
        if runtime.capturing():
            for array in fresh:
                _poisoned(array._data)
        return
    if not runtime.capturing():
        runtime.count_launch()
        return
    targets = [_poisoned(a._data) for a in fresh]  # buffers only: a graph owns no memory

    def replay() -> None:
        result = function(*np_args, **np_kwargs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for data, value in zip(targets, [r for r in results if r is not None], strict=False):
            numpy.copyto(data, value)

    streams.record(what, replay, operands.memories() + [a._memory for a in fresh])


def _call_out(what, function, np_args, np_kwargs, operands, out) -> Any:
    def run() -> None:
        function(*np_args, **np_kwargs)

    _run_or_record(what, run, operands)
    return out


def _run_or_record(what: str, run: Callable[[], None], operands: _Operands) -> None:
    if runtime.capturing():
        streams.record(what, run, operands.memories())
    else:
        run()
        runtime.count_launch()


def inplace(what: str, function: Callable[..., Any], target: ndarray, args: tuple,
            kwargs: dict) -> ndarray:  # fmt: skip
    """``function(target_data, *args, **kwargs)`` writes ``target`` in place (setitem, fill,
    an augmented assignment): run now, or recorded during a capture."""
    operands = _Operands()
    np_target = operands.unwrap(target, False, what)
    np_args = operands.unwrap(args, False, what)
    np_kwargs = operands.unwrap(kwargs, False, what)
    operands.check_devices(what)
    _run_or_record(what, lambda: function(np_target, *np_args, **np_kwargs), operands)
    return target


def write(target: ndarray, what: str, function: Callable[[numpy.ndarray], None]) -> None:
    """``function(target_data)`` fills ``target`` from values the host holds now."""
    operands = _Operands()
    operands.arrays.append(target)
    data = target._data  # the buffer only: a graph must not keep the array alive
    _run_or_record(what, lambda: function(data), operands)


def from_host(value: Any, dtype: Any = None, order: Any = None) -> ndarray:
    """A host value copied to the current device (a capture freezes the value it sees)."""
    host = numpy.array(value, dtype=dtype, order=order or "K", copy=True)
    if host.dtype == object:
        raise ValueError("Unsupported dtype object")
    data = numpy.empty_like(host, order="C")
    array = ndarray._wrap(data, runtime.allocate(data.nbytes))
    write(array, "host-to-device copy", lambda target: numpy.copyto(target, host))
    return array
