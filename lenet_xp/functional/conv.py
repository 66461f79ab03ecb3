"""Convolution as im2col + one GEMM; its backward as two GEMMs + col2im. Pure functions.

Layout. ``x_cols`` has shape ``(C*kh*kw, OH*OW*N)``: row ``(c, i, j)`` holds input pixel
``x[n, c, i + s*oh, j + s*ow]`` for every output position ``(oh, ow, n)``. It is built from
a strided *view* of the padded input with a single copy, and the forward pass is one
well-shaped GEMM ``w_mat (OC, C*kh*kw) @ x_cols -> (OC, OH*OW*N)``. On the CPU that GEMM is
computed in column blocks of a few output rows (``backend.gemm_block``): each block's
``x_cols`` is built, multiplied and dropped while it is still in cache, and rebuilt in the
backward pass, where the same blocks give ``grad_w`` (summed) and ``grad_x`` (col2im'd).

Arrays are indexed ``(N, C, H, W)`` everywhere, but the GEMM's output is stored batch-innermost
(``C, H, W, N`` in memory, as in cuda-convnet) and handed on as a transposed *view*: nothing
is copied to reorder it. The next GEMM (``grad_y`` in backward, ``im2col`` of the next conv)
reads that layout directly, elementwise layers and pooling keep whatever layout they get, and
every strided copy, add and pooling pass then runs over the whole batch as its contiguous
inner loop instead of a few pixels of one row.
"""

from __future__ import annotations

from typing import Any

from lenet_xp import native
from lenet_xp.backend import gemm_block, get_array_module, is_gpu
from lenet_xp.kernels import record_fallback
from lenet_xp.kernels.ops import Kernels, matmul
from lenet_xp.native import conv as native_conv


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


def _patches(x_pad: Any, kh: int, kw: int, stride: int, rows: tuple[int, int], ow: int) -> Any:
    """Strided view ``(C, kh, kw, R, OW, N)`` of the windows of output rows ``rows = (r0, r1)``."""
    xp = get_array_module(x_pad)
    n, c = x_pad.shape[:2]
    r0, r1 = rows
    s_n, s_c, s_h, s_w = x_pad.strides  # any memory layout; fastest when N is innermost
    return xp.lib.stride_tricks.as_strided(
        x_pad[:, :, r0 * stride :],
        shape=(c, kh, kw, r1 - r0, ow, n),
        strides=(s_c, s_h, s_w, s_h * stride, s_w * stride, s_n),
    )


def _cols(x_pad: Any, kh: int, kw: int, stride: int, rows: tuple[int, int], ow: int) -> Any:
    """``x_cols`` of output rows ``rows``: ``(C*kh*kw, R*OW*N)``, one copy of the view (on
    the CPU, a compiled loop when :mod:`lenet_xp.native` is on: the same values)."""
    x_chwn = x_pad.transpose(1, 2, 3, 0)
    if native.fits(x_chwn):
        return native_conv.cols(x_chwn, kh, kw, stride, rows, ow)
    patches = get_array_module(x_pad).ascontiguousarray(_patches(x_pad, kh, kw, stride, rows, ow))
    return patches.reshape(patches.shape[0] * kh * kw, -1)


def _add_cols(grad_pad: Any, cols: Any, kh: int, kw: int, stride: int, r0: int, ow: int) -> None:
    """Scatter-add ``cols (C*kh*kw, R*OW*N)`` of output rows ``r0..`` into ``grad_pad`` stored
    ``(C, H, W, N)``: one large strided add per kernel offset (on the CPU, one compiled loop
    when :mod:`lenet_xp.native` is on: the same sums)."""
    if native.fits(grad_pad, cols):
        native_conv.add_cols(grad_pad, cols, kh, kw, stride, r0, ow)
        return
    c, n = grad_pad.shape[0], grad_pad.shape[3]
    cols = cols.reshape(c, kh, kw, -1, ow, n)
    r = cols.shape[3]
    for i in range(kh):
        rows = slice(r0 * stride + i, r0 * stride + i + stride * r, stride)
        for j in range(kw):
            grad_pad[:, rows, j : j + stride * ow : stride] += cols[:, i, j]


def _add_cols_wide(grad_pad: Any, cols: Any, kh: int, kw: int, r0: int, ow: int) -> None:
    """:func:`_add_cols` for stride 1 from ``cols (kh*kw*C, R*W*N)``: rows ordered by kernel
    offset ``(i, j, c)``, columns ``(r, x, n)`` over the padded width ``W`` (columns
    ``x >= ow`` zeros). Offset ``(i, j)`` is then one add of ``C`` contiguous runs, shifted
    by ``(i*W + j)*N`` in ``grad_pad (C, H, W, N)``, in the reference's order (the zeros add
    nothing); a wrap into the next row lands on a zero column's term."""
    c, _, width, n = grad_pad.shape
    flat = grad_pad.reshape(c, -1)
    length = cols.shape[1] - (width - ow) * n  # the last row's zero columns would overrun
    for i in range(kh):
        for j in range(kw):
            start, row = ((r0 + i) * width + j) * n, (i * kw + j) * c
            flat[:, start : start + length] += cols[row : row + c, :length]


def _grad_x_adder(grad_pad: Any, grad_y_mat: Any, weight: Any, stride: int, ow: int) -> Any:
    """``add(r0, r1)``: add the input gradient of output rows ``r0..r1`` (from ``grad_y_mat
    (OC, OH*OW*N)``) into ``grad_pad (C, H, W, N)``. NumPy without the compiled kernels, at
    stride 1: ``grad_y`` padded to the padded width and the GEMM's rows ordered by kernel
    offset, so each offset's add is contiguous (:func:`_add_cols_wide`, the same sums)."""
    oc, _, kh, kw = weight.shape
    n, width = grad_pad.shape[3], grad_pad.shape[2]
    w_mat_t = weight.reshape(oc, -1).T
    xp = get_array_module(grad_pad)
    if stride != 1 or is_gpu(xp) or native.fits(grad_pad):

        def add(r0: int, r1: int) -> None:
            block = grad_y_mat[:, r0 * ow * n : r1 * ow * n]
            _add_cols(grad_pad, w_mat_t @ block, kh, kw, stride, r0, ow)

        return add
    grad_y_wide = xp.zeros((oc, grad_y_mat.shape[1] // (ow * n), width, n), grad_y_mat.dtype)
    grad_y_wide[:, :, :ow] = grad_y_mat.reshape(oc, -1, ow, n)
    grad_y_wide = grad_y_wide.reshape(oc, -1)
    w_rows = weight.transpose(2, 3, 1, 0).reshape(kh * kw * weight.shape[1], oc)

    def add_wide(r0: int, r1: int) -> None:
        block = grad_y_wide[:, r0 * width * n : r1 * width * n]
        _add_cols_wide(grad_pad, w_rows @ block, kh, kw, r0, ow)

    return add_wide


def _row_blocks(xp: Any, oh: int, cols_per_row: int) -> list[tuple[int, int]]:
    """Output rows in blocks of about ``backend.gemm_block`` columns (one block on a GPU)."""
    block = gemm_block(xp)
    step = oh if block is None else max(1, block // cols_per_row)
    return [(r, min(r + step, oh)) for r in range(0, oh, step)]


def im2col(x: Any, kh: int, kw: int, stride: int = 1, padding: int = 0) -> Any:
    """Patches of ``x (N, C, H, W)`` as columns: returns ``x_cols (C*kh*kw, OH*OW*N)``."""
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    return _cols(_pad(x, padding), kh, kw, stride, (0, oh), ow)


def col2im(
    x_cols: Any, x_shape: tuple[int, ...], kh: int, kw: int, stride: int = 1, padding: int = 0
) -> Any:
    """Adjoint of :func:`im2col`: scatter-add ``x_cols (C*kh*kw, OH*OW*N)`` into
    ``(N, C, H, W)`` (stored batch-innermost)."""
    n, c, h, w = x_shape
    ow = output_size(w, kw, stride, padding)
    grad_pad = get_array_module(x_cols).zeros(
        (c, h + 2 * padding, w + 2 * padding, n), dtype=x_cols.dtype
    )
    _add_cols(grad_pad, x_cols, kh, kw, stride, 0, ow)
    return grad_pad[:, padding : padding + h, padding : padding + w].transpose(3, 0, 1, 2)


def _col2im_gpu(
    x_cols: Any, x_shape: tuple, kh: int, kw: int, stride: int, padding: int, oh: int, ow: int,
    kernels: Kernels | None,
) -> Any:  # fmt: skip
    """:func:`col2im` as our gather kernel of ``kernels``, if given, else the reference."""
    if kernels is not None:
        try:
            grad_x = kernels.col2im(x_cols, x_shape, kh, kw, stride, padding, oh, ow)
            return grad_x.transpose(3, 0, 1, 2)
        except Exception as exc:  # cannot compile or launch here: the reference takes over
            record_fallback("col2im", str(exc))
    return col2im(x_cols, x_shape, kh, kw, stride, padding)


def conv2d_forward(
    x: Any, weight: Any, bias: Any | None, stride: int = 1, padding: int = 0,
    kernels: Kernels | None = None,
) -> tuple[Any, tuple]:  # fmt: skip
    """Convolve ``x (N, C, H, W)`` with ``weight (OC, C, kh, kw)`` plus ``bias (OC,)``.

    Returns ``(y (N, OC, OH, OW), cache)``; ``y`` is a view of batch-innermost memory (see
    the module docstring) and ``cache`` is what :func:`conv2d_backward` needs. On the CPU the
    work runs in blocks of output rows, so each block's ``x_cols`` stays in cache; they are
    rebuilt in the backward pass rather than kept (one block, as on a GPU, is kept).
    ``kernels``: our CUDA kernels (:func:`lenet_xp.kernels.ops.gpu_kernels`) to build
    ``x_cols`` with on a GPU; ``None``: array ops.
    """
    xp = get_array_module(x, weight)
    n, c, h, w = x.shape
    oc, wc, kh, kw = weight.shape
    if c != wc:
        raise ValueError(f"conv input has {c} channels, weight expects {wc} (x shape {x.shape})")
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    w_mat = weight.reshape(oc, -1)
    if kernels is not None:
        try:
            x_cols = kernels.im2col(x, kh, kw, stride, padding, oh, ow)
        except Exception as exc:  # cannot compile or launch here: the reference takes over
            record_fallback("im2col", str(exc))
        else:
            y_mat = matmul(w_mat, x_cols, kernels)
            if bias is not None:
                y_mat += bias[:, None]
            cache = (None, x_cols, x.shape, stride, padding)
            return y_mat.reshape(oc, oh, ow, n).transpose(3, 0, 1, 2), cache
    x_pad = _pad(x, padding)
    y_mat = xp.empty((oc, oh * ow * n), dtype=xp.result_type(x, weight))
    blocks = _row_blocks(xp, oh, ow * n)
    for r0, r1 in blocks:
        x_cols = _cols(x_pad, kh, kw, stride, (r0, r1), ow)
        xp.matmul(w_mat, x_cols, out=y_mat[:, r0 * ow * n : r1 * ow * n])
    if bias is not None:
        y_mat += bias[:, None]
    kept_cols = x_cols if len(blocks) == 1 else None
    cache = (x_pad, kept_cols, x.shape, stride, padding)
    return y_mat.reshape(oc, oh, ow, n).transpose(3, 0, 1, 2), cache


def conv2d_backward(
    grad_y: Any, cache: tuple, weight: Any, need_grad_x: bool = True,
    kernels: Kernels | None = None,
) -> tuple[Any | None, Any, Any]:  # fmt: skip
    """Gradients of :func:`conv2d_forward`: returns ``(grad_x, grad_w, grad_b)``.

    ``grad_y (N, OC, OH, OW)``; ``grad_x`` is ``None`` when ``need_grad_x`` is false (the
    first layer's input needs no gradient, which saves a GEMM and a col2im per block).
    ``kernels``: as given to :func:`conv2d_forward` (col2im runs as our kernel).
    """
    xp = get_array_module(grad_y)
    x_pad, kept_cols, x_shape, stride, padding = cache
    n, c, h, w = x_shape
    oc, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2:]
    # Free when grad_y is stored batch-innermost (it is, coming back through LeNet's layers).
    grad_y_mat = xp.ascontiguousarray(grad_y.transpose(1, 2, 3, 0)).reshape(oc, -1)
    w_mat = weight.reshape(oc, -1)
    if x_pad is None:  # the forward pass ran im2col as our kernel (GPU) and kept x_cols
        grad_w = matmul(grad_y_mat, kept_cols.T, kernels).reshape(weight.shape)
        grad_b = grad_y_mat.sum(axis=1)
        grad_x = None
        if need_grad_x:
            grad_cols = matmul(w_mat.T, grad_y_mat, kernels)
            grad_x = _col2im_gpu(grad_cols, x_shape, kh, kw, stride, padding, oh, ow, kernels)
        return grad_x, grad_w, grad_b
    pad_shape = (c, h + 2 * padding, w + 2 * padding, n)
    grad_pad = xp.zeros(pad_shape, dtype=grad_y.dtype) if need_grad_x else None
    if need_grad_x:
        add_grad_x = _grad_x_adder(grad_pad, grad_y_mat, weight, stride, ow)
    grad_w_t = None  # (C*kh*kw, OC): the faster orientation of the sum over positions
    for r0, r1 in _row_blocks(xp, oh, ow * n):
        x_cols = kept_cols if kept_cols is not None else _cols(x_pad, kh, kw, stride, (r0, r1), ow)
        grad_y_block = grad_y_mat[:, r0 * ow * n : r1 * ow * n]
        partial = x_cols @ grad_y_block.T
        if grad_w_t is None:
            grad_w_t = partial
        else:
            grad_w_t += partial
        if need_grad_x:
            add_grad_x(r0, r1)
    grad_w = grad_w_t.T.reshape(weight.shape)
    grad_b = grad_y_mat.sum(axis=1)
    grad_x = None
    if need_grad_x:
        grad_x = grad_pad[:, padding : padding + h, padding : padding + w].transpose(3, 0, 1, 2)
    return grad_x, grad_w, grad_b
