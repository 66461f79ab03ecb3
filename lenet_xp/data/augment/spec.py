"""``--augment``'s spec: :class:`Augment` and :func:`parse_augment` (named recipes and
``key=value`` lists)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


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
