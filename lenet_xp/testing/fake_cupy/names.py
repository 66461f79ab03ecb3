"""CuPy's public names made from NumPy's: the snapshot of CuPy's names and signatures
(``cupy_names.json``), NumPy's functions and ufuncs run as one device operation with CuPy's
keyword arguments (:class:`Function`, :class:`Ufunc`), and :class:`Module`, which exposes
exactly a CuPy module's names.

A name CuPy has is: an implementation of our own, NumPy's function run as one device
operation (:func:`lenet_xp.testing.fake_cupy.array.call`), NumPy's scalar type or constant,
or, where none of these applies, a function that raises ``NotImplementedError`` when called
(never a silent fallback). A name CuPy lacks is an ``AttributeError``, as on a GPU.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from typing import Any

import numpy

from lenet_xp.testing.cupy_names import SNAPSHOT
from lenet_xp.testing.fake_cupy import array as arrays
from lenet_xp.testing.fake_cupy import runtime
from lenet_xp.testing.fake_cupy.array import call, ndarray

#: CuPy's public names: ``version``, ``modules`` (name -> entry) and ``classes``.
NAMES: dict[str, Any] = json.loads(SNAPSHOT.read_text())
VERSION: str = NAMES["version"]

#: Functions that run on cuBLAS for floating types: refused inside a stream capture.
_CUBLAS = {"matmul", "dot", "tensordot", "inner", "vdot", "einsum", "kron"}
#: Functions whose result size depends on the data: CuPy reads a count back (a sync).
_SYNCING = {"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"}


class UnimplementedError(NotImplementedError):
    pass


def unimplemented(qualname: str) -> Callable[..., Any]:
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


def check_cublas(name: str, args: tuple) -> None:
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
            check_cublas(self.__name__, args)
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


class Module(types.ModuleType):
    """A module exposing exactly CuPy's public names for ``qualname``."""

    def __init__(self, qualname: str, own: dict[str, Any], numpy_source: Any = None) -> None:
        super().__init__(qualname)
        self._names = NAMES["modules"][qualname]
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
            return unimplemented(qualname)
        return unimplemented(qualname)
