"""The parallel counting sort of ``route_points`` across many chunks, and the plan-array pool."""

import gc

import numpy as np

from claire_py.kernels._numba import routing


def _assert_routed_like_numpy(pts, shape, starts0, starts1, table):
    """``route_points`` against numpy: wrap, owner lookup, stable sort."""
    counts, wrapped, order = routing.route_points(pts, shape, starts0, starts1, table)
    ref = np.mod(pts, np.array(shape, float)[:, None])
    ref[ref >= np.array(shape)[:, None]] = 0.0
    owner = table[np.searchsorted(starts0, ref[0], "right") - 1, np.searchsorted(starts1, ref[1], "right") - 1]
    ref_order = np.argsort(owner, kind="stable")
    np.testing.assert_array_equal(order, ref_order)
    np.testing.assert_array_equal(counts, np.bincount(owner, minlength=table.size))
    np.testing.assert_allclose(wrapped, ref[:, ref_order].T, rtol=0, atol=1e-12)
    assert wrapped.min() >= 0 and np.all(wrapped < np.array(shape))


def test_route_points_matches_numpy_reference():
    rng = np.random.default_rng(7)
    pts = rng.uniform(-40, 40, (3, 5000))
    pts[:, :3] = [[-1e-17, 16.0, 0.0], [12.0, -1e-17, 11.999999999], [10.0, 5.0, -1e-17]]
    _assert_routed_like_numpy(pts, (16, 12, 10), np.array([0, 5, 11]), np.array([0, 6]), np.arange(6).reshape(3, 2))


def test_route_points_many_chunks_is_stable_and_matches_numpy():
    rng = np.random.default_rng(11)
    npts = 3 * routing._CHUNK + 123  # several chunks and a ragged last one
    pts = rng.uniform(-40, 40, (3, npts))
    table = np.arange(6).reshape(3, 2)[:, ::-1].copy()  # ranks not in block order
    _assert_routed_like_numpy(pts, (16, 12, 10), np.array([0, 5, 11]), np.array([0, 6]), table)


def test_route_points_single_owner_is_the_identity():
    rng = np.random.default_rng(3)
    pts = rng.uniform(-20, 20, (3, 2 * routing._CHUNK + 7))
    shape = (8, 9, 10)
    table = np.zeros((1, 1), np.int64)
    counts, wrapped, order = routing.route_points(pts, shape, np.array([0]), np.array([0]), table)
    ref = np.mod(pts, np.array(shape, float)[:, None])
    ref[ref >= np.array(shape)[:, None]] = 0.0
    np.testing.assert_array_equal(counts, [pts.shape[1]])
    np.testing.assert_array_equal(order, np.arange(pts.shape[1]))
    np.testing.assert_allclose(wrapped, ref.T, rtol=0, atol=1e-12)


def test_plan_arrays_are_reused_and_plans_stay_independent():
    from claire_py.kernels import Decomposition
    from claire_py.kernels.interpolation import _PLAN_ARRAYS, InterpolationPlan

    gc.collect()  # earlier tests' dead plans give their arrays now, not in the middle of this test
    _PLAN_ARRAYS.clear()
    d = Decomposition((16, 16, 16), dtype=np.float64)
    x = np.stack(np.broadcast_arrays(*np.ix_(*[np.arange(s.start, s.stop, dtype=float) for s in d.real_slice])))
    f = np.random.default_rng(0).random(d.local_shape)
    a = InterpolationPlan(d, x + 0.25)
    expected = a.interpolate(f)
    plan_array = a._plan
    del a
    gc.collect()
    b = InterpolationPlan(d, x + 0.25)  # as many points per rank as a: takes a's arrays
    assert np.shares_memory(b._plan, plan_array)
    c = InterpolationPlan(d, x + 0.5)  # the pool is empty again: fresh arrays
    assert not np.shares_memory(c._plan, plan_array)
    del c
    gc.collect()
    assert _PLAN_ARRAYS.holding
    np.testing.assert_allclose(b.interpolate(f), expected, rtol=0, atol=1e-13)  # b's own values
    # an interpolation ends the velocity update: the pool lets go
    assert not _PLAN_ARRAYS.holding
    out = np.empty((2,) + d.local_shape)[0]  # contiguous out, and a strided one
    np.testing.assert_allclose(b.interpolate(f, out=out), b.interpolate(f), rtol=0, atol=0)
    strided = np.empty(d.local_shape[:2] + (2 * d.local_shape[2],))[..., ::2]
    np.testing.assert_allclose(b.interpolate(f, out=strided), b.interpolate(f), rtol=0, atol=0)
    v = np.stack([f, 2 * f])
    np.testing.assert_allclose(b.interpolate(v, out=v)[1], 2 * b.interpolate(f), rtol=1e-15, atol=1e-15)  # in place
    np.testing.assert_allclose(b.interpolate(f), InterpolationPlan(d, x + 0.25).interpolate(f), rtol=0, atol=1e-13)
    _PLAN_ARRAYS.clear()


def test_plan_arrays_serve_a_slightly_smaller_plan():
    from claire_py.kernels import Decomposition
    from claire_py.kernels.interpolation import _PLAN_ARRAYS, InterpolationPlan

    gc.collect()  # as above: earlier dead plans give their arrays first
    _PLAN_ARRAYS.clear()
    d = Decomposition((16, 16, 16), dtype=np.float32)
    x = np.stack(np.broadcast_arrays(*np.ix_(*[np.arange(s.start, s.stop, dtype=float) for s in d.real_slice])))
    x = x.reshape(3, -1) + 0.3
    f = np.random.default_rng(1).random(d.local_shape).astype(np.float32)
    a = InterpolationPlan(d, x)
    plan_array = a._plan
    del a
    gc.collect()
    k = x.shape[1] - x.shape[1] // 50  # 2 % fewer points: served by the kept, larger arrays
    b = InterpolationPlan(d, x[:, :k])
    assert b._plan.shape == (b.num_owned, 4)
    if b.num_owned <= plan_array.shape[0] <= b.num_owned * _PLAN_ARRAYS.SLACK ** 2:
        assert np.shares_memory(b._plan, plan_array)
    fresh = InterpolationPlan(d, x[:, :k])
    np.testing.assert_array_equal(b.interpolate(f), fresh.interpolate(f))
    _PLAN_ARRAYS.clear()


def test_route_points_of_displacements_matches_absolute_points():
    rng = np.random.default_rng(5)
    lo, block = (3, 4, 0), (5, 6, 10)
    u = rng.uniform(-9, 9, (3,) + block).astype(np.float32)
    nodes = np.stack(np.broadcast_arrays(*np.ix_(*[np.arange(l, l + n, dtype=float) for l, n in zip(lo, block)])))
    shape, starts0, starts1 = (16, 12, 10), np.array([0, 5, 11]), np.array([0, 6])
    table = np.arange(6).reshape(3, 2)
    absolute = routing.route_points((nodes + u).reshape(3, -1), shape, starts0, starts1, table)
    relative = routing.route_points(u.reshape(3, -1), shape, starts0, starts1, table, nodes=(lo, block))
    for a, b in zip(absolute, relative):
        np.testing.assert_array_equal(a, b)
