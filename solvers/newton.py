"""Inexact Gauss-Newton-Krylov with Armijo backtracking (DESIGN.md section 3)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from .krylov import KrylovOptions, pcg
from .monitor import IterationInfo
from .preconditioner import PRECONDITIONERS, make_preconditioner

__all__ = ["NewtonOptions", "NewtonResult", "gauss_newton_krylov"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewtonOptions:
    """Outer iteration options.

    Attributes
    ----------
    gradient_tolerance : float
        Stop when ``||g|| / ||g0|| <= gradient_tolerance`` (5e-2 default, 1e-2 "accurate").
    absolute_gradient_tolerance : float
        Stop when ``||g|| <= absolute_gradient_tolerance``.
    max_iterations : int
        Gauss-Newton iterations.
    max_line_search : int
        Armijo backtracking halvings before giving up.
    armijo : float
        Sufficient-decrease constant ``c`` in ``J(v + a s) <= J(v) + c a <g, s>``.
    stagnation_tolerance : float
        Stop (keeping the current, best, iterate) when two successive iterations each lower
        ``J`` by less than this fraction of ``J``: the solve is stagnating (e.g. β far too
        small for the images).
    preconditioner : str
        ``invreg``: the spectral ``(beta A)^{-1}``; ``2level``: coarse-grid Hessian solve on
        the low frequencies plus ``(beta A)^{-1}`` on the high ones (for small β).
    keep_gradient : bool
        The relaxed model's Armijo slope ``dJ[s] = <g, P^-1 s>`` needs ``g`` after the Krylov
        solve (the other models' slope comes from PCG's recurrences): keep it through the
        solve (3 fields at the matvec peak), or recompute it afterwards (one adjoint solve
        more per iteration; same results). Turned off when memory is short.
    krylov : KrylovOptions
    """

    gradient_tolerance: float = 5e-2
    absolute_gradient_tolerance: float = 1e-6
    max_iterations: int = 50
    max_line_search: int = 10
    armijo: float = 1e-4
    stagnation_tolerance: float = 1e-6
    preconditioner: str = "invreg"
    keep_gradient: bool = True
    krylov: KrylovOptions = field(default_factory=KrylovOptions)

    def __post_init__(self):
        if not 0 < self.gradient_tolerance < 1:
            raise ValueError(f"gradient_tolerance={self.gradient_tolerance} must lie in (0, 1)")
        if not 0 <= self.stagnation_tolerance < 1:
            raise ValueError(f"stagnation_tolerance={self.stagnation_tolerance} must lie in [0, 1)")
        if self.max_iterations < 0:
            raise ValueError(f"max_iterations={self.max_iterations} must be >= 0")
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner={self.preconditioner!r}: use one of {', '.join(PRECONDITIONERS)}")


class _Progress:
    """Logs PCG's progress when a Newton step takes long (a line every ~10 s), so that a
    large run shows it is alive between the per-iteration lines."""

    def __init__(self, target, every=10.0):
        self.target, self.every, self.last = target, every, time.perf_counter()

    def __call__(self, iteration, residual):
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info("      pcg iteration %d: relative residual %.2e (target %.2e)", iteration, residual,
                     self.target)


@dataclass
class NewtonResult:
    velocity: np.ndarray
    history: list
    converged: bool
    stop_reason: str
    matvecs: int


def gauss_newton_krylov(problem, v0, options=None, *, callback=None, level=0, reference_gradient=None,
                        resume=None, on_iterate=None, overwrite_start=False):
    """Minimise the problem's objective from ``v0``.

    Parameters
    ----------
    problem : OptimizationProblem
        Any :class:`~claire_py.solvers.interfaces.OptimizationProblem` (e.g. a
        :class:`~claire_py.solvers.problem.RegistrationProblem`): ``set_velocity``,
        ``objective``, ``gradient``, ``hessian_matvec``, ``apply_inverse_regularization``,
        ``project``, ``inner``, ``norm``, ``directional_derivative`` (the Armijo slope ``dJ[s]``
        from the gradient) and ``symmetric_hessian`` (whether ``<g, s>`` is that slope and
        PCG's recurrences hold).
    v0 : ndarray ``(3, *local_shape)``
    options : NewtonOptions
    callback : callable, optional
        Called with an :class:`IterationInfo` after every iteration (rank-collective).
    level : int
        Continuation level recorded in every :class:`IterationInfo`.
    reference_gradient : float, optional
        ``||g0||`` of the relative stopping test and forcing term; default: the gradient
        norm at ``v0``. Continuation passes the norm at ``v = 0`` (as CLAIRE does), so that a
        warm start is not asked to reduce an already small gradient by the same factor.
    resume : dict, optional
        Continue an interrupted solve whose iterate ``v0`` was reached at iteration
        ``resume["iteration"]``: also ``g0``, ``history`` (the iterations before it),
        ``matvecs``, ``krylov_iterations`` and ``step`` as passed to ``on_iterate``. The
        iterations then repeat those of the uninterrupted solve.
    on_iterate : callable, optional
        ``on_iterate(v, resume)`` at every iterate before its step is computed, with the
        ``resume`` dict that would continue from ``v`` (checkpointing).
    overwrite_start : bool
        ``v0`` may serve as a work vector once the solve has left it (its values are then
        lost): the vector a caller holds through the call costs no memory of its own.

    Returns
    -------
    NewtonResult
    """
    options = NewtonOptions() if options is None else options
    t0 = time.perf_counter()
    v = problem.project(np.asarray(v0, dtype=problem.decomp.dtype))  # never modified in place: no copy
    problem.set_velocity(v)
    objective, mismatch = problem.objective()
    history, matvecs, first = [], 0, 0
    g = problem.gradient()
    gnorm = problem.norm(g)
    g0 = gnorm if reference_gradient is None else reference_gradient
    krylov_its, step = 0, 0.0
    if resume is not None:
        first, g0, matvecs = resume["iteration"], resume["g0"], resume["matvecs"]
        history, krylov_its, step = list(resume["history"]), resume["krylov_iterations"], resume["step"]
        reference_gradient = g0
    precondition = make_preconditioner(problem, options.preconditioner)
    spare = None  # the storage of the iterate left last, for the next Krylov solution
    stop_reason, converged = None, False
    for it in range(first, options.max_iterations + 1):
        grad_rel = gnorm / g0 if g0 > 0 else 0.0
        info = IterationInfo(it, objective, mismatch, grad_rel, gnorm, krylov_its, step, time.perf_counter() - t0,
                             problem.options.beta, level)
        history.append(info)
        log.info("%4d  %12.6e  %9.3e  %9.3e  %4d  %6.3f  %8.2f", it, objective, mismatch, grad_rel,
                 krylov_its, step, info.seconds)
        if callback is not None:
            callback(info)
        if gnorm <= options.absolute_gradient_tolerance:
            stop_reason, converged = f"||g|| = {gnorm:.2e} <= {options.absolute_gradient_tolerance:g}", True
            break
        if (it > 0 or reference_gradient is not None) and grad_rel <= options.gradient_tolerance:
            stop_reason, converged = f"||g||/||g0|| = {grad_rel:.2e} <= {options.gradient_tolerance:g}", True
            break
        if it == options.max_iterations:
            stop_reason = f"reached the maximum of {options.max_iterations} Gauss-Newton iterations"
            break
        if len(history) >= 3 and all(a.objective - b.objective <= options.stagnation_tolerance * abs(a.objective)
                                     for a, b in zip(history[-3:-1], history[-2:])):
            stop_reason = (f"stagnated: the last two iterations lowered J by less than {options.stagnation_tolerance:g} "
                           "of J (beta too small for these images?)")
            break
        if on_iterate is not None:
            on_iterate(v, {"iteration": it, "g0": g0, "history": history[:-1], "matvecs": matvecs,
                           "krylov_iterations": krylov_its, "step": step})
        eta = options.krylov.relative_tolerance(grad_rel)
        if problem.symmetric_hessian or not options.keep_gradient:
            rhs, g = g, None  # -g becomes PCG's residual: one vector less during the matvecs
            rhs *= -1
        else:  # the relaxed model's slope <g, P^-1 s> needs g after the solve
            rhs = -g
        krylov = pcg(problem.hessian_matvec, rhs, inner=problem.inner,
                     precondition=precondition, rtol=eta,
                     max_iterations=options.krylov.max_iterations,
                     flexible=getattr(precondition, "flexible", False), progress=_Progress(eta),
                     overwrite_rhs=True, out=spare)
        del rhs
        spare = None
        matvecs += krylov.iterations
        krylov_its = krylov.iterations
        s = krylov.solution
        # dJ[s]: <g, s> from PCG's exact recurrences when H is symmetric (L2), else computed
        if problem.symmetric_hessian:
            slope = -krylov.rhs_dot_solution
        else:
            krylov = None  # PCG's vectors go before g is recomputed (the state is still v's)
            g = problem.gradient() if g is None else g
            slope = problem.directional_derivative(g, s)
        krylov = None
        if slope >= 0 or not np.isfinite(slope):  # not a descent direction (should not happen): use -g
            s = problem.gradient() if g is None else g
            s *= -1
            slope = problem.directional_derivative(-s, s)
        g = None
        step = 1.0
        for _ in range(options.max_line_search):
            trial = None  # the previous trial goes before the next is made
            trial = s * step
            trial += v
            problem.set_velocity(trial)
            trial_objective, trial_mismatch = problem.objective()
            if trial_objective <= objective + options.armijo * step * slope:
                break
            step *= 0.5
        else:
            problem.set_velocity(v)
            stop_reason = (f"line search failed after {options.max_line_search} halvings (no step lowers J); "
                           "keeping the best iterate")
            break
        s = None  # the step goes before the next Krylov solve (whose solution takes the left iterate's storage)
        previous, v, objective, mismatch = v, trial, trial_objective, trial_mismatch
        spare = previous if previous is not v0 or overwrite_start else None
        previous = None
        g = problem.gradient()
        gnorm = problem.norm(g)
        if not np.isfinite(gnorm):
            history.append(IterationInfo(it + 1, objective, mismatch, float("nan"), gnorm, krylov_its, step,
                                         time.perf_counter() - t0, problem.options.beta, level))
            stop_reason = "the gradient is not finite (diverging solve; increase beta or nt); keeping this iterate"
            break
    return NewtonResult(velocity=v, history=history, converged=converged, stop_reason=stop_reason, matvecs=matvecs)
