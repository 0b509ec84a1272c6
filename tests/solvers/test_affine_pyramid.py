"""The affine stage's pyramid built from each rank's planes equals the pyramid of the whole
images (smoothing by planes reads the neighbours' planes within the kernel's radius)."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py.kernels import Decomposition
from claire_py.solvers.affine import AffineOptions, ImagePyramid, _with_gradient

COMM = MPI.COMM_WORLD


def _planes(whole):
    n3 = whole.shape[-1]
    edges = [n3 * r // COMM.size for r in range(COMM.size + 1)]
    k0, k1 = edges[COMM.rank], edges[COMM.rank + 1]
    return np.ascontiguousarray(whole[..., k0:k1]), k0


@pytest.mark.parametrize("shrink, iterations, max_level_voxels", [((4, 2, 1), (3, 2, 1), 1 << 24),
                                                                   ((6, 3, 2), (3, 2, 1), 1 << 24),  # 3 does not divide 2
                                                                   ((4, 2, 1), (3, 2, 1), 4096)])  # finest levels dropped
def test_pyramid_by_planes_equals_the_whole_images_pyramid(shrink, iterations, max_level_voxels):
    rng = np.random.default_rng(7)
    fixed = rng.standard_normal((21, 18, 23)).astype(np.float32)
    moving = rng.standard_normal((17, 20, 19)).astype(np.float32)
    mask = (rng.uniform(size=fixed.shape) > 0.3).astype(np.float32)
    fa, ma = np.diag([2.0, 2.0, 2.0, 1.0]), np.diag([1.5, 2.5, 2.0, 1.0])
    options = AffineOptions(shrink=shrink, iterations=iterations, max_level_voxels=max_level_voxels)
    whole = ImagePyramid(fixed, moving, fa, ma, options, mask=mask)
    (f, fk0), (m, mk0), (k, _) = _planes(fixed), _planes(moving), _planes(mask)
    with Decomposition((8, 8, 8)) as decomp:
        parts = ImagePyramid(f, m, fa, ma, options, mask=k, decomp=decomp, planes=(fk0, mk0),
                             shapes=(fixed.shape, moving.shape))
    assert [lv["shrink"] for lv in parts.levels] == [lv["shrink"] for lv in whole.levels]
    for a, b in zip(whole.levels, parts.levels):
        for key in ("fixed", "moving", "mask"):
            assert a[key].shape == b[key].shape
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(b["fixed_affine"], a["fixed_affine"])


@pytest.mark.parametrize("shape", [(7, 5, 6), (2, 3, 9), (1, 4, 3)], ids=str)
def test_a_levels_gradient_is_numpys(shape):
    """The pyramid's MOVING levels carry numpy.gradient's differences (zero along an axis of
    one voxel), in float32, bit for bit."""
    m = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    out = _with_gradient(m)
    assert out.dtype == np.float32 and out.shape == (4,) + shape
    np.testing.assert_array_equal(out[0], m)
    for axis in range(3):
        expected = np.gradient(m, axis=axis) if shape[axis] > 1 else np.zeros_like(m)
        np.testing.assert_array_equal(out[1 + axis], expected)
