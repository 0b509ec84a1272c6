"""The report's reading: the slices and statistics it draws, read from OUTDIR's NIfTI files
plane by plane (no whole volume is held; :class:`_Mosaic` lays the three orthogonal cuts out)."""

from __future__ import annotations

import os

import numpy as np

from .errors import UserInputError
from .outputs import output_file

_PLANE_NAMES = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}


class _Volume:
    """A NIfTI file of OUTDIR read in one sequential pass (:func:`claire_py.blockio.iter_planes`)
    for the slices the report draws and the figures it prints: a large grid's report holds three
    planes per file, never the field. ``volume[index]`` is a cut across one axis (``(n_b, n_c)``,
    with the components last for a vector field); ``channel`` picks one component of a 4-D file."""

    def __init__(self, file, channel=None):
        self.file, self.channel = file, channel
        self.shape = tuple(file.shape) + ((file.components,) if channel is None and file.components > 1 else ())
        self.ndim = len(self.shape)
        self._cuts, self.stats = {}, None
        self.preferred = tuple(n // 2 for n in file.shape)  # the slices a scan takes when a cut is asked for

    def scan(self, slices, bound=None, edges=None):
        """One pass of the file: the cuts across each axis at ``slices[axis]``, and
        :attr:`stats` (see :func:`_scan`)."""
        from .blockio import iter_planes

        planes = ((c, k0, k1, p) for c, k0, k1, p in iter_planes(self.file)
                  if self.channel is None or c == self.channel)
        cuts, self.stats = _scan(planes, self.file.shape, self.shape[3:], slices, bound, edges)
        self._cuts = {axis: (slices[axis], cut) for axis, cut in cuts.items()}
        return self

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        axis = next(a for a, i in enumerate(index) if not isinstance(i, slice))
        if axis not in self._cuts or self._cuts[axis][0] != index[axis]:
            slices = list(self.preferred)
            slices[axis] = int(index[axis])
            self.scan(tuple(slices))
        cut = self._cuts[axis][1]
        return cut[index[axis + 1:]] if len(index) > axis + 1 else cut


def _load_nifti(path, vector=False):
    """``(volume, affine)`` of a NIfTI file as a :class:`_Volume` (a field of 3-vectors with
    ``vector``, its components last), or ``None`` when the file is absent or unreadable."""
    from mpi4py import MPI

    from .blockio import open_volume

    if not os.path.isfile(path):
        return None
    try:
        file = open_volume(path, MPI.COMM_SELF, vector=vector, channels=not vector)
    except Exception:  # a damaged or unexpected file: the panel is skipped
        return None
    return _Volume(file), np.asarray(file.affine, float)


def _scan(planes, shape, trailing, slices, bound=None, edges=None):
    """From ``planes`` (``(component, k0, k1, array (n1, n2, k1 - k0))``, in any order): the cuts
    across each axis at ``slices`` (``{axis: array}``, components last when ``trailing``) and
    the figures ``min``, ``max``, ``mean``, the shares in % ``folded`` (<= 0), ``below``
    ``bound`` and ``above`` ``1/bound``, and ``counts`` per bin of ``edges`` when given."""
    n1, n2, n3 = shape
    cuts = {0: np.zeros((n2, n3) + trailing, np.float32), 1: np.zeros((n1, n3) + trailing, np.float32),
            2: np.zeros((n1, n2) + trailing, np.float32)}
    lo, hi, total, n, folded, below, above = np.inf, -np.inf, 0.0, 0, 0, 0, 0
    counts = None if edges is None else np.zeros(len(edges) - 1, np.int64)
    i, j, k = slices
    for c, k0, k1, p in planes:
        at = (c,) if trailing else ()
        cuts[0][(slice(None), slice(k0, k1)) + at] = p[i]
        cuts[1][(slice(None), slice(k0, k1)) + at] = p[:, j]
        if k0 <= k < k1:
            cuts[2][(Ellipsis,) + at] = p[:, :, k - k0]
        lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
        total, n = total + float(p.sum(dtype=np.float64)), n + p.size
        folded += np.count_nonzero(p <= 0)
        if bound:
            below, above = below + np.count_nonzero(p < bound), above + np.count_nonzero(p > 1 / bound)
        if counts is not None:
            counts += np.histogram(p, bins=edges)[0]
    share = 100.0 / max(n, 1)
    return cuts, {"min": lo, "max": hi, "mean": total / max(n, 1), "folded": share * folded,
                  "below": share * below if bound else float("nan"),
                  "above": share * above if bound else float("nan"), "counts": counts}


def _stats(volume, slices, bound=None, edges=None):
    """The figures of :func:`_scan` for a file (scanned once more only when ``bound`` or
    ``edges`` ask for what the first pass did not count) or for a 3-D array."""
    if isinstance(volume, _Volume):
        if volume.stats is None or bound or edges is not None:
            volume.scan(slices, bound, edges)
        return volume.stats
    a = np.asarray(volume, np.float32)
    return _scan([(0, 0, a.shape[2], a)], a.shape, (), slices, bound, edges)[1]


def _load_images(outdir, names):
    """``{name: (volume, affine) or None}`` for the files ``outdir/name.nii[.gz]``."""
    return {name: _load_nifti(output_file(outdir, name), vector=name in ("velocity", "deformation_map", "displacement"))
            for name in names}


def _as_volume(image):
    """A 3-D float array from an array or a NIfTI path; ``None`` when unusable."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        loaded = _load_nifti(os.fspath(image))
        if loaded is None:
            return None
        image = loaded[0]
    if not isinstance(image, _Volume):
        image = np.asarray(image)
    if image.ndim == 4:  # a trailing singleton axis, or the channels of a multi-channel image: the first
        image = _Volume(image.file, 0) if isinstance(image, _Volume) else image[..., 0]
    return image if image.ndim == 3 else None


# ----------------------------------------------------------------------------- drawing


class _Mosaic:
    """Where the slices go: the three planes of a volume side by side, volumes in rows, all in
    one Axes in millimetres (one Axes draws far faster than nine; each slice is an image of
    its own with its own colour map, placed by ``extent``).

    Parameters
    ----------
    shape : tuple of 3 ints
        FIXED's grid.
    affine : ndarray (4, 4)
        Voxel indices to millimetres (FIXED's).
    slices : tuple of 3 ints or None
        Index of the slice across each array axis; mid-slices when ``None``.
    rows : int
        Number of volumes drawn one below the other.

    Notes
    -----
    The slice across array axis ``a`` shows the other two axes ``b < c``: ``b`` horizontal,
    ``c`` vertical, index 0 at the bottom left (``origin="lower"``), each voxel
    ``spacing[b] x spacing[c]`` mm. The plane names (sagittal, coronal, axial) come from the
    affine's axis codes.
    """

    def __init__(self, shape, affine, slices, rows=1):
        import nibabel as nib

        self.shape = tuple(int(n) for n in shape)
        self.affine = np.asarray(affine, float)
        if slices is None:
            slices = tuple(n // 2 for n in self.shape)
        slices = tuple(int(s) for s in slices)
        if len(slices) != 3 or not all(0 <= s < n for s, n in zip(slices, self.shape)):
            raise UserInputError(f"--slices {' '.join(map(str, slices))} is outside the grid "
                                 f"{'x'.join(map(str, self.shape))}; give 0 <= I, J, K < n1, n2, n3")
        self.slices = slices
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        self.spacing = np.where(spacing > 0, spacing, 1.0)
        try:
            codes = nib.aff2axcodes(self.affine)
            self.names = [_PLANE_NAMES.get(c, f"axis {a}") for a, c in enumerate(codes)]
        except Exception:  # a degenerate affine: plain axis names
            self.names = [f"axis {a}" for a in range(3)]
        self.planes = [tuple(b for b in range(3) if b != a) for a in range(3)]
        sizes = [(self.shape[b] * self.spacing[b], self.shape[c] * self.spacing[c]) for b, c in self.planes]
        self.gap = 0.05 * max(w for w, _ in sizes)
        self.x0 = np.concatenate([[0.0], np.cumsum([w + self.gap for w, _ in sizes])])[:3]
        self.sizes = sizes
        self.row_height = max(h for _, h in sizes)
        self.rows = rows
        self.width = self.x0[-1] + sizes[-1][0]

    def title(self, axis):
        return f"{self.names[axis]} ({'ijk'[axis]}={self.slices[axis]})"

    def cut(self, volume, axis, index=None):
        """The slice of ``volume`` across ``axis`` as drawn: ``(n_c, n_b)``, a view."""
        index = self.slices[axis] if index is None else index
        if isinstance(volume, _Volume) and volume.shape[:3] == self.shape:
            volume.preferred = tuple(self.slices)  # one pass of the file serves the three cuts
        return volume[(slice(None),) * axis + (index,)].T

    def extent(self, axis, row=0):
        """``(left, right, bottom, top)`` in mm of the slice across ``axis`` in ``row`` (0 on top)."""
        w, h = self.sizes[axis]
        bottom = (self.rows - 1 - row) * (self.row_height + self.gap) + (self.row_height - h) / 2
        return (self.x0[axis], self.x0[axis] + w, bottom, bottom + h)

    def centres(self, axis, row=0):
        """Voxel-centre coordinates (x of ``n_b``, y of ``n_c``) in mm, for contours."""
        left, _, bottom, _ = self.extent(axis, row)
        b, c = self.planes[axis]
        return (left + (np.arange(self.shape[b]) + 0.5) * self.spacing[b],
                bottom + (np.arange(self.shape[c]) + 0.5) * self.spacing[c])

    def axes(self, fig, rect):
        """One Axes at ``rect`` (figure fraction) spanning the mosaic, axis off, equal aspect."""
        ax = fig.add_axes(rect)
        ax.set_axis_off()
        ax.set_xlim(-0.02 * self.width, self.width * 1.02)
        ax.set_ylim(-self.gap * 0.5, self.rows * (self.row_height + self.gap))
        ax.set_aspect("equal")
        return ax

    def show(self, ax, image, axis, row=0, **kw):
        """Draw ``image`` (:meth:`cut`, or any 2-D array: stretched to the cell) in its cell."""
        return ax.imshow(image, origin="lower", interpolation="nearest", extent=self.extent(axis, row), **kw)

    def label(self, ax, row, text):
        """The name of a row, left of it; the plane titles above the top row."""
        left, _, bottom, top = self.extent(0, row)
        ax.text(left - 0.01 * self.width, (bottom + top) / 2, text, rotation=90, ha="right", va="center",
                fontsize=9)
        if row == 0:
            top = self.rows * (self.row_height + self.gap) - self.gap
            for axis in range(3):
                left, right, _, _ = self.extent(axis, 0)
                ax.text((left + right) / 2, top + 0.2 * self.gap, self.title(axis), ha="center", va="bottom",
                        fontsize=9)

    def note(self, ax, row, text):
        left, right, bottom, top = self.extent(1, row)
        ax.text((left + right) / 2, (bottom + top) / 2, text, ha="center", va="center", fontsize=9, color="0.4")


def _grey_range(cuts):
    """0.5 and 99.5 percentiles of the drawn slices (a grey scale robust to a few hot voxels)."""
    values = np.concatenate([c.ravel() for c in cuts])
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 1.0)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)
