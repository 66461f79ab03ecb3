"""Python launchers for the kernels in ``*.cu``: shapes in, launch configuration and typed
arguments out. One :class:`Kernels` per array namespace and kernel provider: CuPy's compiled
kernels on a GPU; the tests hand it a CPU emulation of the same sources.

Arrays are batch-innermost (``C, H, W, N`` for images, ``F, N`` for features) as in
:mod:`lenet_xp.functional.conv`. Every launcher writes into ``out`` when given one (a
captured CUDA graph needs fixed buffers) and counts its launches in :attr:`Kernels.launches`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

from lenet_xp.backend import is_gpu
from lenet_xp.kernels import (
    DTYPES,
    GEMM_TILE,
    LOSS_THREADS,
    SOURCES,
    THREADS,
    cupy_function,
    source_text,
)
from lenet_xp.kernels.pool_ops import PoolLaunchers
from lenet_xp.kernels.signatures import (
    Param,
    mismatch,
    parse_kernels,
    parse_params,
    split_expression,
)

#: ``(file, "kernel<ctype>") -> fn(grid, block, args)``, e.g. :func:`cupy_function`.
KernelProvider = Callable[[str, str], Any]
_MAX_BLOCKS = 4096  # grid-stride loops cover the rest
#: K per chunk of our GEMM when K is long and the output small (weight gradients).
SPLIT_K = 2048


@functools.cache
def kernel_params(file: str, expression: str) -> tuple[Param, ...]:
    """The parameters of kernel ``expression`` (``"im2col<float>"``) as ``file`` declares them."""
    name, ctype = split_expression(expression)
    return parse_params(parse_kernels(source_text(file))[name], ctype)


class CheckedKernel:
    """A compiled kernel whose every launch is checked against its declaration first: each
    pointer an array of the pointee's dtype (C-contiguous unless the kernel takes strides),
    each scalar a NumPy scalar of the parameter's exact type. On a GPU a mismatch is not an
    error but silent garbage; here it is a ``TypeError`` naming the argument."""

    def __init__(self, function: Any, file: str, expression: str) -> None:
        self.function, self.expression = function, expression
        self.params = kernel_params(file, expression)

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.expression}: takes {len(self.params)} arguments, got {len(args)}"
            )
        for param, value in zip(self.params, args, strict=True):
            problem = mismatch(param, value)
            if problem:
                raise TypeError(
                    f"{self.expression}: argument {param.index} ({param.decl}): {problem}"
                )
        self.function(grid, block, args)


class Kernels(PoolLaunchers):
    """Typed launchers of every kernel for namespace ``xp`` (``cupy``, or ``numpy`` with an
    emulating ``provider``). ``launches`` counts kernel launches issued through it."""

    def __init__(self, xp: ModuleType, provider: KernelProvider = cupy_function) -> None:
        self.xp, self.provider = xp, provider
        self.launches = 0
        self._functions: dict[tuple[str, str], Any] = {}

    # -- plumbing --------------------------------------------------------------------------
    def _fn(self, file: str, kernel: str, dtype: Any) -> Any:
        key = (file, f"{kernel}<{DTYPES[str(self.xp.dtype(dtype))]}>")
        if key not in self._functions:
            try:
                self._functions[key] = CheckedKernel(self.provider(*key), *key)
            except Exception as exc:  # keep the reason: do not compile again at every call
                self._functions[key] = exc
        found = self._functions[key]
        if isinstance(found, Exception):
            raise found
        return found

    def load(self, dtype: Any) -> None:
        """Compile and load every kernel of :data:`SOURCES` for ``dtype`` now: a broken one
        fails here rather than at its first launch (and none loads during a graph capture)."""
        for file, names in SOURCES.items():
            for name in names:
                self._fn(file, name, dtype)

    def _launch(self, fn: Any, total: int, args: tuple, threads: int = THREADS) -> None:
        blocks = max(1, min(_MAX_BLOCKS, -(-total // threads)))
        fn((blocks,), (threads,), args)
        self.launches += 1

    def _i32(self, value: int) -> Any:
        return self.xp.int32(value)

    def _i64(self, value: int) -> Any:
        return self.xp.int64(value)

    def _empty(self, shape: tuple[int, ...], dtype: Any, out: Any | None) -> Any:
        if out is None:
            return self.xp.empty(shape, dtype=dtype)
        if tuple(out.shape) != tuple(shape) or out.dtype != self.xp.dtype(dtype):
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected {shape} {dtype}")
        return out

    # -- convolution -----------------------------------------------------------------------
    def im2col(
        self, x: Any, kh: int, kw: int, stride: int, pad: int, oh: int, ow: int, out: Any = None
    ) -> Any:
        """``x (N, C, H, W)`` (any strides) -> ``x_cols (C*kh*kw, OH*OW*N)``."""
        n, c, h, w = x.shape
        cols = self._empty((c * kh * kw, oh * ow * n), x.dtype, out)
        s = [self._i64(stride_bytes // x.itemsize) for stride_bytes in x.strides]
        ints = [self._i32(v) for v in (kh, kw, stride, pad, oh, ow)]
        dims = [self._i32(v) for v in (n, c, h, w)]
        self._launch(self._fn("conv.cu", "im2col", x.dtype), cols.size, (x, cols, *dims, *s, *ints))
        return cols

    def col2im(
        self, x_cols: Any, x_shape: tuple, kh: int, kw: int, stride: int, pad: int, oh: int,
        ow: int, out: Any = None,
    ) -> Any:  # fmt: skip
        """``x_cols (C*kh*kw, OH*OW*N)`` -> ``grad_x`` stored ``(C, H, W, N)`` (that shape)."""
        n, c, h, w = x_shape
        grad_x = self._empty((c, h, w, n), x_cols.dtype, out)
        args = [self._i32(v) for v in (n, c, h, w, kh, kw, stride, pad, oh, ow)]
        self._launch(
            self._fn("conv.cu", "col2im", x_cols.dtype), grad_x.size, (x_cols, grad_x, *args)
        )
        return grad_x

    # -- batch normalisation ---------------------------------------------------------------
    def batch_norm_act(
        self, x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any,
        tracked: Any, eps: float, momentum: float, act: int,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        """Training batch norm of ``x (N, F)`` (contiguous) then activation ``act`` (-1:
        none), running statistics updated in place: ``(y, x_hat, inv_std)``."""
        n, f = x.shape
        y, x_hat = self.xp.empty_like(x), self.xp.empty_like(x)
        inv_std = self.xp.empty(f, x.dtype)
        f64 = self.xp.float64
        args = (
            x, weight, bias, running_mean, running_var, tracked, x_hat, inv_std, y,
            self._i32(n), self._i32(f), f64(eps), f64(momentum), self._i32(act),
        )  # fmt: skip
        self._launch(self._fn("norm.cu", "batch_norm_act", x.dtype), f, args)
        return y, x_hat, inv_std

    def batch_norm_act_backward(
        self, grad_y: Any, y: Any, x_hat: Any, inv_std: Any, weight: Any, act: int
    ) -> tuple[Any, Any, Any]:
        """Gradients of :meth:`batch_norm_act`: ``(grad_x, grad_weight, grad_bias)``."""
        n, f = grad_y.shape
        grad_x = self.xp.empty_like(grad_y)
        grad_w, grad_b = self.xp.empty(f, grad_y.dtype), self.xp.empty(f, grad_y.dtype)
        args = (
            grad_y, y, x_hat, inv_std, weight, grad_x, grad_w, grad_b, self._i32(n),
            self._i32(f), self._i32(act),
        )  # fmt: skip
        self._launch(self._fn("norm.cu", "batch_norm_act_backward", grad_y.dtype), f, args)
        return grad_x, grad_w, grad_b

    # -- LeCun's RBF output ----------------------------------------------------------------
    def rbf_logits(self, x: Any, centres: Any) -> Any:
        """``x (N, F)``, ``centres (K, F)`` (contiguous) -> ``logits (N, K)``:
        ``-|x[r] - centres[j]|^2``."""
        (n, f), k = x.shape, centres.shape[0]
        logits = self.xp.empty((n, k), x.dtype)
        args = (x, centres, logits, self._i64(n), self._i32(k), self._i32(f))
        self._launch(self._fn("rbf.cu", "rbf_logits", x.dtype), logits.size, args)
        return logits

    def rbf_backward(self, grad_logits: Any, x: Any, centres: Any) -> Any:
        """The gradient of :meth:`rbf_logits` w.r.t. ``x``: ``(N, F)``."""
        (n, f), k = x.shape, centres.shape[0]
        grad_x = self.xp.empty_like(x)
        args = (grad_logits, x, centres, grad_x, self._i64(n), self._i32(k), self._i32(f))
        self._launch(self._fn("rbf.cu", "rbf_backward", x.dtype), grad_x.size, args)
        return grad_x

    # -- loss, data, optimizer -------------------------------------------------------------
    def softmax_cross_entropy(
        self, logits_kn: Any, labels: Any, grad_kn: Any, batch_loss: Any, loss_sum: Any,
        correct: Any, counters: Any = None, rubbish: float | None = None,
    ) -> None:  # fmt: skip
        """Feature-major ``logits_kn (K, N)`` -> ``grad_kn (K, N)``, ``batch_loss (1,)``; adds
        to the running ``loss_sum (1,) float64`` and ``correct (1,) int64``; ``counters``
        (int64) each += 1. ``rubbish``: one more constant logit in the softmax (LeCun's RBF
        loss: ``-j``), or ``None``."""
        k, n = logits_kn.shape
        item = logits_kn.itemsize
        sl = [self._i64(s // item) for s in logits_kn.strides[::-1]]  # (row = n, class = k)
        sg = [self._i64(s // grad_kn.itemsize) for s in grad_kn.strides[::-1]]
        n_counters = 0 if counters is None else int(counters.size)
        args = (
            logits_kn, *sl, labels, grad_kn, *sg, self._i32(n), self._i32(k),
            self._i32(rubbish is not None), logits_kn.dtype.type(rubbish or 0.0), batch_loss,
            loss_sum, correct, counters, self._i32(n_counters),
        )  # fmt: skip
        fn = self._fn("loss.cu", "softmax_cross_entropy", logits_kn.dtype)
        fn((1,), (LOSS_THREADS,), args)
        self.launches += 1

    def gather_shift(
        self, images: Any, labels: Any, order: Any, shifts: Any, batch_index: Any, x: Any,
        y: Any, fill: float, batch: int | None = None,
    ) -> None:  # fmt: skip
        """Fill ``x (R, 1, H, W)`` and ``y (R,)`` with the first ``R`` images of batch
        ``batch_index[0]`` of ``order`` in batches of ``batch`` (default ``R``), each image
        translated by its ``shifts (2, M)`` (or not, if ``None``). An epoch's short last batch
        has ``R < batch`` rows; an MPI rank passes ``order`` from its slice's start (a view)
        and its slice's ``R``; the kernel writes no row past ``order``'s end."""
        m, _, h, w = images.shape
        rows = x.shape[0]
        b = rows if batch is None else batch
        ints = [self._i32(v) for v in (b, rows, order.size, m, h, w)]
        fn = self._fn("data.cu", "gather_shift", images.dtype)
        fill_t = images.dtype.type(fill)
        self._launch(fn, x.size, (images, labels, order, shifts, batch_index, *ints, fill_t, x, y))

    # -- flat-buffer optimizers and the weight average ----------------------------------------
    def sgd_flat(
        self, param: Any, grad: Any, buf: Any, lr_of_step: Any, clock: Any, momentum: float,
        dampening: float, weight_decay: float, nesterov: bool, first: int,
    ) -> None:  # fmt: skip
        """One SGD step over flat buffers (``buf``: the momentum buffer, or ``None`` without
        momentum); learning rate ``lr_of_step[clock[0]]``; the buffer starts as the gradient
        when ``clock[2] == first``."""
        f64 = self.xp.float64
        args = (
            param, grad, buf, lr_of_step, self._i64(lr_of_step.size), clock, f64(momentum),
            f64(dampening),
            f64(weight_decay), self._i32(int(nesterov)), self._i64(first), self._i64(param.size),
        )  # fmt: skip
        self._launch(self._fn("optim.cu", "sgd_flat", param.dtype), param.size, args)

    def adam_flat(
        self, param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, lr_of_step: Any,
        clock: Any, betas: tuple[float, float], eps: float, weight_decay: float,
        decoupled: bool,
    ) -> None:  # fmt: skip
        """One Adam/AdamW step over flat buffers: ``t = clock[2] + 1``, learning rate
        ``lr_of_step[clock[0]]``."""
        f64 = self.xp.float64
        args = (
            param, grad, exp_avg, exp_avg_sq, lr_of_step, self._i64(lr_of_step.size), clock,
            f64(betas[0]), f64(betas[1]),
            f64(eps), f64(weight_decay), self._i32(int(decoupled)), self._i64(param.size),
        )  # fmt: skip
        self._launch(self._fn("optim.cu", "adam_flat", param.dtype), param.size, args)

    def ema_flat(self, average: Any, param: Any, clock: Any, decay: float) -> None:
        """The weight average's update over flat buffers, ``clock[3]`` updates done."""
        args = (average, param, clock, self.xp.float64(decay), self._i64(param.size))
        self._launch(self._fn("optim.cu", "ema_flat", param.dtype), param.size, args)

    # -- dense -----------------------------------------------------------------------------
    def capturing(self) -> bool:
        """Whether the current CUDA stream is capturing a graph (never on the CPU)."""
        return is_gpu(self.xp) and bool(self.xp.cuda.get_current_stream().is_capturing())

    def matmul(self, a: Any, b: Any) -> Any:
        """``a (M, K) @ b (K, N)`` (any strides) into a new ``(M, N)`` array by our GEMM;
        a long ``K`` with a small output is split (:data:`SPLIT_K` per chunk) and summed in
        a fixed order by ``gemm_reduce``."""
        (m, k), n = a.shape, b.shape[1]
        c = self.xp.empty((m, n), dtype=a.dtype)
        splits = -(-k // SPLIT_K)
        partial = None
        if splits > 1 and m * n * GEMM_TILE * GEMM_TILE < 2**22:
            partial = self.xp.empty((splits, m, n), dtype=a.dtype)
        return self.gemm(a, b, c, partial=partial)

    def bias_act(self, y: Any, bias: Any, act: int) -> Any:
        """``y (M, N)`` contiguous (a convolution's GEMM output, feature-major), in place:
        ``act(y + bias[:, None])`` (``act``: a code of
        :data:`~lenet_xp.kernels.ACTIVATION_CODES`, or -1: none)."""
        m, n = y.shape
        args = (y, bias, self._i32(m), self._i64(n), self._i32(act))
        self._launch(self._fn("dense.cu", "bias_act", y.dtype), y.size, args)
        return y

    def bias_act_cols(self, y: Any, bias: Any, act: int) -> Any:
        """``y (R, C)`` contiguous, in place: ``act(y + bias[None, :])`` (``act``: a code of
        :data:`~lenet_xp.kernels.ACTIVATION_CODES`, or -1: none)."""
        r, c = y.shape
        args = (y, bias, self._i64(r), self._i32(c), self._i32(act))
        self._launch(self._fn("dense.cu", "bias_act_cols", y.dtype), y.size, args)
        return y

    def act_backward(self, grad: Any, out: Any, act: int) -> Any:
        """In place: ``grad`` through activation ``act``'s backward, from its output ``out``
        (same shape, both contiguous)."""
        args = (grad, out, self._i64(grad.size), self._i32(act))
        self._launch(self._fn("dense.cu", "act_backward", grad.dtype), grad.size, args)
        return grad

    def relu_mask(self, grad: Any, out: Any) -> Any:
        """In place: ``grad`` zeroed where ``out <= 0`` (same shape, contiguous)."""
        args = (grad, out, self._i64(grad.size))
        self._launch(self._fn("dense.cu", "relu_mask", grad.dtype), grad.size, args)
        return grad

    def gemm(
        self, a: Any, b: Any, c: Any, bias: Any = None, mask: Any = None, relu: bool = False,
        partial: Any = None,
    ) -> Any:  # fmt: skip
        """``c[...] = epilogue(a @ b)`` for 2-d ``a (M, K)``, ``b (K, N)``, ``c (M, N)`` with
        any strides (transposed views are free). ``partial (S, M, N)``, if given, splits K
        into ``S`` chunks (for long K and small M*N) summed by ``gemm_reduce`` in order."""
        (m, k), n = a.shape, b.shape[1]
        splits = 1 if partial is None else partial.shape[0]
        chunk = -(-k // splits)
        chunk = -(-chunk // GEMM_TILE) * GEMM_TILE
        splits = -(-k // chunk)
        s = [self._i64(v // a.itemsize) for v in (*a.strides, *b.strides, *c.strides)]
        grid = (-(-n // GEMM_TILE), -(-m // GEMM_TILE), splits)
        fn = self._fn("dense.cu", "gemm", a.dtype)
        ints = [self._i32(v) for v in (m, n, k, chunk, int(relu))]
        args = (a, s[0], s[1], b, s[2], s[3], c, s[4], s[5], partial, bias, mask, *ints)
        fn(grid, (GEMM_TILE, GEMM_TILE), args)
        self.launches += 1
        if splits > 1:
            fn = self._fn("dense.cu", "gemm_reduce", a.dtype)
            args = (partial, self._i32(splits), c, s[4], s[5], bias, mask)
            self._launch(fn, m * n, (*args, self._i32(m), self._i32(n), self._i32(int(relu))))
        return c


def matmul(a: Any, b: Any, kernels: Kernels | None) -> Any:
    """``a @ b`` for 2-d arrays: by our GEMM (:meth:`Kernels.matmul`) when ``kernels`` is
    given and the current stream is capturing a CUDA graph (where CuPy refuses cuBLAS),
    else by the array namespace (cuBLAS on a GPU, BLAS on the CPU)."""
    if kernels is not None and kernels.capturing():
        return kernels.matmul(a, b)
    return a @ b


@functools.cache
def _gpu_kernels(xp: ModuleType) -> Kernels:
    return Kernels(xp)


def gpu_kernels(xp: ModuleType) -> Kernels | None:
    """The shared :class:`Kernels` of CuPy when ``xp`` is a GPU namespace; ``None`` on the
    CPU (the array-op reference). Who asks decides whether to use them (an engine, through
    :meth:`~lenet_xp.layers.Module.use_cuda_kernels` and ``Optimizer.cuda_kernels``)."""
    return _gpu_kernels(xp) if is_gpu(xp) else None
