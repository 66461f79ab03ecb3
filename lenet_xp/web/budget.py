"""How much memory the pictures a server decodes at once may take: a budget of bytes.

A picture's size and kind are read from its header before it is decoded
(:func:`lenet_xp.data.images.decode_cost`: a 40-megapixel grey PNG takes about 60 MB to
decode and shrink, a colour one 200 MB, a JPEG, decoded at 1/8 scale, under 4 MB). Each
decode reserves its cost from a :class:`DecodeBudget` and waits while the others' would put it
over; one that alone is over the budget waits for every other decode to end and runs alone.
The memory of the decodes under way then stays under ``max(capacity, one picture's cost)``
whatever mix of pictures arrives. Reservations are granted in the order they were asked for,
so a large picture is not starved by a stream of small ones.

That bounds the memory *in use*; :func:`unmap_freed_blocks` makes the process's resident
memory follow it. Without it, glibc's malloc keeps the large blocks a decode freed in the
arena of the thread that freed them (one arena per thread, and blocks over its mmap threshold,
which rises to 32 MB after the first such block is freed, are the only ones given back), so
four threads decoding one 40-megapixel colour PNG after another left the server 430 MiB
larger instead of 190.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections import deque
from collections.abc import Iterator

from lenet_xp.data.images import BYTES_PER_PIXEL

#: A server's budget, in grey pictures of its ``max_pixels`` (:meth:`DecodeBudget.for_limit`):
#: four grey ones at the limit (240 MB at 40 megapixels), or one in colour, at a time.
GREY_PICTURES = 4

#: glibc's ``mallopt`` parameter for the mmap threshold (``M_MMAP_THRESHOLD``, malloc.h).
_M_MMAP_THRESHOLD = -3


def unmap_freed_blocks(threshold: int = 1 << 20) -> bool:
    """Ask the C library's malloc to give each block of ``threshold`` bytes or more its own
    mapping, returned to the system as soon as it is freed (glibc's ``mallopt``; setting it
    also stops glibc raising the threshold). Process-wide; ``True`` where it was done, ``False``
    where the C library has no ``mallopt`` (macOS) or refused."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1


class DecodeBudget:
    """``capacity`` bytes shared by the threads that decode pictures, as :meth:`reserve`s."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a decode budget is a positive number of bytes, not {capacity}")
        self.capacity = capacity
        self.in_use = 0  # bytes reserved now
        self.peak = 0  # the most bytes reserved at once so far
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()  # tickets of the reservations asked for, in order

    @classmethod
    def for_limit(cls, max_pixels: int) -> DecodeBudget:
        """The budget of a server refusing pictures over ``max_pixels``: :data:`GREY_PICTURES`
        grey pictures at the limit."""
        return cls(int(GREY_PICTURES * max_pixels * BYTES_PER_PIXEL["grey"]))

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold ``nbytes`` of the budget for the ``with`` block: waits until they fit (or, for
        more than the whole budget, until nothing else is reserved)."""
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: self._waiting[0] is ticket and self._fits(nbytes))
            self._waiting.popleft()
            self.in_use += nbytes
            self.peak = max(self.peak, self.in_use)
            self._changed.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= nbytes
                self._changed.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self.in_use == 0 or self.in_use + nbytes <= self.capacity
