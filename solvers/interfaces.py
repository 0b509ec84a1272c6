"""What the optimisers ask of what they optimise: the solvers' interfaces as Protocols.

:func:`~claire_py.solvers.newton.gauss_newton_krylov` sees an :class:`OptimizationProblem`,
:func:`~claire_py.solvers.continuation.solve` a :class:`ContinuationProblem` (the same with
the new problems its levels run on) and, optionally, :class:`CheckpointHooks`; a
:class:`RegistrationProblem` composes one :class:`Distance` per image component. Velocities
and gradients are local blocks ``(3, *local_shape)`` of the problem's decomposition; every
method is collective (all ranks call it, in the same order) and every float it returns is
global (the same on every rank). :class:`~claire_py.solvers.problem.RegistrationProblem`,
the distances of :mod:`.distance` and :class:`claire_py.checkpoint.FileCheckpoint` implement
them (``tests/solvers/test_interfaces.py``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["OptimizationProblem", "ContinuationProblem", "Distance", "CheckpointHooks"]


@runtime_checkable
class OptimizationProblem(Protocol):
    """The reduced problem ``min_v J(v)`` as Gauss-Newton-Krylov sees it.

    ``set_velocity(v)`` makes ``v`` the current velocity (solving what ``J`` and its
    derivatives at ``v`` need); the other methods are then evaluated at it.
    """

    decomp: object  #: the :class:`~claire_py.kernels.Decomposition` of every vector
    options: object  #: regularisation options; ``options.beta`` is recorded per iteration
    workload: object  #: :class:`~claire_py.solvers.monitor.Workload` the solve adds to
    velocity: np.ndarray | None  #: the current velocity

    def set_velocity(self, v: np.ndarray) -> None: ...

    def objective(self) -> tuple[float, float]:
        """``(J(v), relative mismatch)``."""

    def gradient(self) -> np.ndarray:
        """The reduced gradient ``g(v)`` (a new vector)."""

    def hessian_matvec(self, w: np.ndarray) -> np.ndarray:
        """``H(v) w``, the Gauss-Newton Hessian (a new vector)."""

    def apply_inverse_regularization(self, r: np.ndarray) -> np.ndarray:
        """The spectral preconditioner ``(beta A)^{-1} r``."""

    def project(self, v: np.ndarray) -> np.ndarray:
        """The velocity's constraint (the identity when there is none; may return ``v``)."""

    def inner(self, a: np.ndarray, b: np.ndarray) -> float: ...

    def norm(self, a: np.ndarray) -> float: ...

    @property
    def symmetric_hessian(self) -> bool:
        """Whether ``H`` is symmetric in :meth:`inner`, so that ``<g, s>`` is the slope
        ``dJ[s]`` and PCG's recurrences give it without ``g``."""

    def directional_derivative(self, g: np.ndarray, w: np.ndarray) -> float:
        """``dJ(v)[w]`` from the gradient ``g`` at the current velocity."""

    def restricted(self, shape):
        """``(coarse problem, restrict, prolong)`` on grid ``shape`` (two-level preconditioner,
        grid continuation)."""


@runtime_checkable
class ContinuationProblem(OptimizationProblem, Protocol):
    """An :class:`OptimizationProblem` that makes the problems of continuation's levels."""

    transport: object  #: its :class:`~claire_py.solvers.transport.SemiLagrangianTransport` (det(grad y))
    sigma: float  #: Gaussian smoothing of its images, voxels

    def with_beta(self, beta: float) -> ContinuationProblem:
        """The problem at regularisation weight ``beta``, sharing the state."""

    def with_smoothing(self, sigma: float) -> ContinuationProblem:
        """The problem with images smoothed by ``sigma`` voxels in all."""


@runtime_checkable
class Distance(Protocol):
    """One image component's distance ``D(m1)`` between the deformed moving image ``m1`` and
    the fixed image it was built with, and its first and (Gauss-Newton) second derivatives
    as the adjoint's final conditions."""

    def prepare(self, m1: np.ndarray) -> None:
        """Store what :meth:`value` and the final conditions at ``m1`` need."""

    def value(self) -> float: ...

    def final_adjoint(self) -> np.ndarray:
        """``lambda(1) = -dD/dm(m1)`` (a new array)."""

    def final_incremental_adjoint(self, mt1: np.ndarray) -> np.ndarray:
        """``lambda~(1) = -D''(m1) mt1``, Gauss-Newton (a new array)."""


@runtime_checkable
class CheckpointHooks(Protocol):
    """Where :func:`~claire_py.solvers.continuation.solve` saves and restores progress (see
    its docstring for the dicts)."""

    def restore(self, level: int, decomp) -> dict | None: ...

    def iterate(self, level: int, decomp, velocity: np.ndarray, resume: dict) -> None: ...

    def level_done(self, level: int, decomp, result) -> None: ...
