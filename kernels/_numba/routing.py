"""Point routing arithmetic for interpolation plans: wrap, find the owner, counting sort."""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel

__all__ = ["route_points"]

#: Points per parallel work item: each thread owns whole chunks, so that the counting sort
#: stays stable (chunks keep their order within every destination).
_CHUNK = 65536


@jit
def _wrap(x, n):
    """``x mod n`` in ``[0, n)``; a branch instead of ``%`` for the common in-range case."""
    if 0.0 <= x < n:
        return x
    y = x - n * math.floor(x / n)
    return y if y < n else 0.0  # -1e-17 mod n rounds to n


@jit
def _block(x, starts):
    b = 0
    while b + 1 < starts.size and starts[b + 1] <= x:
        b += 1
    return b


@jit_parallel
def _route_points(points, n0, n1, n2, starts0, starts1, table, counts, wrapped, order):
    """Parallel stable counting sort by owner: pass 1 counts per (chunk, owner), a serial
    prefix sum gives every chunk its slice of every destination, pass 2 scatters."""
    npts = points.shape[1]
    nranks = counts.size
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    chunk_counts = np.zeros((nchunks, nranks), np.int64)
    owner = np.empty(npts, np.int32)
    for ch in prange(nchunks):
        for p in range(ch * _CHUNK, min(npts, (ch + 1) * _CHUNK)):
            r = table[_block(_wrap(points[0, p], n0), starts0), _block(_wrap(points[1, p], n1), starts1)]
            owner[p] = r
            chunk_counts[ch, r] += 1
    running = 0
    for r in range(nranks):
        for ch in range(nchunks):
            k = chunk_counts[ch, r]
            chunk_counts[ch, r] = running
            running += k
            counts[r] += k
    for ch in prange(nchunks):
        for p in range(ch * _CHUNK, min(npts, (ch + 1) * _CHUNK)):
            r = owner[p]
            k = chunk_counts[ch, r]
            chunk_counts[ch, r] = k + 1
            order[k] = p
            wrapped[k, 0] = _wrap(points[0, p], n0)
            wrapped[k, 1] = _wrap(points[1, p], n1)
            wrapped[k, 2] = _wrap(points[2, p], n2)


@jit_parallel
def _wrap_all(points, n0, n1, n2, wrapped):
    """One owner: the counting sort is the identity, only wrap (and transpose)."""
    npts = points.shape[1]
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    for ch in prange(nchunks):
        for p in range(ch * _CHUNK, min(npts, (ch + 1) * _CHUNK)):
            wrapped[p, 0] = _wrap(points[0, p], n0)
            wrapped[p, 1] = _wrap(points[1, p], n1)
            wrapped[p, 2] = _wrap(points[2, p], n2)


def route_points(points, shape, starts0, starts1, table, *, with_order=True):
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
    with_order : bool
        With a single owner the sort is the identity; ``False`` then returns ``order = None``
        instead of ``arange(npts)``.

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
    table = np.ascontiguousarray(table, dtype=np.int64)
    counts = np.zeros(int(table.max()) + 1, np.int64)
    wrapped = np.empty((npts, 3), np.float64)
    n0, n1, n2 = (float(s) for s in shape)
    if table.size == 1:
        counts[table.flat[0]] = npts
        _wrap_all(points, n0, n1, n2, wrapped)
        return counts, wrapped, (np.arange(npts, dtype=np.int64) if with_order else None)
    order = np.empty(npts, np.int64)
    _route_points(points, n0, n1, n2, np.ascontiguousarray(starts0, dtype=np.int64),
                  np.ascontiguousarray(starts1, dtype=np.int64), table, counts, wrapped, order)
    return counts, wrapped, order
