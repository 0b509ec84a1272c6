"""NIfTI input/output: rank 0 reads and scatters, gathers and writes atomically.

Arrays are in the NIfTI array axis order ``(i, j, k)``; the affine maps voxel indices to
scanner millimetres and is carried unchanged from input to output.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from .errors import UserInputError

__all__ = ["Image", "read_image", "write_image", "atomic_path", "resample_to_grid"]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


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


def _load(path, vector=False):
    import nibabel as nib

    if _suffix(path) is None:
        raise UserInputError(f"{path}: not a NIfTI file name; give a .nii or .nii.gz file")
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such file")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise UserInputError(f"{path}: cannot be read as NIfTI ({exc}); check the file is complete") from exc
    if vector:
        if data.ndim != 4 or data.shape[3] != 3:
            raise UserInputError(f"{path}: shape {data.shape}; a 3-D field of 3-vectors (n1, n2, n3, 3) is needed")
    else:
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise UserInputError(f"{path}: image has shape {data.shape}; a 3-D volume is needed")
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise UserInputError(f"{path}: voxel type {data.dtype} is not a real number type")
    affine = np.asarray(img.affine, float)
    if not np.all(np.isfinite(affine)):
        raise UserInputError(f"{path}: the header's affine is not finite; fix the qform/sform")
    if not np.all(np.isfinite(data)):
        raise UserInputError(f"{path}: image contains NaN or infinite voxels; replace them first")
    return Image(np.ascontiguousarray(data), affine, data.shape, img.header)


def read_image(path, comm=None, *, vector=False):
    """Read a 3-D NIfTI image on rank 0 of ``comm`` and share its geometry with every rank.

    A trailing singleton 4th axis is dropped; ``vector=True`` reads a field ``(n1, n2, n3,
    3)`` instead. Errors are raised on every rank (as :class:`UserInputError`) so that all
    ranks exit together.
    """
    rank = 0 if comm is None else comm.Get_rank()
    result, error = None, None
    if rank == 0:
        try:
            result = _load(path, vector)
        except UserInputError as exc:
            error = str(exc)
    if comm is not None:
        error = comm.bcast(error, root=0)
        geometry = comm.bcast(None if result is None else (result.affine, result.shape), root=0)
    if error is not None:
        raise UserInputError(error)
    if rank != 0:
        return Image(None, geometry[0], geometry[1])
    return result


def atomic_path(path):
    """A temporary file name beside ``path`` keeping its NIfTI suffix (nibabel infers the
    format from it); move it onto ``path`` with ``os.replace`` once written."""
    directory, name = os.path.split(os.path.abspath(path))
    suffix = _suffix(name) or ""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial" + suffix, dir=directory)
    os.close(fd)
    return tmp


def write_image(path, data, affine, header=None, intent=None):
    """Write ``data`` as NIfTI at ``path`` atomically (temporary name, then rename): a
    reader sees either the complete file or none. Call on one rank only. ``intent`` sets the
    NIfTI intent code by name (e.g. ``"vector"`` for displacement fields)."""
    import nibabel as nib

    if _suffix(path) is None:
        raise UserInputError(f"{path}: output must end in .nii or .nii.gz")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UserInputError(f"{directory}: output directory does not exist")
    img = nib.Nifti1Image(np.asarray(data), affine, header=header)
    img.set_data_dtype(np.asarray(data).dtype)
    if intent is not None:
        img.header.set_intent(intent)
    tmp = atomic_path(path)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def resample_to_grid(data, affine, target_affine, target_shape, order=1):
    """``data`` (with voxel-to-mm ``affine``) sampled on the grid of ``target_affine`` and
    ``target_shape``: trilinear (``order=1``) or nearest (``order=0``), zero outside."""
    from scipy import ndimage

    matrix = np.linalg.solve(np.asarray(affine, float), np.asarray(target_affine, float))
    return ndimage.affine_transform(np.asarray(data, np.float64), matrix[:3, :3], matrix[:3, 3],
                                    output_shape=tuple(target_shape), order=order, mode="constant", cval=0.0)
