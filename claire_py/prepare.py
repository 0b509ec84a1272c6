"""The inputs of :func:`claire_py.register`, each rank holding only its part of each image.

An input is first a :class:`Source` (its geometry on every rank, nothing read), then
:class:`Planes`: rank ``r`` of ``P`` holds the planes ``k0 <= k < k1`` of every component that
:func:`claire_py.blockio.slab_bounds` gives it (read so from a NIfTI file, or sent so by rank 0
from an array). From there:

* FIXED (and the mask, FIXED's labels) move to the solver's blocks of FIXED's grid padded by
  ``pad`` (:func:`blocks`, through :meth:`Decomposition.blocks_from_boxes`; the frame takes the
  image's minimum);
* MOVING goes onto those blocks through a voxel-to-voxel affine map ``A`` (FIXED's voxel ->
  MOVING's, :func:`resampled_blocks`): each rank collects the box of MOVING its block maps
  into (the bounding box of the block's corners under ``A``, widened by the interpolation
  stencil, clipped to MOVING's grid) with :meth:`Decomposition.regroup` and resamples it.
  Points mapped outside MOVING lie outside that box on the same side (the box is clipped at
  MOVING's faces only), so each block equals the block of the whole image resampled;
* the affine stage's pyramid is smoothed by planes (:class:`~claire_py.solvers.affine.ImagePyramid`
  with ``decomp``) and only its coarse levels are held whole;
* Dice is counted per block and summed (:func:`dice_counts`).

No rank holds a whole image unless one was given to it as an array.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .errors import UserInputError
from .parallel import world

__all__ = ["Planes", "Source", "source", "Inputs", "blocks", "BlockSampler", "resampled_blocks", "inner_slices",
           "label_values", "dice_counts", "dice_from_counts"]

#: Voxels beyond the bounding box of a block's corners (in MOVING) that the cubic stencil reads.
_STENCIL_MARGIN = 2


@dataclasses.dataclass
class Planes:
    """This rank's planes of an image.

    Attributes
    ----------
    data : ndarray ``(C, n1, n2, k1 - k0)``
        The planes ``k0 <= k < k1`` of each component (``C = 1`` for a 3-D image).
    shape : tuple
        The grid ``(n1, n2, n3)``.
    k0 : int
        The first plane held here.
    affine : ndarray ``(4, 4)`` or None
        Voxel-to-world (RAS mm), when the image came with one.
    components : int or None
        ``None`` for a 3-D image, ``C`` for ``(C, n1, n2, n3)``.
    """

    data: np.ndarray
    shape: tuple
    k0: int
    affine: np.ndarray | None
    components: int | None

    @property
    def box(self):
        n1, n2, _ = self.shape
        return ((0, n1), (0, n2), (self.k0, self.k0 + self.data.shape[-1]))

    def gather(self, comm):
        """The whole image on rank 0 (``(n1, n2, n3)`` or ``(C, n1, n2, n3)``), ``None`` elsewhere."""
        parts = world(comm).gather(self.data)
        if parts is None:
            return None
        whole = np.concatenate(parts, axis=-1)
        return whole if self.components else whole[0]

    def channel_ranges(self, comm):
        """``[(min, max)]`` per component over the whole image, on every rank."""
        from mpi4py import MPI

        data = self.data.reshape(self.data.shape[0], -1)
        lo = np.array([c.min() if c.size else np.inf for c in data], np.float64)
        hi = np.array([c.max() if c.size else -np.inf for c in data], np.float64)
        comm = world(comm)
        comm.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
        comm.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
        return list(zip(lo.tolist(), hi.tolist()))


@dataclasses.dataclass
class Source:
    """An input image before it is read: its geometry, known on every rank, and where its
    voxels come from (a NIfTI file read by planes, or an array held by rank 0 or by every
    rank). :meth:`planes` reads it (collective); it can be read again."""

    name: str
    shape: tuple
    components: int | None
    affine: np.ndarray | None
    dtype: np.dtype
    volume: object = None  # a blockio.VolumeFile
    array: object = None  # rank 0's (or every rank's) array, (C, n1, n2, n3) or (n1, n2, n3)
    everywhere: bool = False

    def planes(self, comm, dtype=None):
        """This rank's :class:`Planes` (in ``dtype``, default: as given or stored); floating-point
        voxels must be finite (on every rank alike; :func:`~claire_py.blockio.read_slab` checks
        a file's)."""
        from .blockio import read_slab, slab_bounds

        comm = world(comm)
        if self.volume is not None:
            box, data = read_slab(self.volume, comm, dtype)
            return Planes(data, self.shape, box[2][0], self.affine, self.components)
        dtype = self.dtype if dtype is None else np.dtype(dtype)
        bounds = slab_bounds(self.shape[2], comm.Get_size())
        k0, k1 = bounds[comm.Get_rank()]
        lead = (self.components or 1,)
        if self.everywhere:
            data = np.array(np.reshape(self.array, lead + self.shape)[..., k0:k1], dtype)
        else:
            data = np.empty(lead + self.shape[:2] + (k1 - k0,), self.dtype)
            if comm.Get_rank() == 0:
                whole = np.reshape(np.asarray(self.array), lead + self.shape)
                for r, (a, b) in enumerate(bounds):
                    piece = np.ascontiguousarray(whole[..., a:b])
                    if r == 0:
                        data[...] = piece
                    else:
                        _send_bytes(comm, piece, r)
            else:
                _recv_bytes(comm, data, 0)
            data = data.astype(dtype, copy=False)
        if data.dtype.kind == "f" and comm.allreduce(int(not np.all(np.isfinite(data)))):
            raise UserInputError(f"{self.name} image contains NaN or infinite values; replace them first")
        return Planes(data, self.shape, k0, self.affine, self.components)


def source(image, comm, name, *, channels=False):
    """The :class:`Source` of ``image`` on every rank of ``comm``: a NIfTI path (its header
    read on rank 0), or an array or a nibabel image given on rank 0 (other ranks may pass
    ``None`` or the same). 3-D, or ``(C, n1, n2, n3)`` with ``C <= 16`` (with ``channels``, a
    4-D NIfTI ``(n1, n2, n3, C)``); every rank raises alike otherwise."""
    from mpi4py import MPI

    from .blockio import open_volume

    comm = world(comm)
    if isinstance(image, (str, os.PathLike)):
        volume = open_volume(os.fspath(image), comm, channels=channels)
        return Source(name, tuple(volume.shape), volume.components if volume.components > 1 else None,
                      volume.affine, np.dtype(volume.dtype), volume=volume)
    array, affine = _as_array(image, channels)
    geometry = comm.bcast(None if comm.Get_rank() != 0 or array is None
                          else (np.shape(array), np.asarray(array).dtype, affine))
    if geometry is None:
        raise UserInputError(f"{name}: no image given (None on rank 0)")
    full_shape, stored, affine = geometry
    if len(full_shape) == 3:
        components, shape = None, tuple(full_shape)
    elif len(full_shape) == 4 and 1 <= full_shape[0] <= 16:
        components, shape = full_shape[0], tuple(full_shape[1:])
    else:
        raise UserInputError(f"{name}: a 3-D image (or (C, n1, n2, n3) with C <= 16 components) is needed, got "
                             f"shape {full_shape}")
    everywhere = not comm.allreduce(array is None, op=MPI.LOR)
    return Source(name, shape, components, None if affine is None else np.asarray(affine, float), np.dtype(stored),
                  array=array, everywhere=everywhere)


_MESSAGE_BYTES = 1 << 30  # below MPI's 2^31 count limit


def _send_bytes(comm, array, dest):
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _MESSAGE_BYTES):
        comm.Send(flat[start:start + _MESSAGE_BYTES], dest=dest)


def _recv_bytes(comm, array, source):
    flat = array.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, _MESSAGE_BYTES):
        comm.Recv(flat[start:start + _MESSAGE_BYTES], source=source)


def _as_array(image, channels):
    """``(array or None, affine or None)`` of an array or a nibabel image (4-D ``(n1, n2, n3,
    C)`` -> ``(C, n1, n2, n3)`` with ``channels``; a trailing axis of 1 dropped)."""
    if hasattr(image, "dataobj") and hasattr(image, "affine"):
        data = np.asanyarray(image.dataobj)
        if data.ndim == 4 and data.shape[-1] == 1:
            data = data[..., 0]
        elif data.ndim == 4 and channels:
            data = np.moveaxis(data, -1, 0)
        return data, np.asarray(image.affine, float)
    return image, None


def inner_slices(decomp, pad):
    """Slices of this rank's block that lie inside the grid without its ``pad`` frame."""
    return tuple(slice(max(pad - s.start, 0), max(min(n - pad, s.stop) - s.start, 0))
                 for s, n in zip(decomp.real_slice, decomp.shape))


def blocks(planes, decomp, pad, *, dtype=None):
    """This rank's block ``(C, *local)`` of ``planes`` (on the grid ``decomp.shape`` minus the
    ``pad`` frame) on the padded grid, the frame filled with each component's minimum."""
    (_, n1), (_, n2), (k0, k1) = planes.box
    box = ((pad, pad + n1), (pad, pad + n2), (pad + k0, pad + k1))
    ranges = planes.channel_ranges(decomp.comm) if pad else [(0.0, 0.0)] * planes.data.shape[0]
    out = np.stack([decomp.blocks_from_boxes(channel, box, fill=lo) for channel, (lo, _) in zip(planes.data, ranges)])
    return out if dtype is None else out.astype(dtype, copy=False)


def _source_box(matrix, sub_shape, shape, margin):
    """The box of a grid ``shape`` that the points ``0 <= i < sub_shape`` mapped by ``matrix``
    read, widened by ``margin`` voxels, clipped to the grid (at least one plane on each axis)."""
    if not all(sub_shape):
        return ((0, 0),) * 3
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in sub_shape], indexing="ij")).reshape(3, -1)
    mapped = matrix[:3, :3] @ corners + matrix[:3, 3:4]
    box = []
    for lo, hi, n in zip(np.floor(mapped.min(axis=1)), np.floor(mapped.max(axis=1)), shape):
        start = int(np.clip(lo - margin, 0, n - 1))
        box.append((start, int(np.clip(hi + margin + 1, start + 1, n))))
    return tuple(box)


class BlockSampler:
    """The box of ``planes`` (MOVING's grid) that this rank's block of FIXED's grid maps into
    through ``matrix`` (FIXED's voxel -> MOVING's voxel; FIXED's grid is ``decomp.shape`` minus
    the ``pad`` frame), collected once (:attr:`source`, ``(C, *box)``), and resampled onto the
    block as often as needed (:meth:`resample`)."""

    def __init__(self, planes, matrix, decomp, pad, *, order):
        self.decomp, self.pad = decomp, pad
        self.inside = inner_slices(decomp, pad)
        self.sub_shape = tuple(i.stop - i.start for i in self.inside)
        shift = np.eye(4)
        shift[:3, 3] = [s.start + i.start - pad for s, i in zip(decomp.real_slice, self.inside)]
        mapped = np.asarray(matrix, float) @ shift
        box = _source_box(mapped, self.sub_shape, planes.shape, _STENCIL_MARGIN if order == 3 else 1)
        self.source = decomp.regroup(planes.data, planes.box, box)
        origin = np.eye(4)
        origin[:3, 3] = [-s for s, _ in box]
        self.matrix = origin @ mapped

    def resample(self, volume, *, order, dtype):
        """``volume`` (a field on the box, e.g. a component of :attr:`source`) on this rank's
        block (0 on the frame; :func:`~claire_py.kernels.sampling.resample_affine` of the whole
        image where the block lies inside the grid)."""
        from .kernels.sampling import resample_affine

        out = np.zeros(self.decomp.local_shape, dtype)
        if all(self.sub_shape):
            out[self.inside] = resample_affine(volume, self.matrix, self.sub_shape, order=order, dtype=dtype)
        return out


def resampled_blocks(planes, matrix, decomp, pad, *, order, dtype):
    """This rank's block ``(C, *local)`` of ``planes`` (MOVING's grid) resampled through
    ``matrix`` onto FIXED's padded grid (:class:`BlockSampler`): the frame takes the least value
    resampled (over all ranks) and each component is clipped to its range (a cubic overshoots
    at edges)."""
    sampler = BlockSampler(planes, matrix, decomp, pad, order=order)
    out = np.stack([sampler.resample(channel, order=order, dtype=dtype) for channel in sampler.source])
    inside, sampler = sampler.inside, None
    for c, (lo, hi) in enumerate(planes.channel_ranges(decomp.comm)):
        if pad:
            interior = out[(c,) + inside]
            least = decomp.allreduce(float(interior.min()) if interior.size else np.inf, "min")
            frame = np.ones(decomp.local_shape, bool)
            frame[inside] = False
            out[c][frame] = least
        np.clip(out[c], lo, hi, out=out[c])
    return out


class Inputs:
    """The inputs of a registration (:class:`Source` objects) as blocks of FIXED's grid padded
    by ``pad``, made on demand: each rank's planes are read once and held until
    :meth:`release`; after it, a block asked for is read again from its source, so that none is
    held through the solve.

    :meth:`place` says where the blocks go: ``decomp`` and ``pad``, ``transform`` the voxel map
    FIXED -> MOVING through the affine part, ``headers`` the one through the headers alone,
    ``through`` whether MOVING needs resampling (another grid, or an affine part that is not the
    identity)."""

    def __init__(self, sources, comm, *, precision):
        self.sources, self.comm, self.precision = sources, comm, precision
        self.decomp = self.pad = self.transform = self.headers = self.through = None
        self._planes = {}

    def place(self, decomp, pad, *, transform, headers, through):
        self.decomp, self.pad, self.transform, self.headers, self.through = decomp, pad, transform, headers, through

    def planes(self, name):
        """This rank's :class:`Planes` of ``name`` (``fixed``, ``moving``, ``mask``, ``fixed
        labels``, ``moving labels``); images in the working precision, labels as stored."""
        if name not in self._planes:
            dtype = None if name.endswith("labels") else self.precision
            self._planes[name] = self.sources[name].planes(self.comm, dtype)
        return self._planes[name]

    def release(self):
        self._planes = {}

    def fixed(self, name="fixed", dtype=None):
        """This rank's block ``(C, *local)`` of FIXED (or of the mask, FIXED's labels)."""
        return blocks(self.planes(name), self.decomp, self.pad, dtype=dtype)

    def moving(self):
        """MOVING through the affine part onto this rank's block (cubic, clipped to its range;
        float64 when resampled)."""
        if not self.through:
            return blocks(self.planes("moving"), self.decomp, self.pad)
        return resampled_blocks(self.planes("moving"), self.transform, self.decomp, self.pad, order=3,
                                dtype=np.float64)

    def moving_before(self):
        """MOVING through the headers alone (trilinear; the affine part's block when that is the
        identity)."""
        if not self.through or np.allclose(self.transform, self.headers, atol=1e-9):
            return self.moving()
        return resampled_blocks(self.planes("moving"), self.headers, self.decomp, self.pad, order=1,
                                dtype=np.float64)

    def labels(self):
        """``(values, fixed, moving, before)``: the sorted label values (with 0 when MOVING's
        labels are resampled: 0 outside MOVING), this rank's blocks of FIXED's labels and of
        MOVING's through the headers alone, and MOVING's labels (their planes when they go
        through the affine part block by block, else their block)."""
        fixed_planes, moving_planes = self.planes("fixed labels"), self.planes("moving labels")
        values = label_values(self.decomp.comm, fixed_planes, moving_planes)[0]
        fixed = blocks(fixed_planes, self.decomp, self.pad)[0]
        if not self.through:
            moving = blocks(moving_planes, self.decomp, self.pad)[0]
            return values, fixed, moving, moving
        sampler = BlockSampler(moving_planes, self.headers, self.decomp, self.pad, order=0)
        before = sampler.resample(sampler.source[0], order=0, dtype=moving_planes.data.dtype)
        return sorted(set(values) | {0}), fixed, moving_planes, before


def label_values(comm, *maps):
    """The sorted union of the values of label maps (:class:`Planes` or blocks) over all
    ranks, and for each of ``maps`` a dict value -> count (summed over ranks)."""
    counts = []
    for labels in maps:
        data = labels.data if isinstance(labels, Planes) else labels
        values, n = np.unique(data, return_counts=True)
        merged = {}
        for part in world(comm).allgather((values.tolist(), n.tolist())):
            for v, k in zip(*part):
                merged[v] = merged.get(v, 0) + k
        counts.append(merged)
    return sorted(set().union(*counts)), counts


def dice_counts(decomp, pad, values, fixed, other):
    """``(|A_k|, |B_k|, |A_k & B_k|)`` for each of ``values`` (sorted, holding every value of
    both maps) over the grid without its ``pad`` frame: ``fixed`` and ``other`` are this
    rank's blocks of two label maps; summed over the ranks (float64 arrays, exact to 2^53)."""
    inside = inner_slices(decomp, pad)
    a, b = np.asarray(fixed)[inside].ravel(), np.asarray(other)[inside].ravel()
    ia, ib = np.searchsorted(values, a), np.searchsorted(values, b)
    n = len(values)
    local = np.concatenate([np.bincount(ia, minlength=n), np.bincount(ib, minlength=n),
                            np.bincount(ia[a == b], minlength=n)]).astype(np.float64)
    return decomp.allreduce_array(local).reshape(3, n)


def dice_from_counts(values, counts):
    """Dice ``2 |A & B| / (|A| + |B|)`` per label ``> 0`` from :func:`dice_counts` (1 where
    neither map holds the label)."""
    return [2.0 * both / (a + b) if a + b else 1.0 for v, a, b, both in zip(values, *counts) if v > 0]
