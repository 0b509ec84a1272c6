"""Iteration records, callbacks and workload counters (runtime state, kept out of options)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

__all__ = ["IterationInfo", "Workload"]


@dataclass(frozen=True)
class IterationInfo:
    """One Gauss-Newton iteration, as passed to callbacks and kept in the history.

    Attributes
    ----------
    iteration : int
        0 for the initial guess, then 1, 2, ...
    objective : float
        ``J(v) = 1/2 ||m(1) - m_R||^2 + beta/2 <A v, v>`` (L2 norms on ``[0, 2 pi)^3``).
    mismatch : float
        Relative mismatch ``||m(1) - m_R|| / ||m_T - m_R||``.
    grad_rel : float
        ``||g|| / ||g_0||``.
    grad_norm : float
        ``||g||`` (L2).
    krylov_iterations : int
        PCG iterations spent to compute the step that led here (0 for iteration 0).
    step : float
        Line-search step length accepted (0 for iteration 0).
    seconds : float
        Wall time since the solve started.
    beta : float
        Regularisation weight of this solve (changes under continuation and training).
    level : int
        Continuation level (grid, scale, β) this iteration belongs to, from 0.
    """

    iteration: int
    objective: float
    mismatch: float
    grad_rel: float
    grad_norm: float
    krylov_iterations: int
    step: float
    seconds: float
    beta: float = float("nan")
    level: int = 0


class Workload:
    """Counts and seconds of the expensive operations (like CLAIRE's workload log)."""

    def __init__(self):
        self.counts = defaultdict(int)
        self.seconds = defaultdict(float)

    def add(self, name, count=1, seconds=0.0):
        self.counts[name] += count
        self.seconds[name] += seconds

    def timer(self, name):
        return _Timer(self, name)

    def prefixed(self, prefix):
        """A view adding to this workload under ``prefix + name`` (e.g. ``coarse_``)."""
        return _Prefixed(self, prefix)

    def as_dict(self):
        return {name: {"count": self.counts[name], "seconds": round(self.seconds[name], 6)}
                for name in sorted(set(self.counts) | set(self.seconds))}


class _Prefixed:
    def __init__(self, parent, prefix):
        self.parent, self.prefix = parent, prefix

    def add(self, name, count=1, seconds=0.0):
        self.parent.add(self.prefix + name, count, seconds)

    def timer(self, name):
        return _Timer(self, name)

    def prefixed(self, prefix):
        return _Prefixed(self.parent, self.prefix + prefix)


class _Timer:
    def __init__(self, workload, name):
        self.workload, self.name = workload, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.workload.add(self.name, 1, time.perf_counter() - self.t0)
        return False
