"""A process's own memory, as the benchmarks report it.

`getrusage(RUSAGE_SELF).ru_maxrss` is no process's own peak when a benchmark starts it: Linux
carries the parent's peak RSS across fork and exec into the child's ru_maxrss, so every child of a
bench driver that had built its data sets reported at least the driver's peak (every HH train
variant read 1,567.06 MiB). VmHWM in /proc/self/status is the high-water mark of this process's
address space, which exec replaces: the peak since this program started, the kernel's own count
rather than a sample that could miss a short spike.
"""

from __future__ import annotations

from pathlib import Path


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel writes kB
    raise RuntimeError(f"/proc/self/status has no {field} line (the benchmarks' memory figures need Linux)")


def peak_rss_mib() -> float:
    """This process's own peak resident set since it started (VmHWM), in MiB."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    """This process's resident set now (VmRSS), in MiB."""
    return _status_mib("VmRSS")
