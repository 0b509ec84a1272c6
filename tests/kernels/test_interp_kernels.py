"""Tricubic interpolation kernels against their numpy references, scipy and theory.

No MPI collectives: under ``mpiexec`` every rank runs these serially and independently.
"""

import numpy as np
import pytest

from claire_py.kernels._numba import interp

SHAPE = (9, 8, 7)  # small, non-cubic, odd and even axes


@pytest.fixture(params=interp.KINDS)
def kind(request):
    return request.param


def _field(shape, dtype, ncomp=None, seed=0):
    rng = np.random.default_rng(seed)
    lead = () if ncomp is None else (ncomp,)
    return rng.standard_normal(lead + shape).astype(dtype)


def _assert_close(actual, desired, dtype, rtol64=1e-12, rtol32=1e-5):
    """Relative to the largest value: sums of 64 terms cancel, so elementwise rtol is unfair."""
    assert actual.shape == desired.shape and actual.dtype == desired.dtype
    rtol = rtol64 if dtype == np.float64 else rtol32
    scale = max(np.abs(desired).max(), 1.0)
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * scale)


def _padded_block(field, origin, padded_shape):
    """``field`` (scalar or vector) periodically extended to global indices
    ``origin_a .. origin_a + padded_shape_a - 1`` on the last three axes."""
    out = field
    for a, (o, p) in enumerate(zip(origin, padded_shape)):
        out = np.take(out, np.arange(o, o + p), axis=field.ndim - 3 + a, mode="wrap")
    return np.ascontiguousarray(out)


# ------------------------------------------------------------------ direct kernel
@pytest.mark.parametrize("ncomp", [None, 3], ids=["scalar", "vector"])
def test_direct_matches_reference(dtype, kind, ncomp):
    f = _field(SHAPE, dtype, ncomp)
    rng = np.random.default_rng(1)
    n = np.array(SHAPE)
    pts = rng.uniform(-2 * n, 3 * n, (400, 3))  # negative and beyond N: wrap
    pts[:20] = rng.integers(-2 * n, 3 * n, (20, 3))  # nodes
    pts[20:23] = [[-1e-17, 0.0, 1e-17], [-1.0, -0.5, n[2] - 1e-13], [n[0], 2.0 * n[1], -3.0 * n[2]]]
    got = interp.interpolate_periodic(f, pts, kind=kind)
    assert got.shape == ((ncomp,) if ncomp else ()) + (400,)
    _assert_close(got, interp.reference_interpolate_periodic(f, pts, kind), dtype)
    # float32 points, and a given out
    out = np.empty_like(got)
    assert interp.interpolate_periodic(f, pts.astype(np.float32), kind=kind, out=out) is out
    _assert_close(out, interp.reference_interpolate_periodic(f, pts.astype(np.float32), kind), dtype)


def test_direct_is_exact_at_nodes(dtype):
    f = _field(SHAPE, dtype, 2)
    nodes = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    shift = np.array(SHAPE) * np.array([-2, 1, 3])
    for pts in (nodes, nodes + shift):
        got = interp.interpolate_periodic(f, np.ascontiguousarray(pts, dtype=np.float64))
        np.testing.assert_array_equal(got, f.reshape(2, -1))


# ------------------------------------------------------------------ plan + planned kernel
@pytest.mark.parametrize("ncomp", [None, 3], ids=["scalar", "vector"])
def test_planned_matches_direct(dtype, kind, ncomp):
    n = np.array((12, 10, 9))
    f = _field(tuple(n), dtype, ncomp, seed=2)
    ghost = 2
    start, size = np.array([7, 0, 3]), np.array([5, 10, 4])  # block wraps past N on axis 0
    origin = tuple(int(o) for o in start - ghost)  # (5, -2, 1): negative on axis 1
    padded_shape = tuple(int(p) for p in size + 2 * ghost)
    fpad = _padded_block(f, origin, padded_shape)
    rng = np.random.default_rng(3)
    owned = rng.uniform(start, start + size, (300, 3))  # what the distributed plan sends
    lo, hi = np.array(origin) + 1.0, np.array(origin) + np.array(padded_shape) - 2.0
    anywhere = rng.uniform(lo, hi, (300, 3))  # the full admissible range
    edges = np.array([lo, np.nextafter(hi, -np.inf), [lo[0], hi[1] - 1e-9, lo[2]]])
    for pts in (owned, anywhere, edges):
        plan = interp.stencil_plan(pts.T, origin, padded_shape, kind=kind, dtype=dtype)
        assert plan.dtype == dtype and plan.shape == (len(pts), 4)
        got = interp.interpolate_planned(fpad, plan, kind)
        _assert_close(got, interp.interpolate_periodic(f, pts, kind=kind), dtype)


def test_plan_layout(dtype, kind):
    """Column 0 = the flat corner index (unsigned bits), columns 1-3 = the fractions; the
    kernel's weights (Horner on ``weight_coefficients``) = the module docstring's formulas."""
    origin, padded_shape = (-2, 3, -1), (8, 9, 10)
    rng = np.random.default_rng(4)
    pts = rng.uniform(np.array(origin) + 1, np.array(origin) + np.array(padded_shape) - 2, (50, 3))
    out = np.empty((50, 4), dtype)
    plan = interp.stencil_plan(pts.T, origin, padded_shape, kind, out=out, dtype=dtype)
    assert plan is out
    corner = np.floor(pts).astype(np.int64) - 1 - np.array(origin)
    bits = plan.view(np.uint32 if dtype == np.float32 else np.uint64)[:, 0]
    np.testing.assert_array_equal(bits, np.ravel_multi_index(corner.T, padded_shape))
    t = pts - np.floor(pts)
    single = dtype == np.float32
    np.testing.assert_allclose(plan[:, 1:], t, rtol=0, atol=1e-7 if single else 0)
    coef = interp.weight_coefficients(kind, dtype).reshape(4, 4).astype(np.float64)
    for a in range(3):
        w = sum(coef[k] * t[:, a:a + 1] ** k for k in range(4))
        np.testing.assert_allclose(w, interp._reference_axis_weights(t[:, a], kind).T, rtol=0,
                                   atol=1e-7 if single else 1e-15)
    np.testing.assert_allclose(coef.sum(axis=1), [1, 0, 0, 0], atol=1e-7 if single else 1e-16)


def test_planned_is_exact_at_nodes(dtype):
    f = _field(SHAPE, dtype, seed=5)
    origin, padded_shape = (-2, -2, -2), tuple(s + 4 for s in SHAPE)
    fpad = np.pad(f, 2, mode="wrap")
    nodes = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")).reshape(3, -1)
    plan = interp.stencil_plan(nodes.astype(np.float64), origin, padded_shape, dtype=dtype)
    np.testing.assert_array_equal(interp.interpolate_planned(fpad, plan), f.ravel())


def test_nearest_plan_takes_node_values_exactly(dtype):
    """``nearest``: fractions rounded to 0 or 1, where the Lagrange weights are one-hot."""
    f = _field(SHAPE, dtype, seed=12)
    fpad = np.pad(f, 2, mode="wrap")
    rng = np.random.default_rng(13)
    pts = rng.uniform(0, np.array(SHAPE) - 1, (400, 3))
    pts[:3] = [[0.5, 1.49999, 2.5000001], [3.0, 4.0, 5.0], [0.999, 0.001, 6.4]]
    plan = interp.stencil_plan(pts.T, (-2, -2, -2), fpad.shape, kind="nearest", dtype=dtype)
    nearest = np.floor(pts + 0.5).astype(np.int64)
    np.testing.assert_array_equal(interp.interpolate_planned(fpad, plan, "nearest"), f[tuple(nearest.T)])


def test_displacement_plan_equals_point_plan(dtype, kind):
    """``nodes=``: displacements of a block's nodes give the plan of the points ``x + u``;
    ``period=``: points outside ``[0, N)`` are wrapped first."""
    lo, block, shape = (2, 0, 3), (4, 5, 3), (9, 8, 7)
    u = np.random.default_rng(14).uniform(-12, 12, (3,) + block).astype(dtype)
    nodes = np.stack(np.broadcast_arrays(*np.ix_(*[np.arange(l, l + n, dtype=float) for l, n in zip(lo, block)])))
    wrapped = np.mod(nodes + u.astype(np.float64), np.array(shape, float)[:, None, None, None])
    origin, padded_shape = (-2, -2, -2), tuple(s + 4 for s in shape)
    ref = interp.stencil_plan(wrapped.reshape(3, -1), origin, padded_shape, kind, dtype=dtype)
    got = interp.stencil_plan(u.reshape(3, -1), origin, padded_shape, kind, dtype=dtype, period=shape,
                              nodes=(lo, block))
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


def test_plain_planned_kernel_matches(dtype, kind):
    """The portable plain-numba kernel computes the same as the SIMD one."""
    f = _field(SHAPE, dtype, seed=6)
    fpad = np.pad(f, 2, mode="wrap")
    pts = np.random.default_rng(7).uniform(0, np.array(SHAPE), (500, 3)).T
    plan = interp.stencil_plan(pts, (-2, -2, -2), fpad.shape, kind=kind, dtype=dtype)
    out = np.empty(500, dtype)
    interp._interpolate_planned_plain(fpad.ravel(), fpad.shape[1] * fpad.shape[2], fpad.shape[2], plan,
                                      interp._plan_bits(plan), interp.weight_coefficients(kind, dtype), out)
    _assert_close(interp.interpolate_planned(fpad, plan, kind), out, dtype, rtol64=1e-14)


# ------------------------------------------------------------------ B-splines
def test_bspline_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    f = _field((10, 9, 8), np.float64, seed=8)
    coeffs = interp.bspline_prefilter_reference(f)
    pts = np.random.default_rng(9).uniform(-10, 20, (500, 3))
    got = interp.interpolate_periodic(coeffs, pts, kind="bspline")
    ref = ndimage.map_coordinates(f, pts.T, order=3, mode="grid-wrap")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10 * np.abs(ref).max())


def test_bspline_prefilter_interpolates_nodes_and_vectors(dtype):
    f = _field(SHAPE, dtype, 3, seed=10)
    coeffs = interp.bspline_prefilter_reference(f)
    assert coeffs.dtype == dtype and coeffs.shape == f.shape
    np.testing.assert_array_equal(coeffs[1], interp.bspline_prefilter_reference(f[1]))
    nodes = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"), -1).reshape(-1, 3)
    got = interp.interpolate_periodic(coeffs, nodes.astype(np.float64), kind="bspline")
    _assert_close(got, f.reshape(3, -1), dtype, rtol64=1e-13, rtol32=1e-5)


# ------------------------------------------------------------------ accuracy
def _smooth(X0, X1, X2):
    return np.sin(X0) * np.cos(2 * X1) * np.sin(X2) + np.cos(X0 + 2 * X2) + 0.5 * np.sin(3 * X1 - X0)


def test_convergence_order(kind):
    rng = np.random.default_rng(11)
    X = rng.uniform(0, 2 * np.pi, (2000, 3))  # physical points
    errors = []
    for n in (16, 32, 64):
        h = 2 * np.pi / n
        grid = np.meshgrid(*(np.arange(n) * h,) * 3, indexing="ij")
        f = _smooth(*grid)
        if kind == "bspline":
            f = interp.bspline_prefilter_reference(f)
        got = interp.interpolate_periodic(f, X / h, kind=kind)
        errors.append(np.abs(got - _smooth(*X.T)).max())
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert orders[-1] >= 3.5 and orders[0] >= 3.0, (errors, orders)
    assert errors[-1] < 1e-3


# ------------------------------------------------------------------ argument checks
def test_wrappers_reject_bad_arguments():
    f = _field(SHAPE, np.float64)
    pts = np.zeros((5, 3))
    with pytest.raises(TypeError, match="float32 or float64"):
        interp.interpolate_periodic(f.astype(np.int64), pts)
    with pytest.raises(TypeError, match="float32 or float64"):
        interp.interpolate_periodic(f, pts.astype(np.float16))
    with pytest.raises(TypeError, match="numpy array"):
        interp.interpolate_periodic(f.tolist(), pts)
    with pytest.raises(ValueError, match="C-contiguous"):
        interp.interpolate_periodic(f[:, ::2], pts)
    with pytest.raises(ValueError, match="C-contiguous"):
        interp.interpolate_periodic(f, np.zeros((3, 5)).T)
    with pytest.raises(ValueError, match=r"shape \(npts, 3\)"):
        interp.interpolate_periodic(f, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="scalar .* or vector"):
        interp.interpolate_periodic(f[0], pts)
    with pytest.raises(ValueError, match="unknown"):
        interp.interpolate_periodic(f, pts, kind="linear")
    with pytest.raises(ValueError, match="out: array of shape"):
        interp.interpolate_periodic(f, pts, out=np.empty(4))
    with pytest.raises(TypeError, match="out: dtype float32 does not match float64"):
        interp.interpolate_periodic(f, pts, out=np.empty(5, np.float32))

    origin, padded_shape = (-2, -2, -2), tuple(s + 4 for s in SHAPE)
    pts = pts.T
    with pytest.raises(ValueError, match="2 of 5 points have stencils outside"):
        bad = pts.copy()
        bad[0, 1], bad[2, 3] = -1.5, SHAPE[2]  # corner -3 < origin; last node N+1 > origin + p - 1
        interp.stencil_plan(bad, origin, padded_shape)
    with pytest.raises(ValueError, match="not finite"):
        interp.stencil_plan(np.full((3, 2), np.nan), origin, padded_shape)
    with pytest.raises(TypeError, match="plans must be float32 or float64"):
        interp.stencil_plan(pts, origin, padded_shape, dtype=np.int32)
    with pytest.raises(TypeError, match="points: expected a float32 or float64"):
        interp.stencil_plan(pts.astype(np.int64), origin, padded_shape)
    with pytest.raises(ValueError, match=r"points: expected shape \(3, npts\)"):
        interp.stencil_plan(pts.T, origin, padded_shape)
    with pytest.raises(ValueError, match="3 entries"):
        interp.stencil_plan(pts, origin[:2], padded_shape)
    with pytest.raises(ValueError, match="unknown"):
        interp.stencil_plan(pts, origin, padded_shape, kind="cubic")
    with pytest.raises(ValueError, match="out: array of shape"):
        interp.stencil_plan(pts, origin, padded_shape, out=np.empty((5, 12), np.float32))
    with pytest.raises(ValueError, match="nodes: a block of 2x2x2 nodes for 5"):
        interp.stencil_plan(pts, origin, padded_shape, nodes=((0, 0, 0), (2, 2, 2)))
    with pytest.raises(ValueError, match="too large for a float32 plan"):
        interp.stencil_plan(pts, origin, (2048, 2048, 1025))

    plan = interp.stencil_plan(pts, origin, padded_shape, dtype=np.float64)
    fpad = np.pad(f, 2, mode="wrap")
    with pytest.raises(TypeError, match="plan: dtype float32 does not match float64"):
        interp.interpolate_planned(fpad, plan.astype(np.float32))
    with pytest.raises(ValueError, match=r"plan: expected shape \(npts, 4\)"):
        interp.interpolate_planned(fpad, np.ascontiguousarray(plan[:, :3]))
    with pytest.raises(ValueError, match="unknown"):
        interp.interpolate_planned(fpad, plan, "cubic")
    with pytest.raises(ValueError, match="C-contiguous"):
        interp.interpolate_planned(np.asfortranarray(fpad), plan)
    with pytest.raises(ValueError, match="scalar .* or vector"):
        interp.interpolate_planned(fpad[0], plan)
    with pytest.raises(ValueError, match="outside the padded field"):
        interp.interpolate_planned(np.ascontiguousarray(fpad[:4]), plan)
