"""Semi-Lagrangian transport along the characteristics of a stationary velocity.

The four PDE solves of the optimality system (DESIGN.md section 1), on ``t in [0, 1]`` with
``nt`` steps of ``dt = 1/nt``, plus the deformation map and transport of images and labels.
Velocities are in physical units of the box ``[0, 2 pi)^3`` (radians per unit time);
departure points, displacements and deformation maps are in grid units (voxels).

Characteristics (RK2, the same at every step because ``v`` is stationary)::

    backward:  X-(x) = x - dt/2 (v(x) + v(x - dt v(x)))     state, incremental state
    forward:   X+(x) = x + dt/2 (v(x) + v(x + dt v(x)))     adjoint, incremental adjoint

Their interpolation plans are built once per velocity by :meth:`set_velocity` and reused by
every solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels.interpolation import InterpolationPlan
from .monitor import Workload

__all__ = ["TransportOptions", "SemiLagrangianTransport"]


@dataclass(frozen=True)
class TransportOptions:
    """Options of the transport solver.

    Attributes
    ----------
    nt : int
        Number of time steps on ``[0, 1]`` (CLAIRE's default 4).
    interpolation : {"lagrange", "bspline"}
        Tricubic Lagrange (default) or cubic B-spline with spectral prefilter.
    """

    nt: int = 4
    interpolation: str = "lagrange"

    def __post_init__(self):
        if not isinstance(self.nt, (int, np.integer)) or self.nt < 1:
            raise ValueError(f"nt={self.nt!r} must be an integer >= 1")
        if self.interpolation not in ("lagrange", "bspline"):
            raise ValueError(f"interpolation={self.interpolation!r}: use 'lagrange' or 'bspline'")


class SemiLagrangianTransport:
    """State, adjoint and incremental transport solves for one velocity at a time.

    Parameters
    ----------
    decomp : Decomposition
    spectral : SpectralOperators
        On the same decomposition (divergence, gradients, B-spline prefilter).
    options : TransportOptions, optional
    workload : Workload, optional
        Where plan builds and interpolations are counted and timed.

    Notes
    -----
    * State: ``m_{j+1}(x) = m_j(X-(x))``; all ``nt + 1`` time points are returned.
    * Adjoint (continuity form) ``-d_t lam - div(lam v) = 0`` backward from ``lam(1)``: along
      forward characteristics ``d lam / dt = -lam div v``, integrated with the trapezoidal rule,
      ``lam_j(x) (1 - dt/2 div v(x)) = [lam_{j+1} (1 + dt/2 div v)](X+(x))``. The body force
      ``b = int_0^1 lam grad m dt`` is accumulated on the fly (trapezoidal rule in time).
    * Incremental state ``d_t mt + v . grad mt = -vt . grad m`` from ``mt(0) = 0``:
      ``mt_{j+1}(x) = [mt_j + dt/2 g_j](X-(x)) + dt/2 g_{j+1}(x)``, ``g_j = -vt . grad m_j``.
    * Incremental adjoint (Gauss-Newton form): the adjoint solve from ``-mt(1)``.
    """

    def __init__(self, decomp, spectral, options=None, workload=None):
        self.decomp = decomp
        self.spectral = spectral
        self.options = TransportOptions() if options is None else options
        self.nt = self.options.nt
        self.dt = 1.0 / self.nt
        self._inv_h = np.array([1.0 / h for h in decomp.spacing])
        # grid-unit coordinates of the local nodes, one broadcastable array per axis
        self._axes = np.ix_(*[np.arange(s.start, s.stop, dtype=np.float64) for s in decomp.real_slice])
        self.velocity = None
        self.div_v = None
        self.resolved = True
        self.backward_plan = self.forward_plan = None
        self._backward_step = None  # X- - x in grid units
        self.workload = Workload() if workload is None else workload

    # --------------------------------------------------------------- velocity
    def _plan(self, points, kind=None):
        kind = self.options.interpolation if kind is None else kind
        with self.workload.timer("interpolation_plan"):
            return InterpolationPlan(self.decomp, points, kind=kind, spectral=self.spectral)

    def _interpolate(self, plan, field, out=None):
        with self.workload.timer("interpolation"):
            out = plan.interpolate(field, out=out)
        if field.ndim == 4:  # count scalar interpolations
            self.workload.add("interpolation", field.shape[0] - 1)
        return out

    def _nodes_plus(self, w):
        """``x + w`` for a vector field ``w`` in grid units (float64)."""
        return np.stack([self._axes[a] + w[a] for a in range(3)])

    def _characteristic(self, v_grid, sign):
        """RK2 departure-point offsets ``sign dt/2 (v(x) + v(x + sign dt v(x)))`` (grid units)."""
        v_euler = self._interpolate(self._plan(self._nodes_plus(sign * self.dt * v_grid)), v_grid)
        return (0.5 * sign * self.dt) * (v_grid + v_euler)

    def set_velocity(self, v):
        """Build the backward and forward interpolation plans and ``div v`` for velocity
        ``v`` of shape ``(3, *local_shape)`` (physical units). Call once per velocity."""
        if v.shape != (3,) + self.decomp.local_shape:
            raise ValueError(f"velocity of shape {v.shape}, expected {(3,) + self.decomp.local_shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("velocity contains NaN or infinite values")
        self.velocity = v
        v_grid = v.astype(np.float64) * self._inv_h[:, None, None, None]
        step = self._characteristic(v_grid, -1.0)
        self.backward_plan = self._plan(self._nodes_plus(step))
        self._backward_step = step.astype(self.decomp.dtype)
        self.forward_plan = self._plan(self._nodes_plus(self._characteristic(v_grid, +1.0)))
        self.div_v = self.spectral.divergence(v)
        # trapezoidal rule of the adjoint's div v source along a characteristic (see Notes)
        half = 0.5 * self.dt
        #: False when dt/2 |div v| >= 1/2 somewhere: the map compresses or expands a cell by
        #: more than a factor ~3 within one time step and the adjoint's trapezoidal rule
        #: breaks down (the optimiser treats such a velocity as infeasible).
        self.resolved = self.decomp.allreduce(float(np.abs(half * self.div_v).max()), "max") < 0.5
        self._adjoint_source = (1.0 + half * self.div_v).astype(self.decomp.dtype)
        self._adjoint_damping = (1.0 / (1.0 - half * self.div_v)).astype(self.decomp.dtype)

    def _require_velocity(self):
        if self.backward_plan is None:
            raise RuntimeError("call set_velocity(v) before solving")

    def _quadrature_weights(self):
        """Trapezoidal weights as Python floats: a float64 numpy scalar would promote the
        float32 body force (and from it the whole Krylov solve) to float64 (NumPy 2)."""
        return [0.5 * self.dt] + [self.dt] * (self.nt - 1) + [0.5 * self.dt]

    # ------------------------------------------------------------------ solves
    def solve_state(self, m0, out=None):
        """Transport ``m0`` forward: returns ``m`` of shape ``(nt + 1, *local_shape)`` with
        ``m[j] = m(t_j)``, ``m[0] = m0``."""
        self._require_velocity()
        hist = np.empty((self.nt + 1,) + self.decomp.local_shape, self.decomp.dtype) if out is None else out
        hist[0] = m0
        for j in range(self.nt):
            self._interpolate(self.backward_plan, hist[j], out=hist[j + 1])
        return hist

    def state_gradients(self, m_hist, out=None):
        """``grad m(t_j)`` for every stored time: shape ``(nt + 1, 3, *local_shape)``. Compute
        once per velocity (outer iteration) and pass to the other solves."""
        out = np.empty((m_hist.shape[0], 3) + self.decomp.local_shape, self.decomp.dtype) if out is None else out
        for j, m in enumerate(m_hist):
            self.spectral.gradient(m, out=out[j])
        return out

    def solve_adjoint(self, lam1, grad_m):
        """Continuity-form adjoint backward from ``lam(1) = lam1``.

        Returns
        -------
        lam0 : ndarray ``(*local_shape)``
            ``lam(t = 0)``.
        body_force : ndarray ``(3, *local_shape)``
            ``b = int_0^1 lam grad m dt`` (trapezoidal rule over the ``nt + 1`` time points).
        """
        self._require_velocity()
        w = self._quadrature_weights()
        lam = np.array(lam1, dtype=self.decomp.dtype, copy=True)
        body = (w[self.nt] * lam) * grad_m[self.nt]
        tmp = np.empty_like(lam)
        for j in range(self.nt - 1, -1, -1):
            np.multiply(lam, self._adjoint_source, out=tmp)
            self._interpolate(self.forward_plan, tmp, out=lam)
            lam *= self._adjoint_damping
            body += (w[j] * lam) * grad_m[j]
        return lam, body

    def solve_incremental_state(self, v_tilde, grad_m):
        """``mt(1)`` of the incremental state equation for the perturbation ``v_tilde``."""
        self._require_velocity()
        half = 0.5 * self.dt
        g = -np.einsum("a...,a...->...", v_tilde, grad_m[0])
        mt = np.zeros(self.decomp.local_shape, self.decomp.dtype)
        for j in range(self.nt):
            self._interpolate(self.backward_plan, (mt + half * g).astype(self.decomp.dtype), out=mt)
            g = -np.einsum("a...,a...->...", v_tilde, grad_m[j + 1])
            mt += half * g
        return mt

    def solve_incremental_adjoint(self, mt1, grad_m):
        """Gauss-Newton incremental adjoint from ``lt(1) = -mt(1)``; returns its body force
        ``int_0^1 lt grad m dt`` (the Hessian matvec's data term)."""
        return self.solve_adjoint(-mt1, grad_m)[1]

    # -------------------------------------------------------- derived outputs
    def displacement(self):
        """Displacement ``u = y - x`` of the pull-back deformation map ``y`` in grid units
        (voxels), shape ``(3, *local_shape)``: ``m(x, 1) = m(y(x), 0)``. Composed step by step,
        ``u_{j+1}(x) = u_j(X-(x)) + (X-(x) - x)``."""
        self._require_velocity()
        u = np.zeros((3,) + self.decomp.local_shape, self.decomp.dtype)
        for _ in range(self.nt):
            self._interpolate(self.backward_plan, u, out=u)
            u += self._backward_step
        return u

    def deformation_map(self):
        """``y(x) = x + u(x)`` in grid units, float64 (not wrapped: ``y`` may leave ``[0, N)``)."""
        return self._nodes_plus(self.displacement())

    def det_grad_y(self, displacement=None):
        """``det(grad y)`` of the pull-back map, ``y = x + u`` (``u`` in voxels), from the
        spectral gradient of ``u``: ``(grad y)_ab = delta_ab + h_b du_a/dX_b``."""
        u = self.displacement() if displacement is None else displacement
        h = self.decomp.spacing
        jac = np.empty((3, 3) + self.decomp.local_shape, np.float64)
        for a in range(3):
            grad = self.spectral.gradient(u[a])
            for b in range(3):
                jac[a, b] = (a == b) + h[b] * grad[b]
        det = (jac[0, 0] * (jac[1, 1] * jac[2, 2] - jac[1, 2] * jac[2, 1])
               - jac[0, 1] * (jac[1, 0] * jac[2, 2] - jac[1, 2] * jac[2, 0])
               + jac[0, 2] * (jac[1, 0] * jac[2, 1] - jac[1, 1] * jac[2, 0]))
        return det.astype(self.decomp.dtype)

    def transport_image(self, image):
        """``image(y(x))``: the image deformed by the velocity (the state at ``t = 1``)."""
        self._require_velocity()
        m = np.array(image, dtype=self.decomp.dtype, copy=True)
        for _ in range(self.nt):
            self._interpolate(self.backward_plan, m, out=m)
        return m

    def transport_labels(self, labels, *, method="nearest"):
        """Deform an integer label map.

        ``nearest``: ``labels`` at the grid node nearest to ``y(x)`` (one plan, labels stay
        exactly the input's). ``probability``: each label's indicator is transported like an
        image and the most probable label wins (smoother boundaries; cost one transport per
        label value).
        """
        self._require_velocity()
        labels = np.asarray(labels)
        if method == "nearest":
            plan = self._plan(self.deformation_map(), kind="nearest")
            out = self._interpolate(plan, labels.astype(self.decomp.dtype))
            return np.rint(out).astype(labels.dtype)
        if method != "probability":
            raise ValueError(f"label transport method {method!r}: use 'nearest' or 'probability'")
        values = np.unique(np.concatenate(self.decomp.allgather(np.unique(labels))))
        best = np.full(self.decomp.local_shape, -np.inf, self.decomp.dtype)
        out = np.zeros(self.decomp.local_shape, labels.dtype)
        for value in values:
            p = self.transport_image((labels == value).astype(self.decomp.dtype))
            better = p > best
            out[better] = value
            best[better] = p[better]
        return out
