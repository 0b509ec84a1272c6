"""What ``claire register`` writes into OUTDIR (on rank 0), each file atomically.

All images are on FIXED's grid with its affine. The whole map is ``x -> T(y(x))``: the
deformable part ``y`` on FIXED's grid, then the affine part ``T`` (world RAS mm, FIXED ->
MOVING; the identity without an affine stage). Conventions:

* ``warped.nii.gz``: MOVING deformed onto FIXED, ``warped(x) = moving(T(y(x)))`` (pull-back), in
  MOVING's original intensity range.
* ``velocity.nii.gz``: the stationary velocity, 4-D ``(n1, n2, n3, 3)``, component ``a`` along
  array axis ``a``, in voxels per unit time (the map ``y`` is its flow over ``t in [0, 1]``).
* ``det_grad_y.nii.gz``: the Jacobian determinant of the whole map, ``det(A) det(grad y)`` (< 1:
  FIXED's voxel maps onto a smaller region of MOVING), ``det(grad y)`` computed along the
  characteristics of the velocity as the exponential of the transported integral of ``-div v``
  (CLAIRE transports ``J`` itself, and for the inverse map); ``registration.json`` also holds
  the range by central differences of ``deformation_map``.
* ``deformation_map.nii.gz``: ``T(y(x))`` as world (RAS, mm) coordinates, 4-D ``(n1, n2, n3,
  3)``: the point of MOVING that FIXED's voxel ``x`` takes its value from (SPM-style ``y_``
  field).
* ``displacement.nii.gz``: the deformable part ``y(x) - x`` in the ITK/ANTs convention:
  physical millimetres in ITK's LPS axes, a 5-D vector NIfTI ``(n1, n2, n3, 1, 3)`` with intent
  "vector".
* ``affine.mat``: ``T`` as ITK's ``AffineTransform_double_3_3`` (LPS, FIXED's points into
  MOVING's; MATLAB v4, as ANTs writes ``0GenericAffine.mat``).
* ``transform.h5``: ITK's composite of both (``x -> T(x + u(x))``), for ``SimpleITK.ReadTransform``
  and ``antsApplyTransforms``. ANTs resamples MOVING into ``warped.nii.gz`` with
  ``antsApplyTransforms -d 3 -i MOVING -r FIXED -t displacement.nii.gz -t affine.mat`` (the
  order of ``ants.registration``'s ``fwdtransforms``) or ``-t transform.h5`` (both tested).
* ``residual_before.nii.gz`` / ``residual_after.nii.gz``: ``|fixed - moving|`` and
  ``|fixed - warped|`` on intensities normalised to ``[0, 1]``.
* ``registration.json``: resolved configuration, convergence history, stop reason, workload,
  det range, wall seconds per phase and rank (``"timing"``, see :mod:`claire_py.timing`) and
  each rank's peak RSS by the end of each phase (``"peak_rss_bytes"``),
  versions; ``"complete": true`` is written last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

import numpy as np

from .errors import UserInputError
from .io import write_image, write_text
from .kernels.fields import affine_to_fortran

__all__ = ["output_file", "read_record", "write_outputs", "write_inverse", "prepare_outdir", "load_registration",
           "SavedRegistration", "Slabs"]


def output_file(outdir, name):
    """``outdir/name.nii.gz``, or ``outdir/name.nii`` when only that exists (``--output-format nii``)."""
    path = os.path.join(outdir, name + ".nii.gz")
    return path if os.path.exists(path) or not os.path.exists(path[:-3]) else path[:-3]


def read_record(outdir):
    """The ``registration.json`` of a finished run in ``outdir`` (the one reader of it);
    :class:`UserInputError` naming the fix if the directory, the file or its ``"complete":
    true`` is missing."""
    if not os.path.isdir(outdir):
        raise UserInputError(f"{outdir}: no such directory; give the -o directory of claire register")
    path = os.path.join(outdir, "registration.json")
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{outdir}: no finished registration found ({exc}); "
                             "give the -o directory of claire register") from None
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        raise UserInputError(f"{outdir}: registration.json is incomplete (the run did not finish); run it again")
    return meta


@dataclasses.dataclass
class SavedRegistration:
    """A finished registration directory, as :func:`load_registration` reads it.

    Attributes
    ----------
    velocity : ndarray ``(3, n1, n2, n3)`` or None
        Radians of the box per unit time, on rank 0 (``None`` elsewhere), on the grid of
        ``affine``.
    config : RegistrationConfig
    affine : ndarray ``(4, 4)``
        Voxel-to-world matrix of the velocity's grid (FIXED's).
    transform : ndarray ``(4, 4)``
        The affine part (world RAS mm). A forward map takes an image on MOVING's grid onto
        FIXED's: ``out(x) = image(transform(y(x)))``; an inverse one (``inverse``) an image
        on FIXED's grid onto ``target``: ``out(z) = image(y_inv(transform(z)))``.
    target : tuple ``(shape, affine)`` or None
        The grid an inverse map writes onto (MOVING's); for a forward map MOVING's grid when
        recorded.
    inverse : bool
    """

    velocity: np.ndarray | None
    config: object
    affine: np.ndarray
    transform: np.ndarray
    target: tuple | None
    inverse: bool


def load_registration(outdir, comm):
    """The :class:`SavedRegistration` in ``outdir``. Errors (missing or incomplete run) are
    raised on every rank."""
    from .config import RegistrationConfig
    from .io import read_image
    from .parallel import on_root

    meta = on_root(comm, lambda: read_record(outdir))
    img = read_image(output_file(outdir, "velocity"), comm, vector=True)
    velocity = None
    if img.data is not None:
        spacing = np.array([2 * np.pi / n for n in img.shape[:3]])
        velocity = np.moveaxis(np.asarray(img.data, np.float64), -1, 0) * spacing[:, None, None, None]
    part = meta.get("affine") or {}
    target = (tuple(part["moving_shape"]), np.array(part["moving_affine"])) if "moving_shape" in part else None
    return SavedRegistration(velocity, RegistrationConfig.from_dict(meta["config"]), img.affine,
                             np.array(part.get("transform_ras", np.eye(4)), float), target, "inverse_of" in meta)


def prepare_outdir(outdir, *, overwrite=False, create=True, shape=None, bytes_needed=None):
    """Check ``outdir`` (and create it when ``create``): refuse one that holds a registration
    unless ``overwrite``, a non-directory, a place that is not writable, and a file system
    without room for the outputs. Raises :class:`UserInputError` naming the fix. With
    ``create=False`` nothing is left behind, so a check before the solve leaves no trace when
    the solve then fails.

    The free space asked for is ``bytes_needed``, else the uncompressed size of the files of
    ``claire register`` on the grid ``shape`` (13 float32 values per point: 4 images, 3
    vector fields), and at least 1 MiB (a full disk is refused whatever the grid). With ``create``
    and ``overwrite``, a previous ``registration.json`` is removed first: the directory is
    marked incomplete until the new one is written last, so a run killed while replacing the
    files never leaves a mix of old and new files under a "complete" record."""
    import tempfile

    from .errors import UserInputError

    record = os.path.join(outdir, "registration.json")
    if os.path.exists(record) and not overwrite:
        raise UserInputError(f"{outdir} already holds a registration; choose another -o or pass --overwrite")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserInputError(f"{outdir} exists and is not a directory")
    existing = os.path.abspath(outdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserInputError(f"{existing} is not a directory; choose another -o")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{existing} is not writable; choose another -o")
    try:  # os.access trusts permission bits: root, read-only mounts, /proc and quotas need a real file
        fd, probe = tempfile.mkstemp(prefix=".claire-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserInputError(f"{existing} is not writable ({exc.strerror or exc}); choose another -o") from exc
    if bytes_needed is None:
        bytes_needed = 0 if shape is None else int(np.prod(shape, dtype=np.float64)) * (4 + 3 * 3) * 4
    bytes_needed = max(int(bytes_needed), 1 << 20)
    try:
        fs = os.statvfs(existing)
        free = fs.f_bavail * fs.f_frsize
    except (OSError, AttributeError):  # pragma: no cover - no statvfs: no check
        free = None
    if free is not None and free < bytes_needed:
        mib = 2.0 ** 20
        raise UserInputError(f"{existing}: {free / mib:.1f} MiB free on its file system but the outputs need up to "
                             f"{bytes_needed / mib:.1f} MiB; free space or choose another -o")
    if create:
        os.makedirs(outdir, exist_ok=True)
        if overwrite and os.path.exists(record):
            os.remove(record)


def _normalized(a, like=None):
    """``a`` rescaled by the intensity range of ``like`` (default: its own) onto ``[0, 1]``."""
    a = np.asarray(a, dtype=np.float32)
    ref = a if like is None else np.asarray(like)
    lo, hi = float(ref.min()), float(ref.max())
    return (a - np.float32(lo)) * np.float32(1 / (hi - lo)) if hi > lo else np.zeros_like(a)


def _versions():
    import mpi4py
    import mpi4py_fft
    import nibabel
    import numba
    import scipy

    from ._version import __version__

    return {"claire_py": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "numba": numba.__version__, "mpi4py": mpi4py.__version__,
            "mpi4py_fft": mpi4py_fft.__version__, "nibabel": nibabel.__version__}


def _write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2))


def _map_images(velocity, displacement, det, affine, transform=None, *, velocity_grid=None, k0=0):
    """The NIfTI arrays describing a map: velocity (voxels / unit time), det_grad_y (when
    ``det`` is given), deformation_map (RAS mm) and displacement (ITK: LPS mm, 5-D), all
    float32 and in Fortran order (NIfTI's: the file's bytes are the array's, written without a
    transpose); keys are the file names without their suffix.

    ``velocity`` and ``displacement`` are ``(3, n1, n2, dk)``: the planes ``k0 <= k < k0 + dk``
    of the grid, in radians of the box of ``velocity_grid`` (default the grid itself; a padded
    grid's box when the solve padded) and in voxels; with ``A`` the affine's linear part, ``t``
    its offset and ``T x = L x + s`` the affine part of the map (``transform``, default the
    identity), ``deformation_map = L (A (i + u) + t) + s`` and ``displacement = diag(-1, -1, 1) A
    u`` (the deformable part alone)."""
    shape = np.shape(displacement)[1:]
    grid = velocity_grid or shape
    linear, offset = np.asarray(affine, float)[:3, :3], np.asarray(affine, float)[:3, 3]
    T = np.eye(4) if transform is None else np.asarray(transform, float)
    displacement = np.ascontiguousarray(displacement)
    itk = np.empty(shape + (1, 3), np.float32, order="F")
    whole = T[:3, :3] @ linear
    origin = whole @ np.array([0.0, 0.0, float(k0)])  # the slab's first plane is plane k0
    images = {
        "velocity": affine_to_fortran(np.ascontiguousarray(velocity), np.diag([n / (2 * np.pi) for n in grid])),
        "deformation_map": affine_to_fortran(displacement, whole, T[:3, :3] @ offset + T[:3, 3] + origin, whole),
        "displacement": affine_to_fortran(displacement, np.diag([-1.0, -1.0, 1.0]) @ linear, out=itk),
    }
    if det is not None:
        images["det_grad_y"] = _fortran(det)
    return images


def _write_transform_files(outdir, transform, displacement_lps, affine, comm, shape, inverse=False):
    """``affine.mat`` (rank 0) and ``transform.h5`` (collective: each rank gives its slab of
    the LPS displacement, ``(n1, n2, dk, 3)``), each atomically."""
    from .io import atomic_path
    from .parallel import agree, on_root
    from .transforms import write_affine_mat, write_composite_h5

    def write_mat():
        try:
            _atomic(os.path.join(outdir, "affine.mat"), lambda tmp: write_affine_mat(tmp, transform))
        except OSError as exc:
            raise UserInputError(f"{outdir}/affine.mat: writing failed ({exc})") from exc

    on_root(comm, write_mat)
    path = os.path.join(outdir, "transform.h5")
    tmp = on_root(comm, lambda: atomic_path(path))
    error = write_composite_h5(tmp, transform, displacement_lps, affine, inverse=inverse, comm=comm, shape=shape)
    if comm.Get_rank() == 0:
        if not error:
            os.replace(tmp, path)
        elif os.path.exists(tmp):
            os.unlink(tmp)
    agree(comm, error)


def _atomic(path, write):
    """``write(tmp)`` to a temporary file beside ``path``, then rename it onto ``path``."""
    from .io import atomic_path

    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fortran(image):
    """A float32 copy of a 3-D image (or ``(C, n1, n2, n3)`` channels, stored last) in NIfTI's order."""
    image = np.ascontiguousarray(image)
    if image.ndim == 3:
        return affine_to_fortran(image, [[1.0]])[..., 0]
    return affine_to_fortran(image, np.eye(image.shape[0]))


def _write_images(outdir, images, affine, affines=None):
    """Write ``images`` (``{file name: array}``, global, on this rank) into ``outdir``, several
    files at once: the compression of each runs in its own thread (zlib releases the GIL);
    ``affines``: ``{name: voxel-to-world}`` where not ``affine``."""
    from concurrent.futures import ThreadPoolExecutor

    def write(name):
        write_image(os.path.join(outdir, name), images[name], (affines or {}).get(name, affine),
                    intent="vector" if name == "displacement.nii.gz" else None)

    workers = max(1, min(len(images), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else os.cpu_count() or 1))
    order = sorted(images, key=lambda name: -np.asarray(images[name]).nbytes)  # largest first
    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(write, name) for name in order]:
            future.result()


class Slabs:
    """This rank's slabs of the fields of a registration, as the files store them.

    ``get(name)`` returns the ``(C, n1, n2, k1 - k0)`` part (C order) of field ``name`` on the
    planes :func:`claire_py.blockio.slab_bounds` gives this rank of ``comm``, or ``None`` when
    absent. Names: ``velocity`` (``C = 3``, radians per unit time of the box ``[0, 2 pi)^3`` of
    ``velocity_grid``), ``displacement`` (``C = 3``, voxels, the deformable part), ``det_grad_y`` (``C = 1``; the
    whole map's), ``warped``, ``fixed`` (``C`` channels each, intensities as given) and
    ``moving_before`` (MOVING through the headers alone, whose range normalises the residuals).
    ``channels``: the images have a
    channel axis (``(C, n1, n2, n3)``, stored last) rather than being 3-D."""

    def __init__(self, comm, shape, get, *, velocity_grid=None, channels=False):
        from .blockio import slab_bounds

        self.comm, self.shape, self.get, self.channels = comm, tuple(shape), get, channels
        self.k0, self.k1 = slab_bounds(self.shape[2], comm.Get_size())[comm.Get_rank()]
        self.velocity_grid = tuple(velocity_grid or shape)

    @classmethod
    def of_arrays(cls, arrays, **kwargs):
        """The slabs of global arrays held by this process alone (one rank: ``COMM_SELF``)."""
        from mpi4py import MPI

        arrays = {name: None if a is None else (np.asarray(a)[None] if np.ndim(a) == 3 else np.asarray(a))
                  for name, a in arrays.items()}
        shape = next(a.shape[-3:] for a in arrays.values() if a is not None)
        return cls(MPI.COMM_SELF, shape, arrays.get, **kwargs)


def _channel_ranges(slab, comm):
    """``[(min, max)]`` per channel of a distributed ``(C, ...)`` slab, on every rank."""
    from mpi4py import MPI

    lo = np.array([float(c.min()) if c.size else np.inf for c in slab])
    hi = np.array([float(c.max()) if c.size else -np.inf for c in slab])
    comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    return list(zip(lo.tolist(), hi.tolist()))


def write_outputs(outdir, slabs, result, affine, config, *, inputs, ranks, seconds, timing=None, suffix=".nii.gz"):
    """Write the registration's files from each rank's :class:`Slabs` (collective over
    ``slabs.comm``; ``result`` holds the scalars: history, workload, transform, Dice...).

    ``affine`` is FIXED's; ``timing`` (``{phase: [seconds per rank]}``, see
    :mod:`claire_py.timing`) is stored with this writing's own time added as ``write``, and
    returned so (on rank 0 of ``slabs.comm``; ``None`` elsewhere). ``suffix`` is ``.nii.gz`` or
    ``.nii`` (written in place by every rank).
    """
    from .blockio import write_volume

    t0 = time.perf_counter()
    comm, shape, k0 = slabs.comm, slabs.shape, slabs.k0
    root = comm.Get_rank() == 0
    transform = np.eye(4) if getattr(result, "transform", None) is None else np.asarray(result.transform, float)
    names = []

    def write(name, slab, **kw):
        names.append(name)
        write_volume(os.path.join(outdir, name + suffix), slab, comm, shape=shape, affine=affine, **kw)

    images = _map_images(slabs.get("velocity"), slabs.get("displacement"), None, affine, transform,
                         velocity_grid=slabs.velocity_grid, k0=k0)
    det = slabs.get("det_grad_y")[0]
    det_range = _channel_ranges(det[None], comm)[0]
    write("det_grad_y", _fortran(det))
    del det
    for name in ("velocity", "deformation_map"):
        write(name, images.pop(name))
    write("displacement", images["displacement"], intent="vector")
    _write_transform_files(outdir, transform, images.pop("displacement")[:, :, :, 0, :], affine, comm, shape)
    warped, fixed, before = slabs.get("warped"), slabs.get("fixed"), slabs.get("moving_before")
    ranges = _channel_ranges(before, comm)
    fixed_ranges = _channel_ranges(fixed, comm)

    def normalized(a, lohi):
        lo, hi = lohi
        return (np.asarray(a, np.float32) - np.float32(lo)) * np.float32(1 / (hi - lo)) if hi > lo \
            else np.zeros(np.shape(a), np.float32)

    channels = slabs.channels
    write("warped", _fortran(warped if channels else warped[0]))
    after = np.stack([np.abs(normalized(f, fr) - normalized(w, r)) for f, w, fr, r in
                      zip(fixed, warped, fixed_ranges, ranges)])
    write("residual_after", _fortran(after if channels else after[0]))
    before = np.stack([np.abs(normalized(f, fr) - normalized(m, r)) for f, m, fr, r in
                       zip(fixed, before, fixed_ranges, ranges)])
    write("residual_before", _fortran(before if channels else before[0]))
    del after, before
    if not root:
        return None
    timing = dict(timing or {}, write=[time.perf_counter() - t0] + [0.0] * (ranks - 1))
    payload = {
        "inputs": inputs,
        "grid": list(shape),
        "ranks": ranks,
        "config": config.to_dict(),
        "converged": result.converged,
        "stop_reason": result.stop_reason,
        "beta": result.beta,
        "history": [dataclasses.asdict(h) for h in result.history],
        "stages": result.stages or [],
        "affine": {"transform_ras": transform.tolist(), "history": getattr(result, "affine_history", None) or [],
                   **_moving_grid(result)},
        "det_grad_y": {"min": det_range[0], "max": det_range[1]},
        "det_grad_y_central_differences": dict(zip(("min", "max"), map(float, result.det_central_differences))),
        "workload": result.workload,
        **({"dice": result.dice} if result.dice else {}),
        "seconds": seconds,
        "timing": timing,
        **({"peak_rss_bytes": result.peak_rss} if getattr(result, "peak_rss", None) else {}),
        "versions": _versions(),
        "files": sorted([name + suffix for name in names] + ["affine.mat", "transform.h5"]),
        "conventions": "warped(x) = moving(T(y(x))), T = affine.transform_ras (world RAS mm, FIXED -> MOVING); "
                       "velocity in voxels per unit time along the array axes",
    }
    payload["complete"] = True  # last key: a reader seeing it knows every file above is in place
    _write_json(os.path.join(outdir, "registration.json"), payload)
    return timing


def _moving_grid(result):
    grid = getattr(result, "moving_grid", None)
    if grid is None:
        return {}
    shape, affine = grid
    return {"moving_shape": list(shape), "moving_affine": np.asarray(affine, float).tolist()}


def write_inverse(outdir, source, inverse, config, *, suffix=".nii.gz"):
    """Write ``inverse`` (the :class:`~claire_py.deformation.DeformationMap` of the registration
    in ``source``, inverted) as a registration directory, collectively, each rank its planes
    of each file: velocity (``-v``), displacement (of the flow of ``-v``, on FIXED's grid),
    det_grad_y and deformation_map (the whole map's, on MOVING's grid when the map knows it,
    else FIXED's), ``affine.mat`` / ``transform.h5`` and a registration.json, so that ``claire
    transport`` / ``jacobian`` work on it (mapping images on FIXED's grid onto MOVING's).

    The whole inverse map is ``z -> y_inv(T^-1 z)``; ``inverse.transform`` is ``T^-1``."""
    from .blockio import write_volume

    comm, shape, affine, transform = inverse.comm, inverse.shape, inverse.grid_affine, inverse.transform
    names = []

    def write(name, planes, grid=(shape, affine), **kw):
        names.append(name + suffix)
        write_volume(os.path.join(outdir, name + suffix), planes, comm, shape=grid[0], affine=grid[1], **kw)

    displacement = inverse.displacement()
    images = _map_images(inverse.velocity, displacement, None, affine, transform, velocity_grid=shape,
                         k0=inverse.box[2][0])
    write("velocity", images.pop("velocity"))
    write("displacement", images["displacement"], intent="vector")
    _write_transform_files(outdir, transform, images.pop("displacement")[:, :, :, 0, :], affine, comm, shape,
                           inverse=True)
    images = None
    grid = inverse.output_grid
    world = inverse.deformation_map(displacement)
    displacement = None
    write("deformation_map", _fortran(world), grid)
    world = None
    det = inverse.jacobian()
    write("det_grad_y", _fortran(det), grid)
    det_range = _channel_ranges(det[None], comm)[0]
    if comm.Get_rank() != 0:
        return det_range
    moving = {} if inverse.moving_grid is None else {"moving_shape": list(grid[0]),
                                                     "moving_affine": np.asarray(grid[1]).tolist()}
    payload = {"inverse_of": os.path.abspath(source), "grid": list(shape), "ranks": comm.Get_size(),
               "config": config.to_dict(), "det_grad_y": {"min": det_range[0], "max": det_range[1]},
               "affine": {"transform_ras": transform.tolist(), **moving},
               "versions": _versions(), "files": sorted(names + ["affine.mat", "transform.h5"]),
               "conventions": "inverse map: image_on_moving(z) = image_on_fixed(y_inv(T(z))), T = "
                              "affine.transform_ras (MOVING -> FIXED), on the grid affine.moving_*; velocity = -v"}
    payload["complete"] = True
    _write_json(os.path.join(outdir, "registration.json"), payload)
    return det_range
