"""Distributed NIfTI reading and writing: each rank reads and writes its own slab of a file.

A NIfTI volume ``(n1, n2, n3[, C])`` is stored in Fortran order (``i`` fastest, then ``j``, ``k``,
then the component), so the planes ``k0 <= k < k1`` of one component are one contiguous run of
bytes: rank ``r`` of ``P`` owns the slab of planes :func:`slab_bounds` gives it. An uncompressed
``.nii`` is read and written by every rank at its own offsets (rank 0 writes the header and sizes
the file first); a ``.nii.gz`` is one gzip stream, so rank 0 inflates or writes it, sending or
receiving each rank's planes in chunks of at most :data:`CHUNK_BYTES`: no rank holds more than
its slab and one chunk (and, writing an image that deflate pays for, its slab deflated: each
rank deflates its own chunks, all at once, and rank 0 strings them into one gzip member). :meth:`Decomposition.blocks_from_boxes` then moves slabs to the
solver's blocks (and :meth:`~Decomposition.boxes_from_blocks` back).

Every function here is collective over ``comm``; errors are raised on every rank alike (a
:class:`UserInputError` for a bad file), and a file being written appears under its name only
once complete.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

from .errors import UserInputError
from .parallel import agree, on_root

__all__ = ["VolumeFile", "open_volume", "read_slab", "iter_planes", "write_volume", "slab_bounds", "CHUNK_BYTES"]

#: Largest message of a ``.nii.gz`` stream between rank 0 and another rank (planes of one component).
CHUNK_BYTES = 16 << 20
_ERROR_TAG, _DATA_TAG = 17, 18


def slab_bounds(n3, ranks):
    """``[(k0, k1)]`` per rank: the planes of an ``n3``-plane volume each rank reads and writes
    (contiguous, in rank order, sizes differing by at most one; empty when ``ranks > n3``)."""
    edges = [n3 * r // ranks for r in range(ranks + 1)]
    return list(zip(edges[:-1], edges[1:]))


@dataclasses.dataclass(frozen=True)
class VolumeFile:
    """The geometry and storage of a NIfTI file, known on every rank.

    ``shape`` is the grid ``(n1, n2, n3)``; ``components`` the length of the last stored axis
    (1 for a volume; e.g. 3 for a vector field, ``C`` channels); ``dtype`` the stored voxel type
    (with its byte order); ``offset`` the byte of the first voxel; ``slope, inter`` the scaling
    (``None`` when absent); ``affine`` the voxel-to-world matrix (RAS mm)."""

    path: str
    shape: tuple
    components: int
    dtype: np.dtype
    offset: int
    slope: float | None
    inter: float | None
    affine: np.ndarray
    gz: bool

    @property
    def plane_items(self):
        return self.shape[0] * self.shape[1]


def _header_info(path, vector, channels):
    from .io import read_header

    header, affine, gz = read_header(path)
    shape = tuple(int(d) for d in header.get_data_shape())
    while len(shape) > 3 and shape[-1] == 1 and not (vector and len(shape) == 4):
        shape = shape[:-1]
    if vector:
        if len(shape) == 5 and shape[3] == 1:
            shape = shape[:3] + shape[4:]
        if len(shape) != 4 or shape[3] != 3:
            raise UserInputError(f"{path}: shape {shape}; a 3-D field of 3-vectors (n1, n2, n3, 3) is needed")
    elif len(shape) == 4 and channels and 1 < shape[3] <= 16:
        pass
    elif len(shape) != 3:
        raise UserInputError(f"{path}: image has shape {shape}; a 3-D volume is needed"
                             + (" (or (n1, n2, n3, C) with C <= 16 channels)" if channels else ""))
    slope, inter = header.get_slope_inter()
    slope = None if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = None if inter is None or not np.isfinite(inter) else float(inter)
    if slope == 1.0 and not inter:
        slope, inter = None, None
    return VolumeFile(str(path), shape[:3], shape[3] if len(shape) == 4 else 1, header.get_data_dtype(),
                      int(header["vox_offset"]), slope, inter, affine, gz)


def open_volume(path, comm, *, vector=False, channels=False):
    """The :class:`VolumeFile` of ``path`` (its header read and checked on rank 0) on every
    rank. ``vector=True`` wants a field ``(n1, n2, n3, 3)`` (or ANTs' ``(n1, n2, n3, 1, 3)``);
    ``channels=True`` also accepts ``(n1, n2, n3, C)``, ``C <= 16``."""
    return on_root(comm, lambda: _header_info(os.fspath(path), vector, channels))


def _as_values(raw, volume, dtype):
    """Stored voxels (flat, the file's bytes) as numbers: native byte order, scaled."""
    data = raw.astype(raw.dtype.newbyteorder("=")) if raw.dtype.byteorder not in "=|" else raw
    if volume.slope is not None or volume.inter is not None:
        data = data * (1.0 if volume.slope is None else volume.slope) + (volume.inter or 0.0)
    return data if dtype is None else data.astype(dtype, copy=False)


def _planes(raw, volume, count, dtype):
    """``count`` planes of stored bytes ``raw`` as an ``(n1, n2, count)`` view of Fortran order, as
    numbers (:func:`_as_values`)."""
    planes = np.frombuffer(raw, np.dtype(volume.dtype)).reshape(count, volume.shape[1], volume.shape[0])
    return _as_values(planes, volume, dtype).transpose(2, 1, 0)


def _chunks(volume, bounds):
    """``(component, rank, k0, k1)`` of every chunk of the stream, in file order."""
    planes = max(1, CHUNK_BYTES // (volume.plane_items * volume.dtype.itemsize))
    for c in range(volume.components):
        for rank, (k0, k1) in enumerate(bounds):
            for start in range(k0, k1, planes):
                yield c, rank, start, min(start + planes, k1)


def _read_exact(fh, nbytes, path):
    data = fh.read(nbytes)
    if len(data) != nbytes:
        raise UserInputError(f"{path}: the file ends before its voxels do (truncated); check the file is complete")
    return data


def read_slab(volume, comm, dtype=None):
    """This rank's slab of ``volume``: ``(box, data)``, ``box = ((0, n1), (0, n2), (k0, k1))``
    and ``data`` of shape ``(C, n1, n2, k1 - k0)`` (C order; ``C = volume.components``), in
    ``dtype`` (default: the stored type, native byte order, scaled to float64 when the header
    scales). Floating-point voxels must be finite and below ``io.MAX_ABS_VALUE``."""
    from .io import MAX_ABS_VALUE, _one_line

    rank, size = comm.Get_rank(), comm.Get_size()
    bounds = slab_bounds(volume.shape[2], size)
    k0, k1 = bounds[rank]
    n1, n2, _ = volume.shape
    stored = np.dtype(volume.dtype)
    out_dtype = _as_values(np.empty(0, stored), volume, dtype).dtype
    data = np.empty((volume.components, n1, n2, k1 - k0), out_dtype)
    total = volume.plane_items * volume.shape[2]

    def place(c, start, stop, raw):
        data[c, :, :, start - k0:stop - k0] = _planes(raw, volume, stop - start, dtype)

    error = None
    if not volume.gz:
        try:
            with open(volume.path, "rb") as fh:
                for c, owner, start, stop in _chunks(volume, bounds):
                    if owner == rank:
                        fh.seek(volume.offset + stored.itemsize * (c * total + start * volume.plane_items))
                        place(c, start, stop, _read_exact(fh, (stop - start) * volume.plane_items * stored.itemsize,
                                                          volume.path))
        except UserInputError as exc:
            error = str(exc)
        except Exception as exc:  # OSError and the like: one line, on every rank
            error = f"{volume.path}: cannot be read ({_one_line(exc)}); check the file"
    else:
        error = _stream_in(volume, comm, bounds, place)
    if error is None and out_dtype.kind == "f" and data.size:
        if not np.all(np.isfinite(data)):
            error = f"{volume.path}: image contains NaN or infinite voxels; replace them first"
        elif float(np.abs(data).max()) > MAX_ABS_VALUE:
            error = (f"{volume.path}: voxel values reach beyond +-{MAX_ABS_VALUE:g} and overflow the spectral "
                     "arithmetic: rescale the image")
    agree(comm, error)
    return ((0, n1), (0, n2), (k0, k1)), data


def iter_planes(volume, dtype=np.float32):
    """The whole of ``volume`` in one sequential pass of its file, by this process alone:
    ``(component, k0, k1, planes)`` with ``planes`` of shape ``(n1, n2, k1 - k0)`` (a view of
    Fortran order), at most :data:`CHUNK_BYTES` of stored voxels at a time. For a reader that
    needs a few slices and some statistics of a large file (the report), without holding it."""
    stored = np.dtype(volume.dtype)
    opener = (lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")) if volume.gz else (lambda raw: raw)
    with open(volume.path, "rb") as raw, opener(raw) as fh:
        _read_exact(fh, volume.offset, volume.path)
        for c, _, start, stop in _chunks(volume, [(0, volume.shape[2])]):
            raw_planes = _read_exact(fh, (stop - start) * volume.plane_items * stored.itemsize, volume.path)
            yield c, start, stop, _planes(raw_planes, volume, stop - start, dtype)


def _stream_in(volume, comm, bounds, place):
    """Rank 0 inflates the ``.nii.gz`` and sends each rank its chunks; returns an error
    message or ``None`` (on the ranks that saw it)."""
    from .io import _one_line

    rank = comm.Get_rank()
    itemsize = np.dtype(volume.dtype).itemsize
    if rank != 0:
        for c, owner, start, stop in _chunks(volume, bounds):
            if owner != rank:
                continue
            buf = bytearray((stop - start) * volume.plane_items * itemsize)
            from mpi4py import MPI

            status = MPI.Status()
            comm.Probe(0, MPI.ANY_TAG, status)
            if status.Get_tag() == _ERROR_TAG:
                return comm.recv(source=0, tag=_ERROR_TAG)
            comm.Recv([buf, MPI.BYTE], source=0, tag=_DATA_TAG)
            place(c, start, stop, bytes(buf))
        return None
    error, waiting = None, {r for r, (k0, k1) in enumerate(bounds) if r and k1 > k0}
    try:
        with open(volume.path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as fh:
            _read_exact(fh, volume.offset, volume.path)
            chunks = list(_chunks(volume, bounds))
            for i, (c, owner, start, stop) in enumerate(chunks):
                data = _read_exact(fh, (stop - start) * volume.plane_items * itemsize, volume.path)
                if owner == 0:
                    place(c, start, stop, data)
                else:
                    from mpi4py import MPI

                    comm.Send([data, MPI.BYTE], dest=owner, tag=_DATA_TAG)
                    if not any(o == owner for _, o, _, _ in chunks[i + 1:]):
                        waiting.discard(owner)
            while fh.read(1 << 24):  # the gzip trailer's CRC and length check the whole stream
                pass
    except UserInputError as exc:
        error = str(exc)
    except Exception as exc:  # gzip and zlib raise several types for damaged streams
        error = f"{volume.path}: cannot be read as NIfTI ({_one_line(exc)}); check the file is complete"
    if error is not None:
        for owner in sorted(waiting):
            comm.send(error, dest=owner, tag=_ERROR_TAG)
    return error


def _header_bytes(volume_shape, dtype, affine, intent, header):
    """The 352 bytes before the voxels of a NIfTI-1 file of ``volume_shape`` (``vox_offset``
    352, no extensions), built by nibabel as it would for an image of that shape."""
    import nibabel as nib

    empty = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), volume_shape, [0] * len(volume_shape))
    img = nib.Nifti1Image(empty, affine, header=header)
    img.set_data_dtype(dtype)
    if intent is not None:
        img.header.set_intent(intent)
    img.update_header()
    hdr = img.header
    hdr["vox_offset"] = 352
    hdr.set_slope_inter(1.0, 0.0)
    return hdr.binaryblock + b"\x00" * 4


def write_volume(path, slab, comm, *, shape, affine, intent=None, header=None):
    """Write a distributed volume as NIfTI at ``path``: every rank gives its slab (planes
    :func:`slab_bounds` of the grid ``shape``) as a Fortran-ordered array ``(n1, n2, k1 - k0)``,
    ``(n1, n2, k1 - k0, C)`` or ``(n1, n2, k1 - k0, 1, C)`` (the file keeps that layout, e.g.
    ANTs' 5-D displacement). ``.nii``: each rank writes its bytes in place; ``.nii.gz``: one
    gzip stream deflated on rank 0 (see :func:`claire_py.io.write_image` for the level). The
    file appears under ``path`` only when complete (a temporary name, then a rename); keeps the
    permissions the umask gives."""
    from .io import _GzipStream, _deflate_level, _suffix

    rank, size = comm.Get_rank(), comm.Get_size()
    suffix = _suffix(path)
    if suffix is None:
        raise UserInputError(f"{path}: output must end in .nii or .nii.gz")
    bounds = slab_bounds(shape[2], size)
    k0, k1 = bounds[rank]
    slab = np.asarray(slab)
    trailing = slab.shape[3:]
    if slab.shape[:3] != (shape[0], shape[1], k1 - k0) or (slab.size and not slab.flags.f_contiguous):
        raise ValueError(f"slab: expected a Fortran-ordered ({shape[0]}, {shape[1]}, {k1 - k0}, ...) array, "
                         f"got {slab.shape}")
    dtype = np.dtype(slab.dtype)
    components = int(np.prod(trailing, dtype=int)) if trailing else 1
    flat = slab.reshape(slab.shape[:3] + (components,), order="F")
    volume = VolumeFile(str(path), tuple(shape), components, dtype, 352, None, None, affine, suffix == ".nii.gz")
    tmp = on_root(comm, lambda: _new_file(path))
    head = _header_bytes(tuple(shape) + trailing, dtype, affine, intent, header) if rank == 0 else None
    if not volume.gz:
        def write_header():
            with open(tmp, "r+b") as fh:
                fh.write(head)
                fh.truncate(352 + dtype.itemsize * components * int(np.prod(shape, dtype=np.int64)))

        def write_slab():
            with open(tmp, "r+b") as fh:
                total = volume.plane_items * shape[2]
                for c in range(components):
                    fh.seek(352 + dtype.itemsize * (c * total + k0 * volume.plane_items))
                    fh.write(memoryview(np.ascontiguousarray(flat[..., c].T)).cast("B"))
                fh.flush()
                os.fsync(fh.fileno())

        error = comm.bcast(_attempt(path, write_header) if rank == 0 else None)  # the file sized, or not at all
        if error is None:
            error = _attempt(path, write_slab)
    else:
        middle = next(r for r, (a, b) in enumerate(bounds) if a <= shape[2] // 2 < b)
        level = comm.bcast(_deflate_level(flat[..., 0]) if rank == middle else None, root=middle)
        error = _stream_out(volume, comm, bounds, flat, tmp, level, head, _GzipStream)
    failed = comm.allgather(error)
    if rank == 0:
        if any(failed):
            if os.path.exists(tmp):
                os.unlink(tmp)
        else:
            os.replace(tmp, path)
    agree(comm, next((e for e in failed if e), None))
    comm.Barrier()  # the file is in place on every rank's return


def _attempt(path, write):
    """``write()``; the one-line error of a failure (a full disk, a vanished directory), or ``None``."""
    try:
        write()
    except OSError as exc:
        return f"{path}: writing failed ({exc})"
    return None


def _finished(path, raw, error, end):
    """Unless ``error``: ``end()`` (the stream's last bytes), then ``raw`` flushed and on disk;
    the error, or ``None``."""
    if error is not None:
        return error

    def finish():
        end()
        raw.flush()
        os.fsync(raw.fileno())

    return _attempt(path, finish)


def _new_file(path):
    from .io import atomic_path

    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserInputError(f"{directory}: output directory does not exist")
    return atomic_path(path)


def _stream_out(volume, comm, bounds, flat, tmp, level, head, gzip_stream):
    """Rank 0 writes the file, receiving each rank's chunks in file order (it drains them all
    even after a failure, so that no rank waits forever); returns an error or ``None``. A
    deflated file (``level`` > 0) is deflated by every rank at once, each its own chunks
    (:func:`_deflated_stream_out`); a stored one goes through rank 0's ``gzip_stream``."""
    from mpi4py import MPI

    if level:
        return _deflated_stream_out(volume, comm, bounds, flat, tmp, level, head)
    rank = comm.Get_rank()
    k0 = bounds[rank][0]
    if rank != 0:
        for c, owner, start, stop in _chunks(volume, bounds):
            if owner == rank:
                comm.Send([np.ascontiguousarray(flat[:, :, start - k0:stop - k0, c].T), MPI.BYTE], dest=0,
                          tag=_DATA_TAG)
        return None
    raw, stream = None, None
    try:
        raw = open(tmp, "wb")
        stream = gzip_stream(raw, level)
        stream.write(head)
    except OSError as exc:
        error = f"{volume.path}: writing failed ({exc})"
    else:
        error = None
    try:
        for c, owner, start, stop in _chunks(volume, bounds):
            if owner == 0:
                chunk = np.ascontiguousarray(flat[:, :, start - k0:stop - k0, c].T)
            else:
                chunk = np.empty((stop - start) * volume.plane_items, volume.dtype)
                comm.Recv([chunk, MPI.BYTE], source=owner, tag=_DATA_TAG)
            if error is None:
                error = _attempt(volume.path, lambda: stream.write(memoryview(chunk).cast("B")))
        error = _finished(volume.path, raw, error, stream.finish)
    finally:
        if raw is not None:
            raw.close()
    return error


def _deflated_stream_out(volume, comm, bounds, flat, tmp, level, head):
    """One gzip member deflated in pieces: every rank deflates its chunks (the other ranks all
    of theirs before sending any, so that the ranks deflate at once: ~1/P of the deflate
    time, holding their deflated slab), rank 0 writes the pieces in file order between the
    gzip header and the final empty block, and the CRC-32 combined from the pieces'."""
    from .io import _FINAL_BLOCK, _GZIP_HEADER, _crc32_combine, _deflated_piece

    rank = comm.Get_rank()
    k0 = bounds[rank][0]

    def piece(c, start, stop):
        return _deflated_piece(np.ascontiguousarray(flat[:, :, start - k0:stop - k0, c].T), level)

    if rank != 0:
        pieces = [piece(c, start, stop) for c, owner, start, stop in _chunks(volume, bounds) if owner == rank]
        for p in pieces:
            comm.send(p, dest=0, tag=_DATA_TAG)
        return None
    raw, error = None, None
    crc, size = 0, 0
    try:
        raw = open(tmp, "wb")
        raw.write(_GZIP_HEADER)
        data, crc, size = _deflated_piece(head, level)
        raw.write(data)
    except OSError as exc:
        error = f"{volume.path}: writing failed ({exc})"
    try:
        for c, owner, start, stop in _chunks(volume, bounds):
            data, part_crc, length = piece(c, start, stop) if owner == 0 else comm.recv(source=owner, tag=_DATA_TAG)
            if error is None:
                error = _attempt(volume.path, lambda: raw.write(data))
            crc, size = _crc32_combine(crc, part_crc, length), size + length
        error = _finished(volume.path, raw, error,
                          lambda: raw.write(_FINAL_BLOCK + struct.pack("<II", crc, size & 0xFFFFFFFF)))
    finally:
        if raw is not None:
            raw.close()
    return error
