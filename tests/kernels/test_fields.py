"""``kernels/fields.py``: each fused numba kernel against a slow numpy evaluation of its formula.

Shapes are small and non-cubic; data come from ``np.random.default_rng``; float32 and float64
(the ``dtype`` fixture of ``conftest.py``) are compared with a tolerance relative to the largest
magnitude of the reference. Purely local (no MPI): under ``mpiexec`` every rank runs them alone.
"""

import numpy as np
import pytest

from claire_py.kernels import fields

SHAPE = (9, 8, 7)
SPACING = (0.7, 1.1, 0.9)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _rand(rng, shape, dtype, lo=-1.0, hi=1.0):
    return rng.uniform(lo, hi, shape).astype(dtype)


def _tol(dtype):
    return 1e-12 if np.dtype(dtype) == np.float64 else 2e-6


def _close(actual, expected, tol):
    """``max |actual - expected| <= tol * max |expected|`` (expected computed in float64)."""
    expected = np.asarray(expected, dtype=np.float64)
    err = np.max(np.abs(np.asarray(actual, dtype=np.float64) - expected))
    assert err <= tol * np.max(np.abs(expected)), f"max error {err:.3e}, scale {np.max(np.abs(expected)):.3e}"


def _f64(*arrays):
    """float64 copies (taken before the kernels modify the inputs in place)."""
    return [np.array(a, dtype=np.float64) for a in arrays]


def _fd4(m, axis, h):
    """4th-order central difference of the periodic ``m`` along ``axis`` (``m[i+s]`` = roll by -s)."""
    r = lambda s: np.roll(m, -s, axis=axis)  # noqa: E731
    return (r(-2) - 8 * r(-1) + 8 * r(1) - r(2)) / (12 * h)


def _grad4(m, spacing):
    m = np.asarray(m, dtype=np.float64)
    return np.stack([_fd4(m, a, spacing[a]) for a in range(3)])


# ---- pointwise kernels -------------------------------------------------------------------------


def test_axpy_contiguous(dtype):
    rng = _rng(1)
    x, y = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype)
    x64, y64 = _f64(x, y)
    assert fields.axpy(-0.37, x, y) is y
    _close(y, y64 - 0.37 * x64, _tol(dtype))


@pytest.mark.parametrize("case", ["strided", "mixed"])
def test_axpy_numpy_fallback(dtype, case):
    rng = _rng(2)
    other = np.float32 if np.dtype(dtype) == np.float64 else np.float64
    if case == "strided":  # non-contiguous views of one dtype
        xb, yb = _rand(rng, (9, 16, 7), dtype), _rand(rng, (9, 8, 14), dtype)
        x, y = xb[:, ::2], yb[..., ::2]
        yb0 = yb.copy()
    else:  # contiguous, but x and y of different dtypes
        x, y = _rand(rng, SHAPE, other), _rand(rng, SHAPE, dtype)
    x64, y64 = _f64(x, y)
    assert fields.axpy(1.7, x, y) is y
    # tolerance of the lower precision: with y float64 and x float32 numpy forms alpha x in float32
    _close(y, y64 + 1.7 * x64, max(_tol(dtype), _tol(x.dtype)))
    if case == "strided":  # the entries of y's parent outside the view are untouched
        np.testing.assert_array_equal(yb[..., 1::2], yb0[..., 1::2])


@pytest.mark.parametrize("alias", [False, True], ids=["out", "out-is-a"])
def test_times_one_plus(dtype, alias):
    rng = _rng(3)
    a, d = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype)
    a64, d64 = _f64(a, d)
    ref = a64 * (1 + 0.6 * d64)
    out = a if alias else np.empty_like(a)
    assert fields.times_one_plus(a, d, 0.6, out) is out
    _close(out, ref, _tol(dtype))


def test_damp_and_accumulate(dtype):
    rng = _rng(4)
    lam, d = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype)
    grad, body = _rand(rng, (3,) + SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype)
    lam64, d64, grad64, body64 = _f64(lam, d, grad, body)
    c, w = 0.4, -1.3  # 1 - c d in [0.6, 1.4]
    lam_ref = lam64 / (1 - c * d64)
    body_ref = body64 + w * lam_ref * grad64
    assert fields.damp_and_accumulate(lam, d, c, w, grad, body) is None
    _close(lam, lam_ref, _tol(dtype))
    _close(body, body_ref, 2 * _tol(dtype))


@pytest.mark.parametrize("alias", [False, True], ids=["out", "out-is-base"])
def test_minus_dot_added(dtype, alias):
    rng = _rng(5)
    base, u, grad = _rand(rng, SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype)
    base64, u64, grad64 = _f64(base, u, grad)
    ref = base64 - 0.8 * np.sum(u64 * grad64, axis=0)
    out = base if alias else np.empty_like(base)
    assert fields.minus_dot_added(base, 0.8, u, grad, out) is out
    _close(out, ref, 2 * _tol(dtype))


@pytest.mark.parametrize("out_dtype", [None, np.float64], ids=["out-same", "out-f64"])
def test_det_identity_plus(dtype, out_dtype):
    rng = _rng(6)
    grad_u = _rand(rng, (3, 3) + SHAPE, dtype)  # grad_u[a][b] = d_b u_a
    scale = (0.5, 0.3, 0.2)
    g = _f64(grad_u)[0] * np.asarray(scale)[None, :, None, None, None]
    mats = np.eye(3) + np.moveaxis(g, (0, 1), (-2, -1))  # (..., a, b)
    ref = np.linalg.det(mats)
    out = np.empty(SHAPE, out_dtype or dtype)
    assert fields.det_identity_plus(grad_u, scale, out) is out
    # float64 arithmetic inside: a float64 output is exact up to float64 round-off
    _close(out, ref, _tol(out.dtype) * 10)
    out2 = np.empty_like(out)  # three separate vector fields work the same
    fields.det_identity_plus([np.ascontiguousarray(grad_u[a]) for a in range(3)], scale, out2)
    np.testing.assert_array_equal(out2, out)


# ---- FourthOrderGradient -----------------------------------------------------------------------


@pytest.mark.parametrize("ghost", [2, 3])
@pytest.mark.parametrize("alias", [False, True], ids=["out", "out-is-base"])
def test_fd4_minus_dot_added(dtype, ghost, alias):
    rng = _rng(7)
    m, base, u = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype)
    base64, u64 = _f64(base, u)
    ref = base64 - 0.9 * np.sum(u64 * _grad4(m, SPACING), axis=0)
    op = fields.FourthOrderGradient(SPACING, dtype, ghost=ghost)
    out = base if alias else np.empty_like(base)
    assert op.minus_dot_added(base, 0.9, u, np.pad(m, ghost, mode="wrap"), out) is out
    _close(out, ref, 5 * _tol(dtype))


@pytest.mark.parametrize("ghost", [2, 3])
def test_fd4_damp_and_accumulate(dtype, ghost):
    rng = _rng(8)
    m, lam, d = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype)
    body = _rand(rng, (3,) + SHAPE, dtype)
    lam64, d64, body64 = _f64(lam, d, body)
    c, w = -0.3, 0.7
    lam_ref = lam64 / (1 - c * d64)
    body_ref = body64 + w * lam_ref * _grad4(m, SPACING)
    op = fields.FourthOrderGradient(SPACING, dtype, ghost=ghost)
    op.damp_and_accumulate(lam, d, c, w, np.pad(m, ghost, mode="wrap"), body)
    _close(lam, lam_ref, _tol(dtype))
    _close(body, body_ref, 5 * _tol(dtype))


def test_fd4_convergence_order():
    """Smooth periodic field on [0, 2 pi)^3: the error against the analytic gradient falls as h^4
    (float64: in float32 the round-off ~ eps/h meets the truncation error on these grids)."""
    c = np.array([1.0, -0.5, 2.0])
    errs_grad, errs_dot = [], []
    for n in (16, 32, 64):
        h = 2 * np.pi / n
        x, y, z = np.meshgrid(*(3 * [np.arange(n) * h]), indexing="ij")
        m = np.sin(x + 1) * np.cos(2 * y) + 0.5 * np.cos(z) * np.sin(x)
        exact = np.stack([np.cos(x + 1) * np.cos(2 * y) + 0.5 * np.cos(z) * np.cos(x),
                          -2 * np.sin(x + 1) * np.sin(2 * y),
                          -0.5 * np.sin(z) * np.sin(x)])
        op = fields.FourthOrderGradient((h, h, h), np.float64)
        mpad = np.pad(m, 2, mode="wrap")
        body = np.zeros((3, n, n, n))
        op.damp_and_accumulate(np.ones_like(m), np.zeros_like(m), 0.0, 1.0, mpad, body)  # body = grad m
        errs_grad.append(np.max(np.abs(body - exact)))
        u = np.broadcast_to(c[:, None, None, None], body.shape).copy()
        out = op.minus_dot_added(np.zeros_like(m), -1.0, u, mpad, np.empty_like(m))  # u . grad m
        errs_dot.append(np.max(np.abs(out - np.tensordot(c, exact, axes=1))))
    for errs in (errs_grad, errs_dot):
        orders = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
        assert np.all(orders >= 3.7), (errs, orders)


def test_fd4_rejects_bad_ghost_and_padding(dtype):
    for ghost in (0, 1):
        with pytest.raises(ValueError):
            fields.FourthOrderGradient(SPACING, dtype, ghost=ghost)
    rng = _rng(9)
    m, lam, d = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype)
    u, body = _rand(rng, (3,) + SHAPE, dtype), np.zeros((3,) + SHAPE, dtype)
    op = fields.FourthOrderGradient(SPACING, dtype, ghost=2)
    other = np.float32 if np.dtype(dtype) == np.float64 else np.float64
    bads = (np.pad(m, 1, mode="wrap"), np.pad(m, 3, mode="wrap"), m, np.pad(m, ((2, 2), (2, 2), (2, 3))),
            np.pad(m, 2, mode="wrap").astype(other))  # wrong shapes, then the right shape in the wrong dtype
    for bad in bads:
        with pytest.raises(ValueError):
            op.minus_dot_added(m, 1.0, u, bad, np.empty_like(m))
        with pytest.raises(ValueError):
            op.damp_and_accumulate(lam, d, 0.5, 1.0, bad, body)


def test_mismatched_shapes_are_refused(dtype):
    """The kernels run without bounds checks: every array's shape is checked first."""
    rng = np.random.default_rng(30)
    a, small = rng.random(SHAPE).astype(dtype), rng.random((4, 4, 3)).astype(dtype)
    vec = rng.random((3,) + SHAPE).astype(dtype)
    with pytest.raises(ValueError, match="d: expected"):
        fields.times_one_plus(a, small, 0.5, np.empty_like(a))
    with pytest.raises(ValueError, match="out: expected"):
        fields.minus_dot_added(a, 0.5, vec, vec, small)
    with pytest.raises(ValueError, match="d: expected"):
        fields.damp_and_accumulate(a.copy(), small, 0.5, 1.0, vec, vec.copy())
    fd = fields.FourthOrderGradient((1.0, 1.0, 1.0), dtype)
    mpad = np.pad(a, 2, mode="wrap")
    with pytest.raises(ValueError, match="out: expected"):
        fd.minus_dot_added(a, 0.5, vec, mpad, small)
    with pytest.raises(ValueError, match="body: expected"):
        fd.damp_and_accumulate(a.copy(), a, 0.5, 1.0, mpad, vec[:2].copy())
