"""The parameter lists of our CUDA kernels, parsed from their sources, and the check that a
launch's arguments match them (on a GPU a wrong dtype or layout is silent garbage).

:class:`lenet_xp.kernels.ops.Kernels` checks every launch with :func:`mismatch`; the CUDA
emulator (:mod:`lenet_xp.testing.cuda_emulator`) parses the same declarations to call them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Pointer parameters that a kernel indexes with element strides it is given, so the array
#: may be any strided view (e.g. a transpose); every other pointer must be C-contiguous.
STRIDED_PARAMS: dict[str, frozenset[str]] = {
    "im2col": frozenset({"x"}),
    "gemm": frozenset({"a", "b", "c", "mask"}),
    "gemm_reduce": frozenset({"c", "mask"}),
    "softmax_cross_entropy": frozenset({"logits", "grad_logits"}),
}

#: C type (after substituting the template parameter) -> NumPy dtype.
C_DTYPES: dict[str, np.dtype] = {
    "float": np.dtype(np.float32),
    "double": np.dtype(np.float64),
    "bool": np.dtype(np.bool_),
    "char": np.dtype(np.int8),
    "signed char": np.dtype(np.int8),
    "unsigned char": np.dtype(np.uint8),
    "short": np.dtype(np.int16),
    "unsigned short": np.dtype(np.uint16),
    "int": np.dtype(np.int32),
    "unsigned": np.dtype(np.uint32),
    "unsigned int": np.dtype(np.uint32),
    "long": np.dtype(np.int64),
    "long long": np.dtype(np.int64),
    "long long int": np.dtype(np.int64),
    "unsigned long long": np.dtype(np.uint64),
    "int32_t": np.dtype(np.int32),
    "int64_t": np.dtype(np.int64),
    "uint8_t": np.dtype(np.uint8),
    "size_t": np.dtype(np.uint64),
}


# -- parsing --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``decl`` as written (template parameter substituted)."""

    index: int
    name: str
    ctype: str  # e.g. "const float*", "long long"
    base: str  # e.g. "float", "long long"
    pointer: bool
    const: bool
    strided: bool  # a pointer the kernel indexes with strides it is given

    @property
    def dtype(self) -> np.dtype:
        return C_DTYPES[self.base]

    @property
    def decl(self) -> str:
        return f"{self.ctype} {self.name}"


@dataclass(frozen=True)
class KernelDecl:
    name: str
    template_param: str | None
    params_text: str
    body: str

    @property
    def uses_syncthreads(self) -> bool:
        return re.search(r"\b__syncthreads\s*\(", self.body) is not None


def strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


_KERNEL_RE = re.compile(
    r"(?:template\s*<\s*(?:typename|class)\s+(\w+)\s*>\s*)?"
    r"__global__\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?void\s+(\w+)\s*\(([^)]*)\)\s*\{"
)


def parse_kernels(source: str) -> dict[str, KernelDecl]:
    """Every ``__global__`` function of ``source``: name -> declaration and body text."""
    text = strip_comments(source)
    kernels = {}
    for match in _KERNEL_RE.finditer(text):
        depth, pos = 1, match.end()
        while depth and pos < len(text):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            pos += 1
        kernels[match.group(2)] = KernelDecl(
            match.group(2), match.group(1), match.group(3), text[match.end() : pos - 1]
        )
    return kernels


def parse_params(kernel: KernelDecl, ctype: str | None) -> tuple[Param, ...]:
    """The parameters of ``kernel`` with its template parameter replaced by ``ctype``."""
    params = []
    pieces = [p.strip() for p in kernel.params_text.split(",") if p.strip()]
    for index, piece in enumerate(pieces):
        piece = re.sub(r"\b(__restrict__|__restrict)\b", " ", piece)
        match = re.fullmatch(r"(.*?)\s*\b(\w+)", piece, flags=re.S)
        if not match or not match.group(1):
            raise ValueError(f"cannot parse parameter {piece!r} of kernel {kernel.name}")
        type_text, name = match.group(1), match.group(2)
        if kernel.template_param is not None:
            if ctype is None:
                raise ValueError(f"kernel {kernel.name} is a template: name an instantiation")
            type_text = re.sub(rf"\b{kernel.template_param}\b", ctype, type_text)
        stars = type_text.count("*")
        if stars > 1:
            raise ValueError(f"{kernel.name}: parameter {piece!r}: only T* pointers supported")
        words = type_text.replace("*", " ").split()
        const = "const" in words
        base = " ".join(w for w in words if w not in ("const", "volatile"))
        if base not in C_DTYPES:
            raise ValueError(f"{kernel.name}: parameter {piece!r}: unknown C type {base!r}")
        ctype_text = ("const " if const else "") + base + ("*" if stars else "")
        strided = bool(stars) and name in STRIDED_PARAMS.get(kernel.name, ())
        params.append(Param(index, name, ctype_text, base, bool(stars), const, strided))
    return tuple(params)


def split_expression(expression: str) -> tuple[str, str | None]:
    """``"im2col<float>"`` -> ``("im2col", "float")``; ``"k"`` -> ``("k", None)``."""
    match = re.fullmatch(r"\s*(\w+)\s*(?:<\s*([\w ]+?)\s*>)?\s*", expression)
    if not match:
        raise ValueError(f"cannot parse name expression {expression!r}")
    return match.group(1), match.group(2)


def mismatch(param: Param, value: Any) -> str | None:
    """Why ``value`` cannot be passed for ``param`` (``None``: it can)."""
    want = param.dtype
    if param.pointer:
        if value is None:
            return None
        if isinstance(value, np.generic) or not hasattr(value, "strides"):
            return f"expects an array of {want} (or None), got {type(value).__name__}"
        if value.dtype != want:
            return f"expects an array of {want}, got {value.dtype}"
        if not getattr(value.flags, "aligned", True):
            return "array is not aligned"
        if param.strided:
            if any(s % value.itemsize for s in value.strides):
                return f"array strides {value.strides} are not multiples of its item size"
        elif not value.flags.c_contiguous:
            return f"expects a C-contiguous array, got shape {value.shape} strides {value.strides}"
        if not param.const and not getattr(value.flags, "writeable", True):
            return "the kernel writes it, but the array is read-only"
        return None
    if hasattr(value, "strides") and not isinstance(value, np.generic):
        return f"expects a numpy.{want.type.__name__} scalar, got a {value.ndim}-d array"
    if not isinstance(value, np.generic):
        return (
            f"expects a numpy.{want.type.__name__} scalar, got Python {type(value).__name__} "
            f"{value!r}"
        )
    if value.dtype != want:
        return f"expects a numpy.{want.type.__name__} scalar, got numpy.{type(value).__name__}"
    return None
