"""β continuation and β training by the det(∇y) bound (DESIGN.md section 3).

* **β continuation**: solve at β = 1, 1e-1, ... (each an inexact presolve to
  ``presolve_tolerance``) down to the target β, warm-starting every level from the previous
  velocity; the target level is solved to the requested tolerance.
* **β training** ``reduce``: starting at β = 1, divide β by 10 while the solution's map
  respects the bound ``bound <= det(grad y) <= 1/bound``; keep the last feasible β.
  ``binary``: then bisect (geometrically) between the last feasible β and its infeasible tenth
  until the bracket is narrower than ``1e-2`` of the feasible β. The chosen β is solved to the
  requested tolerance and reported.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

from .newton import gauss_newton_krylov

__all__ = ["ContinuationOptions", "solve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuationOptions:
    """Continuation and training of the regularisation weight.

    Attributes
    ----------
    beta_continuation : bool
        Reach the target β through β = 1, 1e-1, ... with inexact presolves.
    train : {None, "reduce", "binary"}
        Choose β by the det(∇y) bound instead of using the configured one.
    det_bound : float
        Lower bound on det(∇y) (the upper bound is its inverse), in (0, 1).
    presolve_tolerance : float
        ``||g||/||g0||`` of the continuation and training presolves.
    min_beta : float
        Smallest β training may reach.
    """

    beta_continuation: bool = False
    train: str | None = None
    det_bound: float = 0.25
    presolve_tolerance: float = 1e-1
    min_beta: float = 1e-6

    def __post_init__(self):
        if self.train not in (None, "reduce", "binary"):
            raise ValueError(f"train={self.train!r}: use None, 'reduce' or 'binary'")
        if not 0 < self.det_bound < 1:
            raise ValueError(f"det_bound={self.det_bound} must lie in (0, 1)")
        if not 0 < self.presolve_tolerance < 1:
            raise ValueError(f"presolve_tolerance={self.presolve_tolerance} must lie in (0, 1)")
        if not self.min_beta > 0:
            raise ValueError(f"min_beta={self.min_beta} must be > 0")


@dataclass
class ContinuationResult:
    velocity: object
    history: list
    converged: bool
    stop_reason: str
    matvecs: int
    beta: float
    levels: list  # (beta, min det, max det, feasible) per training / continuation solve


def _set_beta(problem, beta):
    problem.options = dataclasses.replace(problem.options, beta=beta)


def _det_range(problem):
    det = problem.transport.det_grad_y()
    decomp = problem.decomp
    return decomp.allreduce(float(det.min()), "min"), decomp.allreduce(float(det.max()), "max")


def solve(problem, v0, newton, options, *, callback=None):
    """Gauss-Newton-Krylov with the continuation/training of ``options``.

    Returns a :class:`ContinuationResult` whose ``history`` concatenates every level's
    iterations (each :class:`IterationInfo` carries its β).
    """
    target = problem.options.beta
    presolve = dataclasses.replace(newton, gradient_tolerance=max(options.presolve_tolerance,
                                                                   newton.gradient_tolerance))
    history, matvecs, levels = [], 0, []
    v = v0

    def run(beta, opts):
        nonlocal v, matvecs
        _set_beta(problem, beta)
        res = gauss_newton_krylov(problem, v, opts, callback=callback)
        history.extend(res.history)
        matvecs += res.matvecs
        v = res.velocity
        return res

    if options.train is None:
        if options.beta_continuation:
            beta = 1.0
            while beta > target * 1.0000001:
                log.info("beta continuation: presolve at beta = %.3g", beta)
                run(beta, presolve)
                levels.append((beta, None, None, None))
                beta /= 10
        res = run(target, newton)
        return ContinuationResult(v, history, res.converged, res.stop_reason, matvecs, target, levels)

    bound = options.det_bound

    def feasible_at(beta):
        run(beta, presolve)
        lo, hi = _det_range(problem)
        ok = lo >= bound and hi <= 1.0 / bound
        levels.append((beta, lo, hi, ok))
        log.info("beta training: beta = %.3g, det(grad y) in [%.3f, %.3f] -> %s", beta, lo, hi,
                 "feasible" if ok else "violates the bound")
        return ok

    beta, best, best_v = 1.0, None, None
    while beta >= options.min_beta:
        start = v
        if feasible_at(beta):
            best, best_v = beta, v
            beta /= 10
        else:
            v = start if best_v is None else best_v
            break
    if best is None:
        raise ValueError(f"beta training: even beta = 1 violates the det(grad y) bound {bound}; "
                         "check the images (or lower det_bound)")
    if options.train == "binary" and beta >= options.min_beta:
        lo_beta, hi_beta = best / 10, best  # infeasible, feasible
        while hi_beta - lo_beta > 1e-2 * best:
            mid = math.sqrt(lo_beta * hi_beta)
            v = best_v
            if feasible_at(mid):
                hi_beta, best_v = mid, v
            else:
                lo_beta = mid
        best = hi_beta
    v = best_v
    res = run(best, newton)
    lo, hi = _det_range(problem)
    levels.append((best, lo, hi, lo >= bound and hi <= 1.0 / bound))
    log.info("beta training chose beta = %.3g", best)
    return ContinuationResult(v, history, res.converged, res.stop_reason, matvecs, best, levels)
