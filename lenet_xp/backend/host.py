"""The host process for training on the CPU: its cores, and glibc's allocator tuned."""

from __future__ import annotations

import os
from pathlib import Path


def host_cores(physical: bool = False) -> int:
    """The CPU cores this process may run on (its affinity, where the OS says); with
    ``physical``, hyperthreads of one core counted once (Linux's sysfs; else as logical)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
    if not physical:
        return max(1, len(cpus))
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple((topology / n).read_text().strip() for n in _CORE_IDS))
        except OSError:  # no sysfs (a container may hide it): count it on its own
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


#: What tells a physical core apart in sysfs: its package, then its id in the package.
_CORE_IDS = ("physical_package_id", "core_id")


def tune_host_allocator() -> bool:
    """Keep freed memory in the process for reuse (glibc ``mallopt``); ``True`` if applied.

    A training step allocates and frees the same few-megabyte arrays hundreds of times per
    second. By default glibc serves each from fresh ``mmap`` pages and returns them on free, so
    every step pays thousands of page faults (``python -m lenet_xp.bench --plain-malloc``
    shows the cost: about 1.6x slower epochs here). Raising
    the mmap and trim thresholds makes freed blocks come straight back: reuse, no faults.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
    )
