"""Where a sweep's runs train: processes on this machine, or Ray tasks on a cluster.

Locally, ``jobs`` runs train at once, each sized to its share of the machine so that they do
not oversubscribe it: on the CPU each gets ``cores // jobs`` cores (``--workers`` and BLAS
threads); with GPUs each run gets one GPU (``CUDA_VISIBLE_DEVICES``), or a fraction of one
(``gpus_per_run = 0.5``: two runs per GPU). With Ray each run is one task declaring its
CPUs and GPUs (fractions allowed); Ray places it on a node and sets its
``CUDA_VISIBLE_DEVICES``; the sweep's folder must be on a path every node shares.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

from lenet_xp.sweep.execute import Outcome, Task, train_run
from lenet_xp.sweep.spec import SweepError

#: A run's ``--workers`` at most (LeNet's batches are small; as ``train``'s default).
MAX_WORKERS = 4
BLAS_THREADS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
#: Ray retries a task whose node or worker died this many times (each retry resumes).
RAY_RETRIES = 3
POLL_SECONDS = 0.5


def cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_count() -> int:
    """Usable CUDA GPUs here (0 without CuPy, a driver or a GPU)."""
    from lenet_xp.backend import cuda_device_count

    return cuda_device_count()


@dataclass
class Placement:
    """How runs are sized: ``jobs`` at once, ``cpus`` cores and ``gpus`` GPUs each, the
    ``device`` flag they train with and ``gpu_ids`` (local runs on GPUs: slot ``i`` uses
    ``gpu_ids[i % len(gpu_ids)]``)."""

    jobs: int
    cpus: float
    gpus: float
    device: str
    gpu_ids: tuple[int, ...] = ()

    def describe(self) -> str:
        each = f"{self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.jobs} at once, {each} each, --device {self.device}"

    def task(self, folder: str, flags: tuple[str, ...], seed: int, slot: int = 0) -> Task:
        """The :class:`Task` of a run in ``folder`` trained in ``slot`` (its GPU, if local)."""
        threads = str(max(1, math.floor(self.cpus)))
        env = dict.fromkeys(BLAS_THREADS, threads)
        extra: tuple[str, ...] = ()
        if self.device == "cpu" and "--workers" not in flags:
            extra = ("--workers", str(min(MAX_WORKERS, int(threads))))
        if self.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpu_ids[slot % len(self.gpu_ids)])
        return Task(folder, flags, seed, self.device, extra, env)


def local_placement(
    device: str, jobs: int | None, cpus: float | None, gpus: float | None
) -> Placement:
    """Size local runs: on the CPU ``jobs`` defaults to one per ``cpus`` (default 1) cores;
    on GPUs (``device`` ``cuda`` or ``auto`` with a GPU here) to ``1 / gpus`` runs (default
    1) per GPU. ``cuda:N`` trains every run on GPU N, ``jobs`` (default 1) at once."""
    n_cores = cores()
    if gpus is not None and not 0 < gpus <= 1:
        raise SweepError(f"--gpus-per-run {gpus:g}: a local run uses at most one GPU (0 < g <= 1)")
    n_gpus = gpu_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and not n_gpus:
        from lenet_xp.backend import cuda_unavailable_reason

        raise SweepError(f'device cuda: {cuda_unavailable_reason(0)}; use device = "cpu"')
    if n_gpus:
        per_gpu = max(1, math.floor(1 / (gpus or 1)))
        jobs = jobs or n_gpus * per_gpu
        cpus = cpus or max(1, n_cores // jobs)
        return Placement(jobs, cpus, gpus or 1, "cuda", tuple(range(n_gpus)))
    device = "cpu" if device == "auto" else device
    if jobs is None:
        jobs = max(1, n_cores // math.ceil(cpus or 1))
    return Placement(jobs, cpus or max(1, n_cores // jobs), 0, device)


def run_local(
    placement: Placement, tasks: list[tuple[str, Callable[[int], Task]]],
    stop: Callable[[], bool], tick: Callable[[list[str]], None],
) -> Iterator[tuple[str, Outcome | None]]:  # fmt: skip
    """Train ``tasks`` (``(run name, task of slot)``), ``placement.jobs`` at once; yields
    ``(name, outcome)`` as each ends (``None``: not started, the sweep was stopped).
    ``tick(running names)`` every :data:`POLL_SECONDS` (early stopping looks then)."""
    slots: SimpleQueue[int] = SimpleQueue()
    for slot in range(placement.jobs):
        slots.put(slot)

    def work(make_task: Callable[[int], Task]) -> Outcome | None:
        if stop():
            return None
        slot = slots.get()
        try:
            return train_run(make_task(slot), stop)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(placement.jobs) as pool:
        futures = {pool.submit(work, make): name for name, make in tasks}
        while futures:
            done, _ = wait(futures, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for future in done:
                yield futures.pop(future), future.result()
            tick([name for future, name in futures.items() if future.running()])


def ray_placement(ray: Any, device: str, cpus: float | None, gpus: float | None) -> Placement:
    """Size Ray tasks: ``cpus`` (default 1) and ``gpus`` each; ``gpus`` defaults to 1 when
    ``device`` is ``cuda``, or ``auto`` and the cluster has GPUs, else 0 (the CPU)."""
    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    if gpus is None:
        gpus = 1.0 if device == "cuda" or (device == "auto" and cluster_gpus) else 0.0
    if gpus and not cluster_gpus:
        raise SweepError('the Ray cluster has no GPU: use device = "cpu" (or add GPU nodes)')
    cpus = cpus or 1.0
    jobs = int(ray.cluster_resources().get("CPU", 1) // cpus)
    if gpus:
        jobs = min(jobs, int(cluster_gpus // gpus))
    train_device = ("cuda" if gpus else "cpu") if device == "auto" else device
    return Placement(max(1, jobs), cpus, gpus, train_device)


def connect_ray(address: str) -> Any:
    """The ``ray`` module, connected: to ``address`` (``auto``: the cluster this machine is
    part of), or to a Ray instance started here (``local``), or as ``ray.init`` already was."""
    try:
        import ray
    except ImportError:
        raise SweepError('--ray needs Ray: pip install "lenet_xp[ray]"') from None
    if not ray.is_initialized():
        try:
            ray.init(
                address=None if address == "local" else address,
                logging_level="WARNING", log_to_driver=False, include_dashboard=False,
            )  # fmt: skip
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SweepError(
                f"--ray {address}: cannot connect: {first} (start one with `ray start --head`, "
                "or use --ray local)"
            ) from None
    return ray


def run_ray(
    ray: Any, placement: Placement, tasks: list[tuple[str, Callable[[int], Task]]],
    stop: Callable[[], bool], tick: Callable[[list[str]], None],
) -> Iterator[tuple[str, Outcome | None]]:  # fmt: skip
    """As :func:`run_local`, each run one Ray task with its resources declared; a lost node's
    tasks are retried by Ray (and resume). Stopping cancels the tasks: a running one stops
    its training, which saves ``last.npz``."""
    remote = ray.remote(train_run).options(
        num_cpus=placement.cpus, num_gpus=placement.gpus, max_retries=RAY_RETRIES
    )
    refs = {remote.remote(make(0)): name for name, make in tasks}
    cancelled = False
    while refs:
        if stop() and not cancelled:
            for ref in refs:
                ray.cancel(ref)
            cancelled = True
        ready, _ = ray.wait(list(refs), num_returns=1, timeout=POLL_SECONDS)
        for ref in ready:
            name = refs.pop(ref)
            try:
                yield name, ray.get(ref)
            except ray.exceptions.TaskCancelledError:
                yield name, None
            except ray.exceptions.RayError as exc:
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                yield name, Outcome(None, f"Ray: {lines[-1]}", "", False)
        tick(list(refs.values()))
