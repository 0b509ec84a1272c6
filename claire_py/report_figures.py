"""The report's drawing: one PNG per figure, with matplotlib's Agg canvas, each written under
a temporary name and renamed into place."""

from __future__ import annotations

import os

import numpy as np

from .report_volumes import _grey_range, _stats

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

_COMMUNICATION = ("halo_exchange", "alltoallv", "allreduce")


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
    """A log y axis with plain tick labels at the decades and no minor ticks (matplotlib's
    default labels go through mathtext, and its minor ticks, eight per decade, each a few
    artists, took 0.3 s of the report's 1 s)."""
    from matplotlib.ticker import FuncFormatter, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


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
