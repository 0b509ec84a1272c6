"""The reduced optimal-control problem: objective, gradient and Gauss-Newton Hessian.

DESIGN.md section 1, CLAIRE's sign convention, squared-L2 distance::

    J(v) = 1/2 ||m(1) - m_R||^2 + beta/2 <A v, v>
    g(v) = beta A v + K b,            b  = int_0^1 lam grad m dt,   lam(1)  = m_R - m(1)
    H vt = beta A vt + K int lt grad m dt,                          lt(1)   = -mt(1)

``K`` is the Leray projection for the incompressible variant and the identity otherwise.
Inner products and norms are the L2 ones of ``[0, 2 pi)^3``: the grid sum times the cell
volume ``prod(h_a)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels.spectral import REGULARIZATION_NORMS
from .monitor import Workload

__all__ = ["RegularizationOptions", "RegistrationProblem"]


@dataclass(frozen=True)
class RegularizationOptions:
    """Regularisation of the velocity.

    Attributes
    ----------
    norm : str
        ``h1s`` (default), ``h2s``, ``h3s``, ``h1``, ``h2``, ``h3``, ``l2`` or ``h1s-div``.
    beta : float
        Weight ``beta`` of the regularisation (default 1e-2, CLAIRE's for h1s).
    gamma : float
        Identity weight of the full norms ``h1``, ``h2``, ``h3``.
    beta_div : float
        Weight of ``||div v||^2`` in ``h1s-div``.
    incompressible : bool
        Constrain ``div v = 0`` (Leray projection of gradient and Hessian).
    """

    norm: str = "h1s"
    beta: float = 1e-2
    gamma: float = 1e-4
    beta_div: float = 1e-4
    incompressible: bool = False

    def __post_init__(self):
        if self.norm not in REGULARIZATION_NORMS:
            raise ValueError(f"norm={self.norm!r}: use one of {', '.join(REGULARIZATION_NORMS)}")
        for name in ("beta", "gamma", "beta_div"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")

    @property
    def has_null_space(self):
        """True for the seminorms, whose operator vanishes on constant velocities."""
        return self.norm in ("h1s", "h2s", "h3s", "h1s-div")


class RegistrationProblem:
    """Objective, gradient and Hessian matvec for one image pair (the optimiser's view).

    Parameters
    ----------
    transport : SemiLagrangianTransport
        Carries the decomposition and spectral operators.
    fixed, moving : ndarray ``(*local_shape)``
        Local blocks of the reference ``m_R`` and template ``m_T`` (preprocessed).
    options : RegularizationOptions
    workload : Workload, optional
        Counters and timers to add to.

    Notes
    -----
    :meth:`set_velocity` solves the state equation and stores ``m(t_j)`` and ``grad m(t_j)``
    for all time points once; every gradient and Hessian matvec at that velocity reuses them.
    """

    def __init__(self, transport, fixed, moving, options=None, workload=None):
        self.transport = transport
        self.decomp = transport.decomp
        self.spectral = transport.spectral
        self.options = RegularizationOptions() if options is None else options
        self.workload = Workload() if workload is None else workload
        dtype = self.decomp.dtype
        self.fixed = np.ascontiguousarray(fixed, dtype=dtype)
        self.moving = np.ascontiguousarray(moving, dtype=dtype)
        self.cell_volume = math.prod(self.decomp.spacing)
        self.initial_mismatch = self.norm(self.moving - self.fixed)
        self.velocity = None
        self._state = None
        self._grad_m = None

    # ---------------------------------------------------------- inner products
    def inner(self, a, b):
        """L2 inner product on the box (global)."""
        return self.decomp.inner(a, b) * self.cell_volume

    def norm(self, a):
        return math.sqrt(max(self.inner(a, a), 0.0))

    # ------------------------------------------------------------ operators
    def _reg_kw(self):
        o = self.options
        return dict(beta=o.beta, gamma=o.gamma, beta_div=o.beta_div)

    def regularization(self, v):
        """``beta A v``."""
        with self.workload.timer("regularization"):
            return self.spectral.regularization(v, self.options.norm, **self._reg_kw())

    def apply_inverse_regularization(self, r):
        """``(beta A)^{-1} r`` on the regularisation's range; on its null space (constant
        velocities, for the seminorms) the identity. The spectral preconditioner."""
        with self.workload.timer("preconditioner"):
            out = self.spectral.inverse_regularization(r, self.options.norm, **self._reg_kw())
            if self.options.has_null_space:
                for a in range(3):
                    out[a] += self.decomp.allreduce(float(r[a].sum(dtype=np.float64))) / self.decomp.num_points
            return self.project(out)

    def project(self, v):
        """``K v``: Leray projection when incompressible, else ``v`` itself."""
        if not self.options.incompressible:
            return v
        with self.workload.timer("leray"):
            return self.spectral.leray(v)

    # --------------------------------------------------------------- state
    def set_velocity(self, v):
        """Build the transport plans for ``v`` and solve the state equation (stores ``m(t)``
        and ``grad m(t)`` for the gradient and every Hessian matvec at this ``v``)."""
        v = np.ascontiguousarray(v, dtype=self.decomp.dtype)
        with self.workload.timer("set_velocity"):
            self.transport.set_velocity(v)
        with self.workload.timer("state_solve"):
            self._state = self.transport.solve_state(self.moving)
        with self.workload.timer("state_gradients"):
            self._grad_m = self.transport.state_gradients(self._state)
        self.velocity = v
        self._objective = None

    @property
    def deformed(self):
        """``m(1)``: the moving image deformed by the current velocity."""
        return self._state[-1]

    def objective(self):
        """``J(v)`` at the current velocity, and the relative mismatch."""
        residual = self.deformed - self.fixed
        distance = 0.5 * self.inner(residual, residual)
        reg = 0.5 * self.inner(self.regularization(self.velocity), self.velocity)
        mismatch = math.sqrt(2 * distance) / self.initial_mismatch if self.initial_mismatch > 0 else 0.0
        return distance + reg, mismatch

    def gradient(self):
        """Reduced gradient ``beta A v + K b`` at the current velocity."""
        with self.workload.timer("adjoint_solve"):
            _, body = self.transport.solve_adjoint(self.fixed - self.deformed, self._grad_m)
        return self.project(self.regularization(self.velocity) + body)

    def hessian_matvec(self, v_tilde):
        """Gauss-Newton Hessian applied to ``v_tilde``: two transport solves."""
        with self.workload.timer("hessian_matvec"):
            mt1 = self.transport.solve_incremental_state(v_tilde, self._grad_m)
            body = self.transport.solve_incremental_adjoint(mt1, self._grad_m)
            return self.project(self.regularization(v_tilde) + body)
