"""Preconditioners for the Gauss-Newton system ``H s = -g``.

``invreg`` (default): the spectral inverse of the regularisation operator, ``(beta A)^{-1}``,
exact on the high frequencies where the regularisation dominates ``H``; applied by the
problem (:meth:`RegistrationProblem.apply_inverse_regularization`), one forward and one inverse
FFT per component. The two-level (coarse-grid) preconditioner joins here later.
"""

__all__ = ["PRECONDITIONERS", "make_preconditioner"]

PRECONDITIONERS = ("invreg",)


def make_preconditioner(problem, kind="invreg"):
    """The callable ``r -> M^{-1} r`` of the named preconditioner for ``problem``."""
    if kind == "invreg":
        return problem.apply_inverse_regularization
    raise ValueError(f"preconditioner {kind!r} is unknown; use one of {', '.join(PRECONDITIONERS)}")
