"""The reduced optimal-control problem: objective, gradient and Gauss-Newton Hessian.

DESIGN.md section 1, CLAIRE's sign convention, for images of ``C`` components (channels)
``c`` with weights ``w_c`` and a distance ``D`` (:mod:`.distance`)::

    J(v) = sum_c w_c D(m_c(1), m_R,c) + beta/2 <A v, v> [+ R_div(v)]
    g(v) = beta A v + P b,        b = sum_c int_0^1 lam_c grad m_c dt,   lam_c(1) = -w_c dD/dm(m_c(1))
    H vt = beta A vt + P bt,     bt = sum_c int_0^1 lt_c grad m_c dt,   lt_c(1)  = -w_c D'' mt_c(1)

(squared L2: ``lam(1) = m_R - m(1)``, ``lt(1) = -mt(1)``).

``P`` projects the body force: the identity for the compressible models, the Leray
projection ``K = I - grad Delta^{-1} div`` for the incompressible variant, and for ``h1s-div``
(CLAIRE's default model, RELAXEDSTOKES) the relaxed projection ``P = I - grad Delta^{-1}
M^{-1} div``, ``M^{-1} = (beta / (beta_div (1 - Delta)) + 1)^{-1}``, with the objective term
``R_div = beta_div/2 (||grad div v||^2 + ||div v||^2)`` and ``A = -Delta``.

Why ``P`` there: eliminating the pressure of the relaxed constraint ``div v = w`` (``w``
penalised by ``beta_div/2 ||w||_H1^2``) gives ``g = P g_J``, ``g_J = beta A v + b + beta_div
grad (Delta - 1) div v`` the L2 gradient of ``J``: ``P`` is a symmetric positive definite
multiplier (the identity on divergence-free fields, ``1 - M^{-1}`` on gradients) with
``P (beta A + beta_div grad (Delta - 1) div) = beta A``. So ``g`` vanishes exactly where
``g_J`` does, ``H = P H_J`` and the Newton step ``H s = -g`` is that of ``J``. As CLAIRE does,
the solver works with ``g`` and ``H``: stopping tests, forcing and Krylov residuals are in
``||g||`` (the ``||g0||`` CLAIRE prints), the Armijo test in ``J``.

Inner products and norms are the L2 ones of ``[0, 2 pi)^3``: the grid sum times the cell
volume ``prod(h_a)``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from ..kernels.spectral import REGULARIZATION_NORMS
from .distance import DISTANCES, make_distance
from .monitor import Workload

__all__ = ["RegularizationOptions", "DistanceOptions", "RegistrationProblem", "REGULARIZATION_MODELS"]

#: The regularisation models: the operators of ``kernels.spectral`` and ``h1s-div`` (CLAIRE's
#: RELAXEDSTOKES: ``A = -Delta`` with the divergence term and the relaxed projection).
REGULARIZATION_MODELS = ("h1s-div",) + REGULARIZATION_NORMS


@dataclass(frozen=True)
class RegularizationOptions:
    """Regularisation of the velocity.

    Attributes
    ----------
    norm : str
        ``h1s-div`` (default: CLAIRE's default model, RELAXEDSTOKES: the H1 seminorm ``A =
        -Delta``, the divergence term ``beta_div/2 (||grad div v||^2 + ||div v||^2)`` and the
        relaxed projection of the body force, see the module docstring), ``h1s`` (CLAIRE's
        ``-regnorm h1s``, its COMPRESSIBLE model), ``h2s``, ``h3s``, ``h1``, ``h2``, ``h3`` or
        ``l2``.
    beta : float
        Weight ``beta`` of the regularisation (default 1e-2, CLAIRE's ``beta_v``).
    gamma : float
        Identity weight of the full norms ``h1``, ``h2``, ``h3``.
    beta_div : float
        Weight ``beta_w`` of the divergence term of ``h1s-div`` (CLAIRE's default 1e-4).
    incompressible : bool
        Constrain ``div v = 0`` (Leray projection of gradient and Hessian; ``h1s-div`` then
        reduces to ``h1s``, its divergence term vanishing).
    """

    norm: str = "h1s-div"
    beta: float = 1e-2
    gamma: float = 1e-4
    beta_div: float = 1e-4
    incompressible: bool = False

    def __post_init__(self):
        if self.norm not in REGULARIZATION_MODELS:
            raise ValueError(f"norm={self.norm!r}: use one of {', '.join(REGULARIZATION_MODELS)}")
        for name in ("beta", "gamma", "beta_div"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a finite number > 0")

    @property
    def operator(self):
        """The norm of the operator ``A`` (``h1s`` for ``h1s-div``)."""
        return "h1s" if self.norm == "h1s-div" else self.norm

    @property
    def relaxed(self):
        """True for CLAIRE's relaxed model (``h1s-div`` and not incompressible)."""
        return self.norm == "h1s-div" and not self.incompressible


@dataclass(frozen=True)
class DistanceOptions:
    """What "similar" means.

    Attributes
    ----------
    name : str
        ``l2`` (squared L2, default), ``ncc`` (normalised cross-correlation; invariant to an
        affine change of intensities) or ``lncc`` (local normalised cross-correlation in a
        Gaussian window; invariant to smooth changes of gain and offset, e.g. a bias field),
        see :mod:`claire_py.solvers.distance`.
    weights : tuple of float, optional
        Weight of each image component (channel) in the summed distance; equal weights 1
        when ``None``.
    lncc_sigma : float
        ``lncc``'s window: the standard deviation of the Gaussian in voxels of the grid solved
        on (coarse grids of grid continuation use the same number of voxels, as ANTs' radius).
        A box of ANTs' CC radius ``r`` (``2r + 1`` voxels a side) has the variance of a Gaussian
        with ``sigma = sqrt(r (r + 1) / 3)``: radius 2, 4 and 6 are sigma 1.4, 2.6 and 3.7.
    """

    name: str = "l2"
    weights: tuple | None = None
    lncc_sigma: float = 2.0

    def __post_init__(self):
        if self.name not in DISTANCES:
            raise ValueError(f"distance={self.name!r}: use one of {', '.join(DISTANCES)}")
        if self.weights is not None:
            weights = tuple(self.weights)
            if not weights or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) \
                    or not any(w > 0 for w in weights):
                raise ValueError(f"weights={self.weights!r} must be finite numbers >= 0, not all 0")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        if not (isinstance(self.lncc_sigma, (int, float)) and math.isfinite(self.lncc_sigma)
                and self.lncc_sigma > 0):
            raise ValueError(f"lncc_sigma={self.lncc_sigma!r} must be a positive number of voxels")


def _box_inner(decomp, cell_volume):
    """The L2 inner product on the box (global) of two local blocks of ``decomp``."""
    def inner(a, b):
        return decomp.inner(a, b) * cell_volume
    return inner


class RegistrationProblem:
    """Objective, gradient and Hessian matvec for one image pair (the optimiser's view: a
    :class:`~claire_py.solvers.interfaces.ContinuationProblem`, with one
    :class:`~claire_py.solvers.interfaces.Distance` per image component).

    Parameters
    ----------
    transport : SemiLagrangianTransport
        Carries the decomposition and spectral operators.
    fixed, moving : ndarray ``(*local_shape)`` or ``(C, *local_shape)``
        Local blocks of the reference ``m_R`` and template ``m_T`` (normalised), one image or
        ``C`` components.
    options : RegularizationOptions
    workload : Workload, optional
        Counters and timers to add to.
    distance : DistanceOptions, optional
    mask : ndarray ``(*local_shape)``, optional
        Weight in ``[0, 1]`` restricting the distance (on FIXED's grid).
    sigma : float
        Gaussian smoothing of the images, in voxels of this grid (0: none).

    Notes
    -----
    :meth:`set_velocity` solves the state equation and keeps ``m(t_j)`` of all time points and
    components (a :class:`~claire_py.solvers.transport.StateHistory` each); the gradient
    differentiates them spectrally and keeps ``grad m(t_j)`` for every Hessian matvec at that
    velocity (the same derivatives, so that the matvec belongs to the gradient's
    discretisation). Only the smoothed images are kept (a smoother problem is made from them
    by the Gaussian semigroup, see :meth:`with_smoothing`).
    """

    def __init__(self, transport, fixed, moving, options=None, workload=None, *, distance=None, mask=None,
                 sigma=0.0):
        self.transport = transport
        self.decomp = transport.decomp
        self.spectral = transport.spectral
        self.options = RegularizationOptions() if options is None else options
        self.distance_options = DistanceOptions() if distance is None else distance
        self.workload = Workload() if workload is None else workload
        self.sigma = float(sigma)
        dtype, local = self.decomp.dtype, self.decomp.local_shape
        raw = []
        for name, image in (("fixed", fixed), ("moving", moving)):
            image = np.asarray(image)
            image = image[None] if image.shape == local else image
            if image.ndim != 4 or image.shape[1:] != local:
                raise ValueError(f"{name} has local shape {image.shape}; expected {local} or (C, *{local})")
            raw.append(np.ascontiguousarray(image, dtype=dtype))
        if raw[0].shape[0] != raw[1].shape[0]:
            raise ValueError(f"fixed has {raw[0].shape[0]} components and moving {raw[1].shape[0]}")
        self.components = raw[0].shape[0]
        weights = self.distance_options.weights or (1.0,) * self.components
        if len(weights) != self.components:
            raise ValueError(f"{len(weights)} weights given for {self.components} image components")
        self.weights = weights
        self.mask = None if mask is None else np.ascontiguousarray(mask, dtype=dtype)
        if self.mask is not None and self.mask.shape != local:
            raise ValueError(f"mask has local shape {self.mask.shape}; expected {local}")
        #: ``moving[c]`` is ``m(0)`` of every state history, shared, not copied
        self.fixed, self.moving = (self._smoothed(a) for a in raw)
        del raw
        self.cell_volume = math.prod(self.decomp.spacing)
        # the distances get the inner product as a function of the grid alone, not as a bound
        # method: a reference back to the problem would keep it (its state history, images and
        # plans) alive after its last use until Python's cycle collector happens to run
        inner = _box_inner(self.decomp, self.cell_volume)
        self.distances = [make_distance(self.distance_options.name, f, inner, self.mask,
                                        sigma=self.distance_options.lncc_sigma, smooth=self.spectral.smooth)
                          for f in self.fixed]
        self.initial_distance = self._distance(self.moving)
        self.initial_mismatch = math.sqrt(2 * self.initial_distance)
        self.velocity = None
        self._state = None
        self._spare = []
        #: store ``grad m(t_j)`` from the first Hessian matvec at a velocity instead of from its
        #: gradient (see :meth:`deferring_gradients`)
        self.defer_gradients = False

    def _smoothed(self, images):
        if self.sigma <= 0:
            return images
        return np.stack([self.spectral.smooth(c, self.sigma) for c in images])

    def _distance(self, m1):
        """``sum_c w_c D(m1_c)``; leaves every component's distance prepared at ``m1``."""
        total = 0.0
        for w, dist, m in zip(self.weights, self.distances, m1):
            dist.prepare(m)
            total += w * dist.value()
        return total

    # ---------------------------------------------------------- new problems
    def with_smoothing(self, sigma):
        """The same problem (same grid, transport, options) with images smoothed by ``sigma``
        voxels in all, ``sigma >= self.sigma``: this problem's images smoothed by
        ``sqrt(sigma^2 - self.sigma^2)`` (Gaussians compose exactly)."""
        if sigma < self.sigma:
            raise ValueError(f"sigma={sigma} is below this problem's {self.sigma}: smoothing cannot be undone")
        problem = RegistrationProblem(self.transport, self.fixed, self.moving, self.options, self.workload,
                                      distance=self.distance_options, mask=self.mask,
                                      sigma=math.sqrt(sigma ** 2 - self.sigma ** 2))
        problem.sigma = float(sigma)
        return problem

    def with_beta(self, beta):
        """This problem at regularisation weight ``beta`` (``self`` when it is already ``beta``):
        a new problem sharing the images, distances, transport and the state at the current
        velocity (none depends on β); only the options differ. As with :meth:`with_smoothing`,
        the two share one transport: once either sets a velocity, use only that one."""
        if beta == self.options.beta:
            return self
        problem = copy.copy(self)
        problem.options = dataclasses.replace(self.options, beta=beta)
        return problem

    def deferring_gradients(self):
        """This problem (sharing its state, like :meth:`with_beta`) with ``grad m(t_j)``
        stored by the first Hessian matvec at a velocity rather than by its gradient, which
        computes them for its own use only.

        For a grid that is likely to converge at its first iterate (the input grid after a
        grid-continuation presolve): at a velocity that gets no matvec the state then holds
        ``nt + 1`` fields per image component instead of ``3 (nt + 1) + 2``; at one that gets
        matvecs, the gradient's ``nt + 1`` spectral gradients are computed twice. Same results
        either way (only ``store_gradients`` transports store them)."""
        problem = copy.copy(self)
        problem.defer_gradients = True
        return problem

    def restricted(self, shape, *, workload=None):
        """The problem on a coarser (or any) grid ``shape``: this problem's (smoothed) images
        and mask restricted spectrally, same options, its own transport on the same ranks.

        Returns ``(coarse_problem, restrict, prolong)``, the two :class:`SpectralResampler`
        maps between this grid and the new one (velocities in radians per unit time carry
        over unchanged: both grids discretise the same box). A grid of at most 1/8 of this
        one's points stores ``grad m(t_j)`` whatever this transport does: its whole peak is
        below the fine grid's images and vectors, and recomputing them triples its matvecs.
        """
        from ..kernels import Decomposition, SpectralOperators, SpectralResampler
        from .transport import SemiLagrangianTransport

        fine = self.decomp
        coarse = Decomposition(shape, comm=fine.comm, dtype=fine.dtype, threads=fine.threads)
        restrict, prolong = SpectralResampler(fine, coarse), SpectralResampler(coarse, fine)
        workload = self.workload.prefixed("coarse_") if workload is None else workload
        options = self.transport.options
        if math.prod(shape) * 8 <= math.prod(fine.shape):  # far below the fine grid's peak: the fast way
            options = dataclasses.replace(options, store_gradients=True)
        transport = SemiLagrangianTransport(coarse, SpectralOperators(coarse), options, workload)
        mask = None if self.mask is None else np.clip(restrict(self.mask), 0.0, 1.0)
        problem = RegistrationProblem(
            transport, np.stack([restrict(c) for c in self.fixed]), np.stack([restrict(c) for c in self.moving]),
            self.options, workload, distance=self.distance_options, mask=mask)
        return problem, restrict, prolong

    # ---------------------------------------------------------- inner products
    def inner(self, a, b):
        """L2 inner product on the box (global)."""
        return self.decomp.inner(a, b) * self.cell_volume

    def norm(self, a):
        return math.sqrt(max(self.inner(a, a), 0.0))

    # ------------------------------------------------------------ operators
    def regularization_value(self, v):
        """``R(v) = beta/2 <A v, v>``, plus ``beta_div/2 (||grad div v||^2 + ||div v||^2)`` for the
        relaxed model."""
        o = self.options
        with self.workload.timer("regularization"):
            return self.spectral.regularization_energy(v, o.operator, beta=o.beta, gamma=o.gamma,
                                                       beta_div=o.beta_div if o.relaxed else 0.0)

    def apply_inverse_regularization(self, r):
        """``(beta A)^{-1} r`` on the regularisation's range and ``r / beta`` on its null space
        (constant velocities, for the seminorms), as CLAIRE's: the spectral preconditioner."""
        o = self.options
        with self.workload.timer("preconditioner"):
            out = self.spectral.inverse_regularization(r, o.operator, beta=o.beta, gamma=o.gamma, null=1.0 / o.beta)
            return self.project(out)

    def project(self, v):
        """``K v``: Leray projection when incompressible, else ``v`` itself (the velocity's
        constraint; the relaxed model projects the body force only, in :meth:`gradient` and
        :meth:`hessian_matvec`)."""
        if not self.options.incompressible:
            return v
        with self.workload.timer("leray"):
            return self.spectral.leray(v)

    @property
    def symmetric_hessian(self):
        """False for the relaxed model, whose ``H = P H_J`` is symmetric in the inner product
        ``<a, P^{-1} b>``, not in L2 (see the module docstring)."""
        return not self.options.relaxed

    def directional_derivative(self, g, w):
        """``dJ/dv [w]`` from the reduced gradient ``g`` at the current velocity: ``<g, P^{-1}
        w>`` for the relaxed model (``g = P g_J``), ``<g, w>`` otherwise."""
        o = self.options
        if o.relaxed:
            with self.workload.timer("leray"):
                w = self.spectral.leray(w, relaxation=o.beta / o.beta_div, invert=True)
        return self.inner(g, w)

    def _plus_regularization(self, body, v):
        """``beta A v + P body`` (see the module docstring; ``K (beta A v + body)`` for the
        incompressible variant), in ``body``'s storage."""
        o = self.options
        leray = (o.beta / o.beta_div) if o.relaxed else (0.0 if o.incompressible else None)
        with self.workload.timer("regularization"):
            return self.spectral.regularization_plus(v, body, o.operator, beta=o.beta, gamma=o.gamma, leray=leray)

    # --------------------------------------------------------------- state
    def set_velocity(self, v):
        """Build the transport plans for ``v`` and solve the state equation (keeps ``m(t_j)``
        of every component for the gradient and every Hessian matvec). The previous velocity's
        state goes first, so that two never coexist."""
        v = np.ascontiguousarray(v, dtype=self.decomp.dtype)
        if self._state:  # the stored gradients' arrays serve the next state (no fresh pages to touch)
            self._spare = [g for state in self._state for g in state.take_gradients()]
        self.velocity, self._state = None, []
        with self.workload.timer("set_velocity"):
            self.transport.set_velocity(v)
        for m0 in self.moving:
            with self.workload.timer("state_solve"):
                self._state.append(self.transport.state_history(m0, spare=self._spare))
        self.velocity = v
        self._current_distance = self._distance([state.final for state in self._state])

    @property
    def deformed(self):
        """``m(1)``: the moving image(s) deformed by the current velocity, ``(C, *local)``."""
        return np.stack([state.final for state in self._state])

    def objective(self):
        """``J(v)`` at the current velocity, and the relative mismatch ``sqrt(D / D_0)``
        (``D_0`` the distance before registration)."""
        distance = self._current_distance
        reg = self.regularization_value(self.velocity)
        mismatch = math.sqrt(distance / self.initial_distance) if self.initial_distance > 0 else 0.0
        return distance + reg, mismatch

    def _body_force(self, final_condition, store_gradients=True):
        """``sum_c int_0^1 lam_c grad m_c dt`` with ``lam_c(1) = w_c final_condition(c)``."""
        body = self.decomp.new_vector()
        for c, (w, state) in enumerate(zip(self.weights, self._state)):
            lam1 = final_condition(c)  # a new array: the adjoint solve may work in it
            lam1 *= w
            self.transport.solve_adjoint(lam1, state, body, overwrite=True, store_gradients=store_gradients)
        return body

    def gradient(self):
        """Reduced gradient ``beta A v + P b`` at the current velocity (with
        :attr:`defer_gradients`, ``grad m(t_j)`` are not stored by it)."""
        with self.workload.timer("adjoint_solve"):
            body = self._body_force(lambda c: self.distances[c].final_adjoint(), not self.defer_gradients)
        return self._plus_regularization(body, self.velocity)

    def hessian_matvec(self, v_tilde):
        """Gauss-Newton Hessian applied to ``v_tilde``: two transport solves per component."""
        with self.workload.timer("hessian_matvec"):
            body = self._body_force(lambda c: self.distances[c].final_incremental_adjoint(
                self.transport.solve_incremental_state(v_tilde, self._state[c])))
            return self._plus_regularization(body, v_tilde)
