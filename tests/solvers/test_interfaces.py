"""The solvers' Protocols (solvers/interfaces.py): what implements them, and that the
optimiser needs nothing else."""

import numpy as np
from mpi4py import MPI

from claire_py.checkpoint import FileCheckpoint
from claire_py.kernels import Decomposition
from claire_py.solvers.distance import LocalNormalizedCrossCorrelation, NormalizedCrossCorrelation, SquaredL2
from claire_py.solvers.interfaces import CheckpointHooks, ContinuationProblem, Distance, OptimizationProblem
from claire_py.solvers.newton import NewtonOptions, gauss_newton_krylov

from .test_problem import synthetic

COMM = MPI.COMM_WORLD


def test_the_registration_problem_distances_and_checkpoint_implement_the_protocols():
    problem, _ = synthetic(8)
    assert isinstance(problem, ContinuationProblem) and isinstance(problem, OptimizationProblem)
    assert isinstance(problem.with_beta(0.5), ContinuationProblem)
    assert all(isinstance(d, Distance) for d in problem.distances)
    for cls in (SquaredL2, NormalizedCrossCorrelation, LocalNormalizedCrossCorrelation):
        assert issubclass(cls, Distance), cls
    assert issubclass(FileCheckpoint, CheckpointHooks)


class WeightedLeastSquares:
    """``J(v) = 1/2 <v - t, w (v - t)>`` for a positive weight field ``w``: an optimisation
    problem that is no registration, implementing :class:`OptimizationProblem` alone."""

    def __init__(self, decomp, weight, target):
        self.decomp, self.weight, self.target = decomp, weight, target
        self.options = type("Options", (), {"beta": 0.0})()
        self.workload, self.velocity = None, None
        self.symmetric_hessian = True

    def set_velocity(self, v):
        self.velocity = v

    def objective(self):
        r = self.velocity - self.target
        return 0.5 * self.inner(r, self.weight * r), 0.0

    def gradient(self):
        return self.weight * (self.velocity - self.target)

    def hessian_matvec(self, w):
        return self.weight * w

    def apply_inverse_regularization(self, r):
        return r / self.weight  # the exact inverse: PCG converges in one iteration

    def project(self, v):
        return v

    def inner(self, a, b):
        return self.decomp.inner(a, b)

    def norm(self, a):
        return float(np.sqrt(self.inner(a, a)))

    def directional_derivative(self, g, w):
        return self.inner(g, w)

    def restricted(self, shape):  # pragma: no cover - the spectral preconditioner needs no coarse grid
        raise NotImplementedError


def test_gauss_newton_krylov_solves_any_optimization_problem():
    d = Decomposition((8, 8, 8), dtype=np.float64)
    rng = np.random.default_rng(d.rank)
    problem = WeightedLeastSquares(d, 1.0 + rng.random((3,) + d.local_shape), rng.standard_normal((3,) + d.local_shape))
    assert isinstance(problem, OptimizationProblem) and not isinstance(problem, ContinuationProblem)
    res = gauss_newton_krylov(problem, d.new_vector(), NewtonOptions(gradient_tolerance=1e-8))
    assert res.converged and len(res.history) == 2, res.history  # one exact Newton step on a quadratic
    np.testing.assert_allclose(res.velocity, problem.target, rtol=1e-12, atol=1e-12)
