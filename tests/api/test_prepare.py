"""register's inputs by planes (claire_py.prepare): each rank's blocks equal the blocks of the
whole image padded, resampled or compared, at any number of ranks and any decomposition."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py import UserInputError, prepare
from claire_py.api import dice_overlap
from claire_py.kernels import Decomposition
from claire_py.kernels.sampling import resample_affine

COMM = MPI.COMM_WORLD


def _image(shape, seed=0, components=None):
    rng = np.random.default_rng(seed)
    lead = () if components is None else (components,)
    return rng.uniform(-1.0, 3.0, lead + shape)


def _global_block(decomp, whole):
    return whole[(...,) + decomp.real_slice]


@pytest.mark.parametrize("given", ["rank 0", "every rank"])
@pytest.mark.parametrize("components", [None, 2])
def test_planes_from_an_array_are_its_slab_and_gather_back(given, components):
    whole = _image((7, 6, 5), 1, components)
    src = prepare.source(whole if given == "every rank" or COMM.rank == 0 else None, COMM, "image")
    assert src.shape == (7, 6, 5) and src.components == components and src.everywhere == (given == "every rank" or COMM.size == 1)
    planes = src.planes(COMM, np.float32)
    from claire_py.blockio import slab_bounds

    k0, k1 = slab_bounds(5, COMM.size)[COMM.rank]
    assert planes.k0 == k0 and planes.data.dtype == np.float32
    np.testing.assert_array_equal(planes.data, np.reshape(whole, (-1, 7, 6, 5))[..., k0:k1].astype(np.float32))
    gathered = planes.gather(COMM)
    if COMM.rank == 0:
        np.testing.assert_array_equal(gathered, whole.astype(np.float32))
    lo, hi = zip(*planes.channel_ranges(COMM))
    ref = np.reshape(whole, (-1, 7, 6, 5)).astype(np.float32)
    np.testing.assert_allclose(lo, ref.min(axis=(1, 2, 3)))
    np.testing.assert_allclose(hi, ref.max(axis=(1, 2, 3)))


def test_a_missing_or_misshapen_array_fails_on_every_rank():
    with pytest.raises(UserInputError, match="no image given"):
        prepare.source(None, COMM, "fixed")
    with pytest.raises(UserInputError, match="a 3-D image"):
        prepare.source(np.zeros((4, 4)) if COMM.rank == 0 else None, COMM, "fixed")


@pytest.mark.parametrize("pad", [0, 2])
@pytest.mark.parametrize("layout", ["slab", "pencil"])
def test_blocks_equal_the_whole_image_padded_by_its_minimum(pad, layout):
    whole = _image((9, 8, 7), 2, 2)
    planes = prepare.source(whole, COMM, "image").planes(COMM)
    with Decomposition(tuple(n + 2 * pad for n in whole.shape[1:]), layout=layout) as decomp:
        padded = np.stack([np.pad(c, pad, constant_values=c.min()) for c in whole])
        np.testing.assert_array_equal(prepare.blocks(planes, decomp, pad), _global_block(decomp, padded))


def _rotation(degrees, shape_from, shape_to, shift):
    """A voxel map FIXED (shape_to) -> MOVING (shape_from): a rotation about axis 2 through the
    centres, scaled, shifted."""
    t = np.deg2rad(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) * 1.1
    matrix = np.eye(4)
    matrix[:3, :3] = rot
    centre_to, centre_from = (np.array(shape_to) - 1) / 2, (np.array(shape_from) - 1) / 2
    matrix[:3, 3] = centre_from - rot @ centre_to + shift
    return matrix


@pytest.mark.parametrize("order", [0, 1, 3])
@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("shift", [(0.3, -0.7, 0.2), (9.0, -30.0, 0.0)])  # partly, or far, outside MOVING
def test_resampled_blocks_equal_the_whole_image_resampled(order, pad, shift):
    moving = _image((10, 12, 9), 3, 2)
    fixed_shape = (11, 8, 10)
    matrix = _rotation(17.0, moving.shape[1:], fixed_shape, np.array(shift))
    planes = prepare.source(moving, COMM, "moving").planes(COMM)
    shifted = matrix.copy()
    shifted[:3, 3] -= matrix[:3, :3] @ np.full(3, pad)  # padded voxel -> moving voxel
    with Decomposition(tuple(n + 2 * pad for n in fixed_shape), layout="pencil" if COMM.size > 2 else "auto") as d:
        local = prepare.resampled_blocks(planes, matrix, d, pad, order=order, dtype=np.float64)
        padded_shape = tuple(n + 2 * pad for n in fixed_shape)
        ref = []
        for c in moving:
            whole = resample_affine(c, shifted, padded_shape, order=order, dtype=np.float64)
            inner = (slice(pad, pad + fixed_shape[0]), slice(pad, pad + fixed_shape[1]), slice(pad, pad + fixed_shape[2]))
            frame = np.ones(padded_shape, bool)
            frame[inner] = False
            whole[frame] = whole[inner].min()
            ref.append(np.clip(whole, c.min(), c.max()))
        np.testing.assert_allclose(local, _global_block(d, np.stack(ref)), rtol=0, atol=1e-12)


def test_block_sampler_reads_no_more_than_the_box_its_block_maps_into():
    moving = _image((40, 40, 40), 4)
    planes = prepare.source(moving, COMM, "moving").planes(COMM)
    with Decomposition((40, 40, 40)) as d:
        sampler = prepare.BlockSampler(planes, np.eye(4), d, 0, order=3)
        box = sampler.source.shape[1:]
        assert all(b <= n + 2 * 2 + 1 for b, n in zip(box, d.local_shape))


@pytest.mark.parametrize("pad", [0, 2])
def test_dice_counted_by_blocks_equals_dice_of_the_whole_maps(pad):
    rng = np.random.default_rng(5)
    shape = (9, 7, 8)
    fixed, other = rng.integers(0, 4, shape), rng.integers(0, 5, shape)
    with Decomposition(tuple(n + 2 * pad for n in shape)) as d:
        values = prepare.label_values(COMM, fixed, other)[0]
        a = _global_block(d, np.pad(fixed, pad, constant_values=-1))
        b = _global_block(d, np.pad(other, pad, constant_values=-7))
        counts = prepare.dice_counts(d, pad, np.asarray(sorted(set(values) | {-1, -7})), a, b)
        got = prepare.dice_from_counts(sorted(set(values) | {-1, -7}), counts)
    ref = dice_overlap(fixed, other, other)
    assert ref["labels"] == [v for v in values if v > 0]
    np.testing.assert_allclose(got, ref["after"], rtol=1e-15)
