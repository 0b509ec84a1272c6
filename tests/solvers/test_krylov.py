"""PCG on small dense systems: solutions, the tracked ``<rhs, x>``, and ``overwrite_rhs``.

No MPI collectives: every rank solves the same small system independently.
"""

import numpy as np
import pytest

from claire_py.solvers.krylov import pcg


def _spd(n, seed, negative=False):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.geomspace(1e-2, 1.0, n)
    if negative:
        eig[-1] = -0.5
    return (q * eig) @ q.T, rng.standard_normal(n)


@pytest.mark.parametrize("flexible", [False, True])
@pytest.mark.parametrize("max_iterations, rtol", [(200, 1e-10), (5, 1e-12)], ids=["converged", "stopped"])
def test_pcg_tracks_rhs_dot_solution(flexible, max_iterations, rtol):
    a, b = _spd(40, 1)
    diag = np.diag(a).copy()
    res = pcg(lambda x: a @ x, b, inner=np.dot, precondition=lambda r: r / diag, rtol=rtol,
              max_iterations=max_iterations, flexible=flexible)
    assert res.converged == (max_iterations == 200)
    if res.converged:
        np.testing.assert_allclose(res.solution, np.linalg.solve(a, b), rtol=0, atol=1e-8 * np.abs(b).max() * 100)
    assert res.rhs_dot_solution == pytest.approx(float(b @ res.solution), rel=1e-10)


def test_pcg_negative_curvature_and_overwrite():
    a, b = _spd(30, 2, negative=True)
    rhs = b.copy()
    res = pcg(lambda x: a @ x, rhs, inner=np.dot, rtol=1e-12, max_iterations=100, overwrite_rhs=True)
    assert res.negative_curvature
    assert res.rhs_dot_solution == pytest.approx(float(b @ res.solution), rel=1e-10)
    assert not np.array_equal(rhs, b)  # the rhs served as the residual
    kept = b.copy()
    pcg(lambda x: a @ x, kept, inner=np.dot, rtol=1e-3, max_iterations=3)
    np.testing.assert_array_equal(kept, b)  # default: rhs untouched


def test_pcg_zero_rhs():
    res = pcg(lambda x: x, np.zeros(4), inner=np.dot)
    assert res.converged and res.iterations == 0 and res.rhs_dot_solution == 0.0


def test_flexible_pcg_tolerates_a_preconditioner_that_changes_between_iterations():
    """M_k^-1 r = r / (diag(A) (1 + 2 u_k)), u_k random per call (SPD, different every time, like
    an inexact inner solve): the flexible (Polak-Ribiere) update converges, the standard one
    loses its conjugacy and stalls (122 vs > 500 iterations when measured)."""
    a, b = _spd(100, 3)  # eigenvalues in [1e-2, 1]
    exact = np.linalg.solve(a, b)
    diag = np.diag(a).copy()
    iterations = {}
    for flexible in (False, True):
        rng = np.random.default_rng(7)
        res = pcg(lambda x: a @ x, b, inner=np.dot, precondition=lambda r: r / (diag * (1 + 2.0 * rng.random(r.size))),
                  rtol=1e-8, max_iterations=200, flexible=flexible)
        iterations[flexible] = res.iterations if res.converged else None
        if flexible:
            assert res.converged
            assert np.linalg.norm(res.solution - exact) <= 1e-6 * np.linalg.norm(exact)
            assert res.rhs_dot_solution == pytest.approx(float(b @ res.solution), rel=1e-8)
    assert iterations[False] is None and iterations[True] <= 150, iterations
