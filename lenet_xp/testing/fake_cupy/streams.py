"""The stand-in's streams, events and graphs: the current stream of each device (per thread),
stream capture with CUDA's rules, and graphs that replay what a capture recorded.

A captured stream records closures (:func:`record`) that :meth:`Graph.launch` replays on the
buffers they captured; a graph holds its buffers weakly, as a CUDA graph owns no memory.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable
from typing import Any

from lenet_xp.testing.fake_cupy.runtime import (
    CUDARuntimeError,
    Memory,
    _thread,
    capture_error,
    check_device,
    count_launch,
    current_device,
    declare_synchronize,
)


def current_stream(device: int | None = None) -> Stream:
    """The stream current on ``device`` (default: the current device) in this thread: the
    one made current by ``with stream:`` or ``use()``, else the device's null stream."""
    device = _thread.device if device is None else device
    stream = _thread.streams.get(device)
    return stream if stream is not None else Stream.null_of(device)


class Node:
    """One captured operation: ``run()`` does it again on the same buffers; ``memories`` are
    the blocks it touches (weakly held: a graph owns no memory)."""

    def __init__(self, what: str, run: Callable[[], None], memories: list[Memory]) -> None:
        self.what, self.run = what, run
        self.memories = [weakref.ref(m) for m in memories]


def record(what: str, run: Callable[[], None], memories: list[Memory]) -> None:
    """Add ``run`` to the capturing stream's graph (call only while :func:`capturing`)."""
    current_stream().graph_nodes.append(Node(what, run, memories))


class Stream:
    """As ``cupy.cuda.Stream``; ``with stream:`` (or ``use()``) makes it current."""

    _ptrs = itertools.count(0x1000)
    _nulls: dict[int, Stream] = {}

    def __init__(
        self,
        null: bool = False,
        non_blocking: bool = False,
        ptds: bool = False,
        priority: int | None = None,
    ) -> None:
        self.device_id = current_device()
        check_device(self.device_id)
        self.ptr = 0 if null else next(Stream._ptrs)
        self.non_blocking = non_blocking
        self.graph_nodes: list[Node] | None = None
        self.invalidated = False
        self._saved: list[Stream | None] = []

    @classmethod
    def null_of(cls, device: int) -> Stream:
        if device not in cls._nulls:
            stream = cls.__new__(cls)
            stream.device_id, stream.ptr, stream.non_blocking = device, 0, False
            stream.graph_nodes, stream._saved, stream.invalidated = None, [], False
            cls._nulls[device] = stream
        return cls._nulls[device]

    def __repr__(self) -> str:
        return f"<Stream {self.ptr:#x} (device {self.device_id})>"

    def __enter__(self) -> Stream:
        self._saved.append(_thread.streams.get(self.device_id))
        _thread.streams[self.device_id] = self
        return self

    def __exit__(self, *exc: Any) -> None:
        _thread.streams[self.device_id] = self._saved.pop()

    def use(self) -> Stream:
        _thread.streams[self.device_id] = self
        return self

    def synchronize(self) -> None:
        if self.graph_nodes is not None:
            raise capture_error()
        declare_synchronize("Stream.synchronize()")

    @property
    def done(self) -> bool:
        return True

    def record(self, event: Event | None = None) -> Event:
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        pass

    def begin_capture(self, mode: int | None = None) -> None:
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self.graph_nodes is not None:
            raise CUDARuntimeError(900, "cudaErrorIllegalState", "the stream is already capturing")
        self.graph_nodes, self.invalidated = [], False

    def end_capture(self) -> Graph:
        if self.graph_nodes is None:
            raise CUDARuntimeError(400, "cudaErrorIllegalState", "the stream is not capturing")
        nodes, self.graph_nodes = self.graph_nodes, None
        if self.invalidated:
            raise CUDARuntimeError(
                901,
                "cudaErrorStreamCaptureInvalidated",
                "operation failed due to a previous error during capture",
            )
        return Graph(nodes, self.device_id)

    def is_capturing(self) -> bool:
        return self.graph_nodes is not None


class Event:
    """As ``cupy.cuda.Event``: records a time; ``synchronize()`` is a host wait."""

    def __init__(self, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:  # fmt: skip
        self.time: float | None = None
        self.disable_timing = disable_timing

    def record(self, stream: Stream | None = None) -> None:
        self.time = time.perf_counter()

    def synchronize(self) -> None:
        declare_synchronize("Event.synchronize()")

    @property
    def done(self) -> bool:
        return True


def elapsed_ms(start: Event, end: Event) -> float:
    if start.time is None or end.time is None:
        raise CUDARuntimeError(600, "cudaErrorNotReady", "device not ready")
    return (end.time - start.time) * 1e3


class Graph:
    """As ``cupy.cuda.Graph``: :meth:`launch` replays the captured operations on the buffers
    they captured, with the host values (Python scalars, host arrays) they saw then."""

    def __init__(self, nodes: list[Node], device: int) -> None:
        self.nodes, self.device = nodes, device

    def launch(self, stream: Stream | None = None) -> None:
        target = current_stream() if stream is None else stream
        if target.graph_nodes is not None:
            raise CUDARuntimeError(900, "cudaErrorStreamCaptureUnsupported",
                                   "cannot launch a graph into a capturing stream")  # fmt: skip
        if current_device() != self.device:
            raise CUDARuntimeError(400, "cudaErrorInvalidResourceHandle",
                                   "the graph was captured on another device")  # fmt: skip
        for node in self.nodes:
            for ref in node.memories:
                if ref() is None:
                    raise CUDARuntimeError(
                        700,
                        "cudaErrorIllegalAddress",
                        f"graph node {node.what!r} uses device memory that was freed after "
                        "capture (a Graph owns no memory: keep every buffer it touches alive)",
                    )
        for node in self.nodes:
            node.run()
        count_launch()

    def upload(self, stream: Stream | None = None) -> None:
        pass
