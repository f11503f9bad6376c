"""How many CPUs this process may run on: the default of every worker count."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs the scheduler lets this process use (a container's or `taskset`'s limit), which
    can be far fewer than the machine has: `os.cpu_count()` would start idle, competing workers."""
    if hasattr(os, "sched_getaffinity"):  # Linux; macOS and Windows have no affinity call
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1
