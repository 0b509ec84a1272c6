"""The Python API: what library users call. Thin over the solvers and kernels layers."""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from .config import RegistrationConfig
from .deformation import DeformationMap
from .errors import UserInputError
from .io import _available_memory
from .parallel import world
from .prepare import BlockSampler, Inputs, dice_counts, dice_from_counts, inner_slices, label_values, source
from .kernels import Decomposition, SpectralOperators, start_kernel_runtime
from .solvers.monitor import Workload
from .solvers import continuation
from .solvers.affine import ImagePyramid, affine_stage
from .solvers.problem import RegistrationProblem
from .solvers.transport import SemiLagrangianTransport
from .timing import Phases

__all__ = ["smooth", "register", "RegistrationResult", "transport", "jacobian", "invert", "dice_overlap"]

log = logging.getLogger(__name__)


def _global_input(array, decomp):
    """Scatter a global array given on rank 0 (or on every rank) to local blocks; its shape
    was checked by :func:`_image_shape` on every rank before."""
    return decomp.scatter(None if decomp.rank != 0 else np.asarray(array, dtype=decomp.dtype))


def _image_shape(array, comm, name, components=None):
    """Grid shape of a global array held by rank 0, shared with every rank; every rank raises
    alike when it is not 3-D (or ``(components, n1, n2, n3)`` when ``components`` is given)."""
    comm = world(comm)
    shape = None
    if comm.Get_rank() == 0:
        shape = None if array is None else np.shape(array)
    shape = comm.bcast(shape, root=0)
    if components is None:
        if shape is None or len(shape) != 3:
            raise UserInputError(f"{name}: a 3-D array is needed, got shape {shape}")
        return shape
    if shape is None or len(shape) != 4 or shape[0] != components:
        raise UserInputError(f"{name} must have shape ({components}, n1, n2, n3), got {shape}")
    return shape[1:]


def smooth(image, sigma, *, comm=None, dtype=np.float32):
    """Gaussian smoothing of a 3-D image on the distributed spectral grid.

    Parameters
    ----------
    image : ndarray of shape (n1, n2, n3) or None
        The global image, on rank 0 at least (other ranks may pass ``None``).
    sigma : float or sequence of 3 floats
        Standard deviation in voxels, per array axis.
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``COMM_WORLD``).
    dtype : float32 or float64
        Working precision.

    Returns
    -------
    ndarray or None
        The smoothed global image on rank 0, ``None`` on other ranks. The image is treated
        as periodic (the spectral domain is the torus).

    Examples
    --------
    >>> import numpy as np, claire_py
    >>> img = np.zeros((16, 16, 16)); img[8, 8, 8] = 1.0
    >>> out = claire_py.smooth(img, 1.5)
    >>> round(float(out.sum()), 5)
    1.0
    """
    shape = _image_shape(image, comm, "image")
    t0 = time.perf_counter()
    decomp = Decomposition(shape, comm=comm, dtype=dtype)
    ops = SpectralOperators(decomp)
    local = _global_input(image, decomp)
    result = decomp.gather(ops.smooth(local, sigma))
    log.info("smoothed %s with sigma=%s voxels on %s in %.3f s", "x".join(map(str, shape)), sigma,
             decomp, time.perf_counter() - t0)
    decomp.free()
    return result


@dataclass
class RegistrationResult:
    """What :func:`register` returns. On rank 0 the arrays are the global fields; on other
    ranks they are ``None``.

    Attributes
    ----------
    velocity : ndarray ``(3, n1, n2, n3)``
        Stationary velocity on ``[0, 2 pi)^3`` (radians per unit time, component ``a`` along
        array axis ``a``).
    warped : ndarray ``(n1, n2, n3)``
        The moving image deformed onto the fixed one, in the moving image's intensities:
        ``warped(x) = moving(transform(y(x)))`` (pull-back).
    det_grad_y : ndarray ``(n1, n2, n3)``
        Jacobian determinant of the pull-back map ``y``, transported along the characteristics
        (``d_t J + v . grad J = -J div v``; see ``SemiLagrangianTransport.det_grad_y``).
    det_central_differences : (float, float)
        ``(min, max)`` of ``det(grad y)`` by central differences of the composed map ``y`` (the
        ``displacement``), an independent check of ``det_grad_y``; on every rank.
    displacement : ndarray ``(3, n1, n2, n3)``
        ``u = y - x`` in voxels along the array axes (``y`` may leave the grid: periodic).
    history : list of IterationInfo
    workload : dict
        Counts and seconds per operation.
    converged : bool
    stop_reason : str
    beta : float
        The regularisation weight of the final solve (the trained one with β training).
    stages : list of dict
        One entry per continuation level (grid, sigma, beta, iterations, matvecs).
    dice : dict, optional
        ``{"labels": [...], "before": [...], "after": [...]}`` when label maps were given.
    timing : dict
        Wall seconds per phase (``read``, ``setup``, ``solve``, then the outputs derived:
        ``warp``, ``labels``, ``det``, ``displacement`` (with det by central differences
        and the velocity gathered); see
        :mod:`claire_py.timing`), ``{phase: [rank 0, rank 1, ...]}``, on rank 0.
    peak_rss : dict
        Each rank's peak resident memory (bytes) by the end of each of those phases, same
        layout: where the peak arose.
    transform : ndarray ``(4, 4)``
        The affine part of the map, world (RAS mm) FIXED -> MOVING (identity without an affine
        stage); on every rank. The whole map is ``x -> transform(y(x))``: ``warped``,
        ``det_grad_y`` and ``det_central_differences`` describe it; ``velocity`` and
        ``displacement`` are the deformable part ``y`` on FIXED's grid.
    affine_history : list of dict
        Per affine stage and level: steps and objective before and after.
    moving_grid : tuple ``(shape, affine)``
        MOVING's grid (where :func:`invert`'s whole inverse map lands).
    det_range : (float, float)
        ``(min, max)`` of ``det_grad_y``, on every rank.
    slabs : claire_py.outputs.Slabs or None
        With ``register(..., gather=False)``: this rank's slabs of the output fields (the
        arrays above are then ``None`` on every rank), which :meth:`save` writes in parallel.
    map : claire_py.DeformationMap
        The whole map, distributed (each rank its planes of the velocity), on every rank:
        ``map.warp(image)``, ``map.jacobian()``, ``map.inverse()``, ``map.displacement()``,
        ``map.save(outdir)``, ``map.gather(...)``. On a padded solve (``preprocess.pad``), the
        velocity on the cropped grid, as ``velocity.nii.gz`` holds it.

    With ``C`` image components, ``warped`` is ``(C, n1, n2, n3)``.
    """

    velocity: np.ndarray | None
    warped: np.ndarray | None
    det_grad_y: np.ndarray | None
    history: list
    workload: dict
    converged: bool
    stop_reason: str
    displacement: np.ndarray | None = None
    det_central_differences: tuple = (float("nan"), float("nan"))
    beta: float = float("nan")
    config: RegistrationConfig = None
    fixed: np.ndarray | None = None
    moving: np.ndarray | None = None
    affine: np.ndarray | None = None
    seconds: float = 0.0
    ranks: int = 1
    stages: list = None
    dice: dict = None
    timing: dict = None
    peak_rss: dict = None
    transform: np.ndarray | None = None
    affine_history: list = None
    moving_grid: tuple = None
    det_range: tuple = (float("nan"), float("nan"))
    slabs: object = None
    map: DeformationMap = None
    release: object = None  # with gather=False: frees the decomposition the slabs live on

    def free(self):
        """With ``register(..., gather=False)``: release the decomposition that :attr:`slabs`
        live on (collective; call after :meth:`save`). A no-op for a gathered result."""
        if self.release is not None:
            self.release()
            self.release = self.slabs = None

    def save(self, outdir, *, overwrite=False, inputs=None, timing=None, suffix=".nii.gz"):
        """Write the files of ``claire register`` into ``outdir`` (see
        :mod:`claire_py.outputs`). A gathered result (the default of :func:`register`) is
        written by rank 0 (a no-op elsewhere); one registered with ``gather=False`` by every
        rank, each writing its slab of each file (call it on every rank). FIXED's affine is
        used when the inputs were files or nibabel images, else the identity. ``timing``
        (``{phase: [seconds per rank]}``, default :attr:`timing`) goes into
        ``registration.json`` with the time of this writing added as ``write``; returns that
        timing (``None`` on other ranks). ``suffix``: ``.nii.gz`` or ``.nii``."""
        from .outputs import Slabs, prepare_outdir, write_outputs

        slabs = self.slabs
        if slabs is None:
            if self.velocity is None:
                return None
            slabs = Slabs.of_arrays({"velocity": self.velocity, "displacement": self.displacement,
                                     "det_grad_y": self.det_grad_y, "warped": self.warped, "fixed": self.fixed,
                                     "moving_before": self.moving}, channels=np.ndim(self.warped) == 4)
        from .parallel import on_root

        on_root(slabs.comm, lambda: prepare_outdir(outdir, overwrite=overwrite))
        affine = np.eye(4) if self.affine is None else self.affine
        return write_outputs(outdir, slabs, self, affine, self.config, inputs=inputs or {}, ranks=self.ranks,
                             seconds=self.seconds, timing=self.timing if timing is None else timing, suffix=suffix)


def _checked_blocks(local, name, decomp, normalize):
    """``local`` (``(C, *local)``, this rank's blocks of an image) in the working precision,
    refused on every rank when not finite, optionally normalised to [0, 1] channel by channel."""
    local = np.array(local, decomp.dtype)  # a copy: normalised in place below
    if not decomp.allreduce(bool(np.all(np.isfinite(local))), "min"):
        raise UserInputError(f"{name} image contains NaN or infinite values; replace them first")
    if normalize:
        for c in range(local.shape[0]):
            local[c] = _normalized(local[c], decomp, name)
    return local


def _normalized(local, decomp, name):
    lo = decomp.allreduce(float(local.min()), "min")
    hi = decomp.allreduce(float(local.max()), "max")
    if not hi > lo:
        raise UserInputError(f"{name} image is constant (every voxel is {lo:g}): there is nothing to register")
    return (local - lo) / (hi - lo)


#: Resident bytes of a rank before its fields: Python, numpy, numba's compiled kernels, MPI,
#: FFTW (fit of the peaks at 64^3-256^3 on 1 rank: 186 MiB).
_BASE_BYTES = 190 * 2 ** 20
#: Fields per local point the peaks of ``claire register`` hold beyond those counted while a
#: field is smaller than glibc's largest mmap threshold (:data:`_MMAP_CEILING`): on the
#: 160x192x160 brain pair (affine stage, labels; fields of 5-20 MB) 12 float32 fields per local
#: point higher at 1-4 ranks (``benchmarks/bench_memory_cli.py``, 2026-12-03), of which about 4
#: are heap the allocator keeps (a fixed ``MALLOC_MMAP_THRESHOLD_`` returns them). Fields above
#: the ceiling are mmapped and given back when freed: on 256x300x256 (fields of 39 and 79 MB)
#: the peaks are 0.91-0.94 of the count without these (after the solver's reference cycles were
#: broken, 2026-12-03).
_UNTRACED_FIELDS = 12
#: glibc's dynamic mmap threshold stops growing here (64-bit): larger arrays are always mmapped.
_MMAP_CEILING = 32 * 2 ** 20


def _fields_per_point(nt, components, ranks=1, *, store_gradients=True, relaxed=True, distance="l2",
                      keep_gradient=True):
    """Scalar fields (of the working precision) per local grid point at the peak of a
    registration, the Gauss-Newton matvec's regularisation step. Per image component: ``m(1)``
    and the stored ``grad m(t_j)`` (``3 (nt + 1)``; without ``store_gradients`` the state
    ``m(t_j)``, ``j >= 1``, and one gradient work vector instead), the fixed and the moving
    image (``m(0)``). Then two interpolation plans (4 values per point, 3 % slack), the
    adjoint's Heun factor, the Newton and PCG vectors ``v, x, r, p, Hp`` (``-g`` serves as
    PCG's residual, except for the relaxed model with ``keep_gradient``, whose Armijo slope
    needs ``g`` after the solve), FFT work arrays and spectral scratch (measured: 4.15 on one
    rank, 8.65 on several, where mpi4py-fft adds transposed stage arrays), and the matvec's
    body force with the spectral vector its regularisation step makes (6). ``lncc`` keeps 8
    more per component (the fixed image's local mean, variance and window weight; the local
    mean, ``alpha`` and ``1 / B`` at ``m(1)``; the Gauss-Newton weight and its smoothing) and
    its matvec 3 more temporaries."""
    state = 1 + 3 * (nt + 1) if store_gradients else nt + 3
    fft = 4.15 if ranks == 1 else 8.65
    newton = 5 * 3 + (3 if relaxed and keep_gradient else 0)
    lncc = 8 * components + 3 if distance == "lncc" else 0
    return components * (state + 2) + 2 * 4 * 1.03 + 1 + newton + fft + 6 + lncc



def _first_iterate_fields(nt, components, ranks=1, *, relaxed=True, distance="l2"):
    """Scalar fields per local grid point while the input grid's gradient is computed with
    its ``grad m(t_j)`` not stored (:func:`_fields_per_point`'s terms, at the gradient instead
    of the matvec): per component ``m(t_j)`` (``nt + 1``, ``m(0)`` the moving image), one
    gradient work vector (3) and the fixed image; the two plans, the Heun factor, the velocity,
    the prolonged start and the gradient (3 each, and the relaxed model's ``g`` before its
    projection), the FFT arrays, and the body force with its spectral vector (6)."""
    state = nt + 1 + 3 + 1
    fft = 4.15 if ranks == 1 else 8.65
    vectors = 3 * 3 + (3 if relaxed else 0)
    lncc = 8 * components + 3 if distance == "lncc" else 0
    return components * state + 2 * 4 * 1.03 + 1 + vectors + fft + 6 + lncc

#: Fields (of the working precision) per local grid point and image component while the inputs
#: are prepared (:mod:`claire_py.prepare`): FIXED's and MOVING's planes (2), MOVING through the
#: affine part and through the headers alone (float64: 4), the box of MOVING a block maps into
#: and a block being resampled (float64: 3), the solver's copies of FIXED and MOVING and MOVING
#: in its own intensities (3).
_PREPARE_FIELDS = 12
#: Bytes per voxel of the affine stage's pyramid (each kept level whole on every rank): FIXED 4,
#: MOVING and its gradient 16, and the gradient being stacked (16) at the level being built.
_PYRAMID_BYTES = 36


def _pyramid_voxels(shape, options=None):
    """Voxels of the levels of the affine stage's pyramid (:class:`~claire_py.solvers.affine.ImagePyramid`)
    on ``shape``: those of at most ``options.max_level_voxels``, or the coarsest one that fits."""
    from .solvers.affine import AffineOptions

    options = AffineOptions() if options is None else options
    sizes = [math.prod(math.ceil(n / s) for n in shape) for s in options.shrink]
    kept = [v for v in sizes if v <= options.max_level_voxels]
    if kept:
        return sum(kept)
    shrink = max(2, math.ceil((math.prod(shape) / options.max_level_voxels) ** (1 / 3)))
    return math.prod(math.ceil(n / shrink) for n in shape)


def memory_model(shape, ranks, precision="float32", components=1, nt=4, *, store_gradients=True, relaxed=True,
                 distance="l2", affine=True, gather=False, keep_gradient=True):
    """Predicted peak resident bytes of a registration on ``shape`` over ``ranks`` ranks.

    Three phases, each on every rank: ``prepare`` (each rank's part of the inputs while MOVING
    goes onto FIXED's grid: :data:`_PREPARE_FIELDS` per local point and component next to the
    decomposition's and the transport's ~20, and with ``affine`` the pyramid's levels, whole on
    every rank, :data:`_PYRAMID_BYTES` per voxel of :func:`_pyramid_voxels`), ``solve``
    (:func:`_fields_per_point` fields per local point, and without ``gather`` (the command's
    path), while a field is below :data:`_MMAP_CEILING`, :data:`_UNTRACED_FIELDS`: the
    Gauss-Newton matvec's peak; the inputs are read again
    after the solve, none held through it) and ``write`` (the output blocks
    and the slabs being written: 24 fields per local point). On top, each rank's ~190 MiB of
    code and libraries. ``claire register`` writes in parallel (``gather=False``): rank 0 needs
    what the others need. With ``gather=True``
    (the Python API's default) rank 0 also holds the gathered outputs (velocity,
    displacement, warped image, det: ``8 + 4 C`` values per point).

    A fourth phase, ``first_iterate``, is not a peak of its own but the part of ``solve`` that a
    grid-continuation run reaches when the input grid converges at its first iterate (no
    matvec there; its gradient stores no ``grad m(t_j)``: see
    :meth:`~claire_py.solvers.problem.RegistrationProblem.deferring_gradients`), as on the
    1 mm brain pair: :func:`_first_iterate_fields` per local point.

    Returns ``{"per_rank_bytes", "rank0_bytes", "phases": {"prepare", "solve", "write",
    "first_iterate"}}``.
    """
    points = float(np.prod(shape))
    local = points / ranks
    itemsize = 4 if precision == "float32" else 8
    untraced = 0 if gather or local * itemsize > _MMAP_CEILING else _UNTRACED_FIELDS
    solve = local * (_fields_per_point(nt, components, ranks, store_gradients=store_gradients, relaxed=relaxed,
                                       distance=distance, keep_gradient=keep_gradient) + untraced) * itemsize
    prepare = (20 + _PREPARE_FIELDS * components) * local * itemsize + \
        (_PYRAMID_BYTES * _pyramid_voxels(shape) if affine else 0)
    write = local * (24 + 3 * components) * itemsize
    first = local * (_first_iterate_fields(nt, components, ranks, relaxed=relaxed, distance=distance) + untraced) \
        * itemsize
    phases = {"prepare": _BASE_BYTES + prepare, "solve": _BASE_BYTES + solve, "write": _BASE_BYTES + write,
              "first_iterate": _BASE_BYTES + first}
    per_rank = max(phases.values())
    rank0 = per_rank
    if gather:  # the gathered outputs on rank 0, next to ~20 local fields (plans, v, u, det)
        rank0 = max(per_rank, _BASE_BYTES + (8 + 4 * components) * itemsize * points + 20 * itemsize * local)
    return {"per_rank_bytes": per_rank, "rank0_bytes": rank0, "phases": phases}


def estimate_memory(shape, ranks, precision="float32", components=1, nt=4, *, store_gradients=True, relaxed=True,
                    distance="l2", gather=True, keep_gradient=True):
    """Predicted peak bytes ``(per rank, extra on rank 0)`` of a registration on ``shape``
    (see :func:`memory_model`, whose ``rank0_bytes - per_rank_bytes`` is the extra)."""
    model = memory_model(shape, ranks, precision, components, nt, store_gradients=store_gradients, relaxed=relaxed,
                         distance=distance, gather=gather, keep_gradient=keep_gradient)
    return model["per_rank_bytes"], model["rank0_bytes"] - model["per_rank_bytes"]


def _check_memory(shape, comm, config, components=1, gather=True):
    """The configuration to run with: ``config`` itself, or, when its predicted peak exceeds
    this node's memory, the first of the leaner ones that fits: the relaxed model's gradient
    recomputed after each Krylov solve instead of kept through it (``newton.keep_gradient``
    off, ~10 % slower), then also ``grad m(t_j)`` recomputed at every use
    (``transport.store_gradients`` off, ~2.5x slower matvecs); refuse (before allocating) a
    grid that fits none."""
    import dataclasses

    from mpi4py import MPI

    comm = world(comm)
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        node_ranks, holds_root = node.Get_size(), node.allreduce(comm.Get_rank() == 0, op=MPI.LOR)
    finally:
        node.Free()

    def need(candidate):
        per_rank, root = estimate_memory(shape, comm.Get_size(), candidate.precision, components,
                                         candidate.transport.nt, store_gradients=candidate.transport.store_gradients,
                                         relaxed=candidate.regularization.relaxed, distance=candidate.distance.name,
                                         gather=gather, keep_gradient=candidate.newton.keep_gradient)
        return node_ranks * per_rank + (root if holds_root else 0)

    available = _available_memory()  # inf when unknown (not Linux): no refusal
    lean_newton = dataclasses.replace(config, newton=dataclasses.replace(config.newton, keep_gradient=False))
    leanest = dataclasses.replace(lean_newton, transport=dataclasses.replace(config.transport, store_gradients=False))
    candidates = [config]
    for candidate in (lean_newton, leanest):
        if candidate != candidates[-1]:
            candidates.append(candidate)
    # every rank takes part (no early return inside the collective) and decides alike
    needs = [comm.allreduce(need(c), op=MPI.MAX) for c in candidates]
    available = comm.allreduce(available, op=MPI.MIN)
    gib = 2.0 ** 30
    grid = "x".join(map(str, shape))
    for candidate, needed in zip(candidates, needs):
        if needed <= available:
            if candidate is not config:
                log.info("%s: %.1f GiB per node as configured, %.1f GiB available: %s (%.1f GiB)", grid,
                         needs[0] / gib, available / gib,
                         "recomputing the gradient after each Krylov solve" if candidate is lean_newton else
                         "recomputing the gradient after each Krylov solve and grad m(t_j) at every matvec "
                         "(slower matvecs)", needed / gib)
            return candidate
    raise UserInputError(f"a {grid} registration needs about {needs[-1] / gib:.1f} GiB on a "
                         f"node ({node_ranks} rank(s), {config.precision}) but {available / gib:.1f} GiB is "
                         "available; use more nodes (mpiexec -n P across nodes) or a smaller/cropped grid")


def _range_inside(local, decomp, pad):
    """``(min, max)`` over the grid without its ``pad`` frame of a local block, on every rank."""
    if pad:
        local = local[inner_slices(decomp, pad)]
    lo = float(local.min()) if local.size else math.inf
    hi = float(local.max()) if local.size else -math.inf
    return decomp.allreduce(lo, "min"), decomp.allreduce(hi, "max")


def _crop(array, pad, grid_axes=3):
    if array is None or not pad:
        return array
    inner = (slice(pad, -pad),) * grid_axes
    return array[(Ellipsis,) + inner]


def _initial_transform(value, comm):
    """A 4 x 4 world transform from an array or an ITK/ANTs file (read on rank 0; errors on
    every rank)."""
    if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
        from .parallel import on_root
        from .transforms import read_affine

        return on_root(comm, lambda: read_affine(str(value)))
    transform = np.asarray(value, float)
    if transform.shape != (4, 4) or not np.all(np.isfinite(transform)) or abs(np.linalg.det(transform[:3, :3])) < 1e-8:
        raise UserInputError("initial_transform must be an invertible 4 x 4 world transform (or an ITK .mat file)")
    return transform


def _scalar_planes(image, comm):
    """The affine stage's image (this rank's planes, 3-D): float32, each channel rescaled to
    [0, 1] over the whole image, channels averaged."""
    ranges = image.channel_ranges(comm)
    out = np.zeros(image.data.shape[1:], np.float32)
    for channel, (lo, hi) in zip(image.data, ranges):
        out += (np.asarray(channel, np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-30))
    return out / np.float32(len(ranges))


def _voxel_map(moving_world, fixed_world, transform=None):
    """FIXED's voxel -> MOVING's voxel through the world transform FIXED -> MOVING."""
    target = np.asarray(fixed_world, float) if transform is None else np.asarray(transform, float) @ fixed_world
    return np.linalg.solve(np.asarray(moving_world, float), target)


def _resampled(image, components, moving_world, fixed_world, shape, transform=None, order=1):
    """MOVING (each channel) on FIXED's grid through ``transform`` (world, FIXED -> MOVING):
    trilinear or cubic Lagrange, clipped to each channel's range (a cubic overshoots at edges)."""
    from .kernels.sampling import resample_affine

    matrix = _voxel_map(moving_world, fixed_world, transform)
    channels = image if components else [image]
    out = np.stack([np.clip(resample_affine(c, matrix, shape, order=order, dtype=np.float64), np.min(c), np.max(c))
                    for c in channels])
    return out if components else out[0]


def _warp_labels_through(transport, decomp, labels, moving_world, fixed_world, transform, pad):
    """MOVING's labels (:class:`~claire_py.prepare.Planes` on MOVING's grid) through the whole
    map: each label's indicator is interpolated (trilinear) through ``transform`` onto this
    rank's block of FIXED's grid, transported, and the most probable label wins (one
    interpolation of each indicator before the transport, as with
    :meth:`SemiLagrangianTransport.transport_labels`). Returns this rank's blocks of the warped
    labels and of those after the affine part alone."""
    sampler = BlockSampler(labels, _voxel_map(moving_world, fixed_world, transform), decomp, pad, order=1)
    _, (counts,) = label_values(decomp.comm, labels)
    rest = max(counts, key=counts.get)  # the background, usually: the complement of the others
    source, dtype = sampler.source[0], labels.data.dtype
    best = np.full(decomp.local_shape, -np.inf, np.float32)
    affine_labels = np.full(decomp.local_shape, rest, dtype)
    total = np.zeros(decomp.local_shape, np.float32)

    def probabilities():
        for value in sorted(counts):
            if value == rest:
                continue
            p = sampler.resample((source == value).astype(np.float32), order=1, dtype=np.float32)
            total[...] += p
            better = p > best
            affine_labels[better], best[better] = value, p[better]
            yield value, p

    warped = transport.most_probable_label(probabilities(), rest, dtype)
    affine_labels[1 - total > best] = rest
    return warped, affine_labels


def dice_overlap(fixed_labels, moving_labels, warped_labels):
    """Dice ``2 |A & B| / (|A| + |B|)`` per label (labels > 0 present in either map), before
    (fixed vs moving) and after (fixed vs warped): ``{"labels", "before", "after"}``."""
    fixed_labels, moving_labels = np.asarray(fixed_labels), np.asarray(moving_labels)
    labels = np.union1d(np.unique(fixed_labels), np.unique(moving_labels))
    labels = [int(v) for v in labels if v > 0]

    def dice(a, b, label):
        a, b = a == label, b == label
        total = int(a.sum()) + int(b.sum())
        return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0

    return {"labels": labels, "before": [dice(fixed_labels, moving_labels, k) for k in labels],
            "after": [dice(fixed_labels, warped_labels, k) for k in labels]}


def register(fixed, moving, *, config=None, comm=None, callback=None, mask=None, labels=None, checkpoint=None,
             initial_transform=None, gather=True):
    """Register ``moving`` onto ``fixed`` with CLAIRE's Gauss-Newton-Krylov solver.

    Parameters
    ----------
    fixed, moving : ndarray, NIfTI path, nibabel image, or None
        The reference ``m_R`` and the template ``m_T`` (the ANTs/DIPY/ITK order): global
        arrays ``(n1, n2, n3)``, or ``(C, n1, n2, n3)`` for ``C`` components (channels, e.g.
        tissue probability maps; NIfTI files store them as ``(n1, n2, n3, C)``), on rank 0
        (other ranks may pass ``None``, or the same arrays; rank 0 sends each rank its
        planes), or files / images (files are read by planes on every rank: no rank holds a
        whole image, :mod:`claire_py.prepare`).
    config : RegistrationConfig, optional
    comm : mpi4py.MPI.Comm, optional
    callback : callable, optional
        ``callback(info)`` with an :class:`~claire_py.solvers.monitor.IterationInfo` after each
        Gauss-Newton iteration, on every rank.
    mask : ndarray ``(n1, n2, n3)``, NIfTI path or nibabel image, optional
        Weight in ``[0, 1]`` on FIXED's grid restricting the distance (e.g. a brain mask).
    labels : pair of (ndarray, NIfTI path or nibabel image), optional
        Integer label maps ``(fixed_labels, moving_labels)`` on the two images' grids: the
        moving labels are transported (probability-map transport) and
        ``RegistrationResult.dice`` holds the Dice overlap per label before, after the affine
        stage (``"affine"``) and after.
    checkpoint : claire_py.checkpoint.FileCheckpoint, optional
        Save progress (and restore it when the checkpoint was opened with ``resume=True``).
    initial_transform : ndarray ``(4, 4)`` or str, optional
        World (RAS mm) transform FIXED -> MOVING to start the affine stage from (or to use as
        the affine part when ``config.affine.mode == "none"``), or an ITK/ANTs affine file
        (``.mat``, ``.txt``, ``.tfm``; :func:`claire_py.transforms.read_affine`).

    gather : bool
        ``True`` (default): the result holds the global fields on rank 0. ``False``: no rank
        gathers them; the result holds each rank's slabs (:attr:`RegistrationResult.slabs`),
        which :meth:`RegistrationResult.save` writes in parallel (what ``claire register``
        does: rank 0 then needs no more memory than the others).

    The affine stage (``config.affine``, on by default) runs first: centre of mass, rigid,
    affine, coarse to fine (:mod:`claire_py.solvers.affine`); MOVING (and its labels, on
    MOVING's grid) then go onto FIXED's grid through it, and the deformable solve starts
    there. The images may lie on different grids (files or nibabel images).

    Returns
    -------
    RegistrationResult
    """
    config = RegistrationConfig() if config is None else config
    phases = Phases()
    phases.enter("read")
    run = _read(fixed, moving, config, world(comm), mask, labels, initial_transform, gather)
    phases.enter("setup")
    problem = _prepare(run, phases)
    phases.enter("solve")
    result = continuation.solve(problem, run.decomp.new_vector(), run.config.newton, run.config.continuation,
                                callback=callback, checkpoint=checkpoint)
    problem = None  # the solver's state goes before the outputs are made
    phases.enter("warp")
    log.info("stopped: %s (beta = %.3g)", result.stop_reason, result.beta)
    fields = _derive(run, result, gather, phases)
    return _result(run, result, fields, gather, phases)


@dataclass
class _Run:
    """What :func:`register`'s stages hand on: the inputs as sources and, once prepared, the
    decomposition, the transport and the affine part."""

    config: RegistrationConfig
    comm: object
    inputs: Inputs
    shape: tuple  # FIXED's grid
    moving_shape: tuple
    pad: int
    components: int | None
    affine: np.ndarray | None  # FIXED's voxel-to-world as given (None for arrays)
    fixed_world: np.ndarray
    moving_world: np.ndarray
    initial: np.ndarray | None
    same_grid: bool
    has_labels: bool
    has_mask: bool
    use_affine: bool
    t0: float = 0.0
    decomp: Decomposition = None
    transport: SemiLagrangianTransport = None
    workload: Workload = None
    transform: np.ndarray = None
    affine_history: list = None
    through: bool = False

    @property
    def grid(self):
        """The solve's grid: FIXED's padded by ``pad`` on every side."""
        return tuple(n + 2 * self.pad for n in self.shape)


def _read(fixed, moving, config, comm, mask, labels, initial_transform, gather):
    """The inputs as :class:`~claire_py.prepare.Source` objects, checked (every rank raises
    alike), and the configuration to run with (the memory guard's)."""
    # each rank holds its planes of each input (claire_py.prepare): no rank holds a whole image
    fixed = source(fixed, comm, "fixed", channels=True)
    moving = source(moving, comm, "moving", channels=True)
    components, shape = fixed.components, fixed.shape
    moving_shape = moving.shape
    affine, moving_affine = fixed.affine, moving.affine
    if moving.components != components:
        raise UserInputError(f"fixed has {components or 1} component(s) and moving {moving.components or 1}; "
                             "give both the same channels")
    weights = config.distance.weights
    if weights is not None and len(weights) != (components or 1):
        raise UserInputError(f"{len(weights)} distance weights for {components or 1} image component(s)")
    same_affine = affine is None or moving_affine is None or np.allclose(affine, moving_affine, atol=1e-3)
    initial = None if initial_transform is None else _initial_transform(initial_transform, comm)
    use_affine = config.affine.mode != "none" or initial is not None
    same_grid = moving_shape == shape and same_affine
    if not same_grid and not ((config.preprocess.resample or use_affine) and affine is not None
                              and moving_affine is not None):
        raise UserInputError(f"fixed {shape} and moving {moving_shape} images are not on the same grid (shape "
                             "and affine); pass --resample or an affine stage (files or nibabel images), "
                             "or resample moving first")
    has_labels = comm.bcast(labels is not None)
    if has_labels:
        labels = [source(lab, comm, name)
                  for lab, name in zip(labels or (None, None), ("fixed labels", "moving labels"))]
        for lab, grid_shape, which in zip(labels, (shape, moving_shape), ("FIXED", "MOVING")):
            if lab.components is not None or lab.shape != grid_shape:
                raise UserInputError(f"{lab.name} must be a 3-D label map on {which}'s grid {grid_shape}")
    has_mask = comm.bcast(mask is not None)  # rank 0 decides: other ranks may pass None
    if has_mask:
        mask = source(mask, comm, "mask")
        if mask.components is not None or mask.shape != shape:
            raise UserInputError(f"the mask must be a 3-D image on FIXED's grid {shape}")
    if config.affine.only:  # the affine part alone: one evaluation at v = 0, no continuation
        import dataclasses

        config = dataclasses.replace(
            config, newton=dataclasses.replace(config.newton, max_iterations=0),
            continuation=dataclasses.replace(config.continuation, grid_continuation=False, scale_continuation=False,
                                             beta_continuation=False, train=None))
    pad = config.preprocess.pad
    config = _check_memory(tuple(n + 2 * pad for n in shape), comm, config, components or 1, gather)
    sources = {"fixed": fixed, "moving": moving, **({"mask": mask} if has_mask else {}),
               **(dict(zip(("fixed labels", "moving labels"), labels)) if has_labels else {})}
    inputs = Inputs(sources, comm, precision=config.precision)
    for name in ("fixed", "moving") + (("mask",) if has_mask else ()):
        inputs.planes(name)  # read (and checked) now, before any solver memory is allocated
    for name in ("fixed labels", "moving labels") if has_labels else ():
        kind = inputs.planes(name).data.dtype.kind
        if kind not in ("i", "u"):
            raise UserInputError(f"{name}: a label map needs an integer voxel type, not kind {kind!r}")
    return _Run(config, comm, inputs, shape, moving_shape, pad, components, affine,
                np.eye(4) if affine is None else np.asarray(affine, float),
                np.eye(4) if moving_affine is None else np.asarray(moving_affine, float),
                initial, same_grid, has_labels, has_mask, use_affine)


def _prepare(run, phases):
    """The decomposition and transport, the affine stage, the inputs placed on the solve's
    blocks (MOVING through the affine part) and the :class:`RegistrationProblem` on them."""
    config, comm, inputs = run.config, run.comm, run.inputs
    run.t0 = time.perf_counter()
    run.workload = Workload()
    decomp = run.decomp = Decomposition(run.grid, comm=comm, dtype=np.dtype(config.precision))
    run.transport = SemiLagrangianTransport(decomp, SpectralOperators(decomp), config.transport, run.workload)
    start_kernel_runtime()  # once per process: not the cost of whichever kernel comes first
    fixed, moving = inputs.planes("fixed"), inputs.planes("moving")
    run.transform = np.eye(4) if run.initial is None else run.initial
    run.affine_history = []
    if config.affine.mode != "none":
        phases.enter("affine")
        mask = inputs.planes("mask") if run.has_mask else None
        pyramid = ImagePyramid(_scalar_planes(fixed, comm), _scalar_planes(moving, comm), run.fixed_world,
                               run.moving_world, config.affine,
                               mask=None if mask is None else np.asarray(mask.data[0], np.float32),
                               decomp=decomp, planes=(fixed.k0, moving.k0), shapes=(run.shape, run.moving_shape))
        run.transform, run.affine_history = affine_stage(pyramid, decomp, config.affine,
                                                         distance=config.distance.name, initial=run.initial)
        pyramid = mask = None
        phases.enter("setup")
    fixed = moving = None
    # MOVING needs resampling
    run.through = not (run.same_grid and np.allclose(run.transform, np.eye(4), atol=1e-9))
    # MOVING through the affine part onto FIXED's grid (cubic, clipped to its range: trilinear
    # blurs, and a blurred MOVING cost the deformable solve 0.02 Dice): the solve starts there;
    # "before" (residual, Dice) is MOVING through the headers alone
    inputs.place(decomp, run.pad, transform=_voxel_map(run.moving_world, run.fixed_world, run.transform),
                 headers=_voxel_map(run.moving_world, run.fixed_world), through=run.through)
    if run.through:
        log.info("moving %s onto fixed's grid %s through the affine part", run.moving_shape, run.shape)
    normalize = config.preprocess.normalize
    fixed = _checked_blocks(inputs.fixed(), "fixed", decomp, normalize)
    moving = _checked_blocks(inputs.moving(), "moving", decomp, normalize)
    mask = None
    if run.has_mask:
        mask = inputs.fixed("mask", np.float64)[0]
        lo, hi = decomp.allreduce(float(mask.min()), "min"), decomp.allreduce(float(mask.max()), "max")
        if lo < 0 or hi > 1 or hi == 0:
            raise UserInputError(f"mask values lie in [{lo:g}, {hi:g}]; a mask must lie in [0, 1] and not be all 0")
    # nothing of the inputs is held through the solve: the outputs read them again; the problem
    # keeps its own (smoothed) images
    inputs.release()
    problem = RegistrationProblem(run.transport, fixed, moving, config.regularization, run.workload,
                                  distance=config.distance, mask=mask, sigma=config.preprocess.sigma)
    log.info("registering %s%s on %s (%s, distance %s)", "x".join(map(str, run.shape)),
             f" padded to {'x'.join(map(str, run.grid))}" if run.pad else "", decomp, config.precision,
             config.distance.name)
    log.info("iter     objective   mismatch  |g|/|g0|  krylov  step      time")
    return problem


def _derive(run, result, gather, phases):
    """The outputs at the solve's velocity, each kept as this rank's block or gathered onto
    rank 0 as soon as made (:class:`_Outputs`): warped MOVING, the labels' Dice, det(grad y)
    (and its range by central differences), the displacement, the velocity and the map."""
    config, decomp, transport, inputs, pad = run.config, run.decomp, run.transport, run.inputs, run.pad
    # the outputs need the transport's plans only (collected now: mpi4py-fft's FFT objects of
    # the coarse levels sit in reference cycles)
    gc.collect()
    if transport.velocity is not result.velocity:
        transport.set_velocity(result.velocity)
    out = _Outputs(decomp, pad, gather)  # rank 0 holds one gathered field at a time
    # MOVING in its own intensities (checked, not normalised), read again
    warped = out.keep("warped", np.stack([transport.transport_image(c) for c in
                                          _checked_blocks(inputs.moving(), "moving", decomp, False)]))
    dice = _dice(run, phases) if run.has_labels else None
    phases.enter("det")
    det_affine = float(np.linalg.det(run.transform[:3, :3]))  # the whole map's det: affine part x deformable part
    det = transport.det_grad_y()
    if det_affine != 1.0:
        det *= det_affine
    det_range = _range_inside(det, decomp, pad)
    det = out.keep("det_grad_y", det)
    phases.enter("displacement")
    displacement = transport.displacement()
    transport.release()
    det_central = tuple(det_affine * d for d in
                        _range_inside(transport.det_grad_y_central_differences(displacement), decomp, pad))
    displacement = out.keep("displacement", displacement)
    to_cropped_box = np.array([n / m for n, m in zip(run.grid, run.shape)])[:, None, None, None]  # radians
    deformation = DeformationMap(out.planes(result.velocity) * to_cropped_box, run.shape, comm=run.comm,
                                 grid_affine=run.fixed_world, transform=run.transform, nt=config.transport.nt,
                                 interpolation=config.transport.interpolation, precision=config.precision,
                                 moving_grid=(tuple(run.moving_shape), run.moving_world), config=config)
    velocity = out.keep("velocity", result.velocity)
    if velocity is not None and pad:  # radians of the padded box -> radians of the cropped one
        velocity *= to_cropped_box
    return dict(out=out, warped=warped, dice=dice, det=det, det_range=det_range, det_central=det_central,
                displacement=displacement, velocity=velocity, map=deformation)


def _dice(run, phases):
    """Dice per label before and after (and after the affine part alone), on rank 0."""
    phases.enter("labels")
    decomp, pad, transport = run.decomp, run.pad, run.transport
    label_set, fixed_labels, moving_labels, before_labels = run.inputs.labels()
    run.inputs.release()
    if run.through:  # each label's indicator goes through the affine part and the velocity at once
        warped_labels, affine_labels = _warp_labels_through(transport, decomp, moving_labels, run.moving_world,
                                                            run.fixed_world, run.transform, pad)
    else:
        warped_labels = transport.transport_labels(moving_labels, method="probability")
        affine_labels = before_labels
    moving_labels = None

    def overlap(other):
        return dice_from_counts(label_set, dice_counts(decomp, pad, np.asarray(label_set), fixed_labels, other))

    dice = {"labels": [int(v) for v in label_set if v > 0], "before": overlap(before_labels),
            "after": overlap(warped_labels)}
    if run.use_affine:
        dice["affine"] = overlap(affine_labels)
    log.info("Dice (mean over %d labels): %.3f -> %.3f", len(dice["labels"]),
             np.mean(dice["before"] or [np.nan]), np.mean(dice["after"] or [np.nan]))
    return dice if decomp.rank == 0 else None


def _result(run, result, fields, gather, phases):
    """The :class:`RegistrationResult`: the fields gathered on rank 0 (``gather``) or this
    rank's slabs of them, the inputs as the residuals need them, the workload and timing."""
    decomp, inputs, out, pad = run.decomp, run.inputs, fields["out"], run.pad
    workload = run.workload
    workload.add("total", 1, time.perf_counter() - run.t0)
    for name, (count, seconds) in decomp.stats.items():
        workload.add(name, count, seconds)
    work = workload.as_dict()
    work.setdefault("hessian_matvec", {"count": 0, "seconds": 0.0})["pcg_iterations"] = result.matvecs
    log.info("workload (count, seconds):\n%s", "\n".join(
        f"  {name:26s} {entry['count']:>8} {entry['seconds']:>10.3f}" for name, entry in work.items()))
    slabs = fixed_whole = moving_before = None
    if not gather:
        from .outputs import Slabs

        # the residuals' images: FIXED as the solve saw it (normalised), MOVING before, read again
        out.blocks["fixed"] = _checked_blocks(inputs.fixed(), "fixed", decomp, run.config.preprocess.normalize)
        out.blocks["moving_before"] = np.asarray(inputs.moving_before(), decomp.dtype)
        inputs.release()
        slabs = Slabs(decomp.comm, run.shape, out.slab, velocity_grid=run.grid, channels=run.components is not None)
    else:  # the inputs whole on rank 0: FIXED, and MOVING through the headers alone
        fixed_whole = inputs.planes("fixed").gather(run.comm)
        if run.through:
            moving_before = _crop(decomp.gather(np.ascontiguousarray(inputs.moving_before())), pad)
            if moving_before is not None and run.components is None:
                moving_before = moving_before[0]
        else:
            moving_before = inputs.planes("moving").gather(run.comm)
        inputs.release()
    phases.stop()
    timing, peak_rss = phases.gathered(decomp.comm), phases.gathered(decomp.comm, "peak_rss")
    if gather:  # nothing refers to the decomposition now: its communicators go (a batch makes many)
        run.transport = None
        decomp.free()
    warped = fields["warped"]
    return RegistrationResult(
        velocity=fields["velocity"], warped=None if warped is None else (warped if run.components else warped[0]),
        det_grad_y=fields["det"], det_central_differences=fields["det_central"],
        displacement=fields["displacement"], history=result.history, workload=work, converged=result.converged,
        stop_reason=result.stop_reason, beta=result.beta, config=run.config, fixed=fixed_whole,
        moving=None if moving_before is None else np.asarray(moving_before), affine=run.affine,
        seconds=time.perf_counter() - run.t0, ranks=decomp.size, stages=result.stages, dice=fields["dice"],
        timing=timing, peak_rss=peak_rss, transform=run.transform, affine_history=run.affine_history,
        moving_grid=(tuple(run.moving_shape), run.moving_world), det_range=fields["det_range"], slabs=slabs,
        map=fields["map"], release=None if gather else decomp.free)


class _Outputs:
    """The output fields of :func:`register`: each gathered (cropped) onto rank 0 as soon as
    it is made, or, with ``gather=False``, kept as this rank's block; :meth:`slab` then serves
    the planes of the cropped grid this rank writes (:class:`claire_py.outputs.Slabs`)."""

    def __init__(self, decomp, pad, gather):
        self.decomp, self.pad, self.gather, self.blocks = decomp, pad, gather, {}

    def keep(self, name, local):
        if self.gather:
            return _crop(self.decomp.gather(np.ascontiguousarray(local)), self.pad)
        self.blocks[name] = local
        return None

    def slab(self, name):
        local = self.blocks.get(name)
        return None if local is None else self.planes(local)

    def planes(self, local):
        """This rank's planes (:func:`~claire_py.blockio.slab_bounds`) of the cropped grid of a
        field given as its local block (``(C, n1, n2, k1 - k0)``)."""
        from .blockio import slab_bounds

        n1, n2, n3 = (n - 2 * self.pad for n in self.decomp.shape)
        k0, k1 = slab_bounds(n3, self.decomp.size)[self.decomp.rank]
        p = self.pad
        box = ((p, p + n1), (p, p + n2), (p + k0, p + k1))
        return self.decomp.boxes_from_blocks(local if local.ndim == 4 else local[None], box)


def _velocity_setup(velocity, comm, precision, nt, interpolation):
    """Decomposition, transport with ``velocity`` set (global ``(3, n1, n2, n3)`` on rank 0)."""
    from .solvers.transport import TransportOptions

    shape = _image_shape(velocity, comm, "velocity", components=3)
    decomp = Decomposition(shape, comm=comm, dtype=np.dtype(precision))
    ops = SpectralOperators(decomp)
    transport = SemiLagrangianTransport(decomp, ops, TransportOptions(nt=nt, interpolation=interpolation))
    transport.set_velocity(decomp.scatter(velocity if decomp.rank == 0 else None).astype(decomp.dtype))
    return decomp, transport


def _resample(data, affine, target, transform, labels):
    """``data`` (voxel-to-world ``affine``) on the grid ``target = (shape, affine)``, the target's
    point ``z`` taking the value at ``transform(z)`` (rank 0): as :func:`register` takes MOVING
    through the affine part (cubic Lagrange, clipped to the data's range), integer labels by
    nearest."""
    from .kernels.sampling import resample_affine

    if labels:
        return resample_affine(data, _voxel_map(affine, target[1], transform), target[0], order=0, dtype=data.dtype)
    return _resampled(np.asarray(data), None, affine, target[1], target[0], transform, order=3)


def transport(image, velocity, *, labels=None, nt=4, interpolation="lagrange", precision="float64", comm=None,
              transform=None, image_affine=None, grid_affine=None, target=None):
    """Deform ``image`` with a registration: ``image(T(y(x)))`` (forward) or ``image(y(T(z)))``
    (an inverse map onto ``target``).

    Parameters
    ----------
    image : ndarray ``(n1, n2, n3)`` or None
        Global on rank 0: on the velocity's grid, or on its own grid ``image_affine`` (e.g.
        MOVING's).
    velocity : ndarray ``(3, n1, n2, n3)`` or None
        ``RegistrationResult.velocity`` (radians of the box per unit time).
    labels : {None, "nearest", "probability"}
        Treat ``image`` as an integer label map (see ``SemiLagrangianTransport.transport_labels``).
    nt, interpolation, precision : as in the registration's configuration.
    transform : ndarray ``(4, 4)``, optional
        The affine part (world RAS mm; ``RegistrationResult.transform``).
    image_affine, grid_affine : ndarray ``(4, 4)``, optional
        Voxel-to-world matrices of ``image``'s grid and of the velocity's grid (FIXED's): with
        ``image_affine``, ``image`` goes onto the velocity's grid through ``transform`` first
        (trilinear; nearest for labels).
    target : tuple ``(shape, affine)``, optional
        For an inverse map: the result goes from the velocity's grid onto ``target`` through
        ``transform`` after the transport.

    Returns
    -------
    ndarray or None
        The deformed image on rank 0 (integer dtype kept for labels), ``None`` elsewhere.
    """
    decomp, tr = _velocity_setup(velocity, comm, precision, nt, interpolation)
    root = decomp.rank == 0
    if image_affine is not None:
        if _image_shape(image, comm, "image") is None or grid_affine is None:
            raise UserInputError("transport: image_affine needs the velocity's grid_affine")
        image = _resample(np.asarray(image), image_affine, (decomp.shape, grid_affine), transform,
                          labels is not None) if root else None
    elif _image_shape(image, comm, "image") != decomp.shape:
        raise UserInputError(f"image is not on the velocity's grid {decomp.shape}")
    if labels is None:
        out = tr.transport_image(_global_input(image, decomp))
    else:
        dtype = decomp.comm.bcast(np.asarray(image).dtype if decomp.rank == 0 else None)
        if not np.issubdtype(dtype, np.integer):
            raise UserInputError(f"a label map must have an integer voxel type, not {dtype}")
        local = decomp.scatter(np.asarray(image) if decomp.rank == 0 else None)
        out = tr.transport_labels(local, method=labels)
    out = decomp.gather(np.ascontiguousarray(out))
    decomp.free()
    if target is not None and root:
        out = _resample(out, grid_affine, target, transform, labels is not None)
    return out


def jacobian(velocity, *, nt=4, interpolation="lagrange", precision="float64", comm=None, transform=None,
             grid_affine=None, target=None):
    """The Jacobian determinant of a registration's map (global on rank 0, else None):
    ``det(L) det(grad y)``, ``L`` the linear part of ``transform`` (the identity by default);
    with ``target`` (an inverse map, see :func:`transport`) on that grid."""
    decomp, tr = _velocity_setup(velocity, comm, precision, nt, interpolation)
    det = decomp.gather(tr.det_grad_y())
    decomp.free()
    if det is not None and transform is not None:
        if target is not None:
            det = _resample(det, grid_affine, target, transform, False)
        det = det * float(np.linalg.det(np.asarray(transform, float)[:3, :3]))
    return det


def invert(velocity, *, nt=4, interpolation="lagrange", precision="float64", comm=None):
    """The inverse map, from the flow of ``-v``.

    Returns ``(velocity, displacement, det_grad_y)`` of the inverse on rank 0 (``None``
    elsewhere): ``-v``, its pull-back displacement in voxels and det(∇ y_inv).
    """
    negated = None if velocity is None else -np.asarray(velocity)
    decomp, tr = _velocity_setup(negated, comm, precision, nt, interpolation)
    u = tr.displacement()
    det = tr.det_grad_y()
    out = decomp.gather(np.ascontiguousarray(tr.velocity)), decomp.gather(u), decomp.gather(det)
    decomp.free()
    return out
