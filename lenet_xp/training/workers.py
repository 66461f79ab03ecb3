"""The worker processes of :class:`~lenet_xp.training.parallel.DataParallel`: how one boots
(a ``python -c`` program of our own, :data:`_BOOT`, that imports no ``__main__``), the shared
memory it maps, the messages it answers and what it computes (:func:`forward_backward` on its
slice of the batch, the next batch's augmentation grid, evaluations); and the main process's
end of one (:class:`_Link`: its process and socket).
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
import time
from multiprocessing import resource_tracker, spawn
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

from lenet_xp import native
from lenet_xp.backend import host_view, host_zeros, tune_host_allocator
from lenet_xp.layers import Dropout, Module
from lenet_xp.layers.module import flat_views
from lenet_xp.models.lenet5 import model_loss
from lenet_xp.training.interrupt import signal_name


class WorkerError(RuntimeError):
    """A worker process failed or died; the message (one line) says which, how and what to do."""


#: Test hook: ``STAGE:N`` makes worker 1 stop itself (SIGSTOP) the Nth time it reaches STAGE
#: (``boot``: before it reads its set-up; ``start``: after; ``step``: a training step's start;
#: ``handback``: its gradients written, not yet reported; ``prefetch``: a grid's start), so
#: a test can kill it exactly there.
PAUSE_ENV = "LENET_XP_WORKER_PAUSE"


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


#: Signals only the main process acts on (lenet_xp.training.interrupt); workers start with them
#: blocked, so one that arrives while a worker starts up cannot kill it, then ignore them.
_MAIN_DECIDES = {signal.SIGINT, signal.SIGTERM}


#: A message on a socket: its length (8 bytes, big-endian), then its pickle.
_HEADER = struct.Struct("!Q")


#: ``python -c`` program of a worker; argv: lenet_xp's folder, then the worker's index, socket
#: fd and resource tracker fd.
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from lenet_xp.training.workers import _worker_main; _worker_main(*map(int, sys.argv[2:]))"
)


_in_worker = False


def in_worker() -> bool:
    """Whether this process is a worker (which imports ``__main__`` only for a model that
    holds a class defined there: training from that import is the script's mistake)."""
    return _in_worker


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


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def _receive_blocking(sock: socket.socket, spin_s: float = 0.0) -> Any:
    """The next message on a blocking ``sock``, polled for up to ``spin_s`` seconds before
    sleeping on it; :class:`EOFError` once the other end closed."""
    spin_until = time.perf_counter() + spin_s
    while time.perf_counter() < spin_until and not select.select([sock], [], [], 0.0)[0]:
        pass

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
    tune: bool, spin_s: float,
) -> None:  # fmt: skip
    """Worker ``index``'s set-up (its replica of ``model`` on the shared arrays), then its
    answers to the main process's messages until ``None``."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
    if tune:
        tune_host_allocator()
    native.warm_up(next((p.data for p in model.parameters()), None))  # compiled now
    shared = _Shared(specs, attach=names)
    a = shared.arrays
    for layer in model.modules():
        if isinstance(layer, Dropout):
            layer.fork(index)  # this slice's own masks (slice 0 keeps the seed's first stream)
    params = model.parameters()
    for param, view in zip(params, flat_views(model.parameters(), a["params"]), strict=True):
        param.data = view
    grad_views = flat_views(model.parameters(), a["grads"][index])
    sock.sendall(_frame("ok"))
    try:
        while (message := _receive_blocking(sock, spin_s)) is not None:
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


def _preparation(model: Module) -> dict:
    """What a worker needs before it can unpickle ``model`` (``multiprocessing.spawn``'s
    preparation data): ``sys.path`` and folders, and ``__main__`` only if ``model`` holds a
    class defined there. :class:`WorkerError` if that ``__main__`` cannot be imported."""
    data = spawn.get_preparation_data("lenet_xp-worker")
    del data["authkey"]  # multiprocessing's own: not ours to hand on, and not needed
    from_main = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__module__ == "__main__"}
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
