"""Point routing arithmetic for interpolation plans: wrap, find the owner, counting sort."""

import math

import numpy as np

from ._jit import jit

__all__ = ["route_points"]


@jit
def _wrap(x, n):
    """``x mod n`` in ``[0, n)``; a branch instead of ``%`` for the common in-range case."""
    if 0.0 <= x < n:
        return x
    y = x - n * math.floor(x / n)
    return y if y < n else 0.0  # -1e-17 mod n rounds to n


@jit
def _route_points(points, n0, n1, n2, starts0, starts1, table, counts, wrapped, order):
    npts = points.shape[1]
    nblocks0, nblocks1 = starts0.size, starts1.size
    owner = np.empty(npts, np.int64)
    for p in range(npts):
        x0 = _wrap(points[0, p], n0)
        x1 = _wrap(points[1, p], n1)
        b0 = 0
        while b0 + 1 < nblocks0 and starts0[b0 + 1] <= x0:
            b0 += 1
        b1 = 0
        while b1 + 1 < nblocks1 and starts1[b1 + 1] <= x1:
            b1 += 1
        r = table[b0, b1]
        owner[p] = r
        counts[r] += 1
    offsets = np.zeros(counts.size, np.int64)
    for r in range(1, counts.size):
        offsets[r] = offsets[r - 1] + counts[r - 1]
    for p in range(npts):
        r = owner[p]
        k = offsets[r]
        offsets[r] = k + 1
        order[k] = p
        wrapped[k, 0] = _wrap(points[0, p], n0)
        wrapped[k, 1] = _wrap(points[1, p], n1)
        wrapped[k, 2] = _wrap(points[2, p], n2)


def route_points(points, shape, starts0, starts1, table):
    """Wrap points into ``[0, N_a)`` and sort them by owner rank (stable counting sort).

    Parameters
    ----------
    points : float64 array ``(3, npts)``
        Grid-unit coordinates, any real values.
    shape : 3 ints
        Global grid.
    starts0, starts1 : int64 arrays
        Sorted first indices of the process-grid blocks along axes 0 and 1.
    table : int64 array ``(len(starts0), len(starts1))``
        Rank owning each block.

    Returns
    -------
    counts : int64 ``(nranks,)``
        Points per owner.
    wrapped : float64 ``(npts, 3)``
        Wrapped points grouped by owner, in their original order within each group.
    order : int64 ``(npts,)``
        ``wrapped[k]`` is point ``order[k]``.
    """
    points = np.ascontiguousarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] != 3:
        raise ValueError(f"points must have shape (3, npts), got {points.shape}")
    npts = points.shape[1]
    counts = np.zeros(int(table.max()) + 1, np.int64)
    wrapped = np.empty((npts, 3), np.float64)
    order = np.empty(npts, np.int64)
    _route_points(points, float(shape[0]), float(shape[1]), float(shape[2]),
                  np.ascontiguousarray(starts0, dtype=np.int64), np.ascontiguousarray(starts1, dtype=np.int64),
                  np.ascontiguousarray(table, dtype=np.int64), counts, wrapped, order)
    return counts, wrapped, order
