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

from ..kernels import fields
from ..kernels.interpolation import GHOST, InterpolationPlan
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
    * ``grad m_j``: spectral in the gradient's adjoint solve (one FFT gradient per time point
      of the stored state); 4th-order central differences of the ghost-padded state, fused
      into the products, in the Gauss-Newton matvec (no gradient fields are stored: 40 bytes
      per point less in float32; CLAIRE's GPU version likewise uses 8th-order differences).
      The matvec stays symmetric: both of its solves use the same differences.
    """

    def __init__(self, decomp, spectral, options=None, workload=None):
        self.decomp = decomp
        self.spectral = spectral
        self.options = TransportOptions() if options is None else options
        self.nt = self.options.nt
        self.dt = 1.0 / self.nt
        self._inv_h = np.array([1.0 / h for h in decomp.spacing])
        self.velocity = None
        self.div_v = None
        self.resolved = True
        self.backward_plan = self.forward_plan = None
        self.workload = Workload() if workload is None else workload
        self._differences = fields.FourthOrderGradient(decomp.spacing, decomp.dtype, GHOST)

    # --------------------------------------------------------------- velocity
    def _plan(self, displacement, kind=None, scale=None):
        """Plan at the points ``x_a + scale_a displacement_a`` (grid units) of the local nodes
        ``x``."""
        kind = self.options.interpolation if kind is None else kind
        with self.workload.timer("interpolation_plan"):
            return InterpolationPlan(self.decomp, displacement, kind=kind, spectral=self.spectral, displacement=True,
                                     scale=scale)

    def _interpolate(self, plan, field, out=None):
        with self.workload.timer("interpolation"):
            out = plan.interpolate(field, out=out)
        if field.ndim == 4:  # count scalar interpolations
            self.workload.add("interpolation", field.shape[0] - 1)
        return out

    def _departure_step(self, sign):
        """RK2 departure-point offsets ``sign dt/2 (v(x) + v(x + sign dt v(x)))`` in grid units
        (``v / h``), in the working precision (the plans form the points ``x + offset`` in
        float64); the Euler plan scales ``v`` itself, so no scaled copy of ``v`` is made."""
        v = self.velocity
        euler = self._plan(v, scale=sign * self.dt * self._inv_h)
        step = self._interpolate(euler, v)
        del euler
        step += v
        step *= (0.5 * sign * self.dt * self._inv_h)[:, None, None, None]
        return step

    def set_velocity(self, v):
        """Build the backward and forward interpolation plans and ``div v`` for velocity
        ``v`` of shape ``(3, *local_shape)`` (physical units). Call once per velocity; the
        previous velocity's plans are released first."""
        if v.shape != (3,) + self.decomp.local_shape:
            raise ValueError(f"velocity of shape {v.shape}, expected {(3,) + self.decomp.local_shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("velocity contains NaN or infinite values")
        self.backward_plan = self.forward_plan = self.div_v = None
        self.velocity = np.ascontiguousarray(v, dtype=self.decomp.dtype)
        self.backward_plan = self._plan(self._departure_step(-1.0))
        self.forward_plan = self._plan(self._departure_step(+1.0))
        self.div_v = self.spectral.divergence(self.velocity)
        #: False when dt/2 |div v| >= 1/2 somewhere: the map compresses or expands a cell by
        #: more than a factor ~3 within one time step and the adjoint's trapezoidal rule
        #: breaks down (the optimiser treats such a velocity as infeasible).
        self.resolved = self.decomp.allreduce(float(np.abs(self.div_v).max()) * 0.5 * self.dt, "max") < 0.5

    def release(self):
        """Drop the plans and ``div v`` (the velocity stays): memory for what follows."""
        self.backward_plan = self.forward_plan = self.div_v = None

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

    def interior(self, padded):
        """The local block inside ghost-padded arrays (a view; any leading axes)."""
        g = GHOST
        return padded[(..., *(slice(g, g + n) for n in self.decomp.local_shape))]

    def padded(self, m):
        """``m`` (``(..., *local_shape)``) with its periodic ghost layers: what
        :meth:`state_history` takes as ``m(0)`` without copying it."""
        return self.decomp.exchange_halo(np.ascontiguousarray(m, dtype=self.decomp.dtype), GHOST)

    def state_history(self, m0):
        """``m(t_j)``, ``j = 0..nt``, as a list of ghost-padded blocks ``local_shape + 4`` with
        their periodic halos filled: what the adjoint and incremental solves read (the
        Hessian's 4th-order differences straight from the padded blocks, see
        :class:`~claire_py.kernels.fields.FourthOrderGradient`). ``m(1) =
        interior(history[-1])``. A padded ``m0`` (see :meth:`padded`) is the list's first
        entry itself (not copied: the state of every velocity shares it)."""
        self._require_velocity()
        padded_shape = tuple(n + 2 * GHOST for n in self.decomp.local_shape)
        first = m0 if m0.shape == padded_shape and m0.dtype == self.decomp.dtype else self.padded(m0)
        later = np.empty((self.nt,) + padded_shape, self.decomp.dtype)
        m = self.interior(later)
        self._interpolate(self.backward_plan, self.interior(first), out=m[0])
        for j in range(1, self.nt):
            self._interpolate(self.backward_plan, m[j - 1], out=m[j])
        self.decomp.exchange_halo(m, GHOST, out=later)
        return [first] + list(later)

    def solve_adjoint(self, lam1, state, body=None, *, differences=False, overwrite=False):
        """Continuity-form adjoint backward from ``lam(1) = lam1``.

        Parameters
        ----------
        lam1 : ndarray ``(*local_shape)``
        state : ndarray
            :meth:`state_history` of the current velocity.
        body : ndarray ``(3, *local_shape)``, optional
            Accumulate the body force into this array (in place) instead of a new one.
        differences : bool
            ``grad m(t_j)`` by 4th-order differences on the padded state (the Gauss-Newton
            matvec) instead of spectrally (the gradient; one FFT gradient per time point).
        overwrite : bool
            ``lam1`` (C-contiguous, working precision) may serve as the solve's work array.

        Returns
        -------
        lam0 : ndarray ``(*local_shape)``
            ``lam(t = 0)``.
        body_force : ndarray ``(3, *local_shape)``
            ``b = int_0^1 lam grad m dt`` (trapezoidal rule over the ``nt + 1`` time points),
            added to ``body`` when given.
        """
        self._require_velocity()
        dtype = self.decomp.dtype
        w = self._quadrature_weights()
        half = 0.5 * self.dt
        usable = overwrite and lam1.dtype == dtype and lam1.flags.c_contiguous and lam1.flags.writeable
        lam = lam1 if usable else np.array(lam1, dtype=dtype, copy=True)
        if body is None:
            body = np.zeros((3,) + self.decomp.local_shape, dtype)
        if differences:
            def accumulate(j, c):
                self._differences.damp_and_accumulate(lam, self.div_v, c, w[j], state[j], body)
        else:
            grad = np.empty((3,) + self.decomp.local_shape, dtype)

            def accumulate(j, c):
                self.spectral.gradient(self.interior(state[j]), out=grad)
                fields.damp_and_accumulate(lam, self.div_v, c, w[j], grad, body)
        accumulate(self.nt, 0.0)  # lam(1) / 1: no damping at the final time
        tmp = np.empty_like(lam)
        for j in range(self.nt - 1, -1, -1):
            fields.times_one_plus(lam, self.div_v, half, out=tmp)
            self._interpolate(self.forward_plan, tmp, out=lam)
            accumulate(j, half)
        return lam, body

    def solve_incremental_state(self, v_tilde, state):
        """``mt(1)`` of the incremental state equation for the perturbation ``v_tilde``
        (``grad m(t_j)`` by 4th-order differences on the padded ``state``)."""
        self._require_velocity()
        dtype = self.decomp.dtype
        half = 0.5 * self.dt
        v_tilde = np.ascontiguousarray(v_tilde, dtype=dtype)
        mt = np.zeros(self.decomp.local_shape, dtype)
        tmp = np.empty_like(mt)
        for j in range(self.nt):
            self._differences.minus_dot_added(mt, half, v_tilde, state[j], out=tmp)  # mt + dt/2 g_j
            self._interpolate(self.backward_plan, tmp, out=mt)
            self._differences.minus_dot_added(mt, half, v_tilde, state[j + 1], out=mt)
        return mt

    def solve_incremental_adjoint(self, mt1, state, body=None):
        """Gauss-Newton incremental adjoint from ``lt(1) = -mt(1)``; returns its body force
        ``int_0^1 lt grad m dt`` (the Hessian matvec's data term; added to ``body`` if given)."""
        return self.solve_adjoint(-mt1, state, body, differences=True)[1]

    # -------------------------------------------------------- derived outputs
    def displacement(self):
        """Displacement ``u = y - x`` of the pull-back deformation map ``y`` in grid units
        (voxels), shape ``(3, *local_shape)``: ``m(x, 1) = m(y(x), 0)``. Composed step by step,
        ``u_{j+1}(x) = u_j(X-(x)) + (X-(x) - x)``."""
        self._require_velocity()
        step = self._departure_step(-1.0)
        u = np.zeros((3,) + self.decomp.local_shape, self.decomp.dtype)
        for _ in range(self.nt):
            self._interpolate(self.backward_plan, u, out=u)
            u += step
        return u

    def det_grad_y(self, displacement=None):
        """``det(grad y)`` of the pull-back map, ``y = x + u`` (``u`` in voxels), from the
        spectral gradient of ``u``: ``(grad y)_ab = delta_ab + h_b du_a/dX_b``."""
        u = self.displacement() if displacement is None else displacement
        grads = [self.spectral.gradient(np.ascontiguousarray(u[a], dtype=self.decomp.dtype)) for a in range(3)]
        return fields.det_identity_plus(grads, self.decomp.spacing, np.empty(self.decomp.local_shape, self.decomp.dtype))

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
            plan = self._plan(self.displacement(), kind="nearest")
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
