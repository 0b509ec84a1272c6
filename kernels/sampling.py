"""Samples of whole (replicated, non-periodic) volumes at arbitrary points: the affine stage's
interpolation.

The deformable solver interpolates distributed periodic fields through
:class:`~claire_py.kernels.interpolation.InterpolationPlan`. The affine stage instead fits 12
numbers on a coarse image pyramid that every rank holds whole (at most a few million voxels);
each rank samples it at its own share of the points. No MPI here.
"""

from __future__ import annotations

import numpy as np

from ._numba import mattes as _mattes
from ._numba import smoothing as _smoothing
from ._numba import trilinear as _trilinear

__all__ = ["trilinear_samples", "affine_sums", "resample_affine", "gaussian_smooth", "mattes_sums"]


def trilinear_samples(volumes, coords):
    """Trilinear interpolation of ``C`` stacked volumes at ``N`` points.

    Parameters
    ----------
    volumes : ndarray ``(C, n0, n1, n2)`` (or ``(n0, n1, n2)``), float32 or float64
        C-contiguous.
    coords : ndarray ``(N, 3)``
        Points in voxel (index) coordinates of the volumes: node ``(i, j, k)`` sits at
        ``(i, j, k)``.

    Returns
    -------
    values : ndarray ``(N, C)`` float64
        Zero where the point lies outside ``[0, n_a - 1]`` on some axis (zero padding).
    inside : ndarray ``(N,)`` bool
    """
    volumes = np.asarray(volumes)
    if volumes.ndim == 3:
        volumes = volumes[None]
    if volumes.ndim != 4 or volumes.dtype not in (np.float32, np.float64):
        raise TypeError("volumes: expected a float32/float64 array (C, n0, n1, n2)")
    coords = np.ascontiguousarray(coords, np.float64)
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords: expected shape (N, 3), got {coords.shape}")
    values = np.empty((coords.shape[0], volumes.shape[0]), np.float64)
    inside = np.empty(coords.shape[0], np.uint8)
    _trilinear._trilinear(np.ascontiguousarray(volumes), coords, values, inside)
    return values, inside.view(bool)


def affine_sums(volumes, x, f, w, A, b, to_voxel, *, rigid, chunks=64):
    """The weighted sums behind the affine stage's objective and Gauss-Newton system, over this
    rank's sample points, in one fused pass (see :mod:`claire_py.solvers.affine`).

    Parameters
    ----------
    volumes : ndarray ``(4, n0, n1, n2)`` float32 or float64
        MOVING ``m`` and its gradient ``d m / d q_a`` along its voxel axes ``q``.
    x : ndarray ``(N, 3)``
        Sample points, world mm relative to the centre of the transform.
    f, w : ndarray ``(N,)``
        FIXED's values and the weights at the points.
    A, b : ndarray ``(3, 3)``, ``(3,)``
        The transform ``T x = A x + b`` (world mm).
    to_voxel : ndarray ``(4, 4)``
        MOVING's world-to-voxel matrix.
    rigid : bool
        Parameters: ``k = 6`` (rotation increment ``w``, translation) or ``k = 12`` (``A``
        row-major, ``b``).

    Returns
    -------
    scalars : ndarray ``(6,)``
        ``sum w``, ``sum w m``, ``sum w f``, ``sum w m^2``, ``sum w m f``, ``sum w f^2``.
    jm, j1, jf : ndarray ``(k,)``
        ``sum w J m``, ``sum w J``, ``sum w J f`` with ``J = d m(T x) / d parameters``.
    jj : ndarray ``(k, k)``
        ``sum w J J^T``.
    """
    volumes = np.ascontiguousarray(volumes)
    if volumes.ndim != 4 or volumes.shape[0] != 4 or volumes.dtype not in (np.float32, np.float64):
        raise TypeError("volumes: expected a float32/float64 array (4, n0, n1, n2)")
    x = np.ascontiguousarray(x, np.float64)
    f, w = (np.ascontiguousarray(a, np.float64) for a in (f, w))
    if x.ndim != 2 or x.shape[1] != 3 or f.shape != (len(x),) or w.shape != (len(x),):
        raise ValueError(f"x (N, 3), f and w (N,): got {x.shape}, {f.shape}, {w.shape}")
    to_voxel = np.asarray(to_voxel, np.float64)
    k = 6 if rigid else 12
    chunks = max(1, min(chunks, len(x)))
    out = np.empty((chunks, 6 + 3 * k + k * k))
    _trilinear._affine_sums(volumes, x, f, w, np.ascontiguousarray(A, np.float64), np.ascontiguousarray(b, np.float64),
                            np.ascontiguousarray(to_voxel[:3, :3]), np.ascontiguousarray(to_voxel[:3, 3]),
                            bool(rigid), out)
    total = out.sum(axis=0) if len(x) else np.zeros(out.shape[1])
    jj = total[6 + 3 * k:].reshape(k, k)
    jj = np.triu(jj) + np.triu(jj, 1).T
    return total[:6], total[6:6 + k], total[6 + k:6 + 2 * k], total[6 + 2 * k:6 + 3 * k], jj


def mattes_sums(volumes, x, f, w, A, b, to_voxel, *, rigid, bins=32, fixed_range, moving_range, chunks=64,
                fixed_window="box", fade=0.0):
    r"""Parzen-window joint histogram of FIXED and ``m(T x)`` over this rank's sample points, and
    its derivative with respect to the parameters of ``T``, in one fused pass: the sums behind
    the affine stage's Mattes mutual information (see :mod:`claire_py.solvers.affine`).

    An intensity ``v`` maps to the bin coordinate ``eta(v) = (v - lo) (bins - 4) / (hi - lo) + 2``
    (``[lo, hi]`` onto ``[2, bins - 2]``, two padding bins at each end, as ITK). With
    ``beta3`` the cubic B-spline,

    .. math::

        H_{il} = \sum_p w_p o_p W_f(i; f_p) \beta_3(l - \eta_m(m_p)), \qquad
        \frac{\partial H_{il}}{\partial \theta_j} = \sum_p w_p W_f(i; f_p) \Big(
        -o_p \beta_3'(l - \eta_m(m_p)) \frac{bins - 4}{hi_m - lo_m} J_{pj}
        + \beta_3(l - \eta_m(m_p)) \frac{\partial o_p}{\partial \theta_j} \Big),

    where ``m_p = m(T x_p)``, ``J = d m(T x) / d theta`` and ``W_f`` is FIXED's window: the box
    ``[i = floor(eta_f)]`` (``fixed_window="box"``, ITK's v4 metric) or ``beta3(i - eta_f)``
    (``"bspline"``, Mattes et al. 2001). Points with ``T x`` outside MOVING contribute nothing
    (``o_p = 0``); inside, ``o_p = 1`` (ITK) when ``fade = 0``, else the product over MOVING's
    axes of a C2 ramp from 0 on its boundary to 1 at ``fade`` voxels inside, so that ``H`` is
    differentiable as points cross the boundary. ``sum_{il} H = count`` and ``sum_{il} dH =
    d count / d theta`` (0 unless points lie within ``fade`` of the boundary).

    Parameters
    ----------
    volumes : ndarray ``(4, n0, n1, n2)`` float32 or float64
        MOVING ``m`` and its gradient ``d m / d q_a`` along its voxel axes ``q``.
    x : ndarray ``(N, 3)``
        Sample points, world mm relative to the centre of the transform.
    f, w : ndarray ``(N,)``
        FIXED's values and the weights (>= 0) at the points.
    A, b : ndarray ``(3, 3)``, ``(3,)``
        The transform ``T x = A x + b`` (world mm).
    to_voxel : ndarray ``(4, 4)``
        MOVING's world-to-voxel matrix.
    rigid : bool
        Parameters: ``k = 6`` (rotation increment ``w`` with ``A <- exp([w]_x) A``,
        translation) or ``k = 12`` (``A`` row-major, ``b``), as :func:`affine_sums`.
    bins : int
        Histogram bins per image (>= 8).
    fixed_range, moving_range : (float, float)
        ``(lo, hi)`` of each image's intensities. Keep ``moving_range`` fixed while optimising
        (e.g. the level's minimum and maximum) so that the histogram is differentiable in
        ``theta``; values outside it are clamped (with zero derivative).
    chunks : int
        Partial sums computed in parallel (threads), then added in a fixed order.
    fixed_window : {"box", "bspline"}
    fade : float
        Width (MOVING voxels) of the boundary ramp; 0: ITK's abrupt cut.

    Returns
    -------
    joint : ndarray ``(bins, bins)`` float64
        ``H[i_fixed, l_moving]``; its total is ``count``.
    djoint : ndarray ``(bins, bins, k)`` float64
        ``d H / d theta``; its sum over the bins is ``d count / d theta``.
    count : float
        ``sum w o`` over the points mapped inside MOVING.
    """
    volumes = np.ascontiguousarray(volumes)
    if volumes.ndim != 4 or volumes.shape[0] != 4 or volumes.dtype not in (np.float32, np.float64):
        raise TypeError("volumes: expected a float32/float64 array (4, n0, n1, n2)")
    x = np.ascontiguousarray(x, np.float64)
    f, w = (np.ascontiguousarray(a, np.float64) for a in (f, w))
    if x.ndim != 2 or x.shape[1] != 3 or f.shape != (len(x),) or w.shape != (len(x),):
        raise ValueError(f"x (N, 3), f and w (N,): got {x.shape}, {f.shape}, {w.shape}")
    if not (isinstance(bins, (int, np.integer)) and bins >= 8):
        raise ValueError(f"bins={bins!r}: an integer >= 8")
    if fixed_window not in ("box", "bspline"):
        raise ValueError(f"fixed_window={fixed_window!r}: use 'box' or 'bspline'")
    if not (np.isfinite(fade) and fade >= 0):
        raise ValueError(f"fade={fade!r}: a width >= 0 (voxels)")
    ranges = []
    for name, rng in (("fixed_range", fixed_range), ("moving_range", moving_range)):
        lo, hi = (float(v) for v in rng)
        if not (np.isfinite(lo) and np.isfinite(hi) and hi >= lo):
            raise ValueError(f"{name}={rng!r}: finite (lo, hi) with hi >= lo")
        ranges.append((lo, (bins - 4) / max(hi - lo, 1e-300) if hi > lo else 0.0))
    to_voxel = np.asarray(to_voxel, np.float64)
    if to_voxel.shape != (4, 4):
        raise ValueError(f"to_voxel: expected a 4 x 4 matrix, got {to_voxel.shape}")
    k = 6 if rigid else 12
    chunks = max(1, min(int(chunks), len(x)))
    joint = np.empty((chunks, bins, bins))
    djoint = np.empty((chunks, bins, bins, k))
    count = np.empty(chunks)
    _mattes._mattes_sums(volumes, x, f, w, np.ascontiguousarray(A, np.float64), np.ascontiguousarray(b, np.float64),
                         np.ascontiguousarray(to_voxel[:3, :3]), np.ascontiguousarray(to_voxel[:3, 3]), bool(rigid),
                         ranges[0][0], ranges[0][1], ranges[1][0], ranges[1][1], 0 if fixed_window == "box" else 3,
                         float(fade), joint, djoint, count)
    if not len(x):
        return np.zeros((bins, bins)), np.zeros((bins, bins, k)), 0.0
    return joint.sum(axis=0), djoint.sum(axis=0), float(count.sum())


def resample_affine(volume, matrix, shape, *, order=3, dtype=np.float32):
    """``volume`` sampled on a grid of ``shape`` through a voxel-to-voxel affine map.

    Parameters
    ----------
    volume : ndarray ``(n0, n1, n2)``
    matrix : ndarray ``(3, 4)`` or ``(4, 4)``
        Output voxel ``(i, j, k)`` takes ``volume`` at ``matrix[:3, :3] (i, j, k) +
        matrix[:3, 3]`` (``volume``'s voxels).
    shape : tuple of 3 int
    order : {0, 1, 3}
        Nearest (ties to the upper node), trilinear, or cubic Lagrange (interpolating, as the
        transport's; no prefilter; the stencil clamped to the volume near its faces).
    dtype : dtype
        Of the result (the arithmetic is float64; an integer ``volume`` with ``order=0`` keeps
        its values exactly with ``dtype=volume.dtype``).

    Returns
    -------
    ndarray ``shape``
        Zero where the point lies outside ``[0, n_a - 1]`` on some axis.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume: expected a 3-D array, got shape {volume.shape}")
    if order not in (0, 1, 3):
        raise ValueError(f"order={order}: 0 (nearest), 1 (trilinear) or 3 (cubic)")
    if volume.dtype not in (np.float32, np.float64):
        volume = volume.astype(np.float64)
    matrix = np.ascontiguousarray(np.asarray(matrix, np.float64)[:3, :4])
    out = np.empty(tuple(int(n) for n in shape), np.float64 if order == 0 else dtype)
    _trilinear._resample_affine(np.ascontiguousarray(volume), matrix, order, out)
    return out.astype(dtype, copy=False)


def gaussian_smooth(volume, sigma, *, truncate=3.0):
    """``volume`` convolved with a Gaussian of ``sigma`` voxels along each axis, continued by its
    edge values beyond its faces: ``scipy.ndimage.gaussian_filter(volume, sigma,
    mode="nearest", truncate=truncate)`` (the kernel normalised to sum 1, radius ``round(truncate
    * sigma)``), float32 or float64 as ``volume``.

    One pass per axis, each over axis 0 of a transposed view (so that the innermost loops run
    along contiguous memory)."""
    volume = np.asarray(volume)
    if volume.ndim != 3 or volume.dtype not in (np.float32, np.float64):
        raise TypeError("volume: expected a 3-D float32/float64 array")
    if not sigma > 0:
        return volume.copy()
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (t / sigma) ** 2)
    weights /= weights.sum()
    out = np.ascontiguousarray(volume)
    for axis in range(3):
        moved = np.ascontiguousarray(np.moveaxis(out, axis, 0))
        result = np.empty_like(moved)
        _smoothing._convolve_axis0(moved, weights.astype(moved.dtype), result)
        out = np.moveaxis(result, 0, axis)
    return np.ascontiguousarray(out)
