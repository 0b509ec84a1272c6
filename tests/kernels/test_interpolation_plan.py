"""Distributed interpolation plans equal serial interpolation of the gathered field, for
points anywhere: inside the block, across several ranks, wrapped around the torus."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py.kernels import Decomposition, SpectralOperators
from claire_py.kernels._numba import interp
from claire_py.kernels.interpolation import InterpolationPlan

COMM = MPI.COMM_WORLD


def _field(shape, comps=0, seed=0):
    """A smooth periodic test field on the global grid (same on every rank)."""
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(max(comps, 1)):
        a = rng.standard_normal(4)
        out.append(a[0] * np.sin(x[0] + a[1]) * np.cos(2 * x[1]) + a[2] * np.cos(x[2] - x[0]) + a[3])
    return np.stack(out) if comps else out[0]


def _points(decomp, shift, seed):
    """Local grid nodes displaced by ``shift`` voxels plus a random jitter of +-2 voxels."""
    nodes = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=float) for s in decomp.real_slice],
                                 indexing="ij"))
    rng = np.random.default_rng(seed + decomp.rank)
    return nodes + np.asarray(shift, float)[:, None, None, None] + rng.uniform(-2, 2, nodes.shape)


@pytest.mark.parametrize("shape", [(16, 12, 10), (15, 9, 14), (24, 24, 24)], ids=str)
@pytest.mark.parametrize("shift", [(0, 0, 0), (1 / 3, 1 / 3, 1 / 3), (-1.2, 0.7, 2.5)], ids=str)
def test_plan_matches_serial_interpolation(shape, shift, dtype):
    d = Decomposition(shape, dtype=dtype)
    g = _field(shape).astype(dtype)
    v = _field(shape, comps=3, seed=1).astype(dtype)
    pts = _points(d, np.asarray(shift) * np.asarray(shape), seed=3)  # up to N/3 and beyond N
    plan = InterpolationPlan(d, pts)
    flat = pts.reshape(3, -1).T
    tol = 1e-12 if dtype == np.float64 else 1e-5
    scalar = plan.interpolate(g[d.real_slice])
    ref = interp.interpolate_periodic(g, np.ascontiguousarray(flat))
    assert np.abs(scalar.ravel() - ref).max() <= tol * np.abs(ref).max()
    vec = plan.interpolate(v[(slice(None),) + d.real_slice])
    ref = interp.interpolate_periodic(v, np.ascontiguousarray(flat))
    assert np.abs(vec.reshape(3, -1) - ref).max() <= tol * np.abs(ref).max()
    # the plan is reusable: a second field, same points
    again = plan.interpolate(2 * g[d.real_slice])
    assert np.abs(again - 2 * scalar).max() <= tol * np.abs(scalar).max()


def test_points_at_nodes_and_nearest():
    d = Decomposition((16, 12, 10))
    g = _field(d.shape)
    nodes = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, dtype=float) for s in d.real_slice],
                                 indexing="ij"))
    out = InterpolationPlan(d, nodes + np.array([16.0, -12.0, 30.0])[:, None, None, None]).interpolate(g[d.real_slice])
    np.testing.assert_allclose(out, g[d.real_slice], rtol=0, atol=1e-13)
    jitter = np.random.default_rng(d.rank).uniform(-0.49, 0.49, nodes.shape)
    shifted = nodes + np.array([5, 3, -2])[:, None, None, None] + jitter
    near = InterpolationPlan(d, shifted, kind="nearest").interpolate(g[d.real_slice])
    idx = [np.mod(np.rint(shifted[a]).astype(int), d.shape[a]) for a in range(3)]
    np.testing.assert_array_equal(near, g[idx[0], idx[1], idx[2]])


def test_bspline_plan_matches_scipy():
    from scipy.ndimage import map_coordinates

    d = Decomposition((16, 12, 10))
    g = _field(d.shape)
    pts = _points(d, (4.0, -3.0, 7.0), seed=5)
    plan = InterpolationPlan(d, pts, kind="bspline", spectral=SpectralOperators(d))
    out = plan.interpolate(g[d.real_slice])
    ref = map_coordinates(g, pts.reshape(3, -1), order=3, mode="grid-wrap")
    assert np.abs(out.ravel() - ref).max() <= 1e-10 * np.abs(ref).max()


def test_plan_rejects_bad_input():
    d = Decomposition((8, 8, 8))
    nodes = np.zeros((3,) + d.local_shape)
    with pytest.raises(ValueError, match="unknown"):
        InterpolationPlan(d, nodes, kind="quintic")
    with pytest.raises(ValueError, match="spectral"):
        InterpolationPlan(d, nodes, kind="bspline")
    with pytest.raises(ValueError, match="finite"):
        InterpolationPlan(d, np.full((3, 5), np.nan))
    with pytest.raises(ValueError, match=r"shape \(3, \.\.\.\)"):
        InterpolationPlan(d, np.zeros((2, 5)))
    with pytest.raises(ValueError, match="does not match the local block"):
        InterpolationPlan(d, nodes).interpolate(np.zeros((4, 4, 4)))

