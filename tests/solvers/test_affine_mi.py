"""The affine stage with Mattes mutual information (``metric="mi"``) on a pair of different
contrast: Colin 27's T1 against a non-monotonic remap of it, moved by a known transform."""

import os

import numpy as np
import pytest
from mpi4py import MPI
from scipy import ndimage

from claire_py.io import resample_to_grid
from claire_py.kernels.decomposition import Decomposition
from claire_py.solvers.affine import AFFINE_METRICS, AffineOptions, ImagePyramid, affine_stage

COMM = MPI.COMM_WORLD
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "data", "colin27_t1_2mm.nii.gz")


@pytest.fixture(scope="module")
def colin():
    """Colin 27's T1 in [0, 1], its head mask and its voxel-to-world affine."""
    nib = pytest.importorskip("nibabel")
    img = nib.load(DATA)
    t1 = np.asarray(img.dataobj, np.float64)
    t1 /= t1.max()
    return t1, ndimage.binary_fill_holes(t1 > 0.05), np.asarray(img.affine, float)


def _inverted(t1, head):
    """A T2-like contrast: tissue intensities inverted inside the head, 0 outside (dark
    background, bright CSF, dark white matter): no monotonic map of the T1."""
    return np.where(head, 1.0 - t1, 0.0)


def _piecewise(t1, head):
    """Another non-monotonic contrast: a zig-zag map of the T1 inside the head."""
    return np.where(head, np.interp(t1, [0.0, 0.3, 0.6, 1.0], [0.1, 0.9, 0.2, 0.6]), 0.0)


def _rotation(angles_deg):
    out = np.eye(3)
    for axis, deg in enumerate(angles_deg):
        t = np.deg2rad(deg)
        i, j = [a for a in range(3) if a != axis]
        r = np.eye(3)
        r[i, i] = r[j, j] = np.cos(t)
        r[i, j], r[j, i] = -np.sin(t), np.sin(t)
        out = out @ r
    return out


def _truth(shape, affine, angles_deg, shift_mm, scale=1.0):
    """The world transform FIXED -> MOVING: a similarity about the grid's centre."""
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    R = _rotation(angles_deg) * scale
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, centre - R @ centre + np.asarray(shift_mm, float)
    return T


def _moved(image, affine, T):
    """MOVING on FIXED's grid with ``moving(T x) = image(x)``."""
    return resample_to_grid(image, affine, affine, image.shape, transform=np.linalg.inv(T))


def _corner_error(T, truth, shape, affine):
    """Largest distance (mm) between the images of FIXED's box corners under the two transforms."""
    hi = np.array(shape) - 1.0
    corners = np.array([[a, b, c, 1.0] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])]) @ affine.T
    return float(np.linalg.norm((corners @ T.T - corners @ truth.T)[:, :3], axis=1).max())


_DECOMPOSITIONS = {}


def _decomposition(comm):
    """One per communicator: each Decomposition holds MPI communicators of its own (a process
    may hold 2048)."""
    if comm.py2f() not in _DECOMPOSITIONS:
        _DECOMPOSITIONS[comm.py2f()] = Decomposition((8, 8, 8), comm=comm)
    return _DECOMPOSITIONS[comm.py2f()]


def _register(fixed, moving, affine, comm=COMM, **options):
    options = AffineOptions(**options)
    pyramid = ImagePyramid(fixed.astype(np.float32), moving.astype(np.float32), affine, affine, options)
    return affine_stage(pyramid, _decomposition(comm), options)


def test_mi_is_an_option():
    assert "mi" in AFFINE_METRICS
    assert AffineOptions(metric="mi").metric == "mi"
    with pytest.raises(ValueError, match="affine metric"):
        AffineOptions(metric="mattes")


def test_mi_recovers_a_similarity_across_contrasts(colin):
    """Affine mode, a 3 % scaled similarity on the inverted contrast: ``mi`` recovers it within
    1 mm at FIXED's box corners; ``ssd`` and ``ncc``, which assume a (linear) intensity relation,
    do not."""
    t1, head, affine = colin
    truth = _truth(t1.shape, affine, (5.0, -4.0, 3.0), (4.0, -3.0, 5.0), 1.03)
    moving = _moved(_inverted(t1, head), affine, truth)
    T, history = _register(t1, moving, affine, metric="mi")
    error = _corner_error(T, truth, t1.shape, affine)
    assert error < 1.0, error
    assert [h["stage"] for h in history] == ["rigid", "rigid", "affine", "affine", "affine"]
    assert all(h["metric"] == "mi" and h["objective_after"] <= h["objective_before"] for h in history)
    assert history[-1]["objective_after"] < -0.5  # F = -MI
    for metric in ("ssd", "ncc"):
        other = _corner_error(_register(t1, moving, affine, metric=metric)[0], truth, t1.shape, affine)
        assert other > 5.0 and other > 5 * error, (metric, other, error)


def test_mi_rigid_mode_piecewise_contrast(colin):
    """Rigid mode, a rigid transform on a zig-zag remap of the T1."""
    t1, head, affine = colin
    truth = _truth(t1.shape, affine, (-6.0, 3.0, 8.0), (-5.0, 7.0, 3.0))
    moving = _moved(_piecewise(t1, head), affine, truth)
    T, history = _register(t1, moving, affine, metric="mi", mode="rigid")
    error = _corner_error(T, truth, t1.shape, affine)
    assert error < 1.0, error
    assert [h["stage"] for h in history] == ["rigid"] * 3
    np.testing.assert_allclose(T[:3, :3].T @ T[:3, :3], np.eye(3), atol=1e-12)  # a rotation


def test_mi_same_on_every_rank_and_as_one_rank(colin):
    """The ranks sum the histogram in one allreduce: every rank ends with the same transform,
    that of one rank alone to rounding (the samples are split, so the sums' order differs)."""
    t1, head, affine = colin
    truth = _truth(t1.shape, affine, (3.0, 2.0, -4.0), (2.0, 3.0, -4.0), 0.98)
    moving = _moved(_inverted(t1, head), affine, truth)
    options = dict(metric="mi", shrink=(4, 2), iterations=(40, 20))
    T, _ = _register(t1, moving, affine, **options)
    every = COMM.allgather(T)
    assert all(np.array_equal(every[0], t) for t in every)
    if COMM.size > 1:
        alone, _ = _register(t1, moving, affine, comm=MPI.COMM_SELF, **options)
        np.testing.assert_allclose(T, alone, rtol=0, atol=1e-8)
    assert _corner_error(T, truth, t1.shape, affine) < 2.0
