"""Where a command's time goes: wall seconds per phase on each rank.

``claire register`` records its phases in order — ``startup`` (interpreter start to the
command: imports, MPI initialisation), ``read`` (inputs read and checked), ``setup``
(decomposition, FFTW plans, images scattered and smoothed, the problem's distance
prepared), ``solve``, the outputs derived and gathered to rank 0 (``warp``: the warped image,
``labels``: the warped label map and Dice, ``det``: det(grad y), ``displacement``: the
displacement, det(grad y) by its central differences, the velocity), ``write`` and ``report`` — logs them at the end, with each rank's peak memory,
and stores those through ``write`` in ``registration.json`` (``"timing"``: ``{phase: [seconds
on rank 0, rank 1, ...]}``; the report comes after that file). The launcher's own start and
exit lie outside: a command's wall time minus the sum is their share.
"""

from __future__ import annotations

import os
import time

__all__ = ["Phases", "seconds_since_process_start", "peak_rss_bytes", "summary"]


def seconds_since_process_start():
    """Wall seconds since this process started (Linux: ``/proc/self/stat`` against the boot
    clock, 10 ms resolution), or ``None`` where that cannot be read."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time after boot, in ticks
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):  # pragma: no cover - not Linux
        return None


def peak_rss_bytes():
    """Peak resident set size of this process so far, bytes (``ru_maxrss``; Linux counts KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Phases:
    """Wall seconds of named phases on this rank, in the order first entered; one phase runs
    at a time: :meth:`enter` ends the running one."""

    def __init__(self):
        self.seconds = {}
        self.peak_rss = {}  # peak RSS of the process at the end of each phase: where it grew
        self._running = None

    def add(self, name, seconds):
        self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)

    def enter(self, name):
        """End the running phase (if any) and start ``name``."""
        self.stop()
        self._running = (name, time.perf_counter())

    def stop(self):
        """End the running phase (if any)."""
        if self._running is not None:
            name, t0 = self._running
            self.add(name, time.perf_counter() - t0)
            self.peak_rss[name] = peak_rss_bytes()
            self._running = None

    def gathered(self, comm, what="seconds"):
        """``{phase: [value on rank 0, rank 1, ...]}`` of ``what`` (``"seconds"``, or
        ``"peak_rss"``: bytes at the phase's end) on rank 0 (``None`` elsewhere); a phase a
        rank did not enter counts 0 there. Collective."""
        every = comm.gather(getattr(self, what), root=0)
        if every is None:
            return None
        names = list(dict.fromkeys(name for values in every for name in values))
        return {name: [values.get(name, 0) for values in every] for name in names}


def summary(timing):
    """One line: each phase's slowest rank and the sum, e.g. ``startup 0.9 s, solve 4.1 s, ...``."""
    slowest = {name: max(values) for name, values in timing.items()}
    return ", ".join(f"{name} {s:.2f} s" for name, s in slowest.items()) + f"; {sum(slowest.values()):.2f} s in all"
