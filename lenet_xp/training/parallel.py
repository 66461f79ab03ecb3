"""Data parallelism over CPU processes that share memory.

At LeNet's size a training step is hundreds of small NumPy calls. Each holds the GIL for a
few microseconds, so threads serialise on it and a second core buys nothing. Instead, each
batch is split into ``workers`` slices, each run by a replica of the model in its own
process with one BLAS thread. The processes share (``multiprocessing.shared_memory``):

- the parameters, one flat buffer that the model's ``param.data`` arrays are views of, so
  the optimizer's in-place updates reach every replica;
- the workers' slices of each batch (images and labels), written by the main process;
- one gradient buffer per worker, and per-worker loss and correct-count slots.

Per step the main process sends each worker a ``(start, stop)`` slice over a socket, runs the
first slice itself, and waits; then it combines the slice gradients (weighted by slice size,
in a fixed order, so the same seed gives the same numbers for a given worker count).

With augmentation, each process distorts its own slice at the batch's sampling grid. The grid
of the whole next batch (it depends only on the images' indices) is computed by worker 1
while the main process combines the gradients and steps the optimizer, when that worker
would otherwise wait: it leaves the critical path.

The workers are ``python -c`` processes of our own (:func:`_worker_main`), not
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
import math
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker, spawn
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from lenet_xp.backend import host_view, host_zeros, tune_host_allocator
from lenet_xp.layers import Dropout, Module
from lenet_xp.models.lenet5 import model_loss
from lenet_xp.training.interrupt import Interrupted, signal_name

#: Once a stop (SIGINT/SIGTERM) is requested, how long a wait on a worker may go on before
#: the run stops without it (a healthy worker answers within a step, milliseconds).
STOP_GRACE_S = 3.0
#: How often a wait on the workers checks that they live and whether a stop was requested.
_POLL_S = 0.1
#: Test hook: ``STAGE:N`` makes worker 1 stop itself (SIGSTOP) the Nth time it reaches STAGE
#: (``boot``: before it reads its set-up; ``start``: after; ``step``: a training step's start;
#: ``handback``: its gradients written, not yet reported; ``prefetch``: a grid's start), so
#: a test can kill it exactly there.
PAUSE_ENV = "LENET_XP_WORKER_PAUSE"
#: What the main process was doing, for the line that says a worker died.
_DOING = {
    "start": "while starting",
    "train": "during a training step",
    "eval": "during an evaluation",
    "grid": "while computing the next batch's augmentation grid",
}


def forward_backward(model: Module, x: Any, labels: Any) -> tuple[Any, Any]:
    """Forward, loss and backward on one batch: returns ``(loss, n_correct)`` as 0-d device
    arrays (no host sync) and leaves the gradients in ``param.grad``."""
    logits = model.forward(x)
    loss, grad_logits = model_loss(model, logits, labels)
    model.backward(grad_logits)
    return loss, (logits.argmax(axis=1) == labels).sum()


class _Shared:
    """Named shared-memory arrays; ``attach`` maps the same names in a worker."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], str]], attach: dict | None = None):
        self.blocks, self.arrays = {}, {}
        for name, (shape, dtype) in specs.items():
            if attach is None:
                nbytes = math.prod(shape) * host_zeros((), dtype).itemsize
                block = SharedMemory(create=True, size=max(nbytes, 1))
            else:
                block = SharedMemory(name=attach[name])
            self.blocks[name] = block
            self.arrays[name] = host_view(block.buf, shape, dtype)

    def names(self) -> dict[str, str]:
        return {name: block.name for name, block in self.blocks.items()}

    def close(self, unlink: bool) -> None:
        self.arrays.clear()
        for block in self.blocks.values():
            block.close()
            if unlink:
                block.unlink()


class WorkerError(RuntimeError):
    """A worker process failed or died; the message (one line) says which, how and what to do."""


#: Signals only the main process acts on (lenet_xp.training.interrupt); workers start with them
#: blocked, so one that arrives while a worker starts up cannot kill it, then ignore them.
_MAIN_DECIDES = {signal.SIGINT, signal.SIGTERM}
#: A message on a socket: its length (8 bytes, big-endian), then its pickle.
_HEADER = struct.Struct("!Q")
#: ``python -c`` program of a worker; argv: lenet_xp's folder, then the worker's index, socket
#: fd and resource tracker fd.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from lenet_xp.training.parallel import _worker_main; _worker_main(*map(int, sys.argv[2:]))"
)
_in_worker = False


def in_worker() -> bool:
    """Whether this process is a worker (which imports ``__main__`` only for a model that
    holds a class defined there: training from that import is the script's mistake)."""
    return _in_worker


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _receive_blocking(sock: socket.socket) -> Any:
    """The next message on a blocking ``sock``; :class:`EOFError` once the other end closed."""

    def exactly(n: int) -> bytearray:
        data = bytearray(n)
        view, got = memoryview(data), 0
        while got < n:
            chunk = sock.recv_into(view[got:])
            if not chunk:
                raise EOFError
            got += chunk
        return data

    return pickle.loads(exactly(_HEADER.unpack(exactly(_HEADER.size))[0]))


class _Pauser:
    """The :data:`PAUSE_ENV` test hook of worker ``index``."""

    def __init__(self, index: int) -> None:
        stage, _, count = os.environ.get(PAUSE_ENV, "").partition(":")
        self.stage, self.left = (stage, int(count or 1)) if index == 1 else ("", 0)

    def __call__(self, stage: str) -> None:
        if stage == self.stage:
            self.left -= 1
            if self.left == 0:
                os.kill(os.getpid(), signal.SIGSTOP)


def _worker_main(index: int, sock_fd: int, tracker_fd: int) -> None:
    """A worker process (:data:`_BOOT`): set up from the main process's first message, then
    answer its messages until ``None`` or until the main process is gone."""
    global _in_worker
    _in_worker = True
    for signum in _MAIN_DECIDES:  # Ctrl-C, docker stop: the main process's to handle
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _MAIN_DECIDES)  # blocked while we started
    # Attaching shared memory registers it with the main process's resource tracker (as a
    # multiprocessing child does), not with a tracker of our own that would unlink it.
    resource_tracker._resource_tracker._fd = tracker_fd
    sock = socket.socket(fileno=sock_fd)
    pause = _Pauser(index)
    try:
        pause("boot")
        preparation, payload = _receive_blocking(sock)
        spawn.prepare(preparation)  # sys.path, folders; __main__ if the model needs it
        pause("start")
        _serve(sock, index, pause, *pickle.loads(payload))
    except EOFError:  # the main process is gone, or closed us
        pass
    except MemoryError:
        _send_blocking(sock, "memory")
    except Exception as exc:  # report, don't leave the main process guessing
        _send_blocking(sock, ("error", f"{type(exc).__name__}: {exc}".splitlines()[0]))


def _send_blocking(sock: socket.socket, message: Any) -> None:
    with contextlib.suppress(OSError):  # the main process is gone: nobody to tell
        sock.sendall(_frame(message))


def _serve(
    sock: socket.socket, index: int, pause: _Pauser, model: Module, specs: dict, names: dict,
    tune: bool,
) -> None:  # fmt: skip
    """Worker ``index``'s set-up (its replica of ``model`` on the shared arrays), then its
    answers to the main process's messages until ``None``."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    if tune:
        tune_host_allocator()
    shared = _Shared(specs, attach=names)
    a = shared.arrays
    for layer in _modules(model):
        if isinstance(layer, Dropout):
            layer.fork(index)  # this slice's own masks (slice 0 keeps the seed's first stream)
    params = model.parameters()
    for param, view in zip(params, _param_views(model, a["params"]), strict=True):
        param.data = view
    grad_views = _param_views(model, a["grads"][index])
    sock.sendall(_frame("ok"))
    try:
        while (message := _receive_blocking(sock)) is not None:
            kind, start, stop, distortion = message
            if kind == "grid":  # the next batch's sampling grid (its ids are in a["ids"])
                pause("prefetch")
                a["grid"][:, start:stop] = distortion.grid(a["ids"][start:stop], *a["x"].shape[2:])
                sock.sendall(_frame("ok"))
                continue
            x, y = a["x"][start:stop], a["y"][start:stop]
            if distortion is not None:  # this slice's share of the batch's augmentation
                grid = a["grid"][:, start:stop] if distortion.augment.geometric else None
                x = distortion.finish(x, a["ids"][start:stop], grid)
            if kind == "train":
                pause("step")
                model.train()
                loss, correct = forward_backward(model, x, y)
                for param, view in zip(params, grad_views, strict=True):
                    if param.grad is not None:  # fixed parameters (RBF centres) have none
                        view[...] = param.grad
                a["stats"][index] = (float(loss), int(correct))
                pause("handback")
            else:
                model.eval()
                a["logits"][start:stop] = model.forward(x)
            sock.sendall(_frame("ok"))
    finally:
        shared.close(unlink=False)


def _modules(module: Module) -> Iterator[Module]:
    """``module`` and every layer inside it, depth first."""
    yield module
    for _, child in module.named_children():
        yield from _modules(child)


def _param_views(model: Module, flat: Any) -> list[Any]:
    """Views of ``flat`` shaped like each parameter of ``model``, in order."""
    views, offset = [], 0
    for param in model.parameters():
        views.append(flat[offset : offset + param.data.size].reshape(param.data.shape))
        offset += param.data.size
    return views


def _preparation(model: Module) -> dict:
    """What a worker needs before it can unpickle ``model`` (``multiprocessing.spawn``'s
    preparation data): ``sys.path`` and folders, and ``__main__`` only if ``model`` holds a
    class defined there. :class:`WorkerError` if that ``__main__`` cannot be imported."""
    data = spawn.get_preparation_data("lenet_xp-worker")
    del data["authkey"]  # multiprocessing's own: not ours to hand on, and not needed
    from_main = sorted(
        {type(m).__name__ for m in _modules(model) if type(m).__module__ == "__main__"}
    )
    main_file = data.get("init_main_from_path")
    if not from_main:
        data.pop("init_main_from_name", None)
        data.pop("init_main_from_path", None)
    elif "init_main_from_name" not in data and not (main_file and Path(main_file).is_file()):
        raise WorkerError(
            f"the model's {', '.join(from_main)} is defined in an interactive session or "
            "standard input, which worker processes cannot import: define it in a .py file "
            "(a module you import, or a script run as python FILE), or use --workers 1"
        )
    return data


class _Link:
    """The main process's end of one worker: its process and non-blocking socket."""

    def __init__(self, index: int, proc: subprocess.Popen, sock: socket.socket) -> None:
        self.index, self.proc, self.sock = index, proc, sock
        sock.setblocking(False)
        self.inbox = bytearray()

    def fileno(self) -> int:
        return self.sock.fileno()

    def take_message(self) -> tuple[bool, Any]:
        """``(True, message)`` if the inbox holds a whole one (removed), else ``(False, None)``."""
        if len(self.inbox) < _HEADER.size:
            return False, None
        end = _HEADER.size + _HEADER.unpack_from(self.inbox)[0]
        if len(self.inbox) < end:
            return False, None
        message = pickle.loads(self.inbox[_HEADER.size : end])
        del self.inbox[:end]
        return True, message

    def how_it_ended(self) -> str:
        """How the process ended (it is killed first if it has not: its socket broke)."""
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code >= 0:
            return f"exited with status {code}"
        name = signal_name(-code)
        return f"was killed by {name}" + (
            " (out of memory, or kill -9)" if name == "SIGKILL" else ""
        )


def _check_reply(link: _Link, reply: Any, kind: str) -> None:
    """Return on ``"ok"``, else raise what worker ``link`` reported."""
    if reply == "ok":
        return
    if reply == "memory":
        raise MemoryError(f"worker process {link.index} ran out of memory")
    what = "could not start" if kind == "start" else "failed"
    raise WorkerError(f"worker process {link.index} {what}: {reply[1]}")


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
        self._links: list[_Link] = []
        self._shared: _Shared | None = None
        if workers == 1:
            return
        from threadpoolctl import threadpool_limits

        preparation = _preparation(model)
        self._stop_requested = stop_requested
        # One core per slice: this process's BLAS gets one thread too (restored by close).
        self._blas_limit = threadpool_limits(limits=1, user_api="blas")
        params = model.parameters()
        dtype = str(params[0].data.dtype)
        size = sum(int(p.data.size) for p in params)
        specs = {
            "params": ((size,), dtype),
            "grads": ((workers, size), dtype),  # row 0 unused: slice 0's are param.grad
            "x": ((max_batch, 1, model.input_size, model.input_size), dtype),
            "y": ((max_batch,), "int64"),
            "ids": ((max_batch,), "int64"),  # with the grid: augmentation finished by slice
            "grid": ((2, max_batch, model.input_size, model.input_size), "float32"),
            "logits": ((max_batch, num_classes), dtype),
            "stats": ((workers, 2), "float64"),
        }
        self._shared = _Shared(specs)
        self._max_batch = max_batch
        self._prefetched: tuple[Any, Any] | None = None  # (distortion, ids) of a["grid"]
        self._grad_views = [_param_views(model, g) for g in self._shared.arrays["grads"]]
        shared_params = _param_views(model, self._shared.arrays["params"])
        for param, view in zip(params, shared_params, strict=True):
            view[...] = param.data  # the parameters now live in shared memory
            param.data = view
        try:
            for index in range(1, workers):
                self._links.append(self._launch(index))
                payload = (model, specs, self._shared.names(), tune_allocator)
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
        memory (parameters are copied back first)."""
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
        for param in self.model.parameters():
            param.data = param.data.copy()
        self._links, self._grad_views = [], []
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
        while pending:
            readable = select.select(pending, [], [], _POLL_S)[0]
            if not readable:
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
        for link, part in zip(self._links, parts[1:], strict=False):
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
        for j, param in enumerate(self.model.parameters()):
            if param.grad is None:  # a fixed parameter (e.g. RBF centres): nothing to combine
                continue
            param.grad *= weights[0]
            for i in range(1, len(parts)):
                param.grad += weights[i] * self._grad_views[i][j]
        return loss, correct
