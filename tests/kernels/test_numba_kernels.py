"""Each numba kernel against a direct numpy evaluation of its formula."""

import numpy as np
import pytest

from claire_py.kernels._numba import pointwise
from claire_py.kernels._numba import spectral as k

SHAPE = (6, 5, 4)


@pytest.fixture(params=[np.complex128, np.complex64], ids=["c128", "c64"])
def cdtype(request):
    return np.dtype(request.param)


def _data(cdtype, lead=()):
    rng = np.random.default_rng(0)
    z = rng.standard_normal(lead + SHAPE) + 1j * rng.standard_normal(lead + SHAPE)
    rt = np.float32 if cdtype == np.complex64 else np.float64
    ks = [rng.integers(-4, 5, n).astype(rt) for n in SHAPE]
    return z.astype(cdtype), ks


def _grid(ks):
    return np.meshgrid(*ks, indexing="ij")


def _tol(cdtype):
    return 1e-13 if cdtype == np.complex128 else 2e-6


def test_multiply_i_linear(cdtype):
    z, (a0, a1, a2) = _data(cdtype)
    A0, A1, A2 = _grid((a0, a1, a2))
    np.testing.assert_allclose(k.multiply_i_linear(z, a0, a1, a2, 0.5), 0.5j * (A0 + A1 + A2) * z,
                               rtol=_tol(cdtype), atol=_tol(cdtype) * 10)


def test_multiply_i_linear_accumulates(cdtype):
    """``accumulate=True`` adds: the divergence of SpectralOperators, one component at a time."""
    v, ks = _data(cdtype, (3,))
    K = _grid(ks)
    out = np.zeros_like(v[0])
    for a in range(3):
        mult = [ks[b] if b == a else np.zeros_like(ks[b]) for b in range(3)]
        k.multiply_i_linear(v[a], *mult, 2.0, out=out, accumulate=True)
    np.testing.assert_allclose(out, 2j * sum(K[a] * v[a] for a in range(3)), rtol=_tol(cdtype),
                               atol=_tol(cdtype) * 100)
    with pytest.raises(ValueError, match="needs out"):
        k.multiply_i_linear(v[0], *ks, accumulate=True)


@pytest.mark.parametrize("invert", [False, True])
def test_radial_polynomial(cdtype, invert):
    z, ks = _data(cdtype)
    K = _grid(ks)
    q = K[0] ** 2 + K[1] ** 2 + K[2] ** 2
    c = (0.0, 1.0, 0.5, 0.01)
    s = c[0] + c[1] * q + c[2] * q ** 2 + c[3] * q ** 3
    if invert:
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = np.where(s == 0, 0, 3.0 / s * z)
    else:
        expected = 3.0 * s * z
    np.testing.assert_allclose(k.radial_polynomial(z, *ks, c, 3.0, invert), expected, rtol=_tol(cdtype) * 10,
                               atol=_tol(cdtype) * np.abs(expected).max())


def test_radial_axpy(cdtype):
    z, ks = _data(cdtype)
    w = (z[::-1] * 0.5).copy()
    K = _grid(ks)
    q = K[0] ** 2 + K[1] ** 2 + K[2] ** 2
    c = (0.1, 1.0, 0.5, 0.0)
    expected = 2.0 * (c[0] + c[1] * q + c[2] * q ** 2) * z - 0.3 * w
    np.testing.assert_allclose(k.radial_axpy(z, *ks, c, 2.0, w, -0.3), expected, rtol=_tol(cdtype) * 10,
                               atol=_tol(cdtype) * np.abs(expected).max())
    out = k.radial_axpy(z, *ks, c, 2.0, w, -0.3, out=w)  # out may be w
    assert out is w
    np.testing.assert_allclose(w, expected, rtol=_tol(cdtype) * 10, atol=_tol(cdtype) * np.abs(expected).max())


def test_separable_multiply(cdtype):
    z, ks = _data(cdtype)
    m = [np.exp(-0.1 * kk ** 2) for kk in ks]
    M = _grid(m)
    np.testing.assert_allclose(k.separable_multiply(z, *m, 0.25), 0.25 * M[0] * M[1] * M[2] * z,
                               rtol=_tol(cdtype), atol=_tol(cdtype))


@pytest.mark.parametrize("relaxation", [0.0, 100.0])
def test_leray(cdtype, relaxation):
    v, ks = _data(cdtype, (3,))
    D = np.stack(_grid(ks))
    dd = (D ** 2).sum(0)
    m = 1.0 / (relaxation / (1.0 + dd) + 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(dd > 0, m * (D * v).sum(0) / dd, 0)
    np.testing.assert_allclose(k.leray(v, *ks, relaxation=relaxation), v - w * D, rtol=_tol(cdtype) * 10,
                               atol=_tol(cdtype) * 10)
    with pytest.raises(ValueError, match="relaxation"):
        k.leray(v, *ks, relaxation=-1.0)


def test_kernels_write_in_place_and_check_inputs(cdtype):
    z, ks = _data(cdtype)
    expected = k.separable_multiply(z, *ks, 1.0)
    out = k.separable_multiply(z, *ks, 1.0, out=z)
    assert out is z
    np.testing.assert_array_equal(z, expected)
    with pytest.raises(TypeError, match="complex64 or complex128"):
        k.separable_multiply(z.real.copy(), *ks)
    with pytest.raises(ValueError, match="C-contiguous"):
        k.separable_multiply(np.asfortranarray(z), *ks)
    with pytest.raises(ValueError, match="wavenumbers of length"):
        k.separable_multiply(z, ks[1], ks[1], ks[2])


@pytest.mark.parametrize("dt", [np.float32, np.float64])
def test_dot_accumulates_in_float64(dt):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(300_001).astype(dt)
    b = rng.standard_normal(300_001).astype(dt)
    exact = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
    assert pointwise.dot(a, b) == pytest.approx(exact, rel=1e-12, abs=1e-9)
    with pytest.raises(ValueError, match="shapes"):
        pointwise.dot(a, b[:-1])
