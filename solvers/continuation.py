"""Continuation: grid, scale and β; β training by the det(∇y) bound (DESIGN.md section 3).

Levels run coarse to fine; every level warm-starts from the previous level's velocity and is
solved inexactly (``presolve_tolerance``) except the last, solved to the requested tolerance.

* **Grid continuation**: the problem restricted spectrally to grids coarser by 2, 4, ... (the
  coarsest with at least ``coarsest_grid`` points along its shortest axis), the velocity
  prolonged spectrally from level to level; as in CLAIRE, each grid's relative gradient
  tolerance is taken against ``||g(v = 0)||`` on that grid, not against its start's gradient.
* **Scale continuation**: on the input grid, images smoothed by σ = 32, 16, 8, 4, 2, 1 voxels
  (those above the configured σ and at most 1/8 of the shortest axis), down to the configured σ.
* **β continuation**: solve at β = 1, 1e-1, ... (each an inexact presolve to
  ``presolve_tolerance``) down to the target β, warm-starting every level from the previous
  velocity; the target level is solved to the requested tolerance.
* **β training** ``reduce``: starting at β = 1, divide β by 10 while the solution's map
  respects the bound ``bound <= det(grad y) <= 1/bound``; keep the last feasible β.
  ``binary``: then bisect (geometrically) between the last feasible β and its infeasible tenth
  until the bracket is narrower than ``1e-2`` of the feasible β. As in CLAIRE, every training
  solve runs to the requested tolerance, warm-started from the best feasible solution, and the
  answer is the solution at the smallest feasible β (the final ``solve`` stage re-evaluates it
  and stops at its first iterate): the map returned is the one whose det(grad y) was checked.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from dataclasses import dataclass

from .newton import NewtonResult, gauss_newton_krylov

__all__ = ["ContinuationOptions", "solve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContinuationOptions:
    """Continuation and training of the regularisation weight.

    Attributes
    ----------
    grid_continuation : bool
        Solve on coarser grids first (multi-resolution), prolonging the velocity.
    coarsest_grid : int
        Points along the shortest axis of the coarsest grid (at least 8).
    scale_continuation : bool
        Solve with more strongly smoothed images first (σ = 32, 16, ... voxels).
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

    grid_continuation: bool = False
    coarsest_grid: int = 16
    scale_continuation: bool = False
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
        if not (isinstance(self.coarsest_grid, int) and self.coarsest_grid >= 8):
            raise ValueError(f"coarsest_grid={self.coarsest_grid!r} must be an integer >= 8")
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
    levels: list  # (beta, min det, max det, feasible) per training / beta-continuation solve
    stages: list  # one dict per solve: level, grid, sigma, beta, iterations, matvecs, converged


def _det_range(problem):
    det = problem.transport.det_grad_y()
    decomp = problem.decomp
    return decomp.allreduce(float(det.min()), "min"), decomp.allreduce(float(det.max()), "max")


SCALES = (32.0, 16.0, 8.0, 4.0, 2.0, 1.0)


def grid_levels(shape, coarsest):
    """Grids coarser by 2, 4, ... than ``shape`` (coarsest first) whose shortest axis keeps at
    least ``coarsest`` points."""
    levels, factor = [], 2
    while min(-(-n // factor) for n in shape) >= coarsest:
        levels.append(tuple(-(-n // factor) for n in shape))
        factor *= 2
    return levels[::-1]


def scale_levels(shape, sigma):
    """Smoothing widths (voxels) of scale continuation above the target ``sigma``."""
    return [s for s in SCALES if s > sigma and s <= min(shape) / 8]


def solve(problem, v0, newton, options, *, callback=None, checkpoint=None):
    """Gauss-Newton-Krylov with the continuation/training of ``options``.

    Returns a :class:`ContinuationResult` whose ``history`` concatenates every level's
    iterations (each :class:`IterationInfo` carries its β and level); ``problem`` is left
    at the final velocity, or, when β training chose a β other than its own, its transport.
    Its options are never changed: each β is solved on
    :meth:`~claire_py.solvers.problem.RegistrationProblem.with_beta`.

    ``problem`` is a :class:`~claire_py.solvers.interfaces.ContinuationProblem`.
    ``checkpoint`` (optional, :class:`~claire_py.solvers.interfaces.CheckpointHooks`) saves
    and restores progress; the solve calls, with ``level``
    the running level number and ``decomp`` that level's decomposition:

    * ``checkpoint.restore(level, decomp)``: ``None``, or a dict ``{"done": True,
      "velocity", "history", "matvecs", "converged", "stop_reason"}`` for a finished level
      (it is not solved again), or ``{"done": False, "velocity", "resume"}`` for an
      interrupted one (continued through ``gauss_newton_krylov(resume=...)``);
    * ``checkpoint.iterate(level, decomp, velocity, resume)`` at every Gauss-Newton iterate;
    * ``checkpoint.level_done(level, decomp, result)`` with the level's ``NewtonResult``.

    Levels are deterministic, so replaying finished levels from their saved velocities and
    continuing the interrupted one repeats the uninterrupted solve.
    """
    target = problem.options.beta
    presolve = dataclasses.replace(newton, gradient_tolerance=max(options.presolve_tolerance,
                                                                   newton.gradient_tolerance))
    history, matvecs, levels, stages = [], 0, [], []
    v = v0

    reference = None  # ||g(v = 0)|| on the input grid, once a warm start needs it

    # after a grid-continuation presolve the input grid often converges at its first iterate:
    # its gradients are then not worth storing (a lower peak; see deferring_gradients)
    fine = problem.deferring_gradients() if options.grid_continuation else problem

    def run_on(p, v_start, beta, opts, what):
        nonlocal matvecs
        on_input_grid = p is problem  # (scale levels are not: their images are smoother)
        p = (fine if on_input_grid else p).with_beta(beta)
        log.info("level %d: %s, grid %s, sigma %g, beta %.3g", len(stages), what,
                 "x".join(map(str, p.decomp.shape)), p.sigma, beta)
        level = len(stages)
        saved = None if checkpoint is None else checkpoint.restore(level, p.decomp)
        if saved is not None and saved["done"]:
            res = NewtonResult(saved["velocity"], saved["history"], saved["converged"], saved["stop_reason"],
                               saved["matvecs"])
            p.set_velocity(res.velocity)
            log.info("level %d restored from the checkpoint", level)
        else:
            resume = None if saved is None else saved["resume"]
            on_iterate = None if checkpoint is None else (
                lambda vk, state: checkpoint.iterate(level, p.decomp, vk, state))
            level_reference = reference if on_input_grid else None
            if what == "grid continuation" and resume is None:
                # as CLAIRE's grid continuation: a coarse grid's tolerance is relative to ||g(v = 0)||
                # on that grid, so that a good prolonged start is not asked to cut its (already
                # small) gradient 20-fold again
                p.set_velocity(p.decomp.new_vector())
                level_reference = p.norm(p.gradient())
            # the start is the previous level's answer, which the next level replaces; beta
            # training restarts from its best answer, which must stay intact
            res = gauss_newton_krylov(p, v_start if saved is None else saved["velocity"], opts, callback=callback,
                                      level=level, reference_gradient=level_reference,
                                      resume=resume, on_iterate=on_iterate, overwrite_start=options.train is None)
            if checkpoint is not None:
                checkpoint.level_done(level, p.decomp, res)
        history.extend(res.history)
        matvecs += res.matvecs
        stages.append({"level": len(stages), "kind": what, "grid": list(p.decomp.shape), "sigma": p.sigma,
                       "beta": beta, "iterations": len(res.history) - 1, "matvecs": res.matvecs,
                       "converged": res.converged})
        return res

    def run(beta, opts, what="solve"):
        nonlocal v
        res = run_on(problem, v, beta, opts, what)
        v = res.velocity
        return res

    v = _coarse_to_fine(problem, v, target, newton, presolve, options, run_on)
    if stages or options.beta_continuation or options.train:
        # ||g(0)|| = ||P b(0)||: independent of beta but for the relaxed model's P; as CLAIRE, one
        # reference (at the configured beta) serves every level
        fine.set_velocity(problem.decomp.new_vector())
        reference = fine.norm(fine.gradient())

    if options.train is None:
        if options.beta_continuation:
            beta = 1.0
            while beta > target * 1.0000001:
                run(beta, presolve, "beta continuation")
                levels.append((beta, None, None, None))
                beta /= 10
        res = run(target, newton)
        return ContinuationResult(v, history, res.converged, res.stop_reason, matvecs, target, levels, stages)

    bound = options.det_bound
    best = None  # (beta, NewtonResult) of the smallest feasible beta so far

    def trial(beta, v_start):
        """Solve at ``beta`` from ``v_start`` to the requested tolerance, as CLAIRE's training
        does, so that the feasibility checked is that of the answer returned."""
        nonlocal v, best
        v = v_start
        res = run(beta, newton, "beta training")
        lo, hi = _det_range(problem)
        ok = res.converged and lo >= bound and hi <= 1.0 / bound
        levels.append((beta, lo, hi, ok))
        log.info("beta training: beta = %.3g, det(grad y) in [%.3f, %.3f] -> %s", beta, lo, hi,
                 "feasible" if ok else ("violates the bound" if res.converged else "not converged"))
        if ok:
            best = (beta, res)
        return ok

    beta = 1.0
    while beta >= options.min_beta and trial(beta, v if best is None else best[1].velocity):
        beta /= 10
    if best is None:
        raise ValueError(f"beta training: even beta = 1 violates the det(grad y) bound {bound}; "
                         "check the images (or lower det_bound)")
    if options.train == "binary" and beta >= options.min_beta:
        lo_beta, hi_beta = beta, best[0]  # infeasible, feasible
        while hi_beta - lo_beta > 1e-2 * hi_beta:
            mid = math.sqrt(lo_beta * hi_beta)
            if trial(mid, best[1].velocity):
                hi_beta = mid
            else:
                lo_beta = mid
    chosen, res = best
    v = res.velocity
    res = run(chosen, newton)  # the chosen solution is converged: this stops at its first iterate
    lo, hi = _det_range(problem)
    levels.append((chosen, lo, hi, lo >= bound and hi <= 1.0 / bound))
    log.info("beta training chose beta = %.3g", chosen)
    return ContinuationResult(v, history, res.converged, res.stop_reason, matvecs, chosen, levels, stages)


def _coarse_to_fine(problem, v, beta, newton, presolve, options, run_on):
    """Presolve the grid levels, then the scale levels, at ``beta``; return the velocity on
    ``problem``'s grid to start its own solve from."""
    if options.grid_continuation:
        grids = grid_levels(problem.decomp.shape, options.coarsest_grid)
        prolong = None
        for shape in grids:
            coarse, restrict, next_prolong = problem.restricted(shape)
            v_start = restrict(v if prolong is None else prolong(v))
            v = run_on(coarse, v_start, beta, newton, "grid continuation").velocity
            prolong = next_prolong
            del coarse, restrict, v_start
            gc.collect()  # the level's FFT objects hold their work arrays in reference cycles (mpi4py-fft)
        if prolong is not None:
            v = problem.project(prolong(v))
    if options.scale_continuation:
        for sigma in scale_levels(problem.decomp.shape, problem.sigma):
            v = run_on(problem.with_smoothing(sigma), v, beta, presolve, "scale continuation").velocity
            gc.collect()  # the level's problem (a whole state history) goes before the next is built
    return v
