"""The Mattes mutual information sums (:func:`claire_py.kernels.sampling.mattes_sums`): the numba
kernel against a direct numpy evaluation of its formula, and its derivative against finite
differences (Taylor tests of the joint histogram and of the mutual information)."""

import numpy as np
import pytest
from scipy import ndimage

from claire_py.kernels.sampling import mattes_sums
from claire_py.solvers.affine import _mutual_information, _rotation

SHAPE = (12, 11, 10)


def _to_voxel():
    """A world-to-voxel matrix with anisotropic spacing, a small rotation and an offset."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    to_world = np.eye(4)
    to_world[:3, :3] = rot @ np.diag([1.5, 2.0, 1.75])
    to_world[:3, 3] = -to_world[:3, :3] @ ((np.array(SHAPE) - 1) / 2) + [0.3, -0.2, 0.1]
    return np.linalg.inv(to_world), to_world


def _points(rng, n, to_world, margin):
    """``n`` world points whose voxel coordinates lie in ``[margin, n_a - 1 - margin]``."""
    q = np.stack([rng.uniform(margin, s - 1 - margin, n) for s in SHAPE], axis=1)
    return q @ to_world[:3, :3].T + to_world[:3, 3]


def _random_case(rng, dtype, n=700):
    """Random volumes (the gradient channels random too), points partly outside, weights with
    zeros, a transform near the identity."""
    to_voxel, to_world = _to_voxel()
    volumes = rng.uniform(0.0, 2.0, (4,) + SHAPE)
    volumes[1:] = rng.standard_normal((3,) + SHAPE)
    x = _points(rng, n, to_world, -1.5)  # some points fall outside MOVING
    f = rng.uniform(-1.0, 3.0, n)
    w = rng.uniform(0.0, 2.0, n) * (rng.random(n) > 0.1)
    A = np.eye(3) + 0.05 * rng.standard_normal((3, 3))
    b = 0.3 * rng.standard_normal(3)
    return volumes.astype(dtype), x, f, w, A, b, to_voxel


def _bspline3(t):
    a = np.abs(t)
    return np.where(a < 1, (4 - 6 * a ** 2 + 3 * a ** 3) / 6, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _bspline3_derivative(t):
    a = np.abs(t)
    return np.sign(t) * np.where(a < 1, -2 * a + 1.5 * a ** 2, np.where(a < 2, -0.5 * (2 - a) ** 2, 0.0))


def _ramp(t):
    t = np.clip(t, 0.0, 1.0)
    return t ** 3 * (10 - 15 * t + 6 * t ** 2), np.where((t > 0) & (t < 1), 30 * (t * (1 - t)) ** 2, 0.0)


def _reference(volumes, x, f, w, A, b, to_voxel, rigid, bins, fixed_range, moving_range, fixed_window, fade):
    """The formula of :func:`mattes_sums` in numpy, point by point (vectorised)."""
    volumes = np.asarray(volumes, np.float64)
    shape = np.array(volumes.shape[1:])
    u = x @ A.T
    q = (u + b) @ to_voxel[:3, :3].T + to_voxel[:3, 3]
    inside = np.all((q >= 0) & (q <= shape - 1), axis=1) & (w != 0)
    q, u, xs, fs, ws = q[inside], u[inside], x[inside], f[inside], w[inside]
    s = np.stack([ndimage.map_coordinates(v, q.T, order=1, mode="nearest") for v in volumes], axis=1)
    # boundary weight and its voxel gradient
    near_low = q <= (shape - 1) - q
    dist = np.where(near_low, q, (shape - 1) - q)
    if fade > 0:
        o_axis, do_axis = _ramp(dist / fade)
        do_axis = np.where(near_low, 1.0, -1.0) * do_axis / fade
    else:
        o_axis, do_axis = np.ones_like(q), np.zeros_like(q)
    o = o_axis.prod(axis=1)
    do_voxel = np.stack([do_axis[:, a] * o_axis[:, (a + 1) % 3] * o_axis[:, (a + 2) % 3] for a in range(3)], axis=1)
    g, go = s[:, 1:] @ to_voxel[:3, :3], do_voxel @ to_voxel[:3, :3]

    def jacobian(grad):
        if rigid:
            return np.concatenate([np.cross(u, grad), grad], axis=1)
        return np.concatenate([(grad[:, :, None] * xs[:, None, :]).reshape(-1, 9), grad], axis=1)

    J, Jo = jacobian(g), jacobian(go)
    k = J.shape[1]

    def coordinate(v, lo, hi):
        eta = (v - lo) * (bins - 4) / (hi - lo) + 2
        clamped = (eta < 2) | (eta > bins - 2)
        eta = np.clip(eta, 2, bins - 2)
        return eta, np.clip(np.floor(eta).astype(int), 2, bins - 3), clamped

    eta_f, fbin, _ = coordinate(fs, *fixed_range)
    eta_m, mbin, clamped = coordinate(s[:, 0], *moving_range)
    scale_m = (bins - 4) / (moving_range[1] - moving_range[0])
    joint, djoint = np.zeros((bins, bins)), np.zeros((bins, bins, k))
    fixed_offsets = [0] if fixed_window == "box" else [-1, 0, 1, 2]
    for df in fixed_offsets:
        i = fbin + df
        wf = ws if fixed_window == "box" else ws * _bspline3(i - eta_f)
        for dm in (-1, 0, 1, 2):
            l = mbin + dm
            wm = _bspline3(l - eta_m)
            dwm = np.where(clamped, 0.0, -_bspline3_derivative(l - eta_m) * scale_m)
            np.add.at(joint, (i, l), wf * o * wm)
            np.add.at(djoint, (i, l), (wf * o * dwm)[:, None] * J + (wf * wm)[:, None] * Jo)
    return joint, djoint, float((ws * o).sum())


@pytest.mark.parametrize("rigid", [True, False], ids=["rigid", "affine"])
@pytest.mark.parametrize("fixed_window", ["box", "bspline"])
@pytest.mark.parametrize("fade", [0.0, 1.5])
def test_mattes_sums_against_numpy(rigid, fixed_window, fade, dtype):
    rng = np.random.default_rng(1)
    volumes, x, f, w, A, b, to_voxel = _random_case(rng, dtype)
    kw = dict(bins=16, fixed_range=(-0.5, 2.5), moving_range=(0.2, 1.8), fixed_window=fixed_window, fade=fade)
    joint, djoint, count = mattes_sums(volumes, x, f, w, A, b, to_voxel, rigid=rigid, **kw)
    ref_joint, ref_djoint, ref_count = _reference(volumes, x, f, w, A, b, to_voxel, rigid, **kw)
    assert joint.shape == (16, 16) and djoint.shape == (16, 16, 6 if rigid else 12)
    assert 0 < ref_count < w.sum()  # some points (and the zero weights) left out
    np.testing.assert_allclose(joint, ref_joint, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(djoint, ref_djoint, rtol=1e-10, atol=1e-10 * np.abs(ref_djoint).max())
    np.testing.assert_allclose(count, ref_count, rtol=1e-12)
    np.testing.assert_allclose(joint.sum(), count, rtol=1e-12)  # the windows' partition of unity
    if fade == 0:
        np.testing.assert_allclose(djoint.sum(axis=(0, 1)), 0.0, atol=1e-10 * np.abs(djoint).max())


def test_mattes_sums_chunks_and_split():
    """The sums do not depend on the chunking, and add over a split of the points (the ranks)."""
    rng = np.random.default_rng(2)
    volumes, x, f, w, A, b, to_voxel = _random_case(rng, np.float64)
    kw = dict(rigid=False, fixed_range=(-1, 3), moving_range=(0, 2), fade=1.0)
    whole = mattes_sums(volumes, x, f, w, A, b, to_voxel, **kw)
    one = mattes_sums(volumes, x, f, w, A, b, to_voxel, chunks=1, **kw)
    parts = [mattes_sums(volumes, x[r::3], f[r::3], w[r::3], A, b, to_voxel, **kw) for r in range(3)]
    for i in range(3):
        np.testing.assert_allclose(one[i], whole[i], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sum(p[i] for p in parts), whole[i], rtol=1e-12, atol=1e-12)
    empty = mattes_sums(volumes, x[:0], f[:0], w[:0], A, b, to_voxel, **kw)
    assert empty[2] == 0 and not empty[0].any() and empty[1].shape == (32, 32, 12)


def test_mattes_sums_checks():
    rng = np.random.default_rng(3)
    volumes, x, f, w, A, b, to_voxel = _random_case(rng, np.float64, n=20)
    kw = dict(rigid=True, fixed_range=(0, 1), moving_range=(0, 1))
    with pytest.raises(TypeError, match="volumes"):
        mattes_sums(volumes[:3], x, f, w, A, b, to_voxel, **kw)
    with pytest.raises(ValueError, match="x \\(N, 3\\)"):
        mattes_sums(volumes, x, f[:-1], w, A, b, to_voxel, **kw)
    with pytest.raises(ValueError, match="bins"):
        mattes_sums(volumes, x, f, w, A, b, to_voxel, bins=4, **kw)
    with pytest.raises(ValueError, match="moving_range"):
        mattes_sums(volumes, x, f, w, A, b, to_voxel, rigid=True, fixed_range=(0, 1), moving_range=(1, 0))
    with pytest.raises(ValueError, match="fixed_window"):
        mattes_sums(volumes, x, f, w, A, b, to_voxel, fixed_window="gauss", **kw)
    with pytest.raises(ValueError, match="fade"):
        mattes_sums(volumes, x, f, w, A, b, to_voxel, fade=-1.0, **kw)


def _linear_case(rng, n=3000, margin=2.0):
    """MOVING linear in the voxel coordinates, so that its gradient channels are the exact
    derivative of its trilinear interpolant; FIXED a nonlinear function of the points."""
    to_voxel, to_world = _to_voxel()
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in SHAPE], indexing="ij"))
    slope = np.array([0.11, -0.07, 0.05])
    volumes = np.empty((4,) + SHAPE)
    volumes[0] = np.tensordot(slope, grid, axes=1) + 1.0
    volumes[1:] = slope[:, None, None, None]
    x = _points(rng, n, to_world, margin)
    f = np.sin(0.4 * x[:, 0]) + 0.05 * x[:, 1] ** 2 - np.cos(0.3 * x[:, 2]) + 0.1 * rng.standard_normal(n)
    w = rng.uniform(0.5, 1.5, n)
    moving_range = (float(volumes[0].min()), float(volumes[0].max()))
    return volumes, x, f, w, to_voxel, (float(f.min()), float(f.max())), moving_range


def _step(A, b, delta, rigid):
    if rigid:
        return _rotation(delta[:3]) @ A, b + delta[3:]
    return A + delta[:9].reshape(3, 3), b + delta[9:]


def _slopes(hs, remainders):
    return np.diff(np.log(remainders)) / np.diff(np.log(hs))


@pytest.mark.parametrize("rigid", [True, False], ids=["rigid", "affine"])
@pytest.mark.parametrize("fade", [0.0, 2.0])
def test_taylor(rigid, fade):
    """First-order remainders O(h), second-order O(h^2), of the histogram and of the MI.

    Without the fade the points stay inside MOVING (ITK's cut is not differentiable); with it
    some start outside MOVING, within the fade, and cross MOVING's boundary."""
    rng = np.random.default_rng(4)
    volumes, x, f, w, to_voxel, fixed_range, moving_range = _linear_case(rng, margin=2.0 if fade == 0 else -0.5)
    k = 6 if rigid else 12
    A = np.eye(3) + 0.02 * rng.standard_normal((3, 3))
    b = 0.2 * rng.standard_normal(3)
    # a direction moving the points by about a voxel
    delta = rng.standard_normal(k) * np.r_[np.full(k - 3, 0.06), np.ones(3)]
    kw = dict(rigid=rigid, bins=16, fixed_range=fixed_range, moving_range=moving_range, fade=fade)

    def sums(d):
        return mattes_sums(volumes, x, f, w, *_step(A, b, d, rigid), to_voxel, **kw)

    joint, djoint, count = sums(np.zeros(k))
    mi, grad = _mutual_information(joint, djoint, count)
    assert mi > 0.05
    hs = 0.05 * 0.5 ** np.arange(5)
    r0h, r1h, r0m, r1m = [], [], [], []
    for h in hs:
        joint2, djoint2, count2 = sums(h * delta)
        mi2, _ = _mutual_information(joint2, djoint2, count2)
        r0h.append(np.abs(joint2 - joint).sum())
        r1h.append(np.abs(joint2 - joint - h * djoint @ delta).sum())
        r0m.append(abs(mi2 - mi))
        r1m.append(abs(mi2 - mi - h * grad @ delta))
    for name, r0, r1 in (("histogram", r0h, r1h), ("mi", r0m, r1m)):
        s0, s1 = _slopes(hs, r0), _slopes(hs, r1)
        assert np.all(np.abs(s0 - 1) < 0.15) and abs(s0[-1] - 1) < 0.05, (name, s0)
        assert np.all(np.abs(s1 - 2) < 0.25) and abs(s1[-1] - 2) < 0.1, (name, s1)
        assert r1[-1] < 0.02 * r0[-1], name
