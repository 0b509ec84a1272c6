"""The reduced optimal-control problem: objective, gradient and Gauss-Newton Hessian.

DESIGN.md section 1, CLAIRE's sign convention, for images of ``C`` components (channels)
``c`` with weights ``w_c`` and a distance ``D`` (:mod:`.distance`)::

    J(v) = sum_c w_c D(m_c(1), m_R,c) + beta/2 <A v, v>
    g(v) = beta A v + K sum_c int_0^1 lam_c grad m_c dt,   lam_c(1) = -w_c dD/dm(m_c(1))
    H vt = beta A vt + K sum_c int_0^1 lt_c grad m_c dt,   lt_c(1)  = -w_c D'' mt_c(1)

(squared L2: ``lam(1) = m_R - m(1)``, ``lt(1) = -mt(1)``).

``K`` is the Leray projection for the incompressible variant and the identity otherwise.
Inner products and norms are the L2 ones of ``[0, 2 pi)^3``: the grid sum times the cell
volume ``prod(h_a)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..kernels.spectral import REGULARIZATION_NORMS
from .distance import DISTANCES, make_distance
from .monitor import Workload

__all__ = ["RegularizationOptions", "DistanceOptions", "RegistrationProblem"]


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


@dataclass(frozen=True)
class DistanceOptions:
    """What "similar" means.

    Attributes
    ----------
    name : str
        ``l2`` (squared L2, default) or ``ncc`` (normalised cross-correlation; invariant to an
        affine change of intensities), see :mod:`claire_py.solvers.distance`.
    weights : tuple of float, optional
        Weight of each image component (channel) in the summed distance; equal weights 1
        when ``None``.
    """

    name: str = "l2"
    weights: tuple | None = None

    def __post_init__(self):
        if self.name not in DISTANCES:
            raise ValueError(f"distance={self.name!r}: use one of {', '.join(DISTANCES)}")
        if self.weights is not None:
            weights = tuple(self.weights)
            if not weights or not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights) \
                    or not any(w > 0 for w in weights):
                raise ValueError(f"weights={self.weights!r} must be finite numbers >= 0, not all 0")
            object.__setattr__(self, "weights", tuple(float(w) for w in weights))


class RegistrationProblem:
    """Objective, gradient and Hessian matvec for one image pair (the optimiser's view).

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
    :meth:`set_velocity` solves the state equation and stores the ghost-padded ``m(t_j)`` of
    all time points and components once; every gradient (spectral ``grad m``) and Hessian
    matvec (4th-order differences) at that velocity reuses them. Only the smoothed images are kept (a smoother problem is made from
    them by the Gaussian semigroup, see :meth:`with_smoothing`).
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
        self.fixed, moving = (self._smoothed(a) for a in raw)
        del raw
        #: ``moving`` with ghost layers: ``m(0)`` of every state history, shared, not copied
        self._moving_padded = transport.padded(moving)
        del moving
        self.moving = transport.interior(self._moving_padded)  # a view
        self.cell_volume = math.prod(self.decomp.spacing)
        self.distances = [make_distance(self.distance_options.name, f, self.inner, self.mask) for f in self.fixed]
        self.initial_distance = self._distance(self.moving)
        self.initial_mismatch = math.sqrt(2 * self.initial_distance)
        self.velocity = None
        self._state = None

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

    def restricted(self, shape, *, workload=None):
        """The problem on a coarser (or any) grid ``shape``: this problem's (smoothed) images
        and mask restricted spectrally, same options, its own transport on the same ranks.

        Returns ``(coarse_problem, restrict, prolong)``, the two :class:`SpectralResampler`
        maps between this grid and the new one (velocities in radians per unit time carry
        over unchanged: both grids discretise the same box).
        """
        from ..kernels import Decomposition, SpectralOperators, SpectralResampler
        from .transport import SemiLagrangianTransport

        fine = self.decomp
        coarse = Decomposition(shape, comm=fine.comm, dtype=fine.dtype, threads=fine.threads)
        restrict, prolong = SpectralResampler(fine, coarse), SpectralResampler(coarse, fine)
        workload = self.workload.prefixed("coarse_") if workload is None else workload
        transport = SemiLagrangianTransport(coarse, SpectralOperators(coarse), self.transport.options, workload)
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
        """Build the transport plans for ``v`` and solve the state equation (stores ``m(t_j)``
        of every component, ghost-padded, for the gradient and every Hessian matvec). The
        previous velocity's state goes first, so that two never coexist."""
        v = np.ascontiguousarray(v, dtype=self.decomp.dtype)
        self.velocity, self._state = None, []
        with self.workload.timer("set_velocity"):
            self.transport.set_velocity(v)
        for m0 in self._moving_padded:
            with self.workload.timer("state_solve"):
                self._state.append(self.transport.state_history(m0))
        self.velocity = v
        self._current_distance = self._distance([self.transport.interior(m[-1]) for m in self._state])

    @property
    def deformed(self):
        """``m(1)``: the moving image(s) deformed by the current velocity, ``(C, *local)``."""
        return np.stack([self.transport.interior(m[-1]) for m in self._state])

    def objective(self):
        """``J(v)`` at the current velocity, and the relative mismatch ``sqrt(D / D_0)``
        (``D_0`` the distance before registration). ``(inf, inf)`` for a velocity the time
        step cannot resolve (see ``SemiLagrangianTransport.resolved``), so that a line search
        steps back from it."""
        if not self.transport.resolved:
            return math.inf, math.inf
        distance = self._current_distance
        reg = 0.5 * self.inner(self.regularization(self.velocity), self.velocity)
        mismatch = math.sqrt(distance / self.initial_distance) if self.initial_distance > 0 else 0.0
        return distance + reg, mismatch

    def gradient(self):
        """Reduced gradient ``beta A v + K b`` at the current velocity."""
        body = self.regularization(self.velocity)
        with self.workload.timer("adjoint_solve"):
            for w, dist, state in zip(self.weights, self.distances, self._state):
                lam1 = dist.final_adjoint()  # a new array: the adjoint solve may work in it
                lam1 *= w
                self.transport.solve_adjoint(lam1, state, body, overwrite=True)
        return self.project(body)

    def hessian_matvec(self, v_tilde):
        """Gauss-Newton Hessian applied to ``v_tilde``: two transport solves per component."""
        with self.workload.timer("hessian_matvec"):
            body = self.regularization(v_tilde)
            for w, dist, state in zip(self.weights, self.distances, self._state):
                lam1 = dist.final_incremental_adjoint(self.transport.solve_incremental_state(v_tilde, state))
                lam1 *= w
                self.transport.solve_adjoint(lam1, state, body, differences=True, overwrite=True)
            return self.project(body)
