"""Transform files that ANTs and ITK read: an affine ``.mat`` and a composite ``.h5``.

claire_py's world transforms are 4 x 4 matrices in NIfTI's world (RAS, mm) that take FIXED's
points into MOVING's (the direction in which an image is resampled: ``warped(x) =
moving(T(x))``). ITK works in LPS: ``T_lps = D T_ras D`` with ``D = diag(-1, -1, 1, 1)``.

* ``affine.mat``: ITK's ``AffineTransform_double_3_3`` in MATLAB v4 format, as ANTs writes
  ``0GenericAffine.mat``: variables ``AffineTransform_double_3_3`` (the 3 x 3 matrix row by
  row, then the translation) and ``fixed`` (the centre ``c``). ITK's affine maps ``p -> M (p -
  c) + c + t``. claire_py writes ``c = 0``.
* ``transform.h5``: an ITK ``CompositeTransform_double_3_3`` of the affine and the
  ``DisplacementFieldTransform_double_3_3`` of the deformable part, in ITK's HDF5 layout.
  The affine is the composite's first transform and is applied to points last, so a FIXED
  point ``x`` goes to ``T(x + u(x))``. That is the order of ``antsApplyTransforms -t
  displacement.nii.gz -t affine.mat``, the list ``ants.registration`` returns as
  ``fwdtransforms``.

:func:`read_affine` reads the ``.mat`` files of ANTs/ITK (MATLAB v4 or v5; ``AffineTransform``
or ``MatrixOffsetTransformBase``, float or double) and ITK's text format (``.txt``/``.tfm``).
"""

from __future__ import annotations

import os
import re
import zlib

import numpy as np

from .errors import UserInputError

__all__ = ["read_affine", "write_affine_mat", "write_composite_h5", "ras_to_lps"]

_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_LINEAR_TYPE = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3$")


def ras_to_lps(transform):
    """A 4 x 4 world transform between RAS spaces, as the same map between LPS spaces."""
    return _LPS @ np.asarray(transform, float) @ _LPS


def _from_itk(parameters, fixed, where):
    parameters = np.asarray(parameters, float).ravel()
    fixed = np.zeros(3) if fixed is None else np.asarray(fixed, float).ravel()
    if parameters.size != 12 or fixed.size != 3:
        raise UserInputError(f"{where}: an affine transform needs 12 parameters and a 3-D centre, "
                             f"found {parameters.size} and {fixed.size}")
    matrix, translation = parameters[:9].reshape(3, 3), parameters[9:]
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = matrix, translation + fixed - matrix @ fixed
    if not np.all(np.isfinite(lps)) or abs(np.linalg.det(matrix)) < 1e-8:
        raise UserInputError(f"{where}: the affine transform is singular or not finite (det "
                             f"{np.linalg.det(matrix):.3g}); give an invertible transform")
    return ras_to_lps(lps)  # the conjugation by D is its own inverse


def _read_text(path, text):
    kinds = re.findall(r"^Transform:\s*(\S+)", text, re.M)
    params = re.findall(r"^Parameters:\s*(.*)$", text, re.M)
    fixed = re.findall(r"^FixedParameters:\s*(.*)$", text, re.M)
    if len(kinds) != 1 or len(params) != 1:
        raise UserInputError(f"{path}: expected one ITK transform ('Transform:', 'Parameters:' lines), found "
                             f"{len(kinds)}; give an affine transform file written by ITK or ANTs")
    if not _LINEAR_TYPE.match(kinds[0]):
        raise UserInputError(f"{path}: transform type {kinds[0]} is not an affine one; give an AffineTransform "
                             "(e.g. ANTs' 0GenericAffine.mat)")
    try:
        values = [float(v) for v in params[0].split()]
        centre = [float(v) for v in fixed[0].split()] if fixed else None
    except ValueError:
        raise UserInputError(f"{path}: the transform parameters are not numbers") from None
    return _from_itk(values, centre, path)


def read_affine(path):
    """The world (RAS) transform FIXED -> MOVING stored in an ITK/ANTs affine file.

    Parameters
    ----------
    path : str
        ``.mat`` (MATLAB v4/v5, as ANTs and ITK write it) or ITK's text format (``.txt``,
        ``.tfm``).

    Returns
    -------
    ndarray ``(4, 4)``

    Raises
    ------
    UserInputError
        When the file is missing, not an ITK transform, of a non-affine type, or singular.
    """
    if not os.path.isfile(path):
        raise UserInputError(f"{path}: no such transform file")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(b"#Insight Transform File"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            return _read_text(path, fh.read())
    from scipy.io import loadmat

    try:
        variables = loadmat(path)
    except Exception as exc:  # scipy raises several kinds on a file that is not MATLAB
        raise UserInputError(f"{path}: not an ITK transform file (neither ITK text nor a MATLAB .mat: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    names = [name for name in variables if not name.startswith("__") and name != "fixed"]
    linear = [name for name in names if _LINEAR_TYPE.match(name)]
    if not linear:
        raise UserInputError(f"{path}: holds {', '.join(names) or 'no transform'}, not an affine transform; "
                             "give an AffineTransform (e.g. ANTs' 0GenericAffine.mat)")
    return _from_itk(variables[linear[0]], variables.get("fixed"), path)


def _itk_parameters(transform):
    lps = ras_to_lps(transform)
    return np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]])


def write_affine_mat(path, transform):
    """Write ``transform`` (RAS, FIXED -> MOVING) as ITK's ``AffineTransform_double_3_3`` in
    MATLAB v4 format (what ``antsApplyTransforms`` and ``ants.read_transform`` read)."""
    from scipy.io import savemat

    with open(path, "wb") as fh:
        savemat(fh, {"AffineTransform_double_3_3": _itk_parameters(transform)[:, None], "fixed": np.zeros((3, 1))},
                format="4")


def _field_geometry(affine, shape):
    """ITK image geometry (size, origin, spacing, direction) of a NIfTI grid, in LPS."""
    affine = np.asarray(affine, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = (_LPS[:3, :3] @ affine[:3, :3]) / spacing
    origin = _LPS[:3, :3] @ affine[:3, 3]
    return np.concatenate([np.asarray(shape, float), origin, spacing, direction.ravel()])


def write_composite_h5(path, transform, displacement_lps, affine, *, inverse=False, comm=None, shape=None):
    """Write ITK's composite transform ``x -> T(x + u(x))`` (with ``inverse``: ``x -> T x +
    u(T x)``, the form of an inverse map) to HDF5 (``SimpleITK.ReadTransform`` and
    ``antsApplyTransforms`` read it).

    Parameters
    ----------
    transform : ndarray ``(4, 4)``
        The affine part, RAS, FIXED -> MOVING.
    displacement_lps : ndarray ``(n1, n2, n3, 3)``
        ``u`` in LPS mm on FIXED's grid (any memory order); with ``comm``, this rank's slab
        ``(n1, n2, k1 - k0, 3)`` of the planes :func:`claire_py.blockio.slab_bounds` gives it.
    affine : ndarray ``(4, 4)``
        FIXED's voxel-to-world (RAS) matrix.
    comm, shape : optional
        Collective over ``comm`` on the grid ``shape``: each rank deflates its planes into the
        dataset's chunks (one chunk per plane: ITK stores ``x`` fastest, so a plane is one run
        of the parameters), and rank 0 writes the file, receiving the other ranks' chunks one
        rank at a time. Returns an error message (or ``None``) on every rank then, and
        ``None`` without ``comm``.
    """
    from mpi4py import MPI

    from .blockio import slab_bounds

    comm = MPI.COMM_SELF if comm is None else comm
    field = np.asarray(displacement_lps)
    shape = field.shape[:3] if shape is None else tuple(shape)
    rank = comm.Get_rank()
    bounds = slab_bounds(shape[2], comm.Get_size())
    size, plane = 3 * int(np.prod(shape)), 3 * shape[0] * shape[1]
    compressed = size > 4096
    # every rank turns its planes into the dataset's chunks (one per plane, compressed here:
    # the ranks deflate in parallel), then rank 0 stores them as they are
    chunks = [_parameter_chunk(field[:, :, k], compressed) for k in range(bounds[rank][1] - bounds[rank][0])]
    if rank != 0:
        lengths = np.array([len(c) for c in chunks], np.int64)
        comm.Send(lengths, dest=0, tag=19)
        comm.Send(np.frombuffer(b"".join(chunks), np.uint8), dest=0, tag=20)
        return comm.bcast(None)
    error, received = None, {0}

    def receive(r):
        lengths = np.empty(bounds[r][1] - bounds[r][0], np.int64)
        comm.Recv(lengths, source=r, tag=19)
        data = np.empty(int(lengths.sum()), np.uint8)
        comm.Recv(data, source=r, tag=20)
        received.add(r)
        ends = np.cumsum(lengths)
        return [data[end - n:end] for n, end in zip(lengths, ends)]

    try:
        import h5py

        with h5py.File(path, "w") as h5:
            for name, value in (("HDFVersion", h5py.version.hdf5_version), ("ITKVersion", "5.3.0"),
                                ("OSName", "Linux"), ("OSVersion", "unknown")):
                h5.create_dataset(name, data=np.array([value.encode()], dtype=h5py.string_dtype("ascii")))
            group = h5.create_group("TransformGroup")
            # ITK applies a composite's transforms to a point from the last one to the first
            parts = [("AffineTransform_double_3_3", np.zeros(3), _itk_parameters(transform)),
                     ("DisplacementFieldTransform_double_3_3", _field_geometry(affine, shape), None)]
            entries = [("CompositeTransform_double_3_3", np.zeros(0), np.zeros(0))] + \
                (parts[::-1] if inverse else parts)
            for i, (kind, fixed, params) in enumerate(entries):
                sub = group.create_group(str(i))
                sub.create_dataset("TransformType", data=np.array([kind.encode()], dtype=h5py.string_dtype("ascii")))
                sub.create_dataset("TransformFixedParameters", data=np.asarray(fixed, np.float64))
                if params is not None:
                    sub.create_dataset("TransformParameters", data=np.asarray(params, np.float64))
                    continue
                dataset = sub.create_dataset("TransformParameters", (size,), np.float64,
                                             **({"chunks": (plane,), "shuffle": True, "compression": "gzip",
                                                 "compression_opts": 1} if compressed else {}))
                for r, (k0, k1) in enumerate(bounds):
                    for k, chunk in zip(range(k0, k1), chunks if r == 0 else receive(r)):
                        if compressed:
                            dataset.id.write_direct_chunk((plane * k,), memoryview(chunk))
                        else:
                            dataset[plane * k:plane * (k + 1)] = np.frombuffer(chunk, np.float64)
    except Exception as exc:  # a full disk: recorded; the other ranks' slabs are all received below
        error = f"{path}: writing failed ({exc})"
        for r in range(comm.Get_size()):  # no rank may wait for ever in its Send
            if r not in received:
                receive(r)
    return comm.bcast(error)


def _parameter_chunk(plane, compressed):
    """One plane ``(n1, n2, 3)`` of the displacement as the bytes of its chunk of ITK's
    parameters (float64, ``x`` fastest, the vector component innermost): with ``compressed``,
    through HDF5's shuffle filter (byte ``j`` of every value together) and deflate (zlib
    level 1, run-length strategy; 0.42 of the raw size on a float32 field stored as float64,
    about 3x faster than HDF5's own level 1 without the shuffle)."""
    values = np.ascontiguousarray(np.transpose(plane, (1, 0, 2)), np.float64)
    if not compressed:
        return values.tobytes()
    shuffled = np.ascontiguousarray(values.view(np.uint8).reshape(-1, values.itemsize).T)
    z = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    return z.compress(shuffled) + z.flush()
