"""The affine stage's kernels (:mod:`claire_py.kernels.sampling`) against slow references:
trilinear samples against ``scipy.ndimage.map_coordinates``, the fused sums against numpy, and
the Gauss-Newton pieces they give against the objective itself (exact on a linear image)."""

import numpy as np
import pytest
from scipy import ndimage

from claire_py.kernels.sampling import affine_sums, gaussian_smooth, resample_affine, trilinear_samples
from claire_py.solvers.affine import _rotation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_trilinear_samples_match_scipy_inside_and_are_zero_outside(dtype):
    rng = np.random.default_rng(0)
    volumes = rng.random((3, 9, 7, 8)).astype(dtype)
    inside = rng.random((500, 3)) * (np.array(volumes.shape[1:]) - 1)
    inside[:5] = np.array(volumes.shape[1:]) - 1  # the last node on every axis
    inside[5:10] = 0
    outside = np.array([[-0.01, 3, 3], [3, 6.01, 3], [3, 3, 7.5], [9, 0, 0]])
    values, flags = trilinear_samples(volumes, np.concatenate([inside, outside]))
    reference = np.stack([ndimage.map_coordinates(v.astype(np.float64), inside.T, order=1) for v in volumes], -1)
    np.testing.assert_allclose(values[:len(inside)], reference, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-6)
    assert flags[:len(inside)].all() and not flags[len(inside):].any()
    assert not values[len(inside):].any()
    scalar, _ = trilinear_samples(volumes[0], inside)
    np.testing.assert_array_equal(scalar[:, 0], values[:len(inside), 0])


def _reference_sums(volumes, x, f, w, A, b, to_voxel, rigid):
    """The same sums by numpy, from trilinear samples of the stacked image and gradient."""
    y = x @ A.T + b
    q = y @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    s, _ = trilinear_samples(volumes, q)
    m, g = s[:, 0], s[:, 1:] @ to_voxel[:3, :3]  # the gradient in world units
    if rigid:
        jac = np.concatenate([np.cross(x @ A.T, g), g], axis=1)
    else:
        jac = np.concatenate([(g[:, :, None] * x[:, None, :]).reshape(-1, 9), g], axis=1)
    scalars = np.array([w.sum(), w @ m, w @ f, w @ m ** 2, w @ (m * f), w @ f ** 2])
    return scalars, jac.T @ (w * m), jac.T @ w, jac.T @ (w * f), (jac * w[:, None]).T @ jac


def _case(seed=1, n=400):
    rng = np.random.default_rng(seed)
    image = ndimage.gaussian_filter(rng.random((14, 12, 13)), 1.5)
    volumes = np.stack([image, *np.gradient(image)])
    to_voxel = np.linalg.inv(np.array([[1.5, 0.1, 0, -9], [0, 1.8, 0.2, -10], [0.1, 0, 1.6, -9], [0, 0, 0, 1]]))
    x = rng.uniform(-7, 7, (n, 3))
    A = _rotation(np.array([0.05, -0.03, 0.08])) * 1.02
    b = np.array([0.4, -0.3, 0.2])
    return volumes, x, rng.random(n), rng.uniform(0.2, 1, n), A, b, to_voxel


@pytest.mark.parametrize("rigid", [True, False], ids=["rigid", "affine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_sums_match_numpy_and_split_like_ranks(rigid, dtype):
    volumes, x, f, w, A, b, to_voxel = _case()
    volumes = volumes.astype(dtype)
    ours = affine_sums(volumes, x, f, w, A, b, to_voxel, rigid=rigid)
    reference = _reference_sums(volumes, x, f, w, A, b, to_voxel, rigid)
    for got, want in zip(ours, reference):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # chunks change the order of the sums only; two halves add up to the whole (two ranks)
    one = affine_sums(volumes, x, f, w, A, b, to_voxel, rigid=rigid, chunks=1)
    halves = [affine_sums(volumes, x[s], f[s], w[s], A, b, to_voxel, rigid=rigid) for s in (slice(0, 150),
                                                                                           slice(150, None))]
    for got, a, c in zip(one, *halves):
        np.testing.assert_allclose(got, a + c, rtol=1e-12, atol=1e-12)
    empty = affine_sums(volumes, x[:0], f[:0], w[:0], A, b, to_voxel, rigid=rigid)
    assert not any(np.any(part) for part in empty)


def _objective_pieces(volumes, x, f, w, A, b, to_voxel, rigid):
    """SSD ``F = sum w (m - f)^2 / 2``, its gradient ``J^T W r`` and Gauss-Newton matrix."""
    (n, sm, sf, smm, smf, sff), jm, _, jf, jj = affine_sums(volumes, x, f, w, A, b, to_voxel, rigid=rigid)
    return 0.5 * (smm - 2 * smf + sff), jm - jf, jj


def test_gauss_newton_pieces_are_exact_on_a_linear_image():
    """On ``m(q) = a . q + c`` trilinear interpolation is exact and the residual is linear in
    the 12 affine parameters: ``F(theta + h d) = F + h g.d + h^2 d.H d / 2`` to rounding."""
    volumes, x, f, w, A, b, to_voxel = _case()
    q = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in volumes.shape[1:]], indexing="ij"))
    slope = np.array([0.3, -0.2, 0.5])
    volumes = np.stack([np.tensordot(slope, q, 1) + 1.0, *[np.full(q.shape[1:], s) for s in slope]])
    x = x * 0.5  # keep every point (and its moves) inside the image
    F, g, H = _objective_pieces(volumes, x, f, w, A, b, to_voxel, rigid=False)
    d = np.random.default_rng(2).standard_normal(12)
    for h in (1e-1, 1e-2, 1e-3):
        A2, b2 = A + h * d[:9].reshape(3, 3), b + h * d[9:]
        F2 = _objective_pieces(volumes, x, f, w, A2, b2, to_voxel, rigid=False)[0]
        assert F2 - F - h * g @ d == pytest.approx(0.5 * h * h * d @ H @ d, rel=1e-6, abs=1e-12)


def test_rigid_gradient_is_the_derivative_along_the_rotation_chart():
    """The rigid parameters move ``A -> exp([h w]_x) A``, ``b -> b + h t``: the Taylor remainder
    of ``F`` with the gradient of :func:`affine_sums` falls as ``h^2`` (a linear image, so the
    only error is the chart's curvature)."""
    volumes, x, f, w, A, b, to_voxel = _case()
    q = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in volumes.shape[1:]], indexing="ij"))
    slope = np.array([0.3, -0.2, 0.5])
    volumes = np.stack([np.tensordot(slope, q, 1) + 1.0, *[np.full(q.shape[1:], s) for s in slope]])
    x = x * 0.5
    F, g, _ = _objective_pieces(volumes, x, f, w, A, b, to_voxel, rigid=True)
    d = np.random.default_rng(3).standard_normal(6)
    remainders = []
    for h in (1e-1, 1e-2, 1e-3):
        F2 = _objective_pieces(volumes, x, f, w, _rotation(h * d[:3]) @ A, b + h * d[3:], to_voxel, rigid=True)[0]
        remainders.append(abs(F2 - F - h * g @ d))
    slopes = np.log10(np.array(remainders[:-1]) / np.array(remainders[1:]))
    assert np.all(slopes > 1.8), (remainders, slopes)


def test_bad_arguments_are_refused():
    volumes, x, f, w, A, b, to_voxel = _case()
    with pytest.raises(TypeError):
        affine_sums(volumes[:3], x, f, w, A, b, to_voxel, rigid=True)
    with pytest.raises(ValueError):
        affine_sums(volumes, x[:, :2], f, w, A, b, to_voxel, rigid=True)
    with pytest.raises(TypeError):
        trilinear_samples(volumes.astype(np.int32), x)
    with pytest.raises(ValueError):
        trilinear_samples(volumes, x[:, :2])


_MAP = np.array([[0.93, 0.12, 0.0, 1.3], [-0.1, 1.02, 0.05, 0.7], [0.02, 0.0, 1.05, -0.4]])


@pytest.mark.parametrize("order", [0, 1])
def test_resample_affine_matches_scipy(order):
    rng = np.random.default_rng(4)
    volume = ndimage.gaussian_filter(rng.random((20, 22, 19)), 1.0)
    if order == 0:
        volume = (volume * 50).astype(np.int16)
    ours = resample_affine(volume, _MAP, (18, 20, 17), order=order, dtype=volume.dtype if order == 0 else np.float64)
    theirs = ndimage.affine_transform(volume.astype(np.float64), _MAP[:, :3], _MAP[:, 3], output_shape=(18, 20, 17),
                                      order=order, mode="constant")
    if order == 0:  # scipy rounds halves to even, we round them up: compare away from ties
        q = np.tensordot(_MAP[:, :3], np.indices((18, 20, 17)), 1) + _MAP[:, 3, None, None, None]
        away = np.all(np.abs(q - np.round(q)) < 0.49, axis=0)
        np.testing.assert_array_equal(ours[away], theirs[away])
        assert ours.dtype == np.int16
    else:
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def _lagrange_reference(volume, q):
    """Cubic Lagrange interpolation at one point, by the 4 x 4 x 4 nodes around it (clamped)."""
    base = [min(int(np.floor(c)), n - 2) for c, n in zip(q, volume.shape)]
    weights = []
    for c, b in zip(q, base):
        t = c - b
        weights.append([np.prod([(t - m) / (k - m) for m in (-1, 0, 1, 2) if m != k]) for k in (-1, 0, 1, 2)])
    total = 0.0
    for a in range(4):
        for b in range(4):
            for c in range(4):
                idx = [min(max(base[d] + (a, b, c)[d] - 1, 0), volume.shape[d] - 1) for d in range(3)]
                total += weights[0][a] * weights[1][b] * weights[2][c] * volume[tuple(idx)]
    return total


def test_cubic_resample_matches_the_lagrange_reference_and_is_exact_on_cubics():
    rng = np.random.default_rng(5)
    volume = rng.random((9, 10, 8))
    ours = resample_affine(volume, _MAP, (7, 8, 6), order=3, dtype=np.float64)
    q = np.tensordot(_MAP[:, :3], np.indices((7, 8, 6)), 1) + _MAP[:, 3, None, None, None]
    inside = np.all((q >= 0) & (q <= (np.array(volume.shape) - 1)[:, None, None, None]), axis=0)
    for idx in zip(*np.nonzero(inside)):
        assert ours[idx] == pytest.approx(_lagrange_reference(volume, q[(slice(None),) + idx]), abs=1e-12)
    assert not ours[~inside].any()
    # a cubic polynomial is reproduced exactly where the whole stencil lies inside
    x = np.indices((12, 12, 12), dtype=float)
    cubic = 0.01 * x[0] ** 3 - 0.2 * x[1] ** 2 * x[2] + x[2] + 3.0
    small = np.array([[0.9, 0.1, 0.0, 2.2], [0.0, 0.95, 0.1, 1.7], [0.05, 0.0, 0.9, 1.9]])
    got = resample_affine(cubic, small, (6, 6, 6), order=3, dtype=np.float64)
    p = np.tensordot(small[:, :3], np.indices((6, 6, 6)), 1) + small[:, 3, None, None, None]
    want = 0.01 * p[0] ** 3 - 0.2 * p[1] ** 2 * p[2] + p[2] + 3.0
    assert np.all((p >= 1) & (p <= 9.999))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gaussian_smooth_matches_scipy(sigma, dtype):
    volume = np.random.default_rng(6).random((15, 13, 11)).astype(dtype)
    ours = gaussian_smooth(volume, sigma)
    theirs = ndimage.gaussian_filter(volume, sigma, mode="nearest", truncate=3.0)
    assert ours.dtype == dtype
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 if dtype == np.float64 else 1e-6)
