"""NIfTI input/output: rank 0 reads and scatters, gathers and writes atomically.

Arrays are in the NIfTI array axis order ``(i, j, k)``; the affine maps voxel indices to
scanner millimetres and is carried unchanged from input to output.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import UserInputError

__all__ = ["Image", "read_image", "write_image", "write_text", "atomic_path", "resample_to_grid"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Image:
    """A 3-D image on rank 0 (``data`` is ``None`` on other ranks) and its geometry."""

    data: np.ndarray | None
    affine: np.ndarray
    shape: tuple
    header: object = None


def _suffix(path):
    for s in _NIFTI_SUFFIXES:
        if str(path).endswith(s):
            return s
    return None


#: Voxel values beyond this magnitude are refused: spectral sums over up to ~2^31 points of
#: such values stay finite in float32 (3.4e38), and no imaging modality comes near it.
MAX_ABS_VALUE = 1e20
#: deflate cannot expand data by more than ~1032:1; a .nii.gz whose header claims more voxel
#: bytes than this times its size is certainly truncated or lies about its dims.
_DEFLATE_MAX_RATIO = 1100


def _one_line(exc):
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _available_memory():
    """Bytes of memory available for new allocations on this node (inf when unknown)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    return float("inf")


def _nifti_class(path, fh):
    """Nifti1Image or Nifti2Image from ``sizeof_hdr`` (either byte order) of the open stream."""
    import nibabel as nib

    head = fh.read(4)
    fh.seek(0)
    if len(head) < 4:
        raise UserInputError(f"{path}: file too short for a NIfTI header; check the file is complete")
    sizes = {int(np.frombuffer(head, "<i4")[0]), int(np.frombuffer(head, ">i4")[0])}
    if 348 in sizes:
        return nib.Nifti1Image
    if 540 in sizes:
        return nib.Nifti2Image
    raise UserInputError(f"{path}: not a NIfTI-1/2 file (header size field {min(sizes)}, expected 348 or 540)")


def _check_header(path, hdr, file_size, gz, check_memory=True):
    """Refuse, before any voxel is read (or memory allocated for it), a header whose
    geometry, voxel type, size or scaling cannot describe a readable 3-D image."""
    dims = hdr["dim"]
    if not 1 <= int(dims[0]) <= 7:
        raise UserInputError(f"{path}: header dim[0] = {int(dims[0])} is not a number of axes (1..7); the header "
                             "is damaged")
    shape = tuple(int(d) for d in hdr.get_data_shape())
    if any(n <= 0 for n in shape):
        raise UserInputError(f"{path}: header dims {shape} have an axis of length <= 0; the header is damaged")
    dtype = hdr.get_data_dtype()
    if dtype.names is not None:
        raise UserInputError(f"{path}: RGB/RGBA voxels ({dtype.names}); convert to a single-channel (grey) image")
    if dtype.kind not in "uif" or dtype.itemsize == 0:
        kind = "complex" if dtype.kind == "c" else f"NIfTI datatype code {int(hdr['datatype'])}"
        raise UserInputError(f"{path}: voxel type {kind} is not a supported real number type (use int/uint 8-64 "
                             "bits, float32 or float64)")
    offset = float(hdr["vox_offset"])
    minimum = hdr.single_vox_offset  # header + extension flag: 352 (NIfTI-1) or 544 (NIfTI-2)
    if not (np.isfinite(offset) and minimum <= offset < 2.0 ** 62):
        raise UserInputError(f"{path}: header vox_offset = {offset:g} does not point past the header (>= {minimum}); "
                             "the header is damaged")
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    end = int(offset) + nbytes
    if not gz and end > file_size:
        raise UserInputError(f"{path}: the header claims {'x'.join(map(str, shape))} {dtype} voxels ({nbytes} bytes "
                             f"from byte {int(offset)}) but the file has {file_size} bytes: truncated, or wrong "
                             "dims/datatype in the header")
    if gz and end > _DEFLATE_MAX_RATIO * file_size + 4096:
        raise UserInputError(f"{path}: the header claims {'x'.join(map(str, shape))} {dtype} voxels ({nbytes} bytes) "
                             f"but {file_size} compressed bytes cannot hold them: truncated, or wrong "
                             "dims/datatype in the header")
    available = _available_memory() if check_memory else float("inf")
    if nbytes > available:
        gib = 2.0 ** 30
        raise UserInputError(f"{path}: reading {'x'.join(map(str, shape))} {dtype} voxels needs {nbytes / gib:.1f} "
                             f"GiB but {available / gib:.1f} GiB is available on this node")
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if np.isinf(slope) or (slope != 0 and np.isfinite(slope) and not np.isfinite(inter)):
        raise UserInputError(f"{path}: header scaling scl_slope = {slope:g}, scl_inter = {inter:g} is not finite; "
                             "fix the header (scl_slope = 0 or NaN means no scaling)")


def _check_affine(path, affine):
    if not np.all(np.isfinite(affine)):
        raise UserInputError(f"{path}: the header's affine is not finite; fix the qform/sform")
    linear = affine[:3, :3]
    norms = np.linalg.norm(linear, axis=0)
    if not np.all(norms > 0) or abs(np.linalg.det(linear)) <= 1e-9 * float(np.prod(norms)):
        raise UserInputError(f"{path}: the header's voxel-to-world affine is singular (voxel sizes "
                             f"{np.round(norms, 6).tolist()}); fix pixdim or the qform/sform")


class _HeaderFixes:
    """Collects nibabel's header check reports (``logger.log(level, message)``)."""

    def __init__(self):
        self.messages = []

    def log(self, level, message):
        message = " ".join(str(message).split())
        if level >= logging.WARNING and message and not message.endswith("leaving at current value"):
            self.messages.append(message)  # a problem nibabel fixed (a fix changes what is read)


def _parse_header(path, fh, raw, gz, check_memory):
    """The checked header of the open stream ``fh`` (positioned after the header and its
    extensions) and its affine; refused before any voxel memory is allocated."""
    klass = _nifti_class(path, fh)
    fixes = _HeaderFixes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            header = klass.header_class.from_fileobj(fh, check=False)
        except Exception as exc:  # extensions are read here, up to vox_offset
            raise UserInputError(f"{path}: cannot be read as NIfTI, damaged header or header extensions "
                                 f"({_one_line(exc)}); check the file is complete") from exc
        header.check_fix(logger=fixes, error_level=40)  # nibabel's checks: raise or fix
    for message in fixes.messages + [" ".join(str(w.message).split()) for w in caught]:
        log.warning("warning: %s: header: %s", path, message)
    _check_header(path, header, os.fstat(raw.fileno()).st_size, gz, check_memory)
    affine = np.asarray(header.get_best_affine(), float)
    _check_affine(path, affine)
    return klass, header, affine


def _checked_path(path):
    if _suffix(path) is None:
        raise UserInputError(f"{path}: not a NIfTI file name; give a .nii or .nii.gz file")
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such file")
    return str(path).endswith(".gz")


def read_header(path):
    """``(header, affine, gz)`` of a NIfTI file, checked as :func:`read_image` checks it
    (without reading a voxel, and without the memory check: a rank reads only its part)."""
    import gzip

    gz = _checked_path(path)
    try:
        with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw) as fh:
            _, header, affine = _parse_header(path, fh, raw, gz, check_memory=False)
    except UserInputError:
        raise
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise UserInputError(f"{path}: cannot be read as NIfTI ({_one_line(exc)}); check the file is complete") from exc
    return header, affine, gz


def _load(path, vector=False, channels=False):
    import gzip

    gz = _checked_path(path)
    try:
        with open(path, "rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw) as fh:
            klass, header, affine = _parse_header(path, fh, raw, gz, check_memory=True)
            data = np.asanyarray(klass.ImageArrayProxy(fh, header.copy(), mmap=False))
            if gz:  # read to the end: the gzip trailer's CRC and length check the whole stream
                while fh.read(1 << 24):
                    pass
    except UserInputError:
        raise
    except MemoryError as exc:
        raise UserInputError(f"{path}: not enough memory to read the image") from exc
    except Exception as exc:  # nibabel, gzip and zlib raise many types for damaged files
        raise UserInputError(f"{path}: cannot be read as NIfTI ({_one_line(exc)}); check the file is complete") from exc
    if vector:
        if data.ndim != 4 or data.shape[3] != 3:
            raise UserInputError(f"{path}: shape {data.shape}; a 3-D field of 3-vectors (n1, n2, n3, 3) is needed")
    else:
        while data.ndim > 3 and data.shape[-1] == 1:  # trailing singleton axes (time, vector) of a volume
            data = data[..., 0]
        multichannel = channels and data.ndim == 4 and 1 < data.shape[3] <= 16
        if data.ndim != 3 and not multichannel:
            raise UserInputError(f"{path}: image has shape {data.shape}; a 3-D volume is needed"
                                 + (" (or (n1, n2, n3, C) with C <= 16 channels)" if channels else ""))
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise UserInputError(f"{path}: voxel type {data.dtype} is not a real number type")
    if data.dtype.byteorder not in "=|":
        data = data.astype(data.dtype.newbyteorder("="))
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise UserInputError(f"{path}: image contains NaN or infinite voxels; replace them first")
        peak = max(abs(float(data.min())), abs(float(data.max())))
        if peak > MAX_ABS_VALUE:
            raise UserInputError(f"{path}: voxel values reach {peak:.3g}; values beyond +-{MAX_ABS_VALUE:g} overflow "
                                 "the spectral arithmetic: rescale the image")
    return Image(np.ascontiguousarray(data), affine, data.shape, header)


def read_image(path, comm=None, *, vector=False, channels=False):
    """Read a 3-D NIfTI image on rank 0 of ``comm`` and share its geometry with every rank.

    A trailing singleton 4th axis is dropped; ``vector=True`` reads a field ``(n1, n2, n3,
    3)`` instead, ``channels=True`` also accepts ``(n1, n2, n3, C)`` images of ``C <= 16``
    components. Errors are raised on every rank (as :class:`UserInputError`) so that all
    ranks exit together.
    """
    rank = 0 if comm is None else comm.Get_rank()
    result, error, unexpected = None, None, None
    if rank == 0:
        try:
            result = _load(path, vector, channels)
        except UserInputError as exc:
            error = str(exc)
        except BaseException as exc:  # a bug: raise it, but never leave the other ranks in bcast
            if comm is None or comm.Get_size() == 1:
                raise
            unexpected, error = exc, f"{path}: reading failed on rank 0 ({_one_line(exc)})"
    if comm is not None:
        error, kind = comm.bcast((error, unexpected is not None), root=0)
        if kind:
            if unexpected is not None:
                raise unexpected
            raise RuntimeError(error)
        geometry = comm.bcast(None if result is None else (result.affine, result.shape), root=0)
    if error is not None:
        raise UserInputError(error)
    if rank != 0:
        return Image(None, geometry[0], geometry[1])
    return result


def atomic_path(path):
    """A temporary file name beside ``path`` keeping its NIfTI suffix (nibabel infers the
    format from it), with the permissions the umask gives; move it onto ``path`` with
    ``os.replace`` once written. Every file claire_py writes goes through here."""
    directory, name = os.path.split(os.path.abspath(path))
    suffix = _suffix(name) or ""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial" + suffix, dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: the file gets what the umask gives, as open() would
    return tmp


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path, text):
    """Write ``text`` to ``path`` atomically: a hidden temporary file beside it (see
    :func:`atomic_path`), synced, then renamed; nothing under the final name until complete."""
    tmp = atomic_path(path)
    try:
        with open(tmp, "w", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


#: A ``.nii.gz`` is deflated only where deflate pays: a sample that shrinks to less than this
#: share of its size. Images (mostly background) shrink to ~0.4; float fields (velocities,
#: displacements, det) to 0.8-0.92 at 30-100 MB/s, and are written as stored deflate blocks
#: instead (valid gzip, ~600 MB/s).
DEFLATE_WORTH = 0.7
_SAMPLE_BYTES = 1 << 20


def _deflate_level(data):
    """zlib level for a ``.nii.gz`` of ``data``: 1 (with the run-length strategy: as small as
    zlib's default on images at 2-3x its speed) when a 1 MiB sample from the middle compresses
    below :data:`DEFLATE_WORTH`, else 0 (stored)."""
    flat = np.ravel(data, order="K")
    start = max(0, flat.size // 2 - _SAMPLE_BYTES // (2 * flat.itemsize))
    sample = np.ascontiguousarray(flat[start:start + _SAMPLE_BYTES // flat.itemsize]).tobytes()
    if not sample:
        return 0
    z = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return 1 if len(z.compress(sample) + z.flush()) < DEFLATE_WORTH * len(sample) else 0


def _crc32_times(a, b):
    """``a b mod P`` for CRC-32's polynomial ``P`` in its reflected form (bit 31 is x^0)."""
    product, bit = 0, 1 << 31
    while a:
        if a & bit:
            product ^= b
            a ^= bit
        bit >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return product


def _crc32_combine(crc1, crc2, length2):
    """CRC-32 of ``A + B`` from ``crc1`` of ``A``, ``crc2`` of ``B`` and ``B``'s length in
    bytes (zlib's ``crc32_combine``, which Python's zlib does not export): ``crc1`` times
    ``x^(8 length2)`` mod ``P``, plus ``crc2``."""
    shift, square = 1 << 31, 1 << 23  # x^0; x^8 (one byte)
    while length2:
        if length2 & 1:
            shift = _crc32_times(square, shift)
        square = _crc32_times(square, square)
        length2 >>= 1
    return _crc32_times(shift, crc1) ^ crc2


def _deflated_piece(data, level):
    """``(bytes, crc32, length)``: ``data`` deflated at ``level`` (run-length strategy) as a
    piece of a raw deflate stream that others may follow (ended by a sync flush: byte
    aligned, not final). Pieces deflated apart, concatenated and closed by a final empty
    block, are one deflate stream (as pigz writes them)."""
    data = memoryview(data).cast("B")
    z = zlib.compressobj(level, zlib.DEFLATED, -15, 9, zlib.Z_RLE)
    return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH), zlib.crc32(data), len(data)


#: gzip header: deflate, no flags, mtime 0, no extra flags, unknown OS (no name, no time:
#: same data, same bytes); and the final empty fixed-Huffman block that closes a stream of
#: :func:`_deflated_piece`s.
_GZIP_HEADER, _FINAL_BLOCK = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", b"\x03\x00"


class _GzipStream:
    """A write-only file object that gzips what is written to ``raw``: deflated by zlib at
    ``level`` (strategy Z_RLE), or for ``level == 0`` as stored deflate blocks written
    straight from the caller's buffer (only the CRC touches the bytes: ~3x zlib's own level
    0). ``seek`` only moves forward (padding with zeros), as nibabel needs to reach the voxel
    offset. The gzip header holds no name and no time: same data, same bytes."""

    _STORED_BLOCK = 0xFFFF  # the largest stored block deflate allows

    def __init__(self, raw, level):
        self.raw, self.size, self.level, self._crc = raw, 0, level, 0
        if level:
            self._z = zlib.compressobj(level, zlib.DEFLATED, 31, 9, zlib.Z_RLE)
        else:
            raw.write(_GZIP_HEADER)

    def write(self, data):
        data = memoryview(data).cast("B")
        self.size += len(data)
        if self.level:
            self.raw.write(self._z.compress(data))
            return len(data)
        self._crc = zlib.crc32(data, self._crc)
        for start in range(0, len(data), self._STORED_BLOCK):
            block = data[start:start + self._STORED_BLOCK]
            self.raw.write(struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF))  # BFINAL 0, stored
            self.raw.write(block)
        return len(data)

    def read(self, *args):  # nibabel recognises file objects by read and write
        raise OSError("_GzipStream is write-only")

    def tell(self):
        return self.size

    def seek(self, pos, whence=0):
        if whence != 0 or pos < self.size:
            raise OSError("_GzipStream seeks forward only")
        self.write(bytes(pos - self.size))
        return self.size

    def flush(self):
        pass

    def finish(self):
        if self.level:
            self.raw.write(self._z.flush())
        else:  # an empty final stored block, then CRC-32 and size mod 2^32
            self.raw.write(struct.pack("<BHHII", 1, 0, 0xFFFF, self._crc, self.size & 0xFFFFFFFF))


def write_image(path, data, affine, header=None, intent=None):
    """Write ``data`` as NIfTI at ``path`` atomically (temporary name, then rename): a
    reader sees either the complete file or none. Call on one rank only; several calls may
    run in threads (compression releases the GIL). ``intent`` sets the NIfTI intent code by
    name (e.g. ``"vector"`` for displacement fields). A ``.nii.gz`` is one standard gzip
    member, deflated where that pays (see :data:`DEFLATE_WORTH`)."""
    import nibabel as nib

    suffix = _suffix(path)
    if suffix is None:
        raise UserInputError(f"{path}: output must end in .nii or .nii.gz")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserInputError(f"{directory}: output directory does not exist")
    data = np.asarray(data)
    img = nib.Nifti1Image(data, affine, header=header)
    img.set_data_dtype(data.dtype)
    if intent is not None:
        img.header.set_intent(intent)
    tmp = atomic_path(path)
    try:
        with open(tmp, "wb") as raw:
            stream = _GzipStream(raw, _deflate_level(data)) if suffix == ".nii.gz" else raw
            file_map = nib.Nifti1Image.make_file_map()
            file_map["image"].fileobj = stream
            img.to_file_map(file_map)
            if stream is not raw:
                stream.finish()
            raw.flush()
            os.fsync(raw.fileno())  # on disk before the rename: a crash cannot leave a renamed empty file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resample_to_grid(data, affine, target_affine, target_shape, order=1, transform=None):
    """``data`` (with voxel-to-mm ``affine``) sampled on the grid of ``target_affine`` and
    ``target_shape``: trilinear (``order=1``) or nearest (``order=0``), zero outside. With
    ``transform`` (4 x 4, world mm of the target -> world mm of ``data``), the target's point
    ``x`` takes ``data``'s value at ``transform(x)``."""
    from scipy import ndimage

    target = np.asarray(target_affine, float)
    if transform is not None:
        target = np.asarray(transform, float) @ target
    matrix = np.linalg.solve(np.asarray(affine, float), target)
    return ndimage.affine_transform(np.asarray(data, np.float64), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=tuple(target_shape), order=order, mode="constant", cval=0.0)
