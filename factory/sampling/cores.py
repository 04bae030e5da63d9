"""How many CPU cores this process may use: its CPU affinity (a container's, a ``taskset``'s or a batch
job's share), not the machine's count, which oversubscribes the share when threads are sized from it."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``; at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
