"""The public names and signatures of CuPy that the stand-in (:mod:`lenet_xp.testing.fake_cupy`)
may expose, read from the real ``cupy`` package (which imports without a GPU).

``python -m lenet_xp.testing.cupy_names`` rewrites ``cupy_names.json`` beside this file from
the installed CuPy; a test regenerates it in memory and fails if the stored copy drifted.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).with_name("cupy_names.json")

#: The modules whose public names are recorded (every name, so anything else is unknown).
MODULES = (
    "cupy",
    "cupy.cuda",
    "cupy.cuda.runtime",
    "cupy.random",
    "cupy.lib",
    "cupy.lib.stride_tricks",
    "cupyx",
)
#: The classes whose public attributes (methods, properties) are recorded.
CLASSES = (
    "cupy.ndarray",
    "cupy.cuda.Device",
    "cupy.cuda.Stream",
    "cupy.cuda.Event",
    "cupy.cuda.Graph",
    "cupy.cuda.MemoryPool",
    "cupy.random.Generator",
)

#: A parameter: ``[name, kind, has_default]``; kind is one of inspect's names:
#: POSITIONAL_ONLY, POSITIONAL_OR_KEYWORD, VAR_POSITIONAL, KEYWORD_ONLY, VAR_KEYWORD.
Param = list[Any]


def _split_top(text: str) -> list[str]:
    """``text`` split on commas outside brackets and quotes."""
    pieces, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


def _params_from_doc(doc: str) -> list[Param] | None:
    """Parameters from a Cython docstring's first line, e.g.
    ``"_ndarray_base.sum(self, axis=None, dtype=None) -> _ndarray_base"``."""
    first = doc.strip().splitlines()[0] if doc and doc.strip() else ""
    match = re.match(r"^[\w.]+\((.*)\)(\s*->.*)?$", first)
    if not match:
        return None
    params, kind = [], "POSITIONAL_OR_KEYWORD"
    for piece in _split_top(match.group(1).replace("\\*", "*")):
        if piece == "/":
            params = [[n, "POSITIONAL_ONLY", d] for n, _, d in params]
            continue
        if piece == "*":
            kind = "KEYWORD_ONLY"
            continue
        head, _, default = piece.partition("=")
        name = head.split(":")[0].split()[-1]
        if name.startswith("**"):
            params.append([name[2:], "VAR_KEYWORD", False])
        elif name.startswith("*"):
            params.append([name[1:], "VAR_POSITIONAL", False])
            kind = "KEYWORD_ONLY"
        else:
            params.append([name, kind, bool(default.strip())])
    return params


def signature_of(obj: Any) -> list[Param] | None:
    """``obj``'s parameters (``self`` dropped), or ``None`` where CuPy does not say them."""
    try:
        params = [
            [p.name, p.kind.name, p.default is not inspect.Parameter.empty]
            for p in inspect.signature(obj).parameters.values()
        ]
    except (TypeError, ValueError):
        params = _params_from_doc(getattr(obj, "__doc__", None) or "")
    if params is None:
        return None
    return [p for p in params if p[0] != "self"]


def _kind(obj: Any) -> str:
    if inspect.ismodule(obj):
        return "module"
    if isinstance(obj, type):
        return "class"
    if type(obj).__name__ == "ufunc":
        return "ufunc"
    if callable(obj):
        return "function"
    return "value"


def _entry(obj: Any) -> dict[str, Any]:
    kind = _kind(obj)
    entry: dict[str, Any] = {"kind": kind}
    if kind == "ufunc":
        entry.update(nin=obj.nin, nout=obj.nout, params=_params_from_doc(obj.__doc__ or ""))
    elif kind in ("function", "class"):
        entry["params"] = signature_of(obj)
    return entry


def _resolve(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return getattr(importlib.import_module(module_name), attr)


def snapshot() -> dict[str, Any]:
    """What the installed CuPy exposes: ``{"version", "modules": {module: {name: entry}},
    "classes": {class: {attribute: entry}}}``."""
    cupy = importlib.import_module("cupy")
    modules = {}
    for name in MODULES:
        module = _resolve(name)
        modules[name] = {
            attr: _entry(getattr(module, attr))
            for attr in sorted(dir(module))
            if not attr.startswith("_")
        }
    classes = {}
    for name in CLASSES:
        cls = _resolve(name)
        members = {
            attr: {"kind": "method", "params": signature_of(getattr(cls, attr))}
            if callable(getattr(cls, attr))
            else {"kind": "attribute"}
            for attr in sorted(dir(cls))
            if not attr.startswith("_")
        }
        members["__init__"] = {"kind": "method", "params": signature_of(cls)}
        classes[name] = members
    return {"version": cupy.__version__, "modules": modules, "classes": classes}


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main() -> int:
    SNAPSHOT.write_text(render(snapshot()))
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
