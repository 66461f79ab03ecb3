"""Our own CUDA kernels: sources (``*.cu`` beside this file), loading, and the switch.

The array-op (``xp``) code of :mod:`lenet_xp.functional` is the reference: it is what the
CPU runs, what every kernel here is tested against, and the GPU fallback. A kernel that
cannot be compiled or launched falls back to it *and is recorded* (:func:`fallbacks`), so a
GPU test can fail when one of ours silently fell back.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

#: Kernels that fell back to the array code in this process: ``(name, reason)``.
_FALLBACKS: list[tuple[str, str]] = []


def record_fallback(name: str, reason: str) -> None:
    """Note that kernel ``name`` could not be used (one line on stderr, once per name)."""
    if not fell_back(name):
        print(
            f"lenet_xp: CUDA kernel {name} unavailable ({reason}); using array ops", file=sys.stderr
        )
    _FALLBACKS.append((name, reason))


def fallbacks() -> list[tuple[str, str]]:
    """Every ``(kernel name, reason)`` that fell back to array ops so far in this process."""
    return list(_FALLBACKS)


def fell_back(name: str) -> bool:
    """Whether kernel ``name`` has fallen back in this process (then it is not retried)."""
    return any(seen == name for seen, _ in _FALLBACKS)


# -- sources --------------------------------------------------------------------------------
#: Each kernel source file and the templated kernels it defines; every kernel is
#: instantiated for float and double (``"im2col<float>"``, ...).
SOURCES: dict[str, tuple[str, ...]] = {
    "conv.cu": ("im2col", "col2im"),
    "pool.cu": (
        "max_pool_bias_act",
        "max_pool_act_backward",
        "bias_act_avg_pool",
        "act_avg_pool_backward",
    ),
    "subsample.cu": ("bias_act_subsample_act", "act_subsample_act_backward", "subsample_grads"),
    "rbf.cu": ("rbf_logits", "rbf_backward"),
    "loss.cu": ("softmax_cross_entropy",),
    "data.cu": ("gather_shift",),
    "optim.cu": ("sgd_flat", "adam_flat", "ema_flat"),
    "norm.cu": ("batch_norm_act", "batch_norm_act_backward"),
    "dense.cu": (
        "bias_act",
        "bias_act_cols",
        "act_backward",
        "relu_mask",
        "gemm",
        "gemm_reduce",
    ),
}
DTYPES = {"float32": "float", "float64": "double"}
#: Threads per block of the 1-d kernels; the loss kernel is one block of LOSS_THREADS.
THREADS = 256
#: Activation codes of the fused kernels (common.cuh): layer class name -> code.
ACTIVATION_CODES = {"ReLU": 0, "Sigmoid": 1, "Tanh": 2, "LeCunTanh": 3}
LOSS_THREADS = 256
#: Threads per block (one block per channel) of ``subsample_grads``.
SUBSAMPLE_THREADS = 256
GEMM_TILE = 16
_HERE = Path(__file__).resolve().parent


def source_text(file: str) -> str:
    """The full text NVRTC compiles for ``file``: ``common.cuh`` followed by the file."""
    if file not in SOURCES:
        raise KeyError(f"unknown kernel source {file!r}; known: {', '.join(SOURCES)}")
    return (_HERE / "common.cuh").read_text() + "\n" + (_HERE / file).read_text()


def name_expressions(file: str) -> list[str]:
    """``kernel<float>`` and ``kernel<double>`` for every kernel of ``file``."""
    return [f"{name}<{ctype}>" for name in SOURCES[file] for ctype in DTYPES.values()]


NVRTC_OPTIONS = ("--std=c++14",)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds its log (file, line, error)."""


def compile_check(file: str, arch: str = "compute_80", text: str | None = None) -> str:
    """Compile ``file`` (or ``text`` under that name) to PTX with NVRTC for ``arch`` and
    return the PTX; raises :class:`KernelCompileError` with NVRTC's log if it does not
    compile. Needs only the NVRTC library (e.g. the ``nvidia-cuda-nvrtc-cu12`` wheel), no GPU
    and no driver, so a kernel that does not compile never reaches a GPU."""
    from cupy_backends.cuda.libs import nvrtc

    source = source_text(file) if text is None else text
    program = nvrtc.createProgram(source, file, [], [])
    try:
        for expression in name_expressions(file):
            nvrtc.addNameExpression(program, expression)
        options = [*NVRTC_OPTIONS, f"--gpu-architecture={arch}"]
        try:
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(program).strip()
            raise KernelCompileError(f"{file} ({arch}): {exc}\n{log}") from None
        ptx = nvrtc.getPTX(program)
        return ptx.decode() if isinstance(ptx, bytes) else ptx
    finally:
        nvrtc.destroyProgram(program)


#: What CuPy adds to a RawModule's options when it compiles with NVRTC (flush denormals).
CUPY_NVRTC_OPTIONS = ("-ftz=true",)
_PTXAS_LINE = re.compile(
    r"Function properties for (\w+).*?(\d+) bytes spill stores.*?Used (\d+) registers"
    r"(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?",
    re.S,
)


def resource_usage(file: str, arch: str = "sm_90") -> dict[str, tuple[int, int, int]]:
    """``{"kernel<ctype>": (registers per thread, static shared memory bytes, spill bytes)}``
    for every kernel of ``file``, compiled to ``arch``'s machine code with CuPy's own NVRTC
    options and ``-Xptxas -v`` (NVRTC only, no GPU)."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(source_text(file), file, [], [])
    try:
        for expression in name_expressions(file):
            nvrtc.addNameExpression(program, expression)
        options = [*NVRTC_OPTIONS, *CUPY_NVRTC_OPTIONS, f"--gpu-architecture={arch}"]
        nvrtc.compileProgram(program, [*options, "-Xptxas", "-v"])
        log = nvrtc.getProgramLog(program)
        lowered = {nvrtc.getLoweredName(program, e): e for e in name_expressions(file)}
    finally:
        nvrtc.destroyProgram(program)
    usage = {}
    for block in log.split("Compiling entry function")[1:]:
        match = _PTXAS_LINE.search(block)
        if match and match.group(1) in lowered:
            spill, registers, smem = match.group(2), match.group(3), match.group(4) or 0
            usage[lowered[match.group(1)]] = (int(registers), int(smem), int(spill))
    return usage


@functools.cache
def _cupy_module(file: str, device_id: int) -> Any:
    from lenet_xp.backend import import_cupy

    return import_cupy().RawModule(
        code=source_text(file), options=NVRTC_OPTIONS, name_expressions=name_expressions(file)
    )


def cupy_function(file: str, expression: str) -> Any:
    """The compiled CuPy kernel ``expression`` (e.g. ``"im2col<float>"``) of ``file`` on the
    current device: call it as ``fn(grid, block, args)``. Compiled once per device (NVRTC;
    CuPy caches the binary on disk)."""
    from lenet_xp.backend import import_cupy

    return _cupy_module(file, import_cupy().cuda.runtime.getDevice()).get_function(expression)


def enabled_by_default() -> bool:
    """Whether ``train`` uses our kernels when no flag says otherwise (its default
    ``--engine``): ``$LENET_XP_CUDA_KERNELS`` (``1`` on, else off). Off until
    ``scripts/gpu_check.sh`` has passed with them on a GPU."""
    return os.environ.get("LENET_XP_CUDA_KERNELS", "0") == "1"
