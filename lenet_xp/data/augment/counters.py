"""Counter-based random numbers, identical bits on NumPy and CuPy: splitmix64's finaliser
over ``(seed, epoch, image id, stream, draw index)`` (:func:`image_keys`, :func:`uniforms`,
:func:`normals`); nothing is carried between batches."""

from __future__ import annotations

import functools
import math
from typing import Any

from lenet_xp.backend import Device, device_of, get_array_module, use_device

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: splitmix64's increment
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

#: Draw streams: each kind of draw has its own counter space per image.
STREAM_AFFINE, STREAM_ELASTIC, STREAM_NOISE = 0, 1, 2
_STREAM_SHIFT = 40  # counter = stream << 40 | k: 2^40 hashes per stream and image


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (host side: only for the seed and epoch)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * _MUL2) & _MASK64
    return z ^ (z >> 31)


def _mix(xp: Any, z: Any) -> Any:
    """splitmix64's finaliser, in place on a ``uint64`` array ``z``. Only array operations
    with ``xp.uint64`` operands: they wrap silently (NumPy warns on scalar overflow only)."""
    tmp = xp.empty_like(z)
    for shift, mul in ((30, _MUL1), (27, _MUL2)):
        xp.right_shift(z, xp.uint64(shift), out=tmp)
        z ^= tmp
        z *= xp.uint64(mul)
    xp.right_shift(z, xp.uint64(31), out=tmp)
    z ^= tmp
    return z


def epoch_key(seed: int, epoch: int) -> int:
    """The 64-bit key of ``(seed, epoch)`` that :func:`image_keys` mixes into every image's."""
    return _mix_int(_mix_int(int(seed) + _GOLDEN) ^ ((int(epoch) * _GOLDEN) & _MASK64))


def image_keys(ids: Any, seed: int, epoch: int, key: Any = None) -> Any:
    """One 64-bit key per image, ``(N,) uint64``: a hash of ``(seed, epoch, ids[i])``.

    ``seed`` and ``epoch`` are host ints (mixed on the host); ``ids`` is a device integer
    array (each image's index in the training set), so an image gets the same key in a
    given epoch whatever batch it is in and whatever the device. ``key``, if given, is
    :func:`epoch_key` already on the device (``(1,) uint64``; ``seed`` and ``epoch`` are then
    ignored): a captured CUDA graph reads it there at every replay."""
    xp = get_array_module(ids)
    z = ids.astype(xp.uint64)
    z *= xp.uint64(_GOLDEN)
    z += xp.uint64(epoch_key(seed, epoch)) if key is None else key
    return _mix(xp, z)


@functools.lru_cache(maxsize=64)
def _counters(device: Device, stream: int, shape: tuple[int, ...]) -> Any:
    """``((stream << 40) + k + 1) * golden`` for ``k`` over ``shape`` (C order), ``uint64``
    on ``device``: splitmix64's state increments. Cached."""
    xp = device.xp
    with use_device(device):
        c = xp.arange(math.prod(shape), dtype=xp.uint64).reshape(shape)
        c += xp.uint64((stream << _STREAM_SHIFT) + 1)
        c *= xp.uint64(_GOLDEN)
    return c


def _hash(keys: Any, stream: int, shape: tuple[int, ...], key_axis: int = 0) -> Any:
    """``uint64`` hashes of ``(key, stream, k)``, shaped as ``shape`` with the keys inserted
    as axis ``key_axis``; ``k`` runs over ``shape`` in C order."""
    xp = get_array_module(keys)
    counters = xp.expand_dims(_counters(device_of(keys), stream, shape), key_axis)
    k = keys.reshape((1,) * key_axis + (-1,) + (1,) * (len(shape) - key_axis))
    return _mix(xp, counters + k)


def _fields(z: Any) -> Any:
    """The four 16-bit fields of each hash in ``z``, lowest first, as float32 integers in
    ``[0, 65535]``: shape ``z.shape + (4,)`` (one view and one conversion; the field order
    is the same on NumPy and CuPy on little-endian hosts: x86, ARM)."""
    xp = get_array_module(z)
    return z.view(xp.uint16).reshape(z.shape + (4,)).astype(xp.float32)


_TO_UNIT = 2.0**-16  # a 16-bit field -> [0, 1), exact in float32


def uniforms(keys: Any, stream: int, count: int) -> Any:
    """``(N, count)`` float32 uniforms in ``[0, 1)`` (multiples of ``2**-16``) for ``N``
    image keys: draws ``0 .. count - 1`` of ``stream``, four per 64-bit hash."""
    xp = get_array_module(keys)
    hashes = -(-count // 4)
    u = _fields(_hash(keys, stream, (hashes,)))
    u *= xp.float32(_TO_UNIT)
    return u.reshape(keys.shape[0], 4 * hashes)[:, :count]


_ANGLE_BITS = 12  # angles: 4,096 steps of 2 pi / 4096 (small tables: gathers hit the cache)


@functools.lru_cache(maxsize=16)
def _box_muller_tables(device: Device, std: float) -> tuple[Any, Any, Any]:
    """Box-Muller's functions, tabulated (float64 maths, stored as float32 on ``device``;
    cached): the radius ``std * sqrt(-2 ln(1 - f / 2**16))`` for every 16-bit ``f``, and
    ``cos``, ``sin`` of ``2 pi a / 2**12`` for every 12-bit ``a``."""
    xp = device.xp
    with use_device(device):
        u = xp.arange(1 << 16, dtype=xp.float64) * _TO_UNIT
        radius = std * xp.sqrt(-2 * xp.log1p(-u))
        angle = xp.arange(1 << _ANGLE_BITS, dtype=xp.float64) * (2 * math.pi / (1 << _ANGLE_BITS))
        return tuple(t.astype(xp.float32) for t in (radius, xp.cos(angle), xp.sin(angle)))


def _box_muller(z: Any, std: float = 1.0) -> tuple[Any, Any, Any, Any]:
    """Normals of std ``std`` from the hashes ``z (N, q)``: four ``(N, q)`` float32 arrays
    ``(r0 cos a0, r1 cos a1, r0 sin a0, r1 sin a1)``. Box-Muller on two pairs of uniforms per
    hash: radii from bits 0-15 and 16-31 (``|value| < 4.71 std``, the radius of
    ``1 - u = 2**-16``), angles from bits 36-47 and 52-63 (12 bits). The functions are
    looked up in float32 tables of all their values: gathers instead of log, sqrt, cos and
    sin (half the cost on a CPU), and the same bits on every device."""
    xp = get_array_module(z)
    radius_of, cos_of, sin_of = _box_muller_tables(device_of(z), float(std))
    mask = xp.uint64(0xFFFF)
    angle_mask = xp.uint64((1 << _ANGLE_BITS) - 1)
    r0 = radius_of.take((z & mask).view(xp.int64))
    r1 = radius_of.take(((z >> xp.uint64(16)) & mask).view(xp.int64))
    a0 = ((z >> xp.uint64(48 - _ANGLE_BITS)) & angle_mask).view(xp.int64)
    a1 = (z >> xp.uint64(64 - _ANGLE_BITS)).view(xp.int64)
    out = []
    for table in (cos_of, sin_of):
        for radius, angle in ((r0, a0), (r1, a1)):
            value = table.take(angle)
            value *= radius
            out.append(value)
    return out[0], out[1], out[2], out[3]


def normals(keys: Any, stream: int, count: int) -> Any:
    """``(N, count)`` float32 standard normals for ``N`` image keys: draws ``0 .. count - 1``
    of ``stream`` (Box-Muller, four normals per 64-bit hash: for ``q`` hashes, the four
    parts of :func:`_box_muller` one after the other)."""
    xp = get_array_module(keys)
    hashes = -(-count // 4)
    parts = _box_muller(_hash(keys, stream, (hashes,)))
    return xp.concatenate(parts, axis=1)[:, :count]
