"""Convolution as im2col + one GEMM; its backward as two GEMMs + col2im. Pure functions.

Layout. ``x_cols`` has shape ``(C*kh*kw, OH*OW*N)``: row ``(c, i, j)`` holds input pixel
``x[n, c, i + s*oh, j + s*ow]`` for every output position ``(oh, ow, n)``. It is built from
a strided *view* of the padded input with a single copy, and the forward pass is one
well-shaped GEMM ``w_mat (OC, C*kh*kw) @ x_cols -> (OC, OH*OW*N)``.

Arrays are indexed ``(N, C, H, W)`` everywhere, but the GEMM's output is stored batch-innermost
(``C, H, W, N`` in memory, as in cuda-convnet) and handed on as a transposed *view*: nothing
is copied to reorder it. The next GEMM (``grad_y`` in backward, ``im2col`` of the next conv)
reads that layout directly, elementwise layers and pooling keep whatever layout they get, and
every strided copy, add and pooling pass then runs over the whole batch as its contiguous
inner loop instead of a few pixels of one row.
"""

from __future__ import annotations

from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.functional.gemm import matmul_cols, matmul_nt


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output length of a convolution or pooling window."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out <= 0:
        raise ValueError(
            f"window {kernel} (stride {stride}, padding {padding}) does not fit input size {size}"
        )
    return out


def _zeros_chwn(xp: Any, n: int, c: int, h: int, w: int, dtype: Any) -> Any:
    """Zeros indexed ``(N, C, H, W)``, stored ``(C, H, W, N)``."""
    return xp.zeros((c, h, w, n), dtype=dtype).transpose(3, 0, 1, 2)


def _pad(x: Any, padding: int) -> Any:
    """Zero-pad H and W of ``x (N, C, H, W)``; the result is stored batch-innermost."""
    if padding == 0:
        return x
    n, c, h, w = x.shape
    x_pad = _zeros_chwn(get_array_module(x), n, c, h + 2 * padding, w + 2 * padding, x.dtype)
    x_pad[:, :, padding : padding + h, padding : padding + w] = x
    return x_pad


def im2col(x: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Patches of ``x (N, C, H, W)`` as columns: returns ``x_cols (C*kh*kw, OH*OW*N)``."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    x_pad = _pad(x, padding)
    s_n, s_c, s_h, s_w = x_pad.strides  # any memory layout; fastest when N is innermost
    patches = xp.lib.stride_tricks.as_strided(
        x_pad,
        shape=(c, kh, kw, oh, ow, n),
        strides=(s_c, s_h, s_w, s_h * stride, s_w * stride, s_n),
    )
    return xp.ascontiguousarray(patches).reshape(c * kh * kw, oh * ow * n)


def col2im(
    x_cols: Any, x_shape: tuple[int, ...], kh: int, kw: int, stride: int = 1, padding: int = 0
) -> Any:
    """Adjoint of :func:`im2col`: scatter-add ``x_cols (C*kh*kw, OH*OW*N)`` into
    ``(N, C, H, W)`` (stored batch-innermost).

    ``kh*kw`` large strided adds, one per kernel offset; no per-pixel Python.
    """
    xp = get_array_module(x_cols)
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    cols = x_cols.reshape(c, kh, kw, oh, ow, n)
    grad_pad = xp.zeros((c, h + 2 * padding, w + 2 * padding, n), dtype=x_cols.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * oh, stride)
            grad_pad[:, rows, j : j + stride * ow : stride] += cols[:, i, j]
    return grad_pad[:, padding : padding + h, padding : padding + w].transpose(3, 0, 1, 2)


def conv2d_forward(
    x: Any, weight: Any, bias: Any | None, stride: int = 1, padding: int = 0
) -> tuple[Any, Any]:
    """Convolve ``x (N, C, H, W)`` with ``weight (OC, C, kh, kw)`` plus ``bias (OC,)``.

    Returns ``(y (N, OC, OH, OW), x_cols)``; ``y`` is a view of channel-major memory (see the
    module docstring) and ``x_cols`` is kept for the backward pass.
    """
    n, c, h, w = x.shape
    oc, wc, kh, kw = weight.shape
    if c != wc:
        raise ValueError(f"conv input has {c} channels, weight expects {wc} (x shape {x.shape})")
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    x_cols = im2col(x, kh, kw, stride, padding)
    y_mat = matmul_cols(weight.reshape(oc, -1), x_cols)  # (OC, N*OH*OW)
    if bias is not None:
        y_mat += bias[:, None]
    return y_mat.reshape(oc, oh, ow, n).transpose(3, 0, 1, 2), x_cols


def conv2d_backward(
    grad_y: Any,
    x_cols: Any,
    x_shape: tuple[int, ...],
    weight: Any,
    stride: int = 1,
    padding: int = 0,
    need_grad_x: bool = True,
) -> tuple[Any | None, Any, Any]:
    """Gradients of :func:`conv2d_forward`: returns ``(grad_x, grad_w, grad_b)``.

    ``grad_y (N, OC, OH, OW)``; ``grad_x`` is ``None`` when ``need_grad_x`` is false (the
    first layer's input needs no gradient, which saves a GEMM and a col2im).
    """
    xp = get_array_module(grad_y)
    oc, _, kh, kw = weight.shape
    # Free when grad_y is stored batch-innermost (it is, coming back through LeNet's layers).
    grad_y_mat = xp.ascontiguousarray(grad_y.transpose(1, 2, 3, 0)).reshape(oc, -1)
    grad_w = matmul_nt(grad_y_mat, x_cols).reshape(weight.shape)
    grad_b = grad_y_mat.sum(axis=1)
    grad_x = None
    if need_grad_x:
        grad_cols = matmul_cols(weight.reshape(oc, -1).T, grad_y_mat)
        grad_x = col2im(grad_cols, x_shape, kh, kw, stride, padding)
    return grad_x, grad_w, grad_b
