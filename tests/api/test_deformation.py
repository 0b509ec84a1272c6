"""claire_py.DeformationMap: the registration's map as a distributed object, against the
gathered fields of register and the reference functions transport / jacobian."""

import os

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import DeformationMap, RegistrationConfig, api

COMM = MPI.COMM_WORLD


def _pair(n=24):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = 100 + 50 * (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = 100 + 50 * (np.sin(x[0] - 0.25 * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


@pytest.fixture(scope="module")
def registered():
    """A registration with a non-trivial affine part (a rotation and shift given as the
    initial transform), its map on every rank."""
    fixed, moving = _pair()
    c, s = np.cos(0.05), np.sin(0.05)
    initial = np.array([[c, -s, 0, 0.4], [s, c, 0, -0.3], [0, 0, 1, 0.2], [0, 0, 0, 1]])
    config = RegistrationConfig.from_dict({"affine": {"mode": "none"}, "newton": {"max_iterations": 3},
                                           "precision": "float64"})
    root = COMM.rank == 0
    result = claire_py.register(fixed if root else None, moving if root else None, config=config,
                                initial_transform=initial)
    return result, fixed, moving


def test_the_map_gives_the_registration_s_fields(registered):
    result, _, moving = registered
    m = result.map
    assert isinstance(m, DeformationMap) and not m.is_inverse
    assert not np.allclose(m.transform, np.eye(4))
    fields = {"velocity": m.gather(), "det_grad_y": m.gather(m.jacobian()), "displacement": m.gather(m.displacement()),
              "warped": m.gather(m.warp(moving if COMM.rank == 0 else None))}
    m.free()
    if COMM.rank == 0:
        for name, field in fields.items():
            np.testing.assert_allclose(field, getattr(result, name), rtol=1e-12, atol=1e-12, err_msg=name)
    else:
        assert all(f is None for f in fields.values())


def test_displacement_in_millimetres_is_the_grid_s_linear_part_times_voxels(registered):
    m = registered[0].map
    scaled = DeformationMap(m.velocity, m.shape, grid_affine=np.diag([2.0, 3.0, 0.5, 1.0]), precision="float64")
    with scaled:
        voxels, mm = scaled.displacement(), scaled.displacement(units="mm")
    np.testing.assert_allclose(mm, np.array([2.0, 3.0, 0.5])[:, None, None, None] * voxels, rtol=1e-12)
    with pytest.raises(claire_py.UserInputError, match="use 'voxel' or 'mm'"):
        scaled.displacement(units="inch")


def test_the_inverse_map_lands_on_moving_s_grid_as_the_reference_does(registered):
    result, fixed, _ = registered
    inverse = result.map.inverse()
    assert inverse.is_inverse and inverse.output_grid[0] == result.moving_grid[0]
    np.testing.assert_array_equal(inverse.inverse().velocity, result.map.velocity)
    warped, det = inverse.gather(inverse.warp(fixed if COMM.rank == 0 else None)), inverse.gather(inverse.jacobian())
    inverse.free()
    root = COMM.rank == 0
    reference = dict(nt=4, precision="float64", comm=COMM, transform=np.linalg.inv(result.transform),
                     grid_affine=np.eye(4), target=result.moving_grid)
    negated = -result.velocity if root else None
    expected = api.transport(fixed if root else None, negated, **reference), api.jacobian(negated, **reference)
    if root:
        np.testing.assert_allclose(warped, expected[0], rtol=1e-10, atol=1e-8)
        np.testing.assert_allclose(det, expected[1], rtol=1e-10, atol=1e-10)


def test_save_and_load_round_trip_on_any_number_of_ranks(registered, shared_tmp):
    result, _, moving = registered
    outdir = os.path.join(shared_tmp, "map")
    result.map.save(outdir)
    with pytest.raises(claire_py.UserInputError, match="already holds a registration"):
        result.map.save(outdir)
    loaded = DeformationMap.load(outdir, precision="float64")
    assert loaded.shape == result.map.shape and loaded.nt == 4 and not loaded.is_inverse
    np.testing.assert_allclose(loaded.velocity, result.map.velocity, rtol=1e-6, atol=1e-9)  # float32 file
    np.testing.assert_allclose(loaded.transform, result.map.transform, rtol=0, atol=1e-12)
    assert loaded.moving_grid[0] == result.moving_grid[0]
    with loaded:
        det = loaded.gather(loaded.jacobian())
    # the whole field (a small grid) read whole on one rank agrees
    if COMM.rank == 0:
        np.testing.assert_allclose(det, result.det_grad_y, rtol=1e-5)
        whole = np.asarray(nib.load(os.path.join(outdir, "velocity.nii.gz")).dataobj)
        assert whole.shape == result.map.shape + (3,)


def test_labels_must_be_integers_and_keep_their_values(registered):
    result, _, _ = registered
    m = result.map
    labels = (np.indices(m.shape).sum(axis=0) % 3).astype(np.int16)
    with pytest.raises(claire_py.UserInputError, match="integer voxel type"):
        m.warp(labels.astype(np.float32) if COMM.rank == 0 else None, labels="nearest")
    warped = m.gather(m.warp(labels if COMM.rank == 0 else None, labels="nearest"))
    m.free()
    if COMM.rank == 0:
        assert warped.dtype == np.int16 and set(np.unique(warped)) <= {0, 1, 2}
