"""Semi-Lagrangian transport along the characteristics of a stationary velocity.

The four PDE solves of the optimality system (DESIGN.md section 1), on ``t in [0, 1]`` with
``nt`` steps of ``dt = 1/nt``, plus the deformation map and transport of images and labels.
Velocities are in physical units of the box ``[0, 2 pi)^3`` (radians per unit time);
departure points, displacements and deformation maps are in grid units (voxels).

Characteristics (RK2, the same at every step because ``v`` is stationary)::

    backward:  X-(x) = x - dt/2 (v(x) + v(x - dt v(x)))     state, incremental state
    forward:   X+(x) = x + dt/2 (v(x) + v(x + dt v(x)))     adjoint, incremental adjoint

Their interpolation plans are built once per velocity by :meth:`set_velocity` and reused by
every solve. The adjoints, which change along a characteristic by ``dlam/dt = lam div v``,
take CLAIRE's explicit Heun step (:func:`~claire_py.kernels.fields.heun_factor`), whose factor
is also computed once per velocity; the Jacobian determinant is the exponential of the
transported integral of ``-div v``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels import fields
from ..kernels.interpolation import IdentityPlan, InterpolationPlan
from .monitor import Workload

__all__ = ["TransportOptions", "SemiLagrangianTransport", "StateHistory"]


@dataclass(frozen=True)
class TransportOptions:
    """Options of the transport solver.

    Attributes
    ----------
    nt : int
        Number of time steps on ``[0, 1]`` (CLAIRE's default 4).
    interpolation : {"lagrange", "bspline"}
        Tricubic Lagrange (default) or cubic B-spline with spectral prefilter.
    store_gradients : bool
        Keep ``grad m(t_j)`` of the current velocity (``3 (nt + 1)`` fields per image
        component, in place of the state's ``nt - 1`` inner time points) so that every
        Gauss-Newton matvec reads them, instead of recomputing them by FFT at every use
        (``2 (nt + 1)`` spectral gradients per matvec: 2.9x the matvec time at 128^3 and 256^3,
        2.5x on the bundled 2 mm pair, measured on 2 ranks). Same results either way.
        Coarser grids made from this one (grid continuation, the two-level preconditioner)
        store them anyway (:meth:`~claire_py.solvers.problem.RegistrationProblem.restricted`).
    """

    nt: int = 4
    interpolation: str = "lagrange"
    store_gradients: bool = True

    def __post_init__(self):
        if not isinstance(self.nt, (int, np.integer)) or self.nt < 1:
            raise ValueError(f"nt={self.nt!r} must be an integer >= 1")
        if self.interpolation not in ("lagrange", "bspline"):
            raise ValueError(f"interpolation={self.interpolation!r}: use 'lagrange' or 'bspline'")
        if not isinstance(self.store_gradients, bool):
            raise ValueError(f"store_gradients={self.store_gradients!r} must be true or false")


class StateHistory:
    """``m(t_j)``, ``j = 0..nt``, of one image at one velocity, and its spectral gradients.

    What the gradient's adjoint solve and every Gauss-Newton matvec at that velocity read:
    ``history[j]`` is ``m(t_j)`` (``(*local_shape)``), :attr:`final` is ``m(1)``, and
    :meth:`gradient` is ``grad m(t_j)``, the spectral gradient, so that the Hessian
    differentiates ``m`` exactly as the gradient does.

    Parameters
    ----------
    fields : list of nt + 1 arrays ``(*local_shape)``
        ``m(t_j)``; ``fields[0]`` may be shared (the problem's moving image), and one array
        may stand for several time points (at ``v = 0`` all are ``m(0)``): its gradient is
        then computed once.
    spectral : SpectralOperators
    store_gradients : bool
        Keep each ``grad m(t_j)`` once computed (3 fields per time point) and drop the
        ``m(t_j)`` of ``0 < j < nt``, which nothing reads after that; otherwise recompute
        ``grad m(t_j)`` (one forward and three inverse FFTs) at every use.
    spare : list of arrays ``(3, *local_shape)``, optional
        Arrays to store the gradients in (taken from the list), e.g. the previous velocity's
        (:meth:`take_gradients`): touching fresh memory for them cost as much as the FFTs.
    """

    def __init__(self, fields, spectral, *, store_gradients=True, spare=None):
        self._fields = list(fields)
        self.spectral = spectral
        self.store_gradients = bool(store_gradients)
        self._gradients = [None] * len(self._fields)
        self._spare = [] if spare is None else spare
        self._work = self._work_of = None  # a gradient computed for one use, and the field it is of

    def take_gradients(self):
        """The stored gradient arrays (for another state to reuse), each once; this state
        keeps none."""
        taken = list({id(g): g for g in self._gradients if g is not None}.values())
        self._gradients = [None] * len(self._fields)
        return taken

    def __len__(self):
        return len(self._fields)

    def __getitem__(self, j):
        m = self._fields[j]
        if m is None:
            raise RuntimeError(f"m(t_{j}) was released once its gradient was stored")
        return m

    @property
    def final(self):
        """``m(1)``."""
        return self._fields[-1]

    def gradient(self, j, *, store=True):
        """``grad m(t_j)``, ``(3, *local_shape)``: stored, or computed into a work array that
        the next call overwrites (when ``store_gradients`` is off, or ``store`` is false:
        e.g. for a gradient that may be the last use of this state)."""
        g = self._gradients[j]
        if g is not None:
            return g
        m = self[j]
        if self.store_gradients and store:
            self._work = self._work_of = None  # (what an unstored gradient was computed in)
            # one array may stand for several time points (v = 0): its gradient is stored once
            g = next((self._gradients[i] for i, f in enumerate(self._fields) if f is m and self._gradients[i] is not None),
                     None)
            if g is None:
                g = self.spectral.gradient(m, out=self._spare.pop() if self._spare else None)
            self._gradients[j] = g
            if 0 < j < len(self._fields) - 1:
                self._fields[j] = None
            return g
        if self._work is None:
            self._work = self.spectral.decomp.new_vector(zeroed=False)
        elif self._work_of is m:
            return self._work
        self._work_of = m
        return self.spectral.gradient(m, out=self._work)


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
    CLAIRE's semi-Lagrangian schemes (its ``SolveStateEquationSL``,
    ``SolveAdjointEquationSL``, ``SolveIncStateEquationSL``, ``SolveIncAdjointEquationGNSL``
    and ``ComputeDetDefGradSL``):

    * State: ``m_{j+1}(x) = m_j(X-(x))``; all ``nt + 1`` time points are kept.
    * Adjoint (continuity form) ``-d_t lam - div(lam v) = 0`` backward from ``lam(1)``: along
      forward characteristics ``d lam / d(-t) = lam div v``, one explicit Heun step per time
      step, ``lam_j(x) = F+(x) lam_{j+1}(X+(x))`` with ``F+ = 1 + dt/2 (d(X+) + d) + dt^2/2
      d(X+) d``, ``d = div v`` (:func:`~claire_py.kernels.fields.heun_factor`). The body force
      ``b = int_0^1 lam grad m dt`` is accumulated on the fly (trapezoidal rule in time).
    * Incremental state ``d_t mt + v . grad mt = -vt . grad m`` from ``mt(0) = 0``:
      ``mt_{j+1}(x) = [mt_j + dt/2 g_j](X-(x)) + dt/2 g_{j+1}(x)``, ``g_j = -vt . grad m_j``.
    * Incremental adjoint (Gauss-Newton form): the adjoint solve from ``-mt(1)``.
    * ``grad m_j``: spectral everywhere, from the :class:`StateHistory` (the gradient's
      adjoint and the Gauss-Newton matvec differentiate the same way, so the matvec is the
      derivative of the discrete gradient's data term, up to the Gauss-Newton omission).
    * ``det(grad y)``: ``d_t J + v . grad J = -J div v`` from ``J(0) = 1`` along the backward
      characteristics, as ``J = exp(I)`` with the transported trapezoidal integral ``I`` of
      ``-div v`` (CLAIRE transports ``J`` with ``+J div v``, the determinant of the inverse
      map, by Heun steps).
    """

    def __init__(self, decomp, spectral, options=None, workload=None):
        self.decomp = decomp
        self.spectral = spectral
        self.options = TransportOptions() if options is None else options
        self.nt = self.options.nt
        self.dt = 1.0 / self.nt
        self._inv_h = np.array([1.0 / h for h in decomp.spacing])
        self.velocity = None
        self.adjoint_factor = None
        self.backward_plan = self.forward_plan = None
        self.workload = Workload() if workload is None else workload

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
        """Build the backward and forward interpolation plans and the adjoint's Heun factor for
        velocity ``v`` of shape ``(3, *local_shape)`` (physical units). Call once per
        velocity; the previous velocity's plans are released first."""
        if v.shape != (3,) + self.decomp.local_shape:
            raise ValueError(f"velocity of shape {v.shape}, expected {(3,) + self.decomp.local_shape}")
        if not np.all(np.isfinite(v)):
            raise ValueError("velocity contains NaN or infinite values")
        self.backward_plan = self.forward_plan = self.adjoint_factor = None
        self.velocity = np.ascontiguousarray(v, dtype=self.decomp.dtype)
        if self.decomp.allreduce(float(np.abs(self.velocity).max(initial=0.0)), "max") == 0.0:
            # v = 0 (every solve's first iterate): the characteristics stay put and div v = 0
            self.backward_plan = self.forward_plan = IdentityPlan(self.decomp)
            self.adjoint_factor = np.ones(self.decomp.local_shape, self.decomp.dtype)
            return
        self.backward_plan = self._plan(self._departure_step(-1.0))
        self.forward_plan = self._plan(self._departure_step(+1.0))
        d = self.spectral.divergence(self.velocity)
        self.adjoint_factor = fields.heun_factor(self._interpolate(self.forward_plan, d), d, 1.0, self.dt, d)

    def release(self):
        """Drop the plans and the adjoint factor (the velocity stays): memory for what follows."""
        self.backward_plan = self.forward_plan = self.adjoint_factor = None

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

    def state_history(self, m0, *, store_gradients=None, spare=None):
        """:class:`StateHistory` of ``m0`` (``(*local_shape)``, the working precision: kept as
        ``m(t_0)`` itself, not copied, so that every velocity's state shares it);
        ``store_gradients`` defaults to the options', ``spare`` as in :class:`StateHistory`."""
        store_gradients = self.options.store_gradients if store_gradients is None else store_gradients
        self._require_velocity()
        history = [np.ascontiguousarray(m0, dtype=self.decomp.dtype)]
        if isinstance(self.backward_plan, IdentityPlan):  # v = 0: m(t_j) = m0, one array (and one gradient)
            history *= self.nt + 1
        for _ in range(self.nt + 1 - len(history)):  # one array per time point, so that each can be released alone
            history.append(self._interpolate(self.backward_plan, history[-1]))
        return StateHistory(history, self.spectral, store_gradients=store_gradients, spare=spare)

    def solve_adjoint(self, lam1, state, body=None, *, overwrite=False, store_gradients=True):
        """Continuity-form adjoint backward from ``lam(1) = lam1``.

        Parameters
        ----------
        lam1 : ndarray ``(*local_shape)``
        state : StateHistory
            :meth:`state_history` at the current velocity.
        body : ndarray ``(3, *local_shape)``, optional
            Accumulate the body force into this array (in place) instead of a new one.
        overwrite : bool
            ``lam1`` (C-contiguous, working precision) may serve as the solve's work array.
        store_gradients : bool
            ``False``: ``grad m(t_j)`` not yet stored are computed for this solve only
            (:meth:`StateHistory.gradient` with ``store=False``).

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
        usable = overwrite and lam1.dtype == dtype and lam1.flags.c_contiguous and lam1.flags.writeable
        lam = lam1 if usable else np.array(lam1, dtype=dtype, copy=True)
        if body is None:
            body = np.zeros((3,) + self.decomp.local_shape, dtype)
        fields.accumulate_product(lam, w[self.nt], state.gradient(self.nt, store=store_gradients), body)
        departed = np.empty_like(lam)
        for j in range(self.nt - 1, -1, -1):
            self._interpolate(self.forward_plan, lam, out=departed)
            fields.scale_and_accumulate(departed, self.adjoint_factor, w[j], state.gradient(j, store=store_gradients),
                                        lam, body)
        return lam, body

    def solve_incremental_state(self, v_tilde, state):
        """``mt(1)`` of the incremental state equation for the perturbation ``v_tilde``."""
        self._require_velocity()
        dtype = self.decomp.dtype
        half = 0.5 * self.dt
        v_tilde = np.ascontiguousarray(v_tilde, dtype=dtype)
        mt = np.zeros(self.decomp.local_shape, dtype)
        tmp = np.empty_like(mt)
        for j in range(self.nt):
            fields.minus_dot_added(mt, half, v_tilde, state.gradient(j), out=tmp)  # mt + dt/2 g_j
            self._interpolate(self.backward_plan, tmp, out=mt)
            fields.minus_dot_added(mt, half, v_tilde, state.gradient(j + 1), out=mt)
        return mt

    def solve_incremental_adjoint(self, mt1, state, body=None):
        """Gauss-Newton incremental adjoint from ``lt(1) = -mt(1)``; returns its body force
        ``int_0^1 lt grad m dt`` (the Hessian matvec's data term; added to ``body`` if given)."""
        return self.solve_adjoint(-mt1, state, body, overwrite=True)[1]

    # -------------------------------------------------------- derived outputs
    def displacement(self):
        """Displacement ``u = y - x`` of the pull-back deformation map ``y`` in grid units
        (voxels), shape ``(3, *local_shape)``: ``m(x, 1) = m(y(x), 0)``. Composed step by step,
        ``u_{j+1}(x) = u_j(X-(x)) + (X-(x) - x)``."""
        self._require_velocity()
        u = np.zeros((3,) + self.decomp.local_shape, self.decomp.dtype)
        if isinstance(self.backward_plan, IdentityPlan):  # v = 0
            return u
        step = self._departure_step(-1.0)
        for _ in range(self.nt):
            self._interpolate(self.backward_plan, u, out=u)
            u += step
        return u

    def det_grad_y(self):
        """``det(grad y)`` of the pull-back map ``y``, from ``d_t J + v . grad J = -J div v``,
        ``J(0) = 1``, along the backward characteristics: ``J(x, 1) = exp(-int_0^1 div v dt)``
        along the characteristic through ``x``, the integral accumulated by the trapezoidal rule
        and transported with it, ``I_{j+1}(x) = I_j(X-(x)) - dt/2 (d(X-(x)) + d(x))``.

        Second order in time and positive by construction: no spectral derivative of the
        composed map (whose Gibbs undershoot reported folds where a regular map was steep),
        and no interpolation of ``J`` itself, which is steep where the map compresses and
        expands within a few voxels (cubic interpolation of it undershot below 0 there, as
        CLAIRE's transport of ``J`` can). Whether the composed map folds, central
        differences of it tell (:meth:`det_grad_y_central_differences`)."""
        self._require_velocity()
        d = self.spectral.divergence(self.velocity)
        step = self._interpolate(self.backward_plan, d)
        step += d
        step *= -0.5 * self.dt
        log_jac = step.copy()
        for _ in range(self.nt - 1):
            self._interpolate(self.backward_plan, log_jac, out=log_jac)
            log_jac += step
        return np.exp(log_jac, out=log_jac)

    def det_grad_y_central_differences(self, displacement):
        """``det(grad y)`` of ``y = x + u`` (``u`` in voxels) by 2nd-order central differences of
        ``u`` on the grid: an independent check of :meth:`det_grad_y` on the composed map."""
        u = np.ascontiguousarray(displacement, dtype=self.decomp.dtype)
        padded = self.decomp.exchange_halo(u, 1)
        n = self.decomp.local_shape

        def shifted(a, b, by):  # u_a at the nodes shifted by ``by`` along axis b
            return padded[(a,) + tuple(slice(1 + by * (c == b), 1 + by * (c == b) + n[c]) for c in range(3))]

        grads = [np.stack([0.5 * (shifted(a, b, 1) - shifted(a, b, -1)) for b in range(3)]) for a in range(3)]
        return fields.det_identity_plus(grads, (1.0, 1.0, 1.0), np.empty(n, self.decomp.dtype))

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
        values, counts = np.unique(labels, return_counts=True)
        every = self.decomp.allgather(dict(zip(values.tolist(), counts.tolist())))
        totals = {value: sum(c.get(value, 0) for c in every) for value in sorted(set().union(*every))}
        # the indicators sum to 1 and transport is linear and keeps constants: the largest
        # label (the background, usually) is the complement of the others, not transported
        rest = max(totals, key=totals.get)
        indicators = ((value, (labels == value).astype(self.decomp.dtype)) for value in totals if value != rest)
        return self.most_probable_label(indicators, rest, labels.dtype)

    def most_probable_label(self, probabilities, rest, dtype):
        """The label of largest transported probability at each point.

        ``probabilities`` yields ``(label, p)`` with ``p`` a local probability map of that
        label (its indicator, or a map interpolated from one), each transported like an image
        in turn; ``rest`` is the label whose probability is the complement of theirs (not
        transported). Returns the local label map of ``dtype``."""
        best = np.full(self.decomp.local_shape, -np.inf, self.decomp.dtype)
        out = np.zeros(self.decomp.local_shape, dtype)
        total = np.zeros(self.decomp.local_shape, self.decomp.dtype)
        for value, p in probabilities:
            p = self.transport_image(np.asarray(p, self.decomp.dtype))
            total += p
            better = p > best
            out[better] = value
            best[better] = p[better]
        np.subtract(1, total, out=total)
        out[total > best] = rest
        return out
