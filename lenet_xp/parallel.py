"""Data parallelism over CPU processes that share memory.

At LeNet's size a training step is hundreds of small NumPy calls. Each holds the GIL for a
few microseconds, so threads serialise on it and a second core buys nothing. Instead, each
batch is split into ``workers`` slices, each run by a replica of the model in its own
process with one BLAS thread. The processes share (``multiprocessing.shared_memory``):

- the parameters, one flat buffer that the model's ``param.data`` arrays are views of, so
  the optimizer's in-place updates reach every replica;
- the workers' slices of each batch (images and labels), written by the main process;
- one gradient buffer per worker, and per-worker loss and correct-count slots.

Per step the main process sends each worker a ``(start, stop)`` slice over a pipe, runs the
first slice itself, and waits; then it combines the slice gradients (weighted by slice size,
in a fixed order, so the same seed gives the same numbers for a given worker count).

With augmentation, each process distorts its own slice at the batch's sampling grid. The grid
of the whole next batch (it depends only on the images' indices) is computed by worker 1
while the main process combines the gradients and steps the optimizer, when that worker
would otherwise wait: it leaves the critical path.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import signal
import traceback
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from lenet_xp.backend import host_view, host_zeros, tune_host_allocator
from lenet_xp.layers import Dropout, Module
from lenet_xp.model import model_loss


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
    """A worker process failed or died; the message says how."""


_DIED = "a worker process died (killed for memory?); try --workers 1"
#: Signals only the main process acts on (lenet_xp.interrupt); workers start with them
#: blocked, so one that arrives while a worker starts up cannot kill it, then ignore them.
_MAIN_DECIDES = {signal.SIGINT, signal.SIGTERM}


def _worker(
    index: int, model: Module, specs: dict, names: dict, conn: Any, tune_allocator: bool
) -> None:
    from threadpoolctl import threadpool_limits

    for signum in _MAIN_DECIDES:  # Ctrl-C, docker stop: the main process's to handle
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _MAIN_DECIDES)  # blocked while we started
    threadpool_limits(limits=1, user_api="blas")
    if tune_allocator:
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
    try:
        while (message := conn.recv()) is not None:
            kind, start, stop, distortion = message
            if kind == "grid":  # the next batch's sampling grid (its ids are in a["ids"])
                a["grid"][:, start:stop] = distortion.grid(a["ids"][start:stop], *a["x"].shape[2:])
                conn.send("ok")
                continue
            x, y = a["x"][start:stop], a["y"][start:stop]
            if distortion is not None:  # this slice's share of the batch's augmentation
                grid = a["grid"][:, start:stop] if distortion.augment.geometric else None
                x = distortion.finish(x, a["ids"][start:stop], grid)
            if kind == "train":
                model.train()
                loss, correct = forward_backward(model, x, y)
                for param, view in zip(params, grad_views, strict=True):
                    if param.grad is not None:  # fixed parameters (RBF centres) have none
                        view[...] = param.grad
                a["stats"][index] = (float(loss), int(correct))
            else:
                model.eval()
                a["logits"][start:stop] = model.forward(x)
            conn.send("ok")
    except MemoryError:
        conn.send("memory")
    except Exception:  # report, don't hang the main process
        conn.send(traceback.format_exc(limit=3).strip().splitlines()[-1])
    finally:
        shared.close(unlink=False)


def _reply(conn: Any) -> None:
    """A worker's answer to one message: returns on ``"ok"``, else raises saying why."""
    try:
        reply = conn.recv()
    except EOFError:
        raise WorkerError(_DIED) from None
    if reply == "memory":
        raise MemoryError("a worker process ran out of memory")
    if reply != "ok":
        raise WorkerError(f"a worker process failed: {reply}")


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


class DataParallel:
    """Runs ``model`` on ``workers`` slices of each batch (CPU): slice 0 in this process,
    the others in ``workers - 1`` worker processes; ``workers=1``: no processes at all.

    ``max_batch`` bounds the batches it will see (training and evaluation), ``num_classes``
    the logits' width; ``tune_allocator`` applies ``backend.tune_host_allocator`` in the
    workers. Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        model: Module,
        workers: int = 1,
        max_batch: int = 2048,
        num_classes: int = 10,
        tune_allocator: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.model, self.workers = model, workers
        self._procs: list[Any] = []
        if workers == 1:
            return
        from threadpoolctl import threadpool_limits

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
        context = mp.get_context("spawn")
        self._conns = []
        for index in range(1, workers):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=_worker,
                args=(index, model, specs, self._shared.names(), theirs, tune_allocator),
                daemon=True,
            )
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_DECIDES)
            try:
                proc.start()  # inherits the blocked mask; the worker ignores, then unblocks
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._procs.append(proc)
            self._conns.append(ours)

    def __enter__(self) -> DataParallel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers and free the shared memory (parameters are copied back first)."""
        if not self._procs:
            return
        self._prefetched = None
        for conn in self._conns:
            with contextlib.suppress(OSError):  # a worker that reported an error has stopped
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
        for param in self.model.parameters():
            param.data = param.data.copy()
        self._procs, self._grad_views = [], []
        self._shared.close(unlink=True)
        self._blas_limit.restore_original_limits()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def eval(self) -> None:
        self.model.eval()

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
        for conn, part in zip(self._conns, parts[1:], strict=False):
            a["x"][part] = x[part]
            if y is not None:
                a["y"][part] = y[part]
            if distortion is not None:
                a["ids"][part] = ids[part]
                if grid is not None:
                    a["grid"][:, part] = grid[:, part]
            try:
                conn.send((kind, part.start, part.stop, distortion))
            except OSError:
                raise WorkerError(_DIED) from None

    def _wait(self, parts: list[slice]) -> None:
        for conn, _ in zip(self._conns, parts[1:], strict=False):
            _reply(conn)

    def _take_prefetched(self, distortion: Any, ids: Any) -> bool:
        """Wait for the grid worker 1 is computing, if any; whether it is ``ids``'s."""
        if self._prefetched is None:
            return False
        _reply(self._conns[0])
        (prefetched_for, prefetched_ids), self._prefetched = self._prefetched, None
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
        try:
            self._conns[0].send(("grid", 0, n, distortion))
        except OSError:
            raise WorkerError(_DIED) from None
        self._prefetched = (distortion, ids.copy())

    def forward(self, x: Any) -> Any:
        """Logits of ``x (N, ...)``, slices computed in parallel."""
        if not self._procs:
            return self.model.forward(x)
        self._take_prefetched(None, None)
        parts = self._slices(x.shape[0])
        self._start("eval", x, None, parts)
        logits = self._shared.arrays["logits"][: x.shape[0]]
        logits[parts[0]] = self.model.forward(x[parts[0]])
        self._wait(parts)
        return logits.copy()

    def forward_backward(
        self, x: Any, labels: Any, distortion: Any = None, ids: Any = None, next_ids: Any = None
    ) -> tuple[Any, Any]:
        """As :func:`forward_backward` for the whole batch; the combined gradient (the
        slice-size-weighted mean) ends up in ``param.grad`` of ``self.model``.

        ``distortion``, if given (a :class:`lenet_xp.augment.Distortion`; ``ids (N,)``: the
        images' indices), augments the batch first: each process gathers its own slice at
        the whole batch's sampling grid (the same bits as one process distorting the whole
        batch). ``next_ids``, the next batch's indices if known, has worker 1 compute that
        batch's grid while this process steps the optimizer."""
        if not self._procs:
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
        self._wait(parts)
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
