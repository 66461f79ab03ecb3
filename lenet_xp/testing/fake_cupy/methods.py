"""The stand-in :class:`~lenet_xp.testing.fake_cupy.array.ndarray`'s methods and operators:
every method CuPy's ndarray has, as NumPy's method run as one device operation, and Python's
operators as CuPy's ufuncs (host arrays refused, as CuPy refuses them)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import numpy

from lenet_xp.testing.fake_cupy import array as arrays
from lenet_xp.testing.fake_cupy.array import call, ndarray
from lenet_xp.testing.fake_cupy.names import NAMES, check_arguments, check_cublas, unimplemented

#: Methods of ndarray that write the array in place.
_INPLACE_METHODS = {"fill", "sort", "partition", "put"}


def attach(cupy: types.ModuleType) -> None:
    """Give :class:`ndarray` CuPy's methods and operators (the operators call ``cupy``'s
    ufuncs)."""
    _attach_methods()
    _attach_operators(cupy)


def _attach_methods() -> None:
    """Give :class:`ndarray` every method CuPy's has: NumPy's method as one operation."""
    for name, entry in NAMES["classes"]["cupy.ndarray"].items():
        if name.startswith("_") or name in ndarray.__dict__:
            continue
        if entry["kind"] != "method" or not hasattr(numpy.ndarray, name):
            setattr(ndarray, name, unimplemented(f"cupy.ndarray.{name}"))
            continue
        setattr(ndarray, name, _method(name, entry["params"]))


def _method(name: str, params: list | None) -> Callable[..., Any]:
    numpy_method = getattr(numpy.ndarray, name)
    qualname = f"cupy.ndarray.{name}"

    def method(self: ndarray, *args: Any, **kwargs: Any) -> Any:
        check_arguments(qualname, params, args, kwargs)
        if name == "dot":
            check_cublas(name, (self, *args))
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


def _attach_operators(cupy: types.ModuleType) -> None:
    def binary(ufunc: str) -> tuple[Callable, Callable, Callable]:
        def forward(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            return getattr(cupy, ufunc)(self, other)

        def reflected(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            return getattr(cupy, ufunc)(other, self)

        def inplace(self, other):
            if isinstance(other, numpy.ndarray):
                raise TypeError(f"Unsupported type {type(other)}")
            getattr(cupy, ufunc)(self, other, out=self)
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
        setattr(ndarray, f"__{op}__", lambda self, u=ufunc: getattr(cupy, u)(self))
    ndarray.__hash__ = None  # type: ignore[assignment]
