"""The memory budget of the pictures a server decodes at once (:mod:`lenet_xp.web.budget`),
with real threads, and the cost each picture reserves, read from its header before decoding
(:func:`lenet_xp.data.images.decode_cost`)."""

from __future__ import annotations

import contextlib
import io
import threading
import time

import pytest

from lenet_xp.data.images import BYTES_PER_PIXEL, TooManyPixelsError, decode_cost, read_grey
from lenet_xp.web.budget import DecodeBudget, unmap_freed_blocks

Image = pytest.importorskip("PIL.Image")


class Holder:
    """A thread holding ``nbytes`` of ``budget`` from when it gets them until ``release``."""

    def __init__(self, budget: DecodeBudget, nbytes: int, granted: list[int]) -> None:
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._hold, args=(budget, nbytes, granted))
        self.thread.start()

    def _hold(self, budget: DecodeBudget, nbytes: int, granted: list[int]) -> None:
        with budget.reserve(nbytes):
            granted.append(nbytes)
            self.release.wait(60)


def settle(granted: list[int], count: int) -> list[int]:
    """``granted`` once it holds ``count`` entries (or after 5 s), then 0.2 s more: a copy."""
    deadline = time.monotonic() + 5
    while len(granted) < count and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.2)  # time for a wrongly granted reservation to show up
    return list(granted)


def test_reservations_wait_their_turn_and_never_exceed_the_budget():
    """Capacity 10: 6 then 5 cannot both be held; a later 1 that would fit waits behind the 5
    (first asked, first served); 25, over the whole budget, runs alone once all are done."""
    budget, granted = DecodeBudget(10), []
    first = Holder(budget, 6, granted)
    assert settle(granted, 1) == [6]
    second = Holder(budget, 5, granted)
    assert settle(granted, 1) == [6]  # the 5 does not fit
    third = Holder(budget, 1, granted)
    assert settle(granted, 1) == [6]  # the 1 would, but waits behind the 5
    first.release.set()
    assert settle(granted, 3) == [6, 5, 1] and budget.in_use == 6
    alone = Holder(budget, 25, granted)
    assert settle(granted, 3) == [6, 5, 1]  # waits until nothing else is held
    second.release.set()
    third.release.set()
    assert settle(granted, 4) == [6, 5, 1, 25] and budget.in_use == 25
    alone.release.set()
    for holder in (first, second, third, alone):
        holder.thread.join(10)
    assert budget.in_use == 0 and budget.peak == 25
    assert DecodeBudget.for_limit(40_000_000).capacity == 240_000_000  # 4 grey, 1.5 B a pixel
    with pytest.raises(ValueError, match="positive"):
        DecodeBudget(0)


def picture_bytes(mode: str, size: tuple[int, int], fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    colour = {"1": 1, "L": 200, "P": 3, "LA": (200, 255), "RGB": (200, 200, 200)}
    Image.new(mode, size, colour.get(mode, (200, 200, 200, 255))).save(out, fmt, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "options", "kind"),
    [
        ("L", {}, "grey"),
        ("1", {}, "grey"),
        ("P", {}, "palette"),
        ("P", {"transparency": 0}, "transparent"),
        ("RGB", {}, "colour"),
        ("RGBA", {}, "transparent"),
        ("LA", {}, "transparent"),
    ],
)
def test_the_cost_reserved_is_read_from_the_header_before_decoding(mode, options, kind):
    """``read_grey`` reserves ``pixels x BYTES_PER_PIXEL[kind]`` once, for the picture's kind
    as its header says (``decode_cost`` of the opened, undecoded picture)."""
    data = picture_bytes(mode, (300, 200), **options)
    reserved: list[int] = []
    with Image.open(io.BytesIO(data)) as opened:
        assert decode_cost(opened) == int(300 * 200 * BYTES_PER_PIXEL[kind])

    @contextlib.contextmanager
    def reserve(nbytes):
        reserved.append(nbytes)
        yield

    grey = read_grey(data, "the upload", 10**6, reserve)
    assert grey.shape == (200, 300) and reserved == [300 * 200 * BYTES_PER_PIXEL[kind]]


def test_a_jpeg_reserves_what_it_decodes_at_reduced_scale_and_a_refused_picture_nothing():
    """A 4000x3000 JPEG decodes at 1/2 scale (``draft``: the smallest of 1/2, 1/4, 1/8 that
    keeps 1024 pixels a side): it reserves 2000x1500 grey pixels' worth; a picture over
    ``max_pixels`` reserves nothing."""
    reserved: list[int] = []

    @contextlib.contextmanager
    def reserve(nbytes):
        reserved.append(nbytes)
        yield

    read_grey(picture_bytes("L", (4000, 3000), "JPEG"), max_pixels=40_000_000, reserve=reserve)
    assert reserved == [int(2000 * 1500 * BYTES_PER_PIXEL["grey"])]
    with pytest.raises(TooManyPixelsError):
        read_grey(picture_bytes("L", (4000, 3000)), max_pixels=10**6, reserve=reserve)
    assert len(reserved) == 1


def test_unmap_freed_blocks_where_glibc_is():
    """On glibc (Linux), ``mallopt`` takes the threshold; elsewhere it says it could not."""
    import platform

    done = unmap_freed_blocks()
    assert done is (platform.libc_ver()[0] == "glibc")
