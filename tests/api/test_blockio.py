"""Distributed NIfTI I/O (claire_py.blockio): every rank reads and writes its slab, against
nibabel reading and writing whole files; bad files fail on every rank; files appear complete."""

import os
import stat

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

from claire_py import UserInputError, blockio

COMM = MPI.COMM_WORLD
AFFINE = np.array([[-2.0, 0.1, 0, 90], [0, 2.5, 0, -126], [0, 0, 3.0, -72], [0, 0, 0, 1]])


def _saved(path, img):
    if COMM.rank == 0:
        nib.save(img, path)
    COMM.Barrier()
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("layout", ["volume", "vector", "ants"])
def test_slabs_read_and_written_by_every_rank_equal_nibabel_whole_files(shared_tmp, suffix, layout, monkeypatch):
    monkeypatch.setattr(blockio, "CHUNK_BYTES", 500)  # several chunks per slab: the stream's bookkeeping
    shape = (13, 11, 9)
    trailing = {"volume": (), "vector": (3,), "ants": (1, 3)}[layout]
    data = np.random.default_rng(1).standard_normal(shape + trailing).astype(np.float32)
    path = _saved(os.path.join(shared_tmp, "in" + suffix), nib.Nifti1Image(data, AFFINE))
    volume = blockio.open_volume(path, COMM, vector=layout != "volume")
    assert volume.shape == shape and volume.components == (1 if layout == "volume" else 3)
    np.testing.assert_allclose(volume.affine, AFFINE)
    box, slab = blockio.read_slab(volume, COMM, np.float32)
    k0, k1 = box[2]
    assert (k0, k1) == blockio.slab_bounds(shape[2], COMM.size)[COMM.rank]
    channels = data.reshape(shape + (-1,))
    np.testing.assert_array_equal(slab, np.moveaxis(channels, 3, 0)[..., k0:k1])
    out = os.path.join(shared_tmp, "out" + suffix)
    blockio.write_volume(out, np.asfortranarray(data[:, :, k0:k1]), COMM, shape=shape, affine=AFFINE,
                         intent="vector" if layout == "ants" else None)
    back = nib.load(out)
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-6)
    assert back.header["sform_code"] == 2 and back.header.get_intent()[0] == ("vector" if layout == "ants" else "none")
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o666 & ~_umask(), "the umask's permissions, not mkstemp's 0600"
    assert [f for f in os.listdir(shared_tmp) if f.startswith(".")] == [], "no temporary file left"


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_scaled_big_endian_integers_and_channels_read_as_nibabel_scales_them(shared_tmp):
    shape = (7, 6, 11, 2)
    raw = np.random.default_rng(2).integers(-300, 300, shape).astype(">i2")
    img = nib.Nifti1Image(raw, AFFINE)
    img.header.set_slope_inter(0.5, 3.0)
    path = _saved(os.path.join(shared_tmp, "scaled.nii.gz"), img)
    volume = blockio.open_volume(path, COMM, channels=True)
    box, slab = blockio.read_slab(volume, COMM)
    k0, k1 = box[2]
    expected = np.moveaxis(np.asarray(nib.load(path).get_fdata()), 3, 0)[..., k0:k1]
    np.testing.assert_allclose(slab, expected)
    labels = _saved(os.path.join(shared_tmp, "labels.nii"), nib.Nifti1Image(raw[..., 0].astype(np.uint8), AFFINE))
    _, slab = blockio.read_slab(blockio.open_volume(labels, COMM), COMM)
    assert slab.dtype == np.uint8 and np.array_equal(slab[0], raw[..., 0].astype(np.uint8)[..., k0:k1])


@pytest.mark.parametrize("damage", ["truncated_gz", "truncated_nii", "nan", "not_3d"])
def test_a_bad_file_is_one_error_on_every_rank(shared_tmp, damage):
    data = np.random.default_rng(3).standard_normal((9, 8, 12)).astype(np.float32)
    suffix = ".nii" if damage == "truncated_nii" else ".nii.gz"
    path = os.path.join(shared_tmp, "bad" + suffix)
    if damage == "nan":
        data[4, 4, 10] = np.nan
    _saved(path, nib.Nifti1Image(data[..., None, None].repeat(2, 4) if damage == "not_3d" else data, AFFINE))
    if COMM.rank == 0 and damage.startswith("truncated"):
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[:len(raw) * 2 // 3])
    COMM.Barrier()
    expected = {"truncated_gz": "cannot be read", "truncated_nii": "truncated", "nan": "NaN",
                "not_3d": "a 3-D volume is needed"}[damage]
    with pytest.raises(UserInputError, match=expected):
        blockio.read_slab(blockio.open_volume(path, COMM), COMM)


def test_a_failed_write_leaves_nothing_and_fails_on_every_rank(shared_tmp):
    shape = (6, 5, 8)
    k0, k1 = blockio.slab_bounds(shape[2], COMM.size)[COMM.rank]
    slab = np.zeros((6, 5, k1 - k0), np.float32, order="F")
    with pytest.raises(UserInputError, match="output directory does not exist"):
        blockio.write_volume(os.path.join(shared_tmp, "missing", "x.nii.gz"), slab, COMM, shape=shape,
                             affine=np.eye(4))
    with pytest.raises(ValueError, match="Fortran-ordered"):
        blockio.write_volume(os.path.join(shared_tmp, "x.nii"), np.zeros((6, 5, k1 - k0 + 1), np.float32), COMM,
                             shape=shape, affine=np.eye(4))
    assert os.listdir(shared_tmp) == []


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_one_sequential_pass_of_planes_covers_the_file(shared_tmp, suffix, monkeypatch):
    monkeypatch.setattr(blockio, "CHUNK_BYTES", 700)
    data = np.random.default_rng(4).standard_normal((9, 7, 10, 3)).astype(np.float32)
    path = _saved(os.path.join(shared_tmp, "planes" + suffix), nib.Nifti1Image(data, AFFINE))
    volume = blockio.open_volume(path, MPI.COMM_SELF, vector=True)
    seen = np.full(data.shape, np.nan, np.float32)
    for c, k0, k1, planes in blockio.iter_planes(volume):
        assert planes.shape == (9, 7, k1 - k0) and k1 - k0 < 10
        seen[:, :, k0:k1, c] = planes
    np.testing.assert_array_equal(seen, data)


@pytest.mark.parametrize("kind", ["image", "noise"])
def test_a_full_disk_on_rank_0_mid_stream_fails_on_every_rank_and_leaves_nothing(shared_tmp, monkeypatch, kind):
    """Rank 0 keeps receiving the other ranks' chunks after its write failed (none waits for
    ever in its send), then every rank raises the same line: an image the ranks deflate and a
    field of noise stored through rank 0 alike."""
    import builtins

    monkeypatch.setattr(blockio, "CHUNK_BYTES", 600)
    writes = []

    class FullDisk:
        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def write(self, data):
            writes.append(len(data))
            if len(writes) > 2:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(blockio, "open", FullDisk, raising=False)
    shape = (6, 5, 16)
    k0, k1 = blockio.slab_bounds(shape[2], COMM.size)[COMM.rank]
    slab = np.zeros((6, 5, k1 - k0), np.float32, order="F")
    if kind == "noise":
        slab[...] = np.random.default_rng(COMM.rank).standard_normal(slab.shape)
    with pytest.raises(UserInputError, match="writing failed .*No space left"):
        blockio.write_volume(os.path.join(shared_tmp, "full.nii.gz"), slab, COMM, shape=shape, affine=np.eye(4))
    assert os.listdir(shared_tmp) == []


@pytest.mark.parametrize("shape", [(13, 11, 9), (6, 5, 4)], ids=["chunked", "small"])
def test_composite_h5_written_by_every_rank_holds_the_whole_field_in_itk_order(shared_tmp, shape):
    """transform.h5's displacement: each rank gives its slab (and deflates its planes); the
    file holds the whole field as float64 in ITK's order (x fastest, component innermost), one
    shuffled, deflated chunk per plane when it is larger than 4096 values; a failed write is
    reported on every rank."""
    import h5py

    from claire_py.transforms import write_composite_h5

    field = np.random.default_rng(2).standard_normal(shape + (3,)).astype(np.float32)
    k0, k1 = blockio.slab_bounds(shape[2], COMM.size)[COMM.rank]
    path = os.path.join(shared_tmp, "transform.h5")
    slab = np.asfortranarray(field[:, :, k0:k1])
    assert write_composite_h5(path, np.eye(4), slab, AFFINE, comm=COMM, shape=shape) is None
    with h5py.File(path, "r") as h5:
        dataset = h5["TransformGroup/2/TransformParameters"]
        np.testing.assert_array_equal(dataset[...], np.transpose(field, (2, 1, 0, 3)).astype(np.float64).ravel())
        chunked = 3 * np.prod(shape) > 4096
        assert dataset.chunks == ((3 * shape[0] * shape[1],) if chunked else None)
        assert (dataset.compression, dataset.shuffle) == (("gzip", True) if chunked else (None, False))
    missing = os.path.join(shared_tmp, "no such directory", "transform.h5")
    error = write_composite_h5(missing, np.eye(4), slab, AFFINE, comm=COMM, shape=shape)
    assert error is not None and "writing failed" in error


def test_an_image_deflated_by_every_rank_is_one_gzip_member(shared_tmp, monkeypatch):
    """A .nii.gz that deflate pays for is deflated by each rank, chunk by chunk, and strung
    together by rank 0: still one gzip member (CRC-32 and length of the whole) that zlib,
    gzip and nibabel read."""
    import gzip
    import zlib

    from claire_py.io import _crc32_combine

    monkeypatch.setattr(blockio, "CHUNK_BYTES", 500)
    shape = (13, 11, 9)
    data = np.zeros(shape + (2,), np.float32)
    data[3:9, 2:8, 1:7] = np.arange(6 * 6 * 6 * 2, dtype=np.float32).reshape(6, 6, 6, 2) % 7  # compresses
    k0, k1 = blockio.slab_bounds(shape[2], COMM.size)[COMM.rank]
    out = os.path.join(shared_tmp, "image.nii.gz")
    blockio.write_volume(out, np.asfortranarray(data[:, :, k0:k1]), COMM, shape=shape, affine=AFFINE)
    with open(out, "rb") as fh:
        blob = fh.read()
    inflate = zlib.decompressobj(31)
    raw = inflate.decompress(blob)
    assert inflate.eof and inflate.unused_data == b""  # one member, nothing after it
    assert raw == gzip.decompress(blob) and len(blob) < 0.5 * len(raw)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), data)
    # the combination of CRCs that made the trailer
    for a, b in ((raw[:100], raw[100:]), (b"", raw), (raw, b"")):
        assert _crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(raw)
