"""Preconditioners for the Gauss-Newton system ``H s = -g`` (DESIGN.md section 3).

* ``invreg`` (default): the spectral inverse of the regularisation operator,
  ``(beta A)^{-1}``, exact on the high frequencies where the regularisation dominates ``H``;
  one forward and one inverse FFT per component.
* ``2level``: a two-level (coarse-grid) preconditioner for small β, where the data term makes
  the low frequencies of ``H`` far stiffer than ``beta A``. With ``R`` the spectral restriction
  to a grid coarser by 2, ``P`` the prolongation and ``L = P R`` the projection onto the coarse
  band::

      M^{-1} r = P H_c^{-1} R r  +  (I - L) (beta A)^{-1} r

  ``H_c`` is the Gauss-Newton Hessian of the problem restricted to the coarse grid (its own
  state at ``R v``), inverted inexactly by a few PCG iterations preconditioned with
  ``(beta A_c)^{-1}``. A Krylov inner solve varies between calls, so the outer PCG runs in
  its flexible form (:func:`~claire_py.solvers.krylov.pcg` with ``flexible=True``).
"""

from __future__ import annotations

from .krylov import pcg

__all__ = ["PRECONDITIONERS", "make_preconditioner", "TwoLevelPreconditioner"]

PRECONDITIONERS = ("invreg", "2level")


class TwoLevelPreconditioner:
    """``r -> M^{-1} r`` of the two-level preconditioner (see the module docstring).

    Parameters
    ----------
    problem : RegistrationProblem
    coarse_iterations : int
        PCG iterations of the coarse solve at most.
    coarse_tolerance : float
        Relative residual of the coarse solve.
    """

    flexible = True

    def __init__(self, problem, *, coarse_iterations=10, coarse_tolerance=1e-1):
        self.problem = problem
        shape = tuple(max(n // 2, 4) for n in problem.decomp.shape)
        self.coarse, self.restrict, self.prolong = problem.restricted(shape)
        self.coarse_iterations, self.coarse_tolerance = coarse_iterations, coarse_tolerance
        self._velocity = None
        self.coarse_matvecs = 0

    def _sync(self):
        """Follow the fine problem's velocity (coarse state solve); β is the fine problem's,
        fixed for the problem's life (:meth:`RegistrationProblem.with_beta` makes another)."""
        if self._velocity is not self.problem.velocity:
            self._velocity = self.problem.velocity
            self.coarse.set_velocity(self.restrict(self._velocity))

    def __call__(self, r):
        problem = self.problem
        self._sync()
        with problem.workload.timer("preconditioner_2level"):
            high = problem.apply_inverse_regularization(r)
            high -= self.prolong(self.restrict(high))
            coarse = pcg(self.coarse.hessian_matvec, self.restrict(r), inner=self.coarse.inner,
                         precondition=self.coarse.apply_inverse_regularization, rtol=self.coarse_tolerance,
                         max_iterations=self.coarse_iterations)
            self.coarse_matvecs += coarse.iterations
            high += self.prolong(coarse.solution)
            return problem.project(high)


def make_preconditioner(problem, kind="invreg"):
    """The callable ``r -> M^{-1} r`` of the named preconditioner for ``problem``; its
    ``flexible`` attribute (when present and true) asks the outer PCG for its flexible form."""
    if kind == "invreg":
        return problem.apply_inverse_regularization
    if kind == "2level":
        return TwoLevelPreconditioner(problem)
    raise ValueError(f"preconditioner {kind!r} is unknown; use one of {', '.join(PRECONDITIONERS)}")
