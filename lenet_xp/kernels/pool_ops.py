"""Launchers of the pooling kernels (``pool.cu``) and of LeCun's trainable subsampling
(``subsample.cu``), on batch-innermost ``(C, H, W, N)`` arrays with non-overlapping ``k x k``
windows: a part of :class:`~lenet_xp.kernels.ops.Kernels`, whose plumbing (``_fn``,
``_launch``, ``_empty``, ``_i32``, ``xp``) they use."""

from __future__ import annotations

from typing import Any

from lenet_xp.kernels import SUBSAMPLE_THREADS


class PoolLaunchers:
    """The pooling and subsampling launchers of :class:`~lenet_xp.kernels.ops.Kernels`."""

    xp: Any
    launches: int

    def max_pool_bias_act(
        self, y: Any, bias: Any, k: int, act: int, out: Any = None, argmax: Any = None
    ) -> tuple[Any, Any]:
        """``y (C, H, W, N)`` -> ``(act(maxpool(y + bias)) (C, OH, OW, N), argmax uint8)``;
        ``act``: a code of :data:`~lenet_xp.kernels.ACTIVATION_CODES`."""
        c, h, w, n = y.shape
        oh, ow = h // k, w // k
        out = self._empty((c, oh, ow, n), y.dtype, out)
        argmax = self._empty((c, oh, ow, n), self.xp.uint8, argmax)
        args = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act)]
        fn = self._fn("pool.cu", "max_pool_bias_act", y.dtype)
        self._launch(fn, out.size, (y, bias, out, argmax, *args))
        return out, argmax

    def max_pool_act_backward(
        self, grad_out: Any, out: Any, argmax: Any, y_shape: tuple, k: int, act: int,
        grad_y: Any = None,
    ) -> Any:  # fmt: skip
        """Gradient of :meth:`max_pool_bias_act` w.r.t. ``y``: ``(C, H, W, N)``."""
        c, h, w, n = y_shape
        oh, ow = out.shape[1:3]
        grad_y = self._empty((c, h, w, n), grad_out.dtype, grad_y)
        args = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act)]
        fn = self._fn("pool.cu", "max_pool_act_backward", grad_out.dtype)
        self._launch(fn, grad_y.size, (grad_out, out, argmax, grad_y, *args))
        return grad_y

    def bias_act_avg_pool(self, y: Any, bias: Any, k: int, act: int) -> tuple[Any, Any]:
        """``y (C, H, W, N)`` -> ``(avgpool(act(y + bias)) (C, OH, OW, N), act(y + bias)
        (C, H, W, N), for the backward)``."""
        c, h, w, n = y.shape
        oh, ow = h // k, w // k
        out = self.xp.empty((c, oh, ow, n), y.dtype)
        act_out = self.xp.empty((c, h, w, n), y.dtype)
        args = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act)]
        fn = self._fn("pool.cu", "bias_act_avg_pool", y.dtype)
        self._launch(fn, out.size, (y, bias, act_out, out, *args))
        return out, act_out

    def act_avg_pool_backward(self, grad_out: Any, act_out: Any, k: int, act: int) -> Any:
        """Gradient of :meth:`bias_act_avg_pool` w.r.t. ``y``: ``(C, H, W, N)``."""
        c, h, w, n = act_out.shape
        oh, ow = grad_out.shape[1:3]
        grad_y = self.xp.empty((c, h, w, n), grad_out.dtype)
        args = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act)]
        fn = self._fn("pool.cu", "act_avg_pool_backward", grad_out.dtype)
        self._launch(fn, grad_y.size, (grad_out, act_out, grad_y, *args))
        return grad_y

    # -- trainable subsampling -------------------------------------------------------------
    def bias_act_subsample_act(
        self, y: Any, bias: Any, coeff: Any, sbias: Any, k: int, act: int, act2: int
    ) -> tuple[Any, Any, Any]:
        """``y (C, H, W, N)`` -> ``(out, act_out, mean)``: ``act_out = act(y + bias)``
        ``(C, H, W, N)``, ``mean`` its window means and ``out = act2(mean * coeff * k*k +
        sbias)``, both ``(C, OH, OW, N)``."""
        c, h, w, n = y.shape
        oh, ow = h // k, w // k
        out, mean = (self.xp.empty((c, oh, ow, n), y.dtype) for _ in range(2))
        act_out = self.xp.empty_like(y)
        ints = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act, act2)]
        fn = self._fn("subsample.cu", "bias_act_subsample_act", y.dtype)
        self._launch(fn, out.size, (y, bias, coeff, sbias, act_out, mean, out, *ints))
        return out, act_out, mean

    def act_subsample_act_backward(
        self, grad_out: Any, out: Any, act_out: Any, coeff: Any, k: int, act: int, act2: int
    ) -> Any:
        """Gradient of :meth:`bias_act_subsample_act` w.r.t. ``y``: ``(C, H, W, N)``."""
        c, h, w, n = act_out.shape
        oh, ow = out.shape[1:3]
        grad_y = self.xp.empty_like(act_out)
        ints = [self._i32(v) for v in (n, c, h, w, k, oh, ow, act, act2)]
        fn = self._fn("subsample.cu", "act_subsample_act_backward", grad_out.dtype)
        self._launch(fn, grad_y.size, (grad_out, out, act_out, coeff, grad_y, *ints))
        return grad_y

    def subsample_grads(
        self, grad_out: Any, out: Any, mean: Any, k: int, act2: int
    ) -> tuple[Any, Any]:
        """The gradients of :meth:`bias_act_subsample_act`'s ``coeff`` and ``sbias``:
        ``(C,)`` each, in one launch of one block per channel."""
        c, oh, ow, n = out.shape
        grad_coeff, grad_sbias = (self.xp.empty(c, grad_out.dtype) for _ in range(2))
        ints = [self._i32(v) for v in (n, c, oh, ow, k, act2)]
        fn = self._fn("subsample.cu", "subsample_grads", grad_out.dtype)
        fn((c,), (SUBSAMPLE_THREADS,), (grad_out, out, mean, grad_coeff, grad_sbias, *ints))
        self.launches += 1
        return grad_coeff, grad_sbias
