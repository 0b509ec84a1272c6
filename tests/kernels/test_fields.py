"""``kernels/fields.py``: each fused numba kernel against a slow numpy evaluation of its formula.

Shapes are small and non-cubic; data come from ``np.random.default_rng``; float32 and float64
(the ``dtype`` fixture of ``conftest.py``) are compared with a tolerance relative to the largest
magnitude of the reference. Purely local (no MPI): under ``mpiexec`` every rank runs them alone.
"""

import numpy as np
import pytest

from claire_py.kernels import fields

SHAPE = (9, 8, 7)


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


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("alias", [None, "d_departure", "d"])
def test_heun_factor(dtype, sign, alias):
    """The factor is one explicit Heun step of dq/dt = sign d q, predictor then corrector."""
    rng = _rng(3)
    dx, d = _rand(rng, SHAPE, dtype, -3, 3), _rand(rng, SHAPE, dtype, -3, 3)
    dx64, d64 = _f64(dx, d)
    dt, q = 0.25, 1.0
    rhs0 = sign * dx64 * q
    predictor = q + dt * rhs0
    ref = q + 0.5 * dt * (rhs0 + sign * d64 * predictor)
    out = {"d_departure": dx, "d": d}.get(alias, np.empty_like(d))
    assert fields.heun_factor(dx, d, sign, dt, out) is out
    _close(out, ref, _tol(dtype))


def test_heun_factor_is_positive_where_the_step_resolves_div_v():
    """1 + x + y + 2 x y > 0 for |x|, |y| < 1/sqrt(2) (x = sign dt/2 d(X), y = sign dt/2 d), and
    for x = y anywhere; it vanishes at the corner x = -y = 1/sqrt(2)."""
    dt = 0.25
    edge = np.sqrt(0.5) / (0.5 * dt)
    grid = np.linspace(-0.999 * edge, 0.999 * edge, 41)
    dx, d = (np.ascontiguousarray(a) for a in np.meshgrid(grid, grid, indexing="ij"))
    for sign in (1.0, -1.0):
        out = fields.heun_factor(dx[None], d[None], sign, dt, np.empty((1,) + d.shape))
        assert out.min() > 0
    same = np.linspace(-100, 100, 2001).reshape(1, 1, -1)
    assert fields.heun_factor(same, same.copy(), -1.0, dt, np.empty_like(same)).min() > 0
    corner = np.array([[[edge]]]), np.array([[[-edge]]])
    assert abs(fields.heun_factor(*corner, 1.0, dt, np.empty((1, 1, 1)))[0, 0, 0]) < 1e-12


@pytest.mark.parametrize("alias", [False, True], ids=["lam", "lam-is-src"])
def test_scale_and_accumulate(dtype, alias):
    rng = _rng(4)
    src, factor = _rand(rng, SHAPE, dtype), _rand(rng, SHAPE, dtype, 0.5, 1.5)
    grad, body = _rand(rng, (3,) + SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype)
    src64, factor64, grad64, body64 = _f64(src, factor, grad, body)
    w = -1.3
    lam_ref = src64 * factor64
    body_ref = body64 + w * lam_ref * grad64
    lam = src if alias else np.empty_like(src)
    assert fields.scale_and_accumulate(src, factor, w, grad, lam, body) is None
    _close(lam, lam_ref, _tol(dtype))
    _close(body, body_ref, 2 * _tol(dtype))


def test_accumulate_product(dtype):
    rng = _rng(5)
    lam, grad, body = _rand(rng, SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype), _rand(rng, (3,) + SHAPE, dtype)
    lam64, grad64, body64 = _f64(lam, grad, body)
    fields.accumulate_product(lam, 0.7, grad, body)
    _close(body, body64 + 0.7 * lam64 * grad64, 2 * _tol(dtype))
    np.testing.assert_array_equal(lam, lam64.astype(dtype))  # untouched


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


def test_mismatched_shapes_are_refused(dtype):
    """The kernels run without bounds checks: every array's shape is checked first."""
    rng = np.random.default_rng(30)
    a, small = rng.random(SHAPE).astype(dtype), rng.random((4, 4, 3)).astype(dtype)
    vec = rng.random((3,) + SHAPE).astype(dtype)
    with pytest.raises(ValueError, match="d: expected"):
        fields.heun_factor(a, small, 1.0, 0.5, np.empty_like(a))
    with pytest.raises(ValueError, match="out: expected"):
        fields.minus_dot_added(a, 0.5, vec, vec, small)
    with pytest.raises(ValueError, match="factor: expected"):
        fields.scale_and_accumulate(a, small, 1.0, vec, a.copy(), vec.copy())
    with pytest.raises(ValueError, match="body: expected"):
        fields.scale_and_accumulate(a, a, 1.0, vec, a.copy(), vec[:2].copy())
    with pytest.raises(ValueError, match="grad: expected"):
        fields.accumulate_product(a, 1.0, vec[:, :4], vec.copy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_to_fortran_against_numpy(dtype):
    # shapes not multiples of the 32-point tile, on both tiled axes
    rng = np.random.default_rng(5)
    field = rng.standard_normal((3, 37, 5, 70)).astype(dtype)
    matrix, offset, index_matrix = rng.standard_normal((3, 3)), rng.standard_normal(3), rng.standard_normal((3, 3))
    out = fields.affine_to_fortran(field, matrix, offset, index_matrix)
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in field.shape[1:]], indexing="ij"), axis=-1)
    expected = np.einsum("ab,b...->...a", matrix, field.astype(np.float64)) + offset + index @ index_matrix.T
    assert out.flags.f_contiguous and out.dtype == np.float32 and out.shape == (37, 5, 70, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)
    # a scalar, transposed only; and a given (n1, n2, n3, 1, 3) output (ITK's 5-D vector image)
    np.testing.assert_array_equal(fields.affine_to_fortran(field[1], [[1.0]])[..., 0], field[1].astype(np.float32))
    itk = np.empty((37, 5, 70, 1, 3), np.float64, order="F")
    assert fields.affine_to_fortran(field, matrix, out=itk) is itk
    np.testing.assert_allclose(itk[..., 0, :], np.einsum("ab,b...->...a", matrix, field.astype(np.float64)),
                               rtol=1e-6 if dtype == np.float32 else 1e-12)
    with pytest.raises(ValueError, match="Fortran-contiguous"):
        fields.affine_to_fortran(field, matrix, out=np.empty((37, 5, 70, 3), np.float32))
