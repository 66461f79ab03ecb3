"""The gather that distorts a batch (:func:`warp`, one bilinear gather for the whole batch),
noise, and the per-batch entry points :func:`augment_batch` and :class:`Distortion`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lenet_xp.backend import get_array_module
from lenet_xp.data.augment.counters import (
    STREAM_NOISE,
    _box_muller,
    _hash,
    epoch_key,
    image_keys,
)
from lenet_xp.data.augment.geometry import affine_theta, elastic_field, sample_grid
from lenet_xp.data.augment.spec import Augment
from lenet_xp.data.mnist import BACKGROUND

_FLOAT_EXACT = 1 << 24  # float32 holds every integer below this exactly


def warp(x: Any, grid: Any, fill: float = BACKGROUND) -> Any:
    """Bilinear resampling of ``x (N, C, H, W)`` (float, any memory layout) at ``grid
    (2, N, Ho, Wo)`` (source rows and columns in pixels, any layout; the same for every
    channel): one gather per bilinear corner for the whole batch. Outside the image the
    picture continues as ``fill``, so samples there blend into ``fill``, and a grid of
    whole pixels copies pixels exactly. Returns a new C-contiguous ``(N, C, Ho, Wo)`` array
    of ``x``'s dtype."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    ho, wo = grid.shape[2:]
    # Pad by 1 before and 2 after each axis with fill: source coordinates clipped to
    # [-1, h] (resp. w) then have all 4 corners inside, and -1 and h read fill with weight 1:
    # no index clipping, no masks.
    hp, wp = h + 3, w + 3
    padded = xp.full((n, c, hp, wp), fill, dtype=x.dtype)
    padded[:, :, 1 : h + 1, 1 : w + 1] = x
    flat = padded.reshape(-1)

    # Clip, floor and weights for both coordinates at once (C-contiguous (2, N, Ho, Wo)).
    weights = xp.empty((2, n, ho, wo), dtype=xp.float32)
    if h == w:
        xp.clip(grid, -1.0, float(h), out=weights)
    else:
        xp.clip(grid[0], -1.0, float(h), out=weights[0])
        xp.clip(grid[1], -1.0, float(w), out=weights[1])
    corner = xp.floor(weights)
    weights -= corner  # the bilinear weights, in [0, 1)
    # Flat index of the top-left corner, (image, row + 1, col + 1) of the padded batch,
    # computed in float32 while that is exact (every index < 2^24).
    flat_index = corner[0]
    flat_index *= xp.float32(wp)
    flat_index += corner[1]
    base = xp.arange(n, dtype=xp.int64) * (c * hp * wp) + (wp + 1)
    if n * c * hp * wp < _FLOAT_EXACT:
        flat_index += base.astype(xp.float32)[:, None, None]
        idx = flat_index.astype(xp.int32).astype(xp.int64)  # two SIMD casts beat one on x86
    else:
        idx = flat_index.astype(xp.int32).astype(xp.int64)
        idx += base[:, None, None]
    idx = idx[:, None]  # (N, 1, Ho, Wo)
    if c > 1:
        idx = idx + xp.arange(c, dtype=xp.int64)[:, None, None] * (hp * wp)
    wy, wx = weights[0][:, None], weights[1][:, None]
    top = flat.take(idx)
    top_right = flat[1:].take(idx)
    top_right -= top
    top_right *= wx
    top += top_right  # top row interpolated
    bottom = flat[wp:].take(idx)
    bottom_right = flat[wp + 1 :].take(idx)
    bottom_right -= bottom
    bottom_right *= wx
    bottom += bottom_right
    bottom -= top
    bottom *= wy
    top += bottom
    return top


def augment_batch(
    x: Any, aug: Augment, ids: Any, seed: int, epoch: int, fill: float = BACKGROUND
) -> Any:
    """Randomly distort the batch ``x (N, C, H, W)`` (normalised float images, any layout).

    ``ids (N,)`` integer array on ``x``'s device: each image's index in the training set;
    with ``seed`` and ``epoch`` (host ints) it fixes the image's draws, so the result does
    not depend on the batching, and NumPy and CuPy agree to float rounding. One sampling
    grid per image (the affine map about the centre plus the elastic field), one bilinear
    gather for the batch (outside the image: ``fill``, the background), then Gaussian noise
    of std ``aug.noise``. Returns ``x`` itself when ``aug`` is the identity, else a new
    C-contiguous array of ``x``'s dtype. No host synchronisation, no per-image Python.

    Cost on the CPU: ``python scripts/augment_cost.py`` prints the milliseconds per batch of
    each spec (about 1 ms for a batch of 128 with one BLAS thread, most of it the gather).
    """
    if x.ndim != 4 or tuple(ids.shape) != (x.shape[0],):
        raise ValueError(
            f"augment_batch wants x (N, C, H, W) and ids (N,), got {tuple(x.shape)} and "
            f"{tuple(ids.shape)}"
        )
    if aug.is_identity:
        return x
    xp = get_array_module(x)
    if get_array_module(ids) is not xp:
        raise ValueError("augment_batch: ids must be on the same device as x")
    keys = image_keys(ids, seed, epoch)
    return finish(x, aug, keys, distortion_grid(aug, keys, *x.shape[2:]), fill)


def distortion_grid(aug: Augment, keys: Any, h: int, w: int, kernels: Any = None) -> Any:
    """The sampling grid ``(2, N, h, w)`` of images ``keys`` (:func:`image_keys`): the affine
    map plus the elastic field; ``None`` when ``aug`` moves no pixel. Its GEMMs depend on the
    batch size in the last bits, so a batch's grid is computed whole (``kernels``: our CUDA
    kernels, whose GEMM runs inside a graph capture)."""
    if not aug.geometric:
        return None
    theta = affine_theta(aug, keys, h, w)
    if aug.elastic_alpha:
        return elastic_field(aug, keys, h, w, theta, kernels)
    return sample_grid(theta, h, w, kernels)


def finish(x: Any, aug: Augment, keys: Any, grid: Any, fill: float = BACKGROUND) -> Any:
    """The per-image rest of :func:`augment_batch`: the gather at ``grid`` (``None``: a copy),
    then the noise (``keys``: :func:`image_keys`, needed only for noise). Exact image by
    image, so slices of a batch can be finished apart."""
    n, c, h, w = x.shape
    out = x.astype(x.dtype, order="C", copy=True) if grid is None else warp(x, grid, fill)
    if aug.noise:  # out += aug.noise * normals(keys, STREAM_NOISE, c * h * w)
        size = c * h * w
        hashes = -(-size // 4)
        parts = _box_muller(_hash(keys, STREAM_NOISE, (hashes,)), aug.noise)
        flat = out.reshape(n, size)
        for part, noise in enumerate(parts):
            start, stop = part * hashes, min((part + 1) * hashes, size)
            if stop > start:
                flat[:, start:stop] += noise[:, : stop - start]
    return out


@dataclass(frozen=True)
class Distortion:
    """One epoch's :func:`augment_batch` (``distortion(x, ids)``), also in two halves for the
    CPU's worker processes: :meth:`grid` of the whole batch, then :meth:`finish` of each
    process's slice (the same bits as the whole). Plain and picklable."""

    augment: Augment
    seed: int
    epoch: int
    fill: float = BACKGROUND
    #: The epoch's key on the device (``(1,) uint64``, :func:`epoch_key`), read there by a
    #: captured CUDA graph; ``None``: from ``seed`` and ``epoch`` on the host.
    device_key: Any = field(default=None, compare=False)
    #: Our CUDA kernels (their GEMM inside a graph capture), or ``None``.
    kernels: Any = field(default=None, compare=False)

    def __call__(self, x: Any, ids: Any) -> Any:
        if self.device_key is None and self.kernels is None:
            return augment_batch(x, self.augment, ids, self.seed, self.epoch, self.fill)
        keys = self._keys(ids)
        grid = distortion_grid(self.augment, keys, *x.shape[2:], self.kernels)
        return finish(x, self.augment, keys, grid, self.fill)

    def key(self) -> int:
        """The epoch's 64-bit key (:func:`epoch_key` of ``seed`` and ``epoch``)."""
        return epoch_key(self.seed, self.epoch)

    def _keys(self, ids: Any) -> Any:
        return image_keys(ids, self.seed, self.epoch, self.device_key)

    def grid(self, ids: Any, h: int, w: int) -> Any:
        """The batch's sampling grid ``(2, N, h, w)``, or ``None`` (no geometric distortion)."""
        if not self.augment.geometric:
            return None
        return distortion_grid(self.augment, self._keys(ids), h, w, self.kernels)

    def finish(self, x: Any, ids: Any, grid: Any) -> Any:
        """Images ``ids`` of the batch, ``x (n, C, H, W)``, distorted at ``grid (2, n, H, W)``."""
        keys = self._keys(ids) if self.augment.noise else None
        return finish(x, self.augment, keys, grid, self.fill)
