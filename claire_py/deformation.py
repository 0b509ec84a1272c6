"""The map a registration found, as a distributed object: :class:`DeformationMap`."""

from __future__ import annotations

import os

import numpy as np

from .errors import UserInputError
from .parallel import on_root, world

__all__ = ["DeformationMap"]


class DeformationMap:
    """The whole map ``x -> T(y(x))`` of a registration, held by the ranks in planes.

    ``y`` is the pull-back map of a stationary velocity ``v`` on FIXED's grid (its flow over
    ``t in [0, 1]``, ``nt`` semi-Lagrangian steps, :mod:`claire_py.solvers.transport`) and ``T``
    the affine part (world RAS mm, FIXED -> MOVING): :meth:`warp` gives ``moving(T(y(x)))``.
    Rank ``r`` of ``P`` holds the planes ``k0 <= k < k1`` (:func:`claire_py.blockio.slab_bounds`)
    of ``v`` and of every field a method returns (``(..., n1, n2, k1 - k0)``), as files are read
    and written: no rank holds a whole field unless :meth:`gather` is asked for one. Every
    method is collective. The decomposition and the transport's plans for ``v`` are made by the
    first method that needs them and kept until :meth:`free`.

    An *inverse* map (:meth:`inverse`, :attr:`is_inverse`; :meth:`load` of ``claire invert``'s output) is ``z ->
    y_inv(T^-1(z))`` from MOVING's grid to FIXED's: ``v`` is ``-v``, ``transform`` is ``T^-1``,
    :meth:`warp` takes images on FIXED's grid and :meth:`warp` and :meth:`jacobian` land on
    MOVING's grid (``moving_grid``; FIXED's when it is unknown).

    Parameters
    ----------
    velocity : ndarray ``(3, n1, n2, k1 - k0)``
        This rank's planes of ``v``: radians of the box ``[0, 2 pi)^3`` per unit time,
        component ``a`` along array axis ``a``.
    shape : tuple ``(n1, n2, n3)``
        FIXED's grid (the velocity's).
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``.
    grid_affine : ndarray ``(4, 4)``, optional
        FIXED's voxel-to-world matrix (RAS mm); the identity by default.
    transform : ndarray ``(4, 4)``, optional
        ``T`` (``T^-1`` for an inverse map); the identity by default.
    nt, interpolation, precision
        As in the registration's configuration (:class:`~claire_py.solvers.transport.TransportOptions`).
    moving_grid : tuple ``(shape, affine)``, optional
        MOVING's grid.
    is_inverse : bool
    config : RegistrationConfig, optional
        The registration's configuration, kept for :meth:`save` (``nt``, ``interpolation`` and
        ``precision`` above are what the map itself uses).

    Examples
    --------
    >>> result = claire_py.register("fixed.nii.gz", "moving.nii.gz")      # doctest: +SKIP
    >>> planes = result.map.warp("moving_t2.nii.gz")                       # doctest: +SKIP
    >>> det = result.map.gather(result.map.jacobian())   # whole, on rank 0 # doctest: +SKIP
    >>> result.map.save("out/map"); DeformationMap.load("out/map")         # doctest: +SKIP
    """

    def __init__(self, velocity, shape, *, comm=None, grid_affine=None, transform=None, nt=4,
                 interpolation="lagrange", precision="float32", moving_grid=None, is_inverse=False, config=None):
        from .blockio import slab_bounds

        self.comm = world(comm)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(precision)
        k0, k1 = slab_bounds(self.shape[2], self.comm.Get_size())[self.comm.Get_rank()]
        self.box = ((0, self.shape[0]), (0, self.shape[1]), (k0, k1))
        velocity = np.ascontiguousarray(velocity, self.dtype)
        expected = (3,) + self.shape[:2] + (k1 - k0,)
        if velocity.shape != expected:
            raise ValueError(f"velocity planes of shape {velocity.shape}; this rank holds {expected}")
        self.velocity = velocity
        self.grid_affine = np.eye(4) if grid_affine is None else np.asarray(grid_affine, float)
        self.transform = np.eye(4) if transform is None else np.asarray(transform, float)
        self.nt, self.interpolation = int(nt), interpolation
        self.moving_grid = None if moving_grid is None else (tuple(moving_grid[0]), np.asarray(moving_grid[1], float))
        self.is_inverse = bool(is_inverse)
        self.config = config
        self._decomp = self._transport = None

    # ---------------------------------------------------------------- making one
    @classmethod
    def from_global(cls, velocity, shape=None, *, comm=None, **options):
        """The map of a whole velocity ``(3, n1, n2, n3)`` given on rank 0 (other ranks may
        pass ``None``; rank 0 sends each its planes); ``options`` as in the constructor."""
        from .prepare import source

        planes = source(velocity, comm, "velocity").planes(comm, options.get("precision", "float32"))
        if planes.components != 3:
            raise UserInputError(f"a velocity is (3, n1, n2, n3); got {planes.components or 1} component(s)")
        return cls(planes.data, planes.shape, comm=comm, **options)

    @classmethod
    def load(cls, outdir, comm=None, precision=None):
        """The map in ``outdir`` (of ``claire register``, ``claire invert`` or :meth:`save`):
        each rank reads its planes of the velocity; ``precision`` defaults to the
        registration's."""
        from .blockio import open_volume, read_slab
        from .config import RegistrationConfig
        from .outputs import output_file, read_record

        comm = world(comm)
        meta = on_root(comm, lambda: read_record(outdir))
        volume = open_volume(output_file(outdir, "velocity"), comm, vector=True)
        _, data = read_slab(volume, comm, np.float64)
        config = RegistrationConfig.from_dict(meta["config"])
        radians = np.array([2 * np.pi / n for n in volume.shape])[:, None, None, None]  # voxels -> radians
        part = meta.get("affine") or {}
        moving = (part["moving_shape"], part["moving_affine"]) if "moving_shape" in part else None
        return cls(data * radians, volume.shape, comm=comm, grid_affine=volume.affine,
                   transform=part.get("transform_ras"), nt=config.transport.nt,
                   interpolation=config.transport.interpolation, precision=precision or config.precision,
                   moving_grid=moving, is_inverse="inverse_of" in meta, config=config)

    def inverse(self):
        """The inverse map (see the class docstring): the flow of ``-v``, ``T^-1``."""
        return DeformationMap(-self.velocity, self.shape, comm=self.comm, grid_affine=self.grid_affine,
                              transform=np.linalg.inv(self.transform), nt=self.nt, interpolation=self.interpolation,
                              precision=self.dtype, moving_grid=self.moving_grid, is_inverse=not self.is_inverse,
                              config=self.config)

    # ---------------------------------------------------------------- internals
    def _ready(self):
        """``(decomp, transport)`` with ``v`` set: made once, kept until :meth:`free`."""
        if self._transport is None:
            from .kernels import Decomposition, SpectralOperators
            from .solvers.transport import SemiLagrangianTransport, TransportOptions

            decomp = Decomposition(self.shape, comm=self.comm, dtype=self.dtype)
            transport = SemiLagrangianTransport(decomp, SpectralOperators(decomp),
                                                TransportOptions(nt=self.nt, interpolation=self.interpolation))
            transport.set_velocity(decomp.blocks_from_boxes(self.velocity, self.box))
            self._decomp, self._transport = decomp, transport
        return self._decomp, self._transport

    def _planes(self, local):
        """This rank's planes of a field given as the decomposition's local block."""
        planes = self._decomp.boxes_from_blocks(local if local.ndim == 4 else local[None], self.box)
        return planes if local.ndim == 4 else planes[0]

    @staticmethod
    def _resampled(planes, matrix, decomp, *, labels):
        """This rank's block of ``planes`` through the voxel map ``matrix`` (``decomp``'s voxel
        -> the planes' voxel): cubic, clipped to the range, or for labels the nearest value."""
        from .prepare import BlockSampler, resampled_blocks

        if not labels:
            return resampled_blocks(planes, matrix, decomp, 0, order=3, dtype=decomp.dtype)[0]
        sampler = BlockSampler(planes, matrix, decomp, 0, order=0)
        return sampler.resample(sampler.source[0], order=0, dtype=planes.data.dtype)

    @property
    def output_grid(self):
        """``(shape, affine)`` of the grid :meth:`warp` and :meth:`jacobian` land on."""
        if self.is_inverse and self.moving_grid is not None:
            return self.moving_grid
        return self.shape, self.grid_affine

    def _on_moving_grid(self, dtype, block):
        """This rank's planes ``(C, n1, n2, k1 - k0)`` of MOVING's grid of the field that
        ``block(target, matrix)`` makes as a block ``(C, *local)`` of ``target`` (a decomposition
        of MOVING's grid, freed afterwards; ``matrix`` MOVING's voxel -> FIXED's through ``T^-1``)."""
        from .api import _voxel_map
        from .blockio import slab_bounds
        from .kernels import Decomposition

        shape, affine = self.moving_grid
        target = Decomposition(shape, comm=self.comm, dtype=dtype, planner_effort="FFTW_ESTIMATE")
        try:
            local = block(target, _voxel_map(self.grid_affine, affine, self.transform))
            k0, k1 = slab_bounds(shape[2], self.comm.Get_size())[self.comm.Get_rank()]
            return target.boxes_from_blocks(local, ((0, shape[0]), (0, shape[1]), (k0, k1)))
        finally:
            target.free()

    def _onto_moving(self, planes, *, labels):
        """Planes of a field on FIXED's grid, through ``T^-1``, as planes of MOVING's grid
        (cubic, clipped to the field's range; nearest for labels)."""
        from .prepare import Planes

        source = Planes(planes[None], self.shape, self.box[2][0], self.grid_affine, None)
        return self._on_moving_grid(self.dtype, lambda target, matrix: self._resampled(
            source, matrix, target, labels=labels)[None])[0]

    # ---------------------------------------------------------------- the map's fields
    def warp(self, image, *, labels=None):
        """``image`` deformed by the map, as this rank's planes of :attr:`output_grid`.

        ``image``: a NIfTI path or nibabel image (read by planes), or an array on rank 0. A
        forward map takes it from its own grid (an array: FIXED's) through ``T`` and then
        ``y`` (as ``claire register`` takes MOVING: cubic, clipped to its range); an inverse
        map takes an image on FIXED's grid. ``labels`` (``"nearest"`` or ``"probability"``):
        an integer label map, its values kept (nearest through ``T``)."""
        from .api import _voxel_map
        from .prepare import blocks, source

        if labels not in (None, "nearest", "probability"):
            raise UserInputError(f"labels={labels!r}: use None, 'nearest' or 'probability'")
        decomp, transport = self._ready()
        src = source(image, self.comm, "image")
        if src.components is not None:
            raise UserInputError("warp: give a 3-D image (one component)")
        if labels and not np.issubdtype(src.dtype, np.integer):
            raise UserInputError(f"a label map must have an integer voxel type, not {src.dtype}")
        affine = self.grid_affine if src.affine is None else src.affine
        matrix = _voxel_map(affine, self.grid_affine, None if self.is_inverse else self.transform)
        planes = src.planes(self.comm, None if labels else self.dtype)
        if src.shape == self.shape and np.allclose(matrix, np.eye(4), atol=1e-6):
            local = blocks(planes, decomp, 0)[0]
        else:
            local = self._resampled(planes, matrix, decomp, labels=bool(labels))
        out = transport.transport_labels(local, method=labels) if labels else transport.transport_image(local)
        out = self._planes(np.ascontiguousarray(out))
        if self.is_inverse and self.moving_grid is not None:
            out = self._onto_moving(out, labels=bool(labels))
        return out

    def jacobian(self):
        """``det(L) det(grad y)`` (``L`` the linear part of ``T``): the whole map's Jacobian
        determinant, as this rank's planes of :attr:`output_grid` (an inverse map's
        ``det(grad y_inv)`` goes to MOVING's grid as :meth:`warp` takes images there)."""
        _, transport = self._ready()
        det = self._planes(transport.det_grad_y()) * float(np.linalg.det(self.transform[:3, :3]))
        if self.is_inverse and self.moving_grid is not None:
            det = self._onto_moving(det, labels=False)
        return det

    def displacement(self, units="voxel"):
        """``u = y(x) - x`` of the deformable part on FIXED's grid, this rank's planes ``(3, n1,
        n2, k1 - k0)``: in FIXED's voxels along the array axes (``units="voxel"``) or in world
        millimetres, RAS (``"mm"``: ``A u``, ``A`` the linear part of ``grid_affine``)."""
        if units not in ("voxel", "mm"):
            raise UserInputError(f"units={units!r}: use 'voxel' or 'mm'")
        _, transport = self._ready()
        u = self._planes(transport.displacement())
        if units == "mm":
            u = np.einsum("ab,b...->a...", self.grid_affine[:3, :3], u).astype(u.dtype)
        return u

    def deformation_map(self, displacement=None):
        """World coordinates (RAS mm) of the whole map at each voxel of :attr:`output_grid`, this
        rank's planes ``(3, n1, n2, k1 - k0)``: ``T(A (i + u(i)) + t)`` on FIXED's grid (``A``,
        ``t`` FIXED's voxel-to-world), or for an inverse map with MOVING's grid ``A (q + u(q)) +
        t`` at ``q`` = FIXED's voxel of ``T^-1`` of each MOVING voxel (``u`` trilinear there,
        and 0, the identity, beyond FIXED's grid). ``displacement``: :meth:`displacement`'s
        planes (voxels) when the caller has them already."""
        linear, offset = self.grid_affine[:3, :3], self.grid_affine[:3, 3]
        u = self.displacement() if displacement is None else displacement
        if not (self.is_inverse and self.moving_grid is not None):
            k0, k1 = self.box[2]
            index = np.indices(self.shape[:2] + (k1 - k0,), dtype=np.float64)
            index[2] += k0
            world = np.einsum("ab,b...->a...", self.transform[:3, :3] @ linear, index + u)
            return world + (self.transform[:3, :3] @ offset + self.transform[:3, 3])[:, None, None, None]
        from .prepare import BlockSampler, Planes

        def world(target, matrix):
            sampler = BlockSampler(Planes(u, self.shape, self.box[2][0], self.grid_affine, 3), matrix, target, 0,
                                   order=1)
            q = np.indices(target.local_shape, dtype=np.float64)
            q += np.array([s.start for s in target.real_slice], float)[:, None, None, None]
            q = np.einsum("ab,b...->a...", matrix[:3, :3], q) + matrix[:3, 3][:, None, None, None]
            q += np.stack([sampler.resample(c, order=1, dtype=np.float64) for c in sampler.source])  # y = q + u(q)
            return np.einsum("ab,b...->a...", linear, q) + offset[:, None, None, None]

        return self._on_moving_grid(np.float64, world)

    def gather(self, planes=None):
        """The whole field of ``planes`` (this rank's, default the velocity) on rank 0, ``None``
        elsewhere: for small grids."""
        parts = self.comm.gather(np.asarray(self.velocity if planes is None else planes))
        return None if parts is None else np.concatenate(parts, axis=-1)

    def save(self, outdir, *, overwrite=False, suffix=".nii.gz"):
        """Write the map into ``outdir`` (each rank its planes of ``velocity.nii.gz``, in voxels
        per unit time, and a ``registration.json``) for :meth:`load`, ``claire transport`` and
        ``claire jacobian``."""
        from .blockio import write_volume
        from .config import RegistrationConfig, _merged
        from .kernels.fields import affine_to_fortran
        from .outputs import _write_json, prepare_outdir

        on_root(self.comm, lambda: prepare_outdir(outdir, overwrite=overwrite))
        voxels = np.diag([n / (2 * np.pi) for n in self.shape])
        write_volume(os.path.join(outdir, "velocity" + suffix), affine_to_fortran(self.velocity, voxels), self.comm,
                     shape=self.shape, affine=self.grid_affine, intent="vector")
        if self.comm.Get_rank() == 0:
            config = self.config or RegistrationConfig()
            config = RegistrationConfig.from_dict(_merged(config.to_dict(), {
                "transport": {"nt": self.nt, "interpolation": self.interpolation}, "precision": self.dtype.name}))
            moving = {} if self.moving_grid is None else {"moving_shape": list(self.moving_grid[0]),
                                                          "moving_affine": self.moving_grid[1].tolist()}
            _write_json(os.path.join(outdir, "registration.json"), {
                "grid": list(self.shape), "ranks": self.comm.Get_size(), "config": config.to_dict(),
                "affine": {"transform_ras": self.transform.tolist(), **moving},
                **({"inverse_of": None} if self.is_inverse else {}), "files": ["velocity" + suffix],
                "conventions": "a deformation map (DeformationMap.save): velocity in voxels per unit time along the "
                               "array axes; warped(x) = moving(T(y(x))), T = affine.transform_ras",
                "complete": True})
        self.comm.Barrier()

    def free(self):
        """Release the decomposition and plans (collective); the map stays usable."""
        if self._decomp is not None:
            self._transport = None
            self._decomp.free()
            self._decomp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()
