"""Preconditioned conjugate gradients with an injected (global) inner product."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels.fields import axpy

__all__ = ["KrylovOptions", "KrylovResult", "pcg"]


@dataclass(frozen=True)
class KrylovOptions:
    """PCG options. ``forcing``: ``superlinear`` (eta = min(0.5, sqrt(||g||/||g0||)), default),
    ``quadratic`` (min(0.5, ||g||/||g0||)) or ``fixed`` (``tolerance``)."""

    max_iterations: int = 50
    forcing: str = "superlinear"
    tolerance: float = 1e-1

    def __post_init__(self):
        if self.forcing not in ("superlinear", "quadratic", "fixed"):
            raise ValueError(f"forcing={self.forcing!r}: use 'superlinear', 'quadratic' or 'fixed'")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= 1")
        if not 0 < self.tolerance < 1:
            raise ValueError(f"tolerance={self.tolerance} must lie in (0, 1)")

    def relative_tolerance(self, grad_rel):
        """The forcing term eta for the current ``||g|| / ||g0||``."""
        if self.forcing == "fixed":
            return self.tolerance
        return min(0.5, math.sqrt(grad_rel) if self.forcing == "superlinear" else grad_rel)


@dataclass(frozen=True)
class KrylovResult:
    solution: np.ndarray
    iterations: int
    relative_residual: float
    converged: bool
    negative_curvature: bool
    #: ``<rhs, solution>`` (e.g. the Newton step's slope ``-<g, s>``), tracked by scalar
    #: recurrences so that the caller need not keep ``rhs`` (see :func:`pcg`).
    rhs_dot_solution: float = 0.0


def pcg(matvec, rhs, *, inner, precondition=None, rtol=1e-1, max_iterations=50, flexible=False, progress=None,
        overwrite_rhs=False, out=None):
    """Solve ``H x = rhs`` for symmetric positive (semi)definite ``H``.

    Parameters
    ----------
    matvec, precondition : callable
        ``H x`` and ``M^{-1} r`` (identity when ``None``).
    rhs : ndarray
    inner : callable
        Global inner product ``inner(a, b) -> float`` (the Decomposition's, so all ranks take
        the same decisions).
    rtol : float
        Stop when ``||r|| <= rtol ||rhs||``.
    max_iterations : int
    flexible : bool
        Use the Polak-Ribiere update ``<r_new, z_new - z_old> / <r_old, z_old>`` (flexible CG),
        which tolerates a preconditioner that varies between iterations (an inner Krylov
        solve, as in the two-level preconditioner); equal to the standard update for a fixed
        linear preconditioner, at the cost of one more inner product.
    progress : callable, optional
        ``progress(iteration, relative_residual)`` after every iteration.
    overwrite_rhs : bool
        ``rhs`` becomes the residual's storage (one vector less; its values are lost).
    out : ndarray, optional
        Storage for the solution (shaped and typed as ``rhs``; zeroed first): a vector the
        caller holds but no longer reads.

    Returns
    -------
    KrylovResult
        On negative curvature the iterate so far (or the preconditioned rhs at the first
        step) is returned with ``negative_curvature=True``. ``rhs_dot_solution = <r, x> +
        <x, H x>`` with ``<x, H x>`` updated exactly by ``<x + a p, H (x + a p)> = <x, H x> +
        2 a <H p, x> + a^2 <p, H p>`` (one inner product per iteration): equal to ``<rhs, x>``
        up to the drift of the recursively updated residual ``r``.
    """
    precondition = precondition or (lambda r: r)
    if out is None:
        x = np.zeros_like(rhs)
    else:
        if out.shape != rhs.shape or out.dtype != rhs.dtype:
            raise ValueError(f"out of shape {out.shape} ({out.dtype}), expected {rhs.shape} ({rhs.dtype})")
        x = out
        x[...] = 0
    norm_rhs = math.sqrt(inner(rhs, rhs))
    r = rhs if overwrite_rhs else rhs.copy()
    del rhs  # a caller's temporary (e.g. -g) is not kept through the solve
    if norm_rhs == 0.0:
        return KrylovResult(x, 0, 0.0, True, False, 0.0)
    z = precondition(r)
    p = z.copy()
    rz = inner(r, z)
    z_old = z if flexible else None
    del z  # live vectors during a matvec: x, r, p, H p (and z_old when flexible)
    res, xhx = 1.0, 0.0
    for it in range(1, max_iterations + 1):
        hp = matvec(p)
        curvature = inner(p, hp)
        if curvature <= 0:
            if it == 1:  # p = M^-1 rhs, and <rhs, p> = <r, z>
                return KrylovResult(p, it, res, False, True, rz)
            return KrylovResult(x, it, res, False, True, inner(r, x) + xhx)
        alpha = rz / curvature
        xhx += 2.0 * alpha * inner(hp, x) + alpha * alpha * curvature
        axpy(alpha, p, x)
        axpy(-alpha, hp, r)
        del hp
        res = math.sqrt(inner(r, r)) / norm_rhs
        if progress is not None:
            progress(it, res)
        if res <= rtol:
            return KrylovResult(x, it, res, True, False, inner(r, x) + xhx)
        z = precondition(r)
        rz_new = inner(r, z)
        beta = (rz_new - inner(r, z_old)) / rz if flexible else rz_new / rz
        p *= beta
        p += z
        rz = rz_new
        z_old = z if flexible else None
        del z
    return KrylovResult(x, max_iterations, res, False, False, inner(r, x) + xhx)
