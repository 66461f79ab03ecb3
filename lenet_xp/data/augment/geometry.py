"""The geometry of a distortion: affine maps about the image centre, sampling grids and
elastic displacement fields drawn on a coarse lattice."""

from __future__ import annotations

import functools
import math
from typing import Any

from lenet_xp.backend import Device, device_of, get_array_module, use_device
from lenet_xp.data.augment.counters import (
    _TO_UNIT,
    STREAM_AFFINE,
    STREAM_ELASTIC,
    _fields,
    _hash,
    uniforms,
)
from lenet_xp.data.augment.spec import Augment
from lenet_xp.kernels.ops import Kernels, matmul


@functools.lru_cache(maxsize=32)
def _affine_constants(device: Device, aug: Augment, h: int, w: int) -> tuple[Any, Any, Any]:
    """``(span, low, centre)`` float32 on ``device`` (cached): uniforms ``u (N, 5)`` map to
    ``u * span + low`` = angle (radians), scale factor, shear angle (radians), and the output
    row and column the image centre goes to; ``centre`` is ``(cy, cx)``."""
    xp = device.xp
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rot, shear = math.radians(aug.rotate), math.radians(aug.shear)
    t = aug.translate
    span = [2 * rot, 2 * aug.scale, 2 * shear, 2 * t, 2 * t]
    low = [-rot, 1 - aug.scale, -shear, cy - t, cx - t]
    with use_device(device):
        return (
            xp.asarray(span, dtype=xp.float32),
            xp.asarray(low, dtype=xp.float32),
            xp.asarray([[cy], [cx]], dtype=xp.float32),
        )


def affine_theta(aug: Augment, keys: Any, h: int, w: int) -> Any:
    """``(N, 2, 3)`` float32: for each image, the map from an output pixel ``(row, col, 1)``
    to the source ``(row, col)`` it samples: the inverse of a random
    ``translate . rotate . shear . scale`` about the centre ``c = ((h-1)/2, (w-1)/2)``.

    In ``(x, y) = (col, row)`` terms the forward map is ``out = c + t + s R(a) Sh(k) (in -
    c)`` with ``R(a)`` a rotation, ``Sh(k) = [[1, k], [0, 1]]`` a horizontal shear
    (``k = tan(shear angle)``), so ``in = c + Sh(-k) R(-a) (out - c - t) / s``. Draws 5
    uniforms per image (stream :data:`STREAM_AFFINE`)."""
    xp = get_array_module(keys)
    span, low, centre = _affine_constants(device_of(keys), aug, h, w)
    p = uniforms(keys, STREAM_AFFINE, 5) * span
    p += low  # angle, scale, shear angle, centre's output row, centre's output column
    inv_scale = xp.reciprocal(p[:, 1])
    cos = xp.cos(p[:, 0])
    cos *= inv_scale
    sin = xp.sin(p[:, 0])
    sin *= inv_scale
    k = xp.tan(p[:, 2])
    # Sh(-k) R(-a) / s = [[cos + k sin, sin - k cos], [-sin, cos]] / s in (x, y); in
    # (row, col) order: row' = cos row - sin col, col' = (sin - k cos) row + (cos + k sin) col.
    theta = xp.empty((keys.shape[0], 2, 3), dtype=xp.float32)
    theta[:, 0, 0] = cos
    xp.negative(sin, out=theta[:, 0, 1])
    xp.multiply(k, cos, out=theta[:, 1, 0])
    xp.subtract(sin, theta[:, 1, 0], out=theta[:, 1, 0])
    xp.multiply(k, sin, out=theta[:, 1, 1])
    theta[:, 1, 1] += cos
    # Offsets: c - M (c + t), with c + t = p[:, 3:5] (row, col).
    offset = theta[:, :, 2]
    xp.multiply(theta[:, :, 0], p[:, 3:4], out=offset)
    offset += theta[:, :, 1] * p[:, 4:5]
    xp.subtract(centre.T, offset, out=offset)
    return theta


@functools.lru_cache(maxsize=32)
def _pixel_basis(device: Device, h: int, w: int) -> Any:
    """``(3, h * w)`` float32 on ``device``: each pixel's row, column and 1. Cached."""
    xp = device.xp
    with use_device(device):
        rows = xp.repeat(xp.arange(h, dtype=xp.float32), w)
        cols = xp.tile(xp.arange(w, dtype=xp.float32), h)
        return xp.stack([rows, cols, xp.ones(h * w, dtype=xp.float32)])


def sample_grid(theta: Any, h: int, w: int, kernels: Kernels | None = None) -> Any:
    """The sampling grid ``(2, N, h, w)`` float32 of affine maps ``theta (N, 2, 3)``
    (``theta[i] @ (row, col, 1)`` = the source of output pixel ``(row, col)``): ``grid[0]``
    the source rows, ``grid[1]`` the source columns. One GEMM; a view of ``(N, 2, h, w)``."""
    xp = get_array_module(theta)
    n = theta.shape[0]
    basis = _pixel_basis(device_of(theta), h, w)
    grid = matmul(xp.ascontiguousarray(theta, dtype=xp.float32).reshape(2 * n, 3), basis, kernels)
    return grid.reshape(n, 2, h, w).transpose(1, 0, 2, 3)


#: Elastic lattice: nodes reach this many sigmas past the image on every side.
ELASTIC_MARGIN = 2.0
#: The discrete Gaussian is normalised over offsets within this many sigmas (as scipy's
#: ``gaussian_filter``, whose full-resolution field this one matches).
_GAUSS_TRUNCATE = 4.0


def elastic_step(sigma: float) -> float:
    """Pixels between the elastic lattice's nodes: ``sigma``, at least 1."""
    return max(float(sigma), 1.0)


def elastic_nodes(n: int, sigma: float) -> list[float]:
    """Positions (pixels) of the elastic lattice's nodes along an axis of ``n`` pixels:
    every :func:`elastic_step` pixels from pixel 0 (so a step of 1 is the pixel grid
    itself), reaching at least :data:`ELASTIC_MARGIN` sigmas past both ends."""
    step = elastic_step(sigma)
    before = math.ceil(ELASTIC_MARGIN * sigma / step)
    after = math.ceil((n - 1 + ELASTIC_MARGIN * sigma) / step)
    return [k * step for k in range(-before, after + 1)]


def _elastic_axis(n: int, sigma: float) -> list[list[float]]:
    """Weights ``(n, g + 2)`` from the ``g`` lattice nodes (:func:`elastic_nodes`) to the
    ``n`` pixels of one axis, as lists; the last two columns are the pixel's coordinate and
    1 (for the affine part). Pixel ``i``'s weight for the node at ``q`` is the discrete
    Gaussian kernel (sum 1 over integer offsets, as a full-resolution blur's) at ``i - q``,
    times ``sqrt(step)``: a node stands for ``step`` pixels of white noise along the axis,
    so the field keeps the variance of the full-resolution one."""
    step = elastic_step(sigma)
    radius = math.ceil(_GAUSS_TRUNCATE * sigma)
    norm = sum(math.exp(-(m * m) / (2 * sigma * sigma)) for m in range(-radius, radius + 1))
    gain = math.sqrt(step) / norm
    nodes = elastic_nodes(n, sigma)
    return [
        [gain * math.exp(-((i - q) ** 2) / (2 * sigma * sigma)) for q in nodes] + [i, 1.0]
        for i in range(n)
    ]


@functools.lru_cache(maxsize=32)
def elastic_matrices(device: Device, h: int, w: int, sigma: float) -> tuple[Any, Any]:
    """``(rows (h, gy + 2), cols_t (gx + 2, w))`` float32 on ``device``: a lattice block
    ``L (gy + 2, gx + 2)`` gives the field ``rows @ L @ cols_t`` (:func:`elastic_field`);
    the last two columns of ``rows`` (rows of ``cols_t``) carry the affine part. Cached."""
    xp = device.xp
    with use_device(device):
        rows = xp.asarray(_elastic_axis(h, sigma), dtype=xp.float64).astype(xp.float32)
        cols = xp.asarray(_elastic_axis(w, sigma), dtype=xp.float64).astype(xp.float32)
        return rows, xp.ascontiguousarray(cols.T)


def elastic_field(
    aug: Augment, keys: Any, h: int, w: int, theta: Any = None, kernels: Kernels | None = None
) -> Any:
    """Elastic displacements ``(2, N, h, w)`` float32 (rows, columns; pixels), a view of an
    ``(h, 2, N, w)`` array. With ``theta (N, 2, 3)`` (:func:`affine_theta`) the affine grid
    is added in the same two GEMMs: the result is then the whole sampling grid.

    Simard et al. (2003) draw a displacement uniform in ``[-1, 1]`` per pixel and component,
    smooth it with a Gaussian of ``sigma`` and scale it by ``alpha``. Here the uniform noise
    is drawn on a coarse lattice instead (:func:`elastic_nodes`: every ``step = max(sigma,
    1)`` pixels, reaching ``2 sigma`` past the image; 12 x 12 nodes for 28 x 28 and sigma 4,
    the pixels themselves for sigma <= 1) and each pixel's displacement is the
    Gaussian-weighted sum of the nodes around it, with the full-resolution discrete kernel's
    weights times ``sqrt(step)`` per axis: ``R @ U @ C.T`` per image and component, two
    GEMMs for the whole batch. With ``step = sigma`` the lattice sum of the Gaussian is
    uniform to 1e-4, so the field is stationary and has the full-resolution field's
    statistics: per component a standard deviation of ``alpha * 0.163 / sigma`` and a mean
    absolute value of ``alpha * 0.130 / sigma`` (sigma >= 1), the same correlation length
    (the mean difference between neighbours matches too), and no fall-off at the edges as a
    zero-padded blur has. It is infinitely smooth: neighbouring pixels' displacements differ
    by at most ``alpha / (sigma * step)`` (``alpha / sigma**2`` for sigma >= 1; every node at
    +-1 with the worst signs: typically the largest difference in a batch is half of that).
    Cost: one 64-bit hash per two nodes (16-bit uniforms, both components).
    """
    xp = get_array_module(keys)
    n = keys.shape[0]
    rows, cols_t = elastic_matrices(device_of(keys), h, w, aug.elastic_sigma)
    gy, gx = rows.shape[1] - 2, cols_t.shape[0] - 2
    # Lattice noise, uniform in [-alpha, alpha): hash (ky, m) of an image gives the row and
    # column components of nodes (ky, 2m) and (ky, 2m + 1).
    z = _hash(keys, STREAM_ELASTIC, (gy, -(-gx // 2)))  # (N, gy, gx / 2)
    noise = _fields(z)  # (N, gy, gx / 2, 4)
    noise *= xp.float32(2 * aug.elastic_alpha * _TO_UNIT)
    noise -= xp.float32(aug.elastic_alpha)
    noise = noise.reshape(n, gy, -1, 2)[:, :, :gx].transpose(1, 0, 2, 3)  # (gy, N, gx, 2)
    block = xp.zeros((gy + 2, 2, n, gx + 2), dtype=xp.float32)
    block[:gy, 0, :, :gx] = noise[..., 0]
    block[:gy, 1, :, :gx] = noise[..., 1]
    if theta is not None:  # row * theta[..., 0] + col * theta[..., 1] + theta[..., 2]
        block[gy, :, :, gx + 1] = theta[:, :, 0].T
        block[gy + 1, :, :, gx] = theta[:, :, 1].T
        block[gy + 1, :, :, gx + 1] = theta[:, :, 2].T
    field = matmul(rows, block.reshape(gy + 2, 2 * n * (gx + 2)), kernels)  # (h, 2 N (gx + 2))
    field = matmul(field.reshape(h * 2 * n, gx + 2), cols_t, kernels)  # (h 2 N, w)
    return field.reshape(h, 2, n, w).transpose(1, 2, 0, 3)
