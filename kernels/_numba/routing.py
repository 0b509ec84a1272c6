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


@jit
def _coordinate(points, p, axis, node, scale):
    """Coordinate ``axis`` of point ``p`` in float64: ``points[axis, p]`` when ``scale`` is
    None (a branch numba prunes at compile time, so the absolute case stays vectorisable),
    else the global ``node`` index plus ``scale[axis] * points[axis, p]``."""
    if scale is None:
        return np.float64(points[axis, p])
    return node + scale[axis] * np.float64(points[axis, p])


@jit
def _node_of(p, lo, n1, n2):
    """Global node ``(i, j, k)`` of the flat local index ``p`` (block starting at ``lo``)."""
    return lo[0] + p // (n1 * n2), lo[1] + (p // n2) % n1, lo[2] + p % n2


@jit
def _next_node(i, j, k, lo, n1, n2):
    """The node after ``(i, j, k)`` in C order (no divisions in the points loop)."""
    k += 1
    if k == lo[2] + n2:
        k = lo[2]
        j += 1
        if j == lo[1] + n1:
            j = lo[1]
            i += 1
    return i, j, k


@jit_parallel
def _route_points(points, lo, n1, n2, scale, n0g, n1g, n2g, starts0, starts1, table, counts, wrapped,
                  order):
    """Parallel stable counting sort by owner: pass 1 counts per (chunk, owner), a serial
    prefix sum gives every chunk its slice of every destination, pass 2 scatters."""
    npts = points.shape[1]
    nranks = counts.size
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    chunk_counts = np.zeros((nchunks, nranks), np.int64)
    owner = np.empty(npts, np.int32)
    for ch in prange(nchunks):
        i, j, k = _node_of(ch * _CHUNK, lo, n1, n2)
        for p in range(ch * _CHUNK, min(npts, (ch + 1) * _CHUNK)):
            x0 = _wrap(_coordinate(points, p, 0, i, scale), n0g)
            x1 = _wrap(_coordinate(points, p, 1, j, scale), n1g)
            r = table[_block(x0, starts0), _block(x1, starts1)]
            owner[p] = r
            chunk_counts[ch, r] += 1
            i, j, k = _next_node(i, j, k, lo, n1, n2)
    running = 0
    for r in range(nranks):
        for ch in range(nchunks):
            c = chunk_counts[ch, r]
            chunk_counts[ch, r] = running
            running += c
            counts[r] += c
    for ch in prange(nchunks):
        i, j, k = _node_of(ch * _CHUNK, lo, n1, n2)
        for p in range(ch * _CHUNK, min(npts, (ch + 1) * _CHUNK)):
            r = owner[p]
            dest = chunk_counts[ch, r]
            chunk_counts[ch, r] = dest + 1
            order[dest] = p
            wrapped[dest, 0] = _wrap(_coordinate(points, p, 0, i, scale), n0g)
            wrapped[dest, 1] = _wrap(_coordinate(points, p, 1, j, scale), n1g)
            wrapped[dest, 2] = _wrap(_coordinate(points, p, 2, k, scale), n2g)
            i, j, k = _next_node(i, j, k, lo, n1, n2)


def route_points(points, shape, starts0, starts1, table, *, nodes=None, scale=None):
    """Wrap points into ``[0, N_a)`` and sort them by owner rank (stable counting sort).

    Parameters
    ----------
    points : float32 or float64 array ``(3, npts)``
        Grid-unit coordinates, any real values — or, with ``nodes``, displacements of the
        nodes of a local block.
    shape : 3 ints
        Global grid.
    starts0, starts1 : int64 arrays
        Sorted first indices of the process-grid blocks along axes 0 and 1.
    table : int64 array ``(len(starts0), len(starts1))``
        Rank owning each block.
    nodes : ((lo0, lo1, lo2), (n0, n1, n2)), optional
        ``points[:, p]`` displaces node ``p`` (C order) of the block of shape ``(n0, n1, n2)``
        starting at global node ``lo``.
    scale : 3 floats, optional
        With ``nodes``: the displacement is ``scale_a * points[a, p]`` (default 1).

    Returns
    -------
    counts : int64 ``(nranks,)``
        Points per owner.
    wrapped : float64 ``(npts, 3)``
        Wrapped points grouped by owner, in their original order within each group.
    order : int32 (int64 beyond 2^31 points) ``(npts,)``
        ``wrapped[k]`` is point ``order[k]``.
    """
    if points.ndim != 2 or points.shape[0] != 3:
        raise ValueError(f"points must have shape (3, npts), got {points.shape}")
    if points.dtype not in (np.float32, np.float64):
        points = points.astype(np.float64)
    npts = points.shape[1]
    relative = nodes is not None
    lo, (n0, n1, n2) = nodes if relative else ((0, 0, 0), (1, 1, max(npts, 1)))
    if relative and n0 * n1 * n2 != npts:
        raise ValueError(f"nodes: a block of {n0}x{n1}x{n2} nodes for {npts} displacements")
    table = np.ascontiguousarray(table, dtype=np.int64)
    counts = np.zeros(int(table.max()) + 1, np.int64)
    wrapped = np.empty((npts, 3), np.float64)
    order = np.empty(npts, np.int32 if npts < 2 ** 31 else np.int64)
    scale = (np.ones(3) if scale is None else np.asarray(scale, dtype=np.float64)) if relative else None
    _route_points(points, np.asarray(lo, np.int64), int(n1), int(n2), scale, *(float(s) for s in shape),
                  np.ascontiguousarray(starts0, dtype=np.int64), np.ascontiguousarray(starts1, dtype=np.int64),
                  table, counts, wrapped, order)
    return counts, wrapped, order
