"""A visual report of a finished registration: ``OUTDIR/report.html`` plus PNGs.

People judge a registration by looking at it. :func:`write_report` reads what ``claire
register`` wrote into OUTDIR (see :mod:`claire_py.outputs`) and draws, with matplotlib's Agg
canvas and no network resources:

* three orthogonal slices of FIXED, MOVING and the warped MOVING (``slices.png``);
* the residuals ``|fixed - moving|`` and ``|fixed - warped|`` on one colour scale
  (``residuals.png``);
* ``det(grad y)`` on a diverging colour map centred at 1, with its histogram, range and the
  share of voxels outside the bound ``[det_bound, 1/det_bound]`` (``det_grad_y.png``);
* MOVING's regular grid pulled back onto FIXED (``grid.png``);
* objective, relative mismatch, ``||g||/||g0||`` and PCG iterations per Gauss-Newton step,
  continuation levels marked (``convergence.png``);
* the workload: FFT, interpolation, communication, other (``workload.png``);
* Dice per label before/after when ``registration.json`` holds ``"dice"`` (``dice.png``);
* the resolved configuration and the versions.

Every file is written under a temporary name and renamed into place; the page references
only files inside OUTDIR, by relative name. The report is drawn by one process: under MPI
call it on rank 0 (``claire report`` does).

The same module holds the two argparse helpers that ``claire_py.cli`` wires in:
:func:`add_report_options` (``--report/--no-report``, ``--slices``) and
:func:`add_report_command` (``claire report OUTDIR``).
"""

from __future__ import annotations

import html
import json
import os

import numpy as np

from .errors import UserInputError
from .io import write_text
from .outputs import output_file, read_record as _load_meta

__all__ = ["write_report", "write_batch_report", "add_report_options", "add_report_command", "report_wanted",
           "FIGURE_SIZES", "DPI"]

DPI = 90
"""Resolution of every PNG, dots per inch."""

FIGURE_SIZES = {
    "slices.png": (7.5, 7.2),
    "residuals.png": (8.2, 5.0),
    "det_grad_y.png": (11.0, 3.2),
    "grid.png": (7.5, 2.8),
    "convergence.png": (9.0, 2.8),
    "workload.png": (6.0, 2.6),
    "dice.png": (8.0, 3.0),
    "batch.png": (8.0, 3.0),
}
"""Size in inches of each PNG (width, height); the pixel size is ``round(size * DPI)``."""

_PLANE_NAMES = {"L": "sagittal", "R": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}
_COMMUNICATION = ("halo_exchange", "alltoallv", "allreduce")
_IMAGE_FILES = ("warped", "residual_before", "residual_after", "det_grad_y", "deformation_map")


# ----------------------------------------------------------------------------- reading


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


def _figure(name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGURE_SIZES[name], dpi=DPI)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    return fig


def _save(fig, outdir, name):
    """Write ``fig`` to ``outdir/name`` atomically; return ``(name, width, height)`` in pixels."""
    tmp = os.path.join(outdir, f".{name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as fh:
            fig.savefig(fh, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})  # speed over size
        os.replace(tmp, os.path.join(outdir, name))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    width, height = fig.canvas.get_width_height()
    return name, width, height


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


def _draw_slices(outdir, mosaic, rows):
    """FIXED, MOVING and warped, one row each, three planes per row. ``rows`` is a list of
    ``(label, volume or None, reason)``; a volume on another grid is shown at its own
    mid-slices, stretched to the cells. The warped row takes MOVING's grey scale (when MOVING
    is shown): the same intensities look the same, and the interpolation's undershoot at the
    brain's edge stays black instead of greying the background."""
    fig = _figure("slices.png")
    ax = mosaic.axes(fig, [0.04, 0.0, 0.96, 0.97])
    scales = {}
    for r, (label, volume, reason) in enumerate(rows):
        mosaic.label(ax, r, label)
        if volume is None:
            mosaic.note(ax, r, reason)
            continue
        own = None if volume.shape == mosaic.shape else [n // 2 for n in volume.shape]
        cuts = [mosaic.cut(volume, a, None if own is None else own[a]) for a in range(3)]
        lo, hi = scales[label] = scales.get("moving") if label == "warped moving" and "moving" in scales \
            else _grey_range(cuts)
        for axis in range(3):
            mosaic.show(ax, cuts[axis], axis, r, cmap="gray", vmin=lo, vmax=hi)
    return _save(fig, outdir, "slices.png")


def _draw_residuals(outdir, mosaic, before, after):
    """``|fixed - moving|`` over ``|fixed - warped|``, one colour scale, one colour bar."""
    fig = _figure("residuals.png")
    ax = mosaic.axes(fig, [0.04, 0.0, 0.84, 0.95])
    cuts = [[mosaic.cut(v, axis) for axis in range(3)] for v in (before, after)]
    vmax = max(float(c.max()) for row in cuts for c in row) or 1.0
    for r, label in enumerate(("|fixed − moving|", "|fixed − warped|")):
        mosaic.label(ax, r, label)
        for axis in range(3):
            im = mosaic.show(ax, cuts[r][axis], axis, r, cmap="magma", vmin=0.0, vmax=vmax)
    fig.colorbar(im, cax=fig.add_axes([0.9, 0.1, 0.025, 0.78])).ax.tick_params(labelsize=8)
    return _save(fig, outdir, "residuals.png")


def _det_summary(det, bound, slices):
    """Min, max and the shares (in %) of voxels below ``bound``, above ``1/bound`` and <= 0."""
    return {k: v for k, v in _stats(det, slices, bound).items() if k in ("min", "max", "below", "above", "folded")}


def _draw_det(outdir, mosaic, det, bound):
    """Slices of det(∇y) on a diverging map centred at 1 (TwoSlopeNorm), its colour bar, and a
    log histogram with the bound and 1/bound dashed."""
    from matplotlib.colors import TwoSlopeNorm

    fig = _figure("det_grad_y.png")
    ax = mosaic.axes(fig, [0.0, 0.02, 0.58, 0.88])
    first = _stats(det, mosaic.slices)
    lo, hi = first["min"], first["max"]
    norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 1.0 - 1e-3), vmax=max(hi, 1.0 + 1e-3))
    mosaic.label(ax, 0, "")
    for axis in range(3):
        im = mosaic.show(ax, mosaic.cut(det, axis), axis, 0, cmap="RdBu_r", norm=norm)
    ticks = np.unique(np.r_[np.linspace(norm.vmin, 1.0, 3), np.linspace(1.0, norm.vmax, 4)].round(3))
    bar = fig.colorbar(im, cax=fig.add_axes([0.595, 0.12, 0.012, 0.72]), ticks=ticks, format="{x:.3g}")
    bar.ax.tick_params(labelsize=8)  # ticks on both sides of 1: the two halves have different scales
    ax = fig.add_axes([0.735, 0.17, 0.25, 0.73])
    edges = np.histogram_bin_edges([], bins=80, range=(lo, hi if hi > lo else lo + 1.0))
    counts = _stats(det, mosaic.slices, edges=edges)["counts"]
    ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="0.35", baseline=0.5)  # one artist, not 80 bars
    _plain_log(ax)
    ax.set_ylim(bottom=0.5)
    for x in (bound, 1.0 / bound) if bound else ():
        ax.axvline(x, color="C3", lw=1, ls="--")
    ax.axvline(1.0, color="0.6", lw=0.8)
    ax.set_xlabel("det(∇y)", fontsize=9)
    ax.set_ylabel("voxels", fontsize=9)
    ax.tick_params(labelsize=8)
    return _save(fig, outdir, "det_grad_y.png")


def _map_in_voxels(mosaic, deformation_map, displacement, axis):
    """``y`` on the slice across ``axis`` in FIXED's voxel indices, ``(3, n_b, n_c)``, from the
    world-mm deformation map (preferred) or the ITK (LPS mm) displacement; ``None`` if neither."""
    inv = np.linalg.inv(mosaic.affine)
    cut = (slice(None),) * axis + (mosaic.slices[axis],)
    if deformation_map is not None and deformation_map.shape[:3] == mosaic.shape:
        ras = deformation_map[cut]  # (n_b, n_c, 3) mm
        return np.einsum("ab,...b->a...", inv[:3, :3], ras) + inv[:3, 3][:, None, None]
    if displacement is not None and displacement.shape[:3] == mosaic.shape:
        plane = tuple(n for a, n in enumerate(mosaic.shape) if a != axis)
        u_ras = np.asarray(displacement[cut]).reshape(plane + (3,)) * np.array([-1.0, -1.0, 1.0])  # ITK's LPS
        index = np.meshgrid(*[np.arange(n, dtype=float) for n in mosaic.shape], indexing="ij")
        return np.einsum("ab,...b->a...", inv[:3, :3], u_ras) + np.stack([x[cut] for x in index])
    return None


def _grid_step(shape):
    """Spacing in voxels of the drawn grid lines: about 16 across the largest axis."""
    return max(2, int(round(max(shape) / 16)))


def _draw_grid(outdir, mosaic, background, deformation_map, displacement):
    """Level lines of ``y``'s in-plane components every :func:`_grid_step` voxels over
    ``background``: MOVING's regular grid pulled back onto FIXED."""
    fig = _figure("grid.png")
    ax = mosaic.axes(fig, [0.0, 0.0, 1.0, 0.92])
    mosaic.label(ax, 0, "")
    step = _grid_step(mosaic.shape)
    cuts = None if background is None else [mosaic.cut(background, a) for a in range(3)]
    lo, hi = (0.0, 1.0) if cuts is None else _grey_range(cuts)
    for axis in range(3):
        if cuts is not None:
            mosaic.show(ax, cuts[axis], axis, 0, cmap="gray", vmin=lo, vmax=hi)
        y = _map_in_voxels(mosaic, deformation_map, displacement, axis)
        x_mm, y_mm = mosaic.centres(axis)
        for b in mosaic.planes[axis] if y is not None else ():
            component = y[b].T  # (n_c, n_b), as the cut
            levels = np.arange(np.ceil(component.min() / step), np.floor(component.max() / step) + 1) * step
            if levels.size:
                ax.contour(x_mm, y_mm, component, levels=levels, colors="C1", linewidths=0.7)
    return _save(fig, outdir, "grid.png")


def _plain_log(ax):
    """A log y axis with plain tick labels (matplotlib's default ones go through mathtext, slow)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _levels(history):
    """Indices in ``history`` where a new continuation level starts: β changes, the
    iteration counter restarts, or a ``"level"`` entry changes."""
    starts = []
    for n in range(1, len(history)):
        prev, cur = history[n - 1], history[n]
        if (cur.get("beta") != prev.get("beta") and not (_isnan(cur.get("beta")) and _isnan(prev.get("beta")))) \
                or cur.get("iteration", 1) <= prev.get("iteration", 0) or cur.get("level") != prev.get("level"):
            starts.append(n)
    return starts


def _isnan(x):
    return isinstance(x, float) and x != x


def _draw_convergence(outdir, history):
    """Left: ``J/J_0``, relative mismatch and ``||g||/||g_0||`` on one log axis; right: PCG
    iterations per step; dashed lines where a continuation level starts."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure("convergence.png")
    axes = fig.subplots(1, 2, squeeze=False, width_ratios=[1.6, 1])[0]
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.17, top=0.9, wspace=0.18)
    steps = np.arange(len(history))
    objective = np.array([h.get("objective", np.nan) for h in history], dtype=float)
    series = [("J / J₀", objective / objective[0] if objective[0] else objective),
              ("relative mismatch", np.array([h.get("mismatch", np.nan) for h in history], dtype=float)),
              ("‖g‖ / ‖g₀‖", np.array([h.get("grad_rel", np.nan) for h in history], dtype=float))]
    positive = True
    for label, values in series:
        axes[0].plot(steps, values, "o-", ms=3, lw=1, label=label)
        positive &= bool(np.all(values[np.isfinite(values)] > 0))
    if positive:
        _plain_log(axes[0])
    axes[0].legend(fontsize=8, frameon=False)
    axes[1].bar(steps, [h.get("krylov_iterations", 0) for h in history], color="C2")
    axes[1].set_title("PCG iterations per step", fontsize=9, y=1.0, pad=3)
    starts = _levels(history)
    for ax in axes:
        for n in starts:
            ax.axvline(n - 0.5, color="0.5", lw=0.8, ls="--")
        ax.set_xlabel("Gauss-Newton iteration" + (" (all levels)" if starts else ""), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
    return _save(fig, outdir, "convergence.png"), starts


def _workload_groups(workload):
    """Seconds of FFT, interpolation, communication and (when ``"total"`` exists) the rest."""
    def seconds(names):
        return sum(float(workload[n].get("seconds", 0.0)) for n in names)

    groups = {"FFT": seconds([n for n in workload if n == "fft"]),
              "interpolation": seconds([n for n in workload if "interp" in n]),
              "communication": seconds([n for n in workload if n in _COMMUNICATION])}
    if "total" in workload:
        groups["other"] = max(0.0, seconds(["total"]) - sum(groups.values()))
    return groups


def _draw_workload(outdir, groups):
    fig = _figure("workload.png")
    ax = fig.subplots()
    fig.subplots_adjust(left=0.22, right=0.95, bottom=0.2, top=0.95)
    names = list(groups)[::-1]
    bars = ax.barh(names, [groups[n] for n in names], color=["C0", "C1", "C2", "C7"][:len(names)][::-1])
    total = sum(groups.values()) or 1.0
    ax.bar_label(bars, [f"{groups[n]:.2f} s ({100 * groups[n] / total:.0f} %)" for n in names], fontsize=8, padding=2)
    ax.set_xlim(0, 1.3 * max(max(groups.values()), 1e-9))
    ax.set_xlabel("seconds", fontsize=9)
    ax.tick_params(labelsize=9)
    return _save(fig, outdir, "workload.png")


def _draw_dice(outdir, dice):
    fig = _figure("dice.png")
    ax = fig.subplots()
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.2, top=0.95)
    x = np.arange(len(dice["labels"]))
    ax.bar(x - 0.2, dice["before"], 0.4, label="before", color="0.6")
    ax.bar(x + 0.2, dice["after"], 0.4, label="after", color="C0")
    ax.set_xticks(x, [str(label) for label in dice["labels"]], fontsize=7, rotation=90 if len(x) > 20 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, outdir, "dice.png")


def _valid_dice(dice):
    """Whether ``dice`` is ``{"labels": [...], "before": [...], "after": [...]}``, one length,
    with numbers before and after."""
    if not isinstance(dice, dict):
        return False
    parts = [dice.get(k) for k in ("labels", "before", "after")]
    if not (all(isinstance(p, list) for p in parts) and len({len(p) for p in parts}) == 1 and parts[0]):
        return False
    try:
        return bool(np.all(np.isfinite(np.asarray(parts[1] + parts[2], dtype=float))))
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- the page


def _img(entry, alt):
    name, width, height = entry
    return f'<img src="{html.escape(name)}" width="{width}" height="{height}" alt="{html.escape(alt)}">'


def _table(rows):
    cell = lambda x: html.escape(str(x), quote=False)  # noqa: E731
    body = "".join(f"<tr><th>{cell(k)}</th><td>{cell(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


_STYLE = ("body{font-family:sans-serif;max-width:72em;margin:1em auto;padding:0 1em;color:#222}"
          "h2{border-bottom:1px solid #ccc;margin-top:1.6em}figure{margin:0.5em 0}"
          "figcaption{font-size:0.9em;color:#444;max-width:60em}img{max-width:100%;height:auto}"
          "table{border-collapse:collapse;font-size:0.9em}th,td{padding:2px 8px;text-align:left;"
          "border-bottom:1px solid #eee}pre{background:#f6f6f6;padding:0.6em;font-size:0.85em;overflow:auto}"
          ".note{color:#a33}")


def _section(title, body):
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _figure_html(entry, alt, caption):
    return f"<figure>{_img(entry, alt)}<figcaption>{caption}</figcaption></figure>"


def _inputs(meta, fixed, moving, notes):
    """FIXED and MOVING as 3-D arrays (or ``None``, with a note saying why): the arrays given,
    else the files named in ``registration.json["inputs"]``."""
    recorded = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
    volumes = {}
    for role, given in (("fixed", fixed), ("moving", moving)):
        source = given if given is not None else recorded.get(role)
        volumes[role] = _as_volume(source)
        if volumes[role] is None:
            if source is None:
                why = "not given, and registration.json names no input file"
            elif isinstance(source, (str, os.PathLike)):
                why = f"{os.fspath(source)} is not a readable 3-D NIfTI image"
            else:
                why = "the array given is not 3-D"
            notes.append(f"{role.upper()} image unavailable ({why}): the panels needing it are left out.")
    return volumes["fixed"], volumes["moving"]


def _summary_section(meta, shape):
    def number(key, fmt):
        value = meta.get(key)
        return f"{value:{fmt}}" if isinstance(value, (int, float)) else "?"

    rows = [("grid", "x".join(map(str, meta.get("grid") or shape or ()))), ("ranks", meta.get("ranks", "?")),
            ("converged", meta.get("converged", "?")), ("stop reason", meta.get("stop_reason", "?")),
            ("beta", number("beta", ".3g")), ("seconds", number("seconds", ".2f"))]
    inputs = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
    rows += [(role, inputs[role]) for role in ("fixed", "moving") if inputs.get(role)]
    return _section("Summary", _table(rows))


def _convergence_section(outdir, history):
    entry, starts = _draw_convergence(outdir, history)
    levels = ""
    if starts:
        betas = ", ".join(f"{history[n].get('beta', float('nan')):.3g}" for n in [0] + starts)
        levels = f" Dashed lines: a new continuation level starts ({len(starts) + 1} levels, β = {betas})."
    pcg = sum(int(h.get("krylov_iterations", 0)) for h in history)
    return _section("Convergence", _figure_html(
        entry, "convergence",
        "Objective J relative to its first value, relative mismatch ‖m(1) − m_R‖/‖m_T − m_R‖ and relative "
        f"gradient ‖g‖/‖g₀‖ (left), PCG iterations per Gauss-Newton step (right); {pcg} PCG iterations in "
        f"all.{levels}"))


def _workload_section(outdir, workload):
    groups = _workload_groups(workload)
    entry = _draw_workload(outdir, groups)
    total = workload.get("total", {}).get("seconds")
    rows = [(name, f"{item.get('count', '?')} calls, {float(item.get('seconds', 0.0)):.3f} s")
            for name, item in sorted(workload.items())]
    total = f" ({float(total):.2f} s)" if total is not None else ""
    return _section("Workload", _figure_html(
        entry, "workload",
        "Seconds in FFTs (fft, which includes the pencil transposes' communication), interpolation (every "
        "entry named *interp*), other communication (halo_exchange, alltoallv, allreduce) and the rest of the "
        f"total{total}, as timed on rank 0. Per operation (nested timers overlap):") + _table(rows))


def write_report(outdir, *, fixed=None, moving=None, slices=None):
    """Draw the report of the finished registration in ``outdir``.

    Parameters
    ----------
    outdir : str or path
        The ``-o`` directory of ``claire register`` (or of :meth:`RegistrationResult.save`).
    fixed, moving : ndarray ``(n1, n2, n3)`` or NIfTI path, optional
        The input images (OUTDIR does not hold them). When not given, the paths in
        ``registration.json["inputs"]`` are read if they exist; otherwise the panels that
        need them are left out, and the page says so.
    slices : tuple of 3 ints, optional
        Index of the slice across each array axis; default the mid-slices ``n // 2``.

    Returns
    -------
    str
        Path of ``outdir/report.html``.

    Raises
    ------
    UserInputError
        ``outdir`` is not a directory, holds no complete ``registration.json``, or
        ``slices`` lies outside the grid.

    Notes
    -----
    One process, no MPI: under ``mpiexec`` call it on rank 0 only. The PNGs (sizes in
    :data:`FIGURE_SIZES` at :data:`DPI`) and ``report.html`` are each written under a
    temporary name and renamed into place. Panels whose files are missing are left out and
    listed at the top of the page. About 1 s for a 128³ registration.

    Examples
    --------
    >>> res = claire_py.register(fixed, moving)            # doctest: +SKIP
    >>> res.save("out")                                     # doctest: +SKIP
    >>> write_report("out", fixed=fixed, moving=moving)     # doctest: +SKIP
    'out/report.html'
    """
    outdir = os.fspath(outdir)
    meta = _load_meta(outdir)
    images = _load_images(outdir, _IMAGE_FILES)
    channels = images["warped"] is not None and images["warped"][0].ndim == 4
    for name in ("warped", "residual_before", "residual_after"):  # multi-channel runs: show channel 0
        if channels and images[name] is not None and images[name][0].ndim == 4:
            images[name] = (_Volume(images[name][0].file, 0), images[name][1])
    if channels:
        fixed, moving = (a[0] if isinstance(a, np.ndarray) and a.ndim == 4 else a for a in (fixed, moving))
    on_grid = next((images[n] for n in ("warped", "det_grad_y", "residual_before") if images[n] is not None), None)
    notes, sections = [], []
    if channels:
        notes.append("Multi-channel images: the panels show channel 0.")
    fixed, moving = _inputs(meta, fixed, moving, notes)
    if on_grid is not None:
        shape, affine = on_grid[0].shape, on_grid[1]
    elif fixed is not None:
        shape, affine = fixed.shape, np.eye(4)
    else:
        shape, affine = None, None
    mosaic = None if shape is None else (lambda rows: _Mosaic(shape, affine, slices, rows))  # layout of `rows` volumes
    if mosaic is not None:
        mosaic(1)  # checks --slices before anything is drawn
    else:
        notes.append("No image of the registration grid in OUTDIR: no image panels.")
    if fixed is not None and shape is not None and fixed.shape != shape:
        notes.append(f"FIXED has shape {fixed.shape}, not the registration grid {shape}: left out.")
        fixed = None
    warped = None if images["warped"] is None else images["warped"][0]
    sections.append(_summary_section(meta, shape))

    if mosaic is not None and not (fixed is None and moving is None and warped is None):
        if moving is not None and moving.shape != shape:
            notes.append("MOVING is on another grid than FIXED: its own mid-slices are shown, stretched.")
        rows = [("fixed", fixed, "FIXED not available"), ("moving", moving, "MOVING not available"),
                ("warped moving", warped, "warped.nii.gz missing")]
        sections.append(_section("Images", _figure_html(
            _draw_slices(outdir, mosaic(3), rows), "fixed, moving and warped slices",
            "FIXED (top), MOVING (middle) and MOVING warped onto FIXED (bottom), slices "
            f"{', '.join(f'{n}={s}' for n, s in zip('ijk', mosaic(1).slices))}; FIXED and MOVING each on its own "
            "grey scale (0.5–99.5 percentiles of the slices shown), the warped image on MOVING's: the bottom row "
            "should look like the top one.")))

    if mosaic is not None and images["residual_before"] is not None and images["residual_after"] is not None:
        before, after = images["residual_before"][0], images["residual_after"][0]
        sections.append(_section("Residuals", _figure_html(
            _draw_residuals(outdir, mosaic(2), before, after), "residuals before and after",
            "Residual |fixed − moving| before (top) and |fixed − warped| after (bottom) registration, on "
            f"intensities normalised to [0, 1], one colour scale. Mean over the volume: "
            f"{_stats(before, mosaic(1).slices)['mean']:.4f} before, "
            f"{_stats(after, mosaic(1).slices)['mean']:.4f} after.")))
    else:
        notes.append("residual_before/after.nii.gz missing: no residual panel.")

    continuation = (meta.get("config") or {}).get("continuation") or {}
    bound = continuation.get("det_bound")
    if mosaic is not None and images["det_grad_y"] is not None:
        det = images["det_grad_y"][0]
        s = _det_summary(det, bound, mosaic(1).slices)
        bound_text = (f"{s['below']:.2f} % of voxels below the bound {bound:g} and {s['above']:.2f} % above "
                      f"1/bound = {1 / bound:.3g} (dashed)" if bound else "no det bound in the configuration")
        sections.append(_section("det(∇y)", _figure_html(
            _draw_det(outdir, mosaic(1), det, bound), "determinant of the deformation gradient",
            "det(∇y) of the pull-back map: blue &lt; 1 &lt; red, colour map centred at 1; right, its "
            f"histogram. <b>det(∇y) min {s['min']:.3f}, max {s['max']:.3f}</b>; {bound_text}; "
            f"{s['folded']:.2f} % ≤ 0 (folding).")))
    else:
        notes.append("det_grad_y.nii.gz missing: no det(∇y) panel.")

    deformation_map = None if images["deformation_map"] is None else images["deformation_map"][0]
    displacement = None
    if deformation_map is None:  # the ITK displacement describes the same map
        loaded = _load_nifti(output_file(outdir, "displacement"), vector=True)
        displacement = None if loaded is None else loaded[0]
    if mosaic is not None and (deformation_map is not None or displacement is not None):
        background = fixed if fixed is not None else warped
        sections.append(_section("Deformation grid", _figure_html(
            _draw_grid(outdir, mosaic(1), background, deformation_map, displacement), "deformation grid",
            f"MOVING's regular grid (a line every {_grid_step(shape)} voxels) pulled back onto "
            f"{'FIXED' if fixed is not None else 'the warped image (FIXED unavailable)'}: the lines are where a "
            "component of y(x) crosses a grid plane; straight, evenly spaced lines mean no deformation.")))
    else:
        notes.append("deformation_map.nii.gz and displacement.nii.gz missing: no deformation grid panel.")

    history = [h for h in meta.get("history") or [] if isinstance(h, dict)]
    if history:
        sections.append(_convergence_section(outdir, history))
    else:
        notes.append("registration.json has no convergence history: no convergence panel.")

    workload = {k: v for k, v in (meta.get("workload") or {}).items() if isinstance(v, dict)}
    if workload:
        sections.append(_workload_section(outdir, workload))

    dice = meta.get("dice")
    if dice is not None and _valid_dice(dice):
        sections.append(_section("Label overlap", _figure_html(
            _draw_dice(outdir, dice), "Dice per label",
            f"Dice per label before (grey) and after (blue) registration; mean {np.mean(dice['before']):.3f} → "
            f"{np.mean(dice['after']):.3f}.")))
    elif dice is not None:
        notes.append('registration.json["dice"] is malformed (needs labels, before and after of one length): '
                     "no Dice panel.")

    config = json.dumps(meta.get("config", {}), indent=2)
    sections.append(_section("Configuration", f"<pre>{html.escape(config, quote=False)}</pre>"))
    sections.append(_section("Versions", _table(sorted((meta.get("versions") or {}).items()))))
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>\n' for n in notes)
    name = html.escape(os.path.basename(os.path.abspath(outdir)))
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>claire_py registration report: {name}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>Registration report: {name}</h1>\n{note_html}{''.join(sections)}</body>\n</html>\n")
    path = os.path.join(outdir, "report.html")
    write_text(path, page)
    return path


def write_batch_report(outdir, rows, swept=()):
    """``OUTDIR/batch_report.html`` and ``batch.png`` for the rows of :func:`claire_py.batch`:
    a table of every job and, against the first swept option's values (job order without a
    sweep), the relative mismatch after registration and, with labels, the mean Dice — one
    line per combination of the other swept options. One process; returns the page's path."""
    import numpy as np

    done = [r for r in rows if r.get("status") == "complete"]
    key = swept[0] if swept else None
    others = list(swept[1:])
    fig = _figure("batch.png")
    metrics = [("mismatch_after", "relative mismatch after")]
    if any(r.get("dice_mean") is not None for r in done):
        metrics.append(("dice_mean", "mean Dice after"))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    values = list(dict.fromkeys(str(r.get(key)) for r in done)) if key else [r["name"] for r in done]
    groups = {}
    for r in done:
        groups.setdefault(tuple(str(r.get(o)) for o in others), []).append(r)
    for ax, (column, label) in zip(axes, metrics):
        for group, members in groups.items():
            xs = [values.index(str(r.get(key)) if key else r["name"]) for r in members]
            ys = [float(r[column]) if r.get(column) is not None else np.nan for r in members]
            name = ", ".join(f"{o}={g}" for o, g in zip(others, group)) or None
            ax.plot(xs, ys, "o-", label=name)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(values, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(key or "job")
        ax.set_ylabel(label)
        if others:
            ax.legend(fontsize=7)
    fig.tight_layout()
    entry = _save(fig, outdir, "batch.png")
    columns = ["name", "status", "seconds", "iterations", "matvecs", "mismatch_after", "det_min", "det_max",
               "dice_mean", "error"] + list(swept)
    cell = lambda x: html.escape("" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x))  # noqa: E731
    table = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows) + "</table>"
    caption = (f"Relative mismatch{' and mean Dice' if len(metrics) > 1 else ''} of the {len(done)} complete "
               f"job(s) against {key or 'the job'}" + (f", one line per {', '.join(others)}" if others else "") + ".")
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>claire_py batch report</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>Batch report: {len(rows)} job(s)</h1>\n" + _section("Results", _figure_html(entry, "batch", caption))
            + _section("Jobs", table) + "</body>\n</html>\n")
    path = os.path.join(outdir, "batch_report.html")
    write_text(path, page)
    return path


# ----------------------------------------------------------------------------- CLI helpers


def add_report_options(parser):
    """Add ``--report``/``--no-report`` and ``--slices I J K`` to ``claire register``.

    ``args.report`` is ``True`` (``--report``), ``False`` (``--no-report``) or ``None``
    (neither given); :func:`report_wanted` resolves ``None`` to "on unless ``--quiet``".
    """
    parser.add_argument("--report", dest="report", action="store_const", const=True, default=None,
                        help="write OUTDIR/report.html with PNGs (default: on, off with --quiet)")
    parser.add_argument("--no-report", dest="report", action="store_const", const=False,
                        help="do not write the report")
    _add_slices(parser)


def _add_slices(parser):
    parser.add_argument("--slices", type=int, nargs=3, metavar=("I", "J", "K"),
                        help="indices of the report's slices across array axes 0, 1, 2 (default: mid-slices)")


def report_wanted(args):
    """Whether ``claire register`` should write the report: ``--report`` / ``--no-report``
    when given, else on unless ``--quiet``."""
    return (not getattr(args, "quiet", False)) if args.report is None else bool(args.report)


def _cmd_report(args):
    """``claire report OUTDIR``: the report drawn on rank 0; errors raised on every rank."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    error, path, failure = None, None, None
    if comm.Get_rank() == 0:
        try:
            path = write_report(args.outdir, slices=args.slices)
        except UserInputError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{args.outdir}: cannot write the report ({exc})"
        except Exception as exc:  # a bug: no rank may stay waiting in the bcast below
            failure = exc
    error, crashed = comm.bcast((error, failure is not None))
    if crashed:
        raise RuntimeError("claire report failed on rank 0") from failure
    if error:
        raise UserInputError(error)
    if comm.Get_rank() == 0:
        print(f"wrote {path}")
    return 0


def add_report_command(subparsers):
    """Register ``claire report OUTDIR [--slices I J K]`` on the ``claire`` subparsers."""
    p = subparsers.add_parser("report", help="draw OUTDIR/report.html for a finished registration",
                              description="Draw OUTDIR/report.html and its PNGs from the files of a finished "
                                          "claire register (FIXED and MOVING are read from the paths it recorded).")
    p.add_argument("outdir", help="the -o directory of a finished claire register")
    _add_slices(p)
    p.set_defaults(run=_cmd_report)
    return p
