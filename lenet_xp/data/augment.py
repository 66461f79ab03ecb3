"""Random image distortions for training, computed on the training device.

Every function is written once against the array namespace ``xp`` of its inputs (NumPy on the
CPU, CuPy on a GPU), so the same code runs on both. A batch is distorted by

1. one **sampling grid** per image: an affine transform about the image centre (rotation,
   scale, shear, translation) plus, optionally, a smooth **elastic** displacement field
   (Simard et al. 2003);
2. **one bilinear gather** over the whole batch (:func:`warp`): samples that fall outside the
   image read ``fill``, the background value;
3. optional additive Gaussian **noise**.

There is no per-image Python loop and no host synchronisation: nothing is read back from the
device and nothing is drawn on the host per batch. The random numbers come from a
counter-based generator written with ``xp`` integer operations (splitmix64's finaliser over
``(seed, epoch, image id, stream, draw index)``), so NumPy and CuPy produce the same bits, a
given image in a given epoch always gets the same distortion, whatever the batch it is in, and
nothing has to be carried between batches.

Use :func:`parse_augment` for a spec (``"default"``, ``"rotate=10,translate=2"``, ...) and
:func:`augment_batch` per training batch. The lower-level pieces (:func:`image_keys`,
:func:`uniforms`, :func:`normals`, :func:`affine_theta`, :func:`sample_grid`,
:func:`elastic_field`, :func:`warp`) are public for tests and other uses.

Elastic fields are drawn on a coarse lattice (:func:`elastic_field`): white noise on nodes
``elastic_sigma`` pixels apart, smoothed onto the pixels by the Gaussian weights of each axis,
as two small GEMMs for the whole batch (which also add the affine part). That costs 288
uniforms (72 hashes) per image at sigma 4 instead of 1,568 plus a full-resolution blur, and
gives a field with the full-resolution one's standard deviation and correlation length.

Cost on the CPU, for a batch of 128 MNIST images: see :func:`augment_batch`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any

from lenet_xp.backend import Device, device_of, get_array_module, use_device
from lenet_xp.data.mnist import BACKGROUND

#: The background of a normalised MNIST image (a 0 pixel): what samples outside it read.

# ----------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Strengths of the random distortions; each image draws its own, uniformly.

    * ``rotate``: degrees, angle uniform in ``[-rotate, rotate]`` (below 180);
    * ``scale``: zoom factor uniform in ``[1 - scale, 1 + scale]`` (below 1);
    * ``shear``: degrees, horizontal shear angle uniform in ``[-shear, shear]`` (below 90);
    * ``translate``: pixels, each of the two offsets uniform in ``[-translate, translate]``
      (not rounded: bilinear interpolation handles fractions);
    * ``elastic_alpha``: pixels, strength of the elastic field (Simard's alpha; 0: off);
    * ``elastic_sigma``: pixels, the Gaussian smoothing of that field (Simard's sigma);
    * ``noise``: standard deviation of additive Gaussian noise, in normalised units (the
      images' own standard deviation is 1).

    All zero (``Augment()``, spec ``none``) is the identity.
    """

    rotate: float = 0.0
    scale: float = 0.0
    shear: float = 0.0
    translate: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"augment {f.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"augment {f.name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, f.name, float(value))
        limits = {"rotate": 180.0, "scale": 1.0, "shear": 90.0}
        for name, limit in limits.items():
            if getattr(self, name) >= limit:
                raise ValueError(
                    f"augment {name} must be below {limit:g}, got {getattr(self, name):g}"
                )
        if self.elastic_sigma <= 0:
            raise ValueError(f"augment elastic_sigma must be > 0, got {self.elastic_sigma:g}")

    @property
    def geometric(self) -> bool:
        """Whether any distortion moves pixels (everything but noise)."""
        return bool(self.rotate or self.scale or self.shear or self.translate or self.elastic_alpha)

    @property
    def is_identity(self) -> bool:
        """Whether this spec leaves images unchanged (every strength is 0)."""
        return not (self.geometric or self.noise)

    @property
    def spec(self) -> str:
        """A spec string that :func:`parse_augment` turns back into this ``Augment``."""
        parts = [
            f"{name}={_text(getattr(self, name))}"
            for name in ("rotate", "scale", "shear", "translate")
            if getattr(self, name)
        ]
        if self.elastic_alpha or self.elastic_sigma != 4:
            parts.append(f"elastic={_text(self.elastic_alpha)}:{_text(self.elastic_sigma)}")
        if self.noise:
            parts.append(f"noise={_text(self.noise)}")
        return ",".join(parts) or "none"


def _text(value: float) -> str:
    """``value`` as short text that reads back as the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


#: The named specs. ``default`` is torchvision-like (``RandomAffine(10, translate=(2/28,)*2,
#: scale=(0.9, 1.1), shear=5)``) without rounding the translation to whole pixels; ``strong``
#: adds Simard's elastic field (alpha 34, sigma 4) and noise.
NAMED = {
    "none": Augment(),
    "light": Augment(rotate=5, scale=0.05, translate=1),
    "default": Augment(rotate=10, scale=0.1, shear=5, translate=2),
    "strong": Augment(
        rotate=15, scale=0.15, shear=10, translate=2, elastic_alpha=34, elastic_sigma=4, noise=0.1
    ),
}

_KEYS = frozenset(
    ("rotate", "scale", "shear", "translate", "noise", "elastic_alpha", "elastic_sigma")
)
_VALID = (
    f"use one of {', '.join(NAMED)}, or key=value pairs separated by commas with keys rotate, "
    "scale, shear, translate, elastic (ALPHA or ALPHA:SIGMA), elastic_alpha, elastic_sigma, "
    "noise; e.g. rotate=10,scale=0.1,translate=2,elastic=34:4,noise=0.1"
)


def _number(key: str, text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"augment spec {spec!r}: {key}={text!r} is not a number; {_VALID}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"augment spec {spec!r}: {key}={text} must be finite and >= 0; {_VALID}")
    return value


def parse_augment(spec: str | Augment) -> Augment:
    """An :class:`Augment` from a spec: a name in :data:`NAMED`, or ``key=value`` pairs
    separated by commas (keys: ``rotate``, ``scale``, ``shear``, ``translate``, ``noise``,
    ``elastic=ALPHA[:SIGMA]``, ``elastic_alpha``, ``elastic_sigma``) applied on top of
    ``none``, or on top of a name given first (``"light,noise=0.05"``).

    Raises :class:`ValueError` with one line naming the problem and the valid keys.
    """
    if isinstance(spec, Augment):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"augment spec must be a string, got {type(spec).__name__}; {_VALID}")
    text = spec.strip().lower()
    if text in NAMED:
        return NAMED[text]
    items = [item.strip() for item in text.split(",")]
    values: dict[str, float] = {}
    base = NAMED["none"]
    for position, item in enumerate(items):
        if not item:
            raise ValueError(f"augment spec {spec!r}: empty item; {_VALID}")
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            if position == 0 and key in NAMED:
                base = NAMED[key]
                continue
            raise ValueError(
                f"augment spec {spec!r}: {item!r} is not key=value or a name; {_VALID}"
            )
        if key == "elastic":
            alpha, colon, sigma = value.partition(":")
            values["elastic_alpha"] = _number("elastic alpha", alpha.strip(), spec)
            if colon:
                values["elastic_sigma"] = _number("elastic sigma", sigma.strip(), spec)
        elif key in _KEYS:
            values[key] = _number(key, value, spec)
        else:
            raise ValueError(f"augment spec {spec!r}: unknown key {key!r}; {_VALID}")
    merged = {f.name: getattr(base, f.name) for f in fields(base)} | values
    try:
        return Augment(**merged)
    except ValueError as e:
        raise ValueError(f"augment spec {spec!r}: {e}; {_VALID}") from None


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers (identical bits on NumPy and CuPy)
# ----------------------------------------------------------------------------------------------

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


def image_keys(ids: Any, seed: int, epoch: int) -> Any:
    """One 64-bit key per image, ``(N,) uint64``: a hash of ``(seed, epoch, ids[i])``.

    ``seed`` and ``epoch`` are host ints (mixed on the host); ``ids`` is a device integer
    array (each image's index in the training set), so an image gets the same key in a
    given epoch whatever batch it is in and whatever the device."""
    xp = get_array_module(ids)
    key = _mix_int(_mix_int(int(seed) + _GOLDEN) ^ ((int(epoch) * _GOLDEN) & _MASK64))
    z = ids.astype(xp.uint64)
    z *= xp.uint64(_GOLDEN)
    z += xp.uint64(key)
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


# ----------------------------------------------------------------------------------------------
# Geometry: affine maps, sampling grids, elastic fields
# ----------------------------------------------------------------------------------------------


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


def sample_grid(theta: Any, h: int, w: int) -> Any:
    """The sampling grid ``(2, N, h, w)`` float32 of affine maps ``theta (N, 2, 3)``
    (``theta[i] @ (row, col, 1)`` = the source of output pixel ``(row, col)``): ``grid[0]``
    the source rows, ``grid[1]`` the source columns. One GEMM; a view of ``(N, 2, h, w)``."""
    xp = get_array_module(theta)
    n = theta.shape[0]
    basis = _pixel_basis(device_of(theta), h, w)
    grid = xp.ascontiguousarray(theta, dtype=xp.float32).reshape(2 * n, 3) @ basis
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


def elastic_field(aug: Augment, keys: Any, h: int, w: int, theta: Any = None) -> Any:
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
    field = rows @ block.reshape(gy + 2, 2 * n * (gx + 2))  # (h, 2 N (gx + 2))
    field = field.reshape(h * 2 * n, gx + 2) @ cols_t  # (h 2 N, w)
    return field.reshape(h, 2, n, w).transpose(1, 2, 0, 3)


# ----------------------------------------------------------------------------------------------
# The gather and the batch function
# ----------------------------------------------------------------------------------------------

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


def distortion_grid(aug: Augment, keys: Any, h: int, w: int) -> Any:
    """The sampling grid ``(2, N, h, w)`` of images ``keys`` (:func:`image_keys`): the affine
    map plus the elastic field; ``None`` when ``aug`` moves no pixel. Its GEMMs depend on the
    batch size in the last bits, so a batch's grid is computed whole."""
    if not aug.geometric:
        return None
    theta = affine_theta(aug, keys, h, w)
    return elastic_field(aug, keys, h, w, theta) if aug.elastic_alpha else sample_grid(theta, h, w)


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

    def __call__(self, x: Any, ids: Any) -> Any:
        return augment_batch(x, self.augment, ids, self.seed, self.epoch, self.fill)

    def grid(self, ids: Any, h: int, w: int) -> Any:
        """The batch's sampling grid ``(2, N, h, w)``, or ``None`` (no geometric distortion)."""
        if not self.augment.geometric:
            return None
        return distortion_grid(self.augment, image_keys(ids, self.seed, self.epoch), h, w)

    def finish(self, x: Any, ids: Any, grid: Any) -> Any:
        """Images ``ids`` of the batch, ``x (n, C, H, W)``, distorted at ``grid (2, n, H, W)``."""
        keys = image_keys(ids, self.seed, self.epoch) if self.augment.noise else None
        return finish(x, self.augment, keys, grid, self.fill)
