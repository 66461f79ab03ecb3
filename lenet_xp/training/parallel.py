"""Data parallelism over CPU processes that share memory.

At LeNet's size a training step is hundreds of small NumPy calls. Each holds the GIL for a
few microseconds, so threads serialise on it and a second core buys nothing. Instead, each
batch is split into ``workers`` slices, each run by a replica of the model in its own
process with one BLAS thread. The processes share (``multiprocessing.shared_memory``):

- the parameters, one flat buffer that the model's ``param.data`` arrays are views of, so
  the optimizer's in-place updates reach every replica;
- each batch's images (gathered straight there by the training loop: :attr:`batch_buffer`)
  and labels;
- the gradients, one flat row per slice, and per-worker loss and correct-count slots.

Per step the main process sends each worker a ``(start, stop)`` slice over a socket, runs the
first slice itself, and waits (polling for up to :data:`SPIN_S` before it sleeps); then it
combines the slice gradients over the flat rows in one compiled pass (weighted by slice size,
in a fixed order, so the same seed gives the same numbers for a given worker count), and
``param.grad`` are views of the combined row: an optimizer given :attr:`flat` updates every
parameter at once (:mod:`lenet_xp.optim.flat`).

With augmentation, each process distorts its own slice at the batch's sampling grid. The grid
of the whole next batch (it depends only on the images' indices) is computed by worker 1
while the main process combines the gradients and steps the optimizer, when that worker
would otherwise wait: it leaves the critical path.

The workers are ``python -c`` processes of our own (:mod:`.workers`), not
``multiprocessing`` ones: they never import the user's ``__main__`` (a script that calls
``fit()`` without ``if __name__ == "__main__":`` works), unless the model holds a class
defined there. Every wait on them is bounded: the main process watches their sockets and
processes together, so a worker that dies (killed, out of memory) is one
:class:`WorkerError` line, never a hang; and once SIGINT/SIGTERM is requested
(``stop_requested``), a worker that does not answer within :data:`STOP_GRACE_S` stops the
run (:class:`~lenet_xp.training.interrupt.Interrupted`).
"""

from __future__ import annotations

import contextlib
import pickle
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

from lenet_xp import native
from lenet_xp.backend import host_cores
from lenet_xp.layers import Module
from lenet_xp.layers.module import flat_copy, flat_views
from lenet_xp.native import combine as native_combine
from lenet_xp.optim.flat import FlatBuffers
from lenet_xp.training.interrupt import Interrupted
from lenet_xp.training.workers import (  # noqa: F401  (PAUSE_ENV, in_worker: re-exported)
    _BOOT,
    _MAIN_DECIDES,
    PAUSE_ENV,
    WorkerError,
    _check_reply,
    _frame,
    _Link,
    _preparation,
    _Shared,
    forward_backward,
    in_worker,
)

#: Once a stop (SIGINT/SIGTERM) is requested, how long a wait on a worker may go on before
#: the run stops without it (a healthy worker answers within a step, milliseconds).
STOP_GRACE_S = 3.0
#: How often a wait on the workers checks that they live and whether a stop was requested.
_POLL_S = 0.1
#: How long a wait on the workers polls without sleeping, when each process has a physical
#: core of its own: the slices end within a fraction of a millisecond of each other, and waking a
#: sleeping process is slow next to that (a step takes about 4 ms).
SPIN_S = 0.002
#: What the main process was doing, for the line that says a worker died.
_DOING = {
    "start": "while starting",
    "train": "during a training step",
    "eval": "during an evaluation",
    "grid": "while computing the next batch's augmentation grid",
}


def _shared_specs(
    model: Module, workers: int, max_batch: int, num_classes: int
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The shared arrays of :class:`DataParallel` (name -> shape, dtype)."""
    params = model.parameters()
    dtype = str(params[0].data.dtype)
    size = sum(int(p.data.size) for p in params)
    side = model.input_size
    return {
        "params": ((size,), dtype),
        "grads": ((workers, size), dtype),  # row i: slice i's; row 0 then the combined
        "x": ((max_batch, 1, side, side), dtype),
        "y": ((max_batch,), "int64"),
        "ids": ((max_batch,), "int64"),  # with the grid: augmentation finished by slice
        "grid": ((2, max_batch, side, side), "float32"),
        "logits": ((max_batch, num_classes), dtype),
        "stats": ((workers, 2), "float64"),
    }


def _address(array: Any) -> int:
    """Where ``array``'s data starts in memory."""
    return array.__array_interface__["data"][0]


class DataParallel:
    """Runs ``model`` on ``workers`` slices of each batch (CPU): slice 0 in this process,
    the others in ``workers - 1`` worker processes; ``workers=1``: no processes at all.

    ``max_batch`` bounds the batches it will see (training and evaluation), ``num_classes``
    the logits' width; ``tune_allocator`` applies ``backend.tune_host_allocator`` in the
    workers; ``stop_requested()``, if given, returns the signal number of a requested stop
    (``None``: none), after which a worker that keeps a wait going for :data:`STOP_GRACE_S`
    raises :class:`~lenet_xp.training.interrupt.Interrupted`. Use as a context manager, or call
    :meth:`close`. A worker that dies or fails raises :class:`WorkerError`.
    """

    def __init__(
        self,
        model: Module,
        workers: int = 1,
        max_batch: int = 2048,
        num_classes: int = 10,
        tune_allocator: bool = True,
        stop_requested: Callable[[], int | None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.model, self.workers = model, workers
        self._params = params = model.parameters()
        native.warm_up(next((p.data for p in params), None))  # compiled now (CPU)
        self._links: list[_Link] = []
        self._shared: _Shared | None = None
        #: The shared parameters and combined gradient, for an optimizer to update in one go
        #: (``optimizer.flat``); ``None`` with one process.
        self.flat: FlatBuffers | None = None
        #: Where a training batch may be gathered, so the workers read it without a copy
        #: (``DeviceSplit.batches(out=...)``); ``None`` with one process.
        self.batch_buffer: Any = None
        if workers == 1:
            return
        # Polling only where each process has a core of its own: on a hyperthread it would
        # slow the one computing beside it.
        self._spin_s = SPIN_S if workers <= host_cores(physical=True) else 0.0
        from threadpoolctl import threadpool_limits

        preparation = _preparation(model)
        self._stop_requested = stop_requested
        # One core per slice: this process's BLAS gets one thread too (restored by close).
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        specs = _shared_specs(model, workers, max_batch, num_classes)
        self._shared = _Shared(specs)
        self._max_batch = max_batch
        self._prefetched: tuple[Any, Any] | None = None  # (distortion, ids) of a["grid"]
        a = self._shared.arrays
        self._grad_views = [flat_views(params, g) for g in a["grads"]]
        shared_params = flat_copy(params, [p.data for p in params], a["params"])
        for param, view in zip(params, shared_params, strict=True):
            param.data = view  # the parameters now live in shared memory
        self.flat = FlatBuffers(a["params"], a["grads"][0], shared_params, self._grad_views[0])
        self.batch_buffer = a["x"]
        try:
            for index in range(1, workers):
                self._links.append(self._launch(index))
                payload = (model, specs, self._shared.names(), tune_allocator, self._spin_s)
                message = (preparation, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
                self._send(self._links[-1], message, "start")
            self._replies(self._links, "start")
        except BaseException:
            self.close()
            raise

    def _launch(self, index: int) -> _Link:
        """Start worker ``index``: our own entry point, which imports no ``__main__``."""
        ours, theirs = socket.socketpair()
        resource_tracker.ensure_running()
        tracker_fd = resource_tracker.getfd()
        package_folder = str(Path(__file__).resolve().parents[2])
        cmd = [sys.executable, "-c", _BOOT, package_folder]
        cmd += [str(index), str(theirs.fileno()), str(tracker_fd)]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_DECIDES)
        try:  # the worker inherits the blocked mask; it ignores, then unblocks them
            proc = subprocess.Popen(
                cmd, pass_fds=(theirs.fileno(), tracker_fd), stdin=subprocess.DEVNULL
            )
        except BaseException:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            theirs.close()  # the worker's now: its death closes the socket (our sentinel)
        return _Link(index, proc, ours)

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (killing any that do not end within seconds) and free the shared
        memory (parameters and gradients are copied out of it first)."""
        if self._shared is None:
            return
        self._prefetched = None
        for link in self._links:
            with contextlib.suppress(OSError):  # one dead or stuck is killed below
                link.sock.send(_frame(None))
        deadline = time.monotonic() + 2
        for link in self._links:
            try:
                link.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                link.proc.kill()
                link.proc.wait()
            link.sock.close()
        for param in self.model.parameters():  # own their memory again (data and gradient)
            param.data = param.data.copy()
            param.grad = None if param.grad is None else param.grad.copy()
        self._links, self._grad_views = [], []
        self.flat.release()
        self.flat = self.batch_buffer = None
        self._shared.close(unlink=True)
        self._shared = None
        self._blas_limit.restore_original_limits()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def eval(self) -> None:
        self.model.eval()

    def _died(self, link: _Link, kind: str) -> WorkerError:
        return WorkerError(
            f"worker process {link.index} (pid {link.proc.pid}) {link.how_it_ended()} "
            f"{_DOING[kind]}; if it happens again, train with --workers 1"
        )

    def _check(self, links: list[_Link], kind: str, stop_seen: float | None) -> float | None:
        """Between the polls of one wait on ``links``: raise for a worker that has ended, and
        for a stop requested :data:`STOP_GRACE_S` ago or more (``stop_seen``: when this wait
        first saw it, returned updated)."""
        for link in links:
            if link.proc.poll() is not None:
                raise self._died(link, kind)
        signum = self._stop_requested() if self._stop_requested else None
        if signum is None:
            return None
        if stop_seen is None:
            return time.monotonic()
        if time.monotonic() - stop_seen >= STOP_GRACE_S:
            waiting = ", ".join(str(link.index) for link in links)
            how = f"(worker process {waiting} did not answer within {STOP_GRACE_S:g} s)"
            raise Interrupted(signum, how=how)
        return stop_seen

    def _send(self, link: _Link, message: Any, kind: str) -> None:
        """Write ``message`` to ``link``'s worker, waiting for room in bounded polls."""
        view, stop_seen = memoryview(_frame(message)), None
        while view:
            try:
                view = view[link.sock.send(view) :]
            except BlockingIOError:
                while not select.select([], [link], [], _POLL_S)[1]:
                    stop_seen = self._check([link], kind, stop_seen)
            except OSError:  # BrokenPipeError, ConnectionResetError: it died
                raise self._died(link, kind) from None

    def _replies(self, links: list[_Link], kind: str) -> None:
        """Wait for one answer from each of ``links`` (their sockets and processes together,
        in bounded polls): returns once all said ``"ok"``, else raises saying why."""
        pending, stop_seen = list(links), None
        spin_until = time.perf_counter() + self._spin_s
        while pending:
            spinning = time.perf_counter() < spin_until
            readable = select.select(pending, [], [], 0.0 if spinning else _POLL_S)[0]
            if not readable and not spinning:
                stop_seen = self._check(pending, kind, stop_seen)
            for link in readable:
                try:
                    chunk = link.sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:  # ConnectionResetError: it died
                    raise self._died(link, kind) from None
                if not chunk:
                    raise self._died(link, kind)
                link.inbox += chunk
                whole, reply = link.take_message()
                if whole:
                    pending.remove(link)
                    _check_reply(link, reply, kind)

    def _slices(self, n: int) -> list[slice]:
        if n > self._max_batch:
            raise ValueError(f"batch of {n} exceeds max_batch {self._max_batch} of DataParallel")
        k = min(self.workers, n)
        bounds = [n * i // k for i in range(k + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def _start(
        self, kind: str, x: Any, y: Any | None, parts: list[slice], distortion: Any = None,
        ids: Any = None, grid: Any = None,
    ) -> None:  # fmt: skip
        """Hand slices 1.. to the workers (through shared memory); they run meanwhile."""
        a = self._shared.arrays
        gathered = _address(x) == _address(a["x"])  # into a["x"] already: batch_buffer
        for link, part in zip(self._links, parts[1:], strict=False):
            if not gathered:
                a["x"][part] = x[part]
            if y is not None:
                a["y"][part] = y[part]
            if distortion is not None:
                a["ids"][part] = ids[part]
                if grid is not None:
                    a["grid"][:, part] = grid[:, part]
            self._send(link, (kind, part.start, part.stop, distortion), kind)

    def _wait(self, parts: list[slice], kind: str) -> None:
        self._replies(self._links[: len(parts) - 1], kind)

    def _take_prefetched(self, distortion: Any, ids: Any) -> bool:
        """Wait for the grid worker 1 is computing, if any; whether it is ``ids``'s."""
        if self._prefetched is None:
            return False
        (prefetched_for, prefetched_ids), self._prefetched = self._prefetched, None
        self._replies(self._links[:1], "grid")
        return (
            prefetched_for == distortion
            and prefetched_ids.shape == ids.shape
            and bool((prefetched_ids == ids).all())
        )

    def _prefetch_grid(self, distortion: Any, ids: Any) -> None:
        """Have worker 1 compute the grid of the batch ``ids`` into shared memory, now."""
        n = ids.shape[0]
        if n > self._max_batch:
            return
        self._shared.arrays["ids"][:n] = ids
        self._send(self._links[0], ("grid", 0, n, distortion), "grid")
        self._prefetched = (distortion, ids.copy())

    def forward(self, x: Any) -> Any:
        """Logits of ``x (N, ...)``, slices computed in parallel."""
        if not self._links:
            return self.model.forward(x)
        self._take_prefetched(None, None)
        parts = self._slices(x.shape[0])
        self._start("eval", x, None, parts)
        logits = self._shared.arrays["logits"][: x.shape[0]]
        logits[parts[0]] = self.model.forward(x[parts[0]])
        self._wait(parts, "eval")
        return logits.copy()

    def forward_backward(
        self, x: Any, labels: Any, distortion: Any = None, ids: Any = None, next_ids: Any = None
    ) -> tuple[Any, Any]:
        """As :func:`forward_backward` for the whole batch; the combined gradient (the
        slice-size-weighted mean) ends up in ``param.grad`` of ``self.model``.

        ``distortion``, if given (a :class:`lenet_xp.data.augment.Distortion`; ``ids (N,)``: the
        images' indices), augments the batch first: each process gathers its own slice at
        the whole batch's sampling grid (the same bits as one process distorting the whole
        batch). ``next_ids``, the next batch's indices if known, has worker 1 compute that
        batch's grid while this process steps the optimizer."""
        if not self._links:
            x = x if distortion is None else distortion(x, ids)
            return forward_backward(self.model, x, labels)
        n = x.shape[0]
        parts = self._slices(n)
        grid = to_share = None  # the batch's sampling grid; to_share: not in shared memory yet
        if distortion is not None and distortion.augment.geometric:
            if self._take_prefetched(distortion, ids):
                grid = self._shared.arrays["grid"][:, :n]
            else:
                grid = to_share = distortion.grid(ids, *x.shape[2:])
        else:
            self._take_prefetched(None, None)
        self._start("train", x, labels, parts, distortion, ids, to_share)
        x0 = x[parts[0]]
        if distortion is not None:
            x0 = distortion.finish(x0, ids[parts[0]], None if grid is None else grid[:, parts[0]])
        loss, correct = forward_backward(self.model, x0, labels[parts[0]])
        self._wait(parts, "train")
        if grid is not None and next_ids is not None and next_ids.shape[0] > 0:
            self._prefetch_grid(distortion, next_ids)
        weights = [(part.stop - part.start) / n for part in parts]
        stats = self._shared.arrays["stats"]
        loss = loss * weights[0] + sum(w * stats[i, 0] for i, w in enumerate(weights) if i)
        correct = correct + int(stats[1 : len(parts), 1].sum())
        self._combine(weights)
        return loss, correct

    def _combine(self, weights: list[float]) -> None:
        """``param.grad`` = the slices' gradients weighted by ``weights``, summed in slice
        order over the flat shared buffer (a few array operations, whatever the number of
        parameters); ``param.grad`` becomes a view of its row 0."""
        grads = self._shared.arrays["grads"]
        views = zip(self._params, self._grad_views[0], strict=True)
        params = [(p, view) for p, view in views if p.grad is not None]  # RBF centres: none
        for param, view in params:
            view[...] = param.grad
        rows = grads[: len(weights)]
        if native.fits(rows):  # one compiled pass: the same bits
            native_combine.combine(rows, weights)
        else:
            combined = grads[0]
            combined *= weights[0]
            for i in range(1, len(weights)):
                combined += weights[i] * grads[i]
        for param, view in params:
            param.grad = view
