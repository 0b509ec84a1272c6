"""Pointwise and reduction kernels on local real arrays."""

import numpy as np
from numba import prange

from ._jit import jit_parallel


@jit_parallel
def _dot(a, b):
    n = a.size
    chunk = 1 << 16
    nchunks = (n + chunk - 1) // chunk
    partial = np.zeros(nchunks, np.float64)
    for c in prange(nchunks):
        s = 0.0
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            s += np.float64(a[i]) * np.float64(b[i])
        partial[c] = s
    return partial.sum()


def dot(a, b):
    """Local Euclidean inner product ``sum(a * b)`` of two real arrays of equal shape,
    accumulated in float64 (blocked, so float32 fields of 1024^3 points keep ~1e-12
    relative accuracy)."""
    if a.shape != b.shape:
        raise ValueError(f"dot: shapes {a.shape} and {b.shape} differ")
    a = np.ascontiguousarray(a).reshape(-1)
    b = np.ascontiguousarray(b).reshape(-1)
    if a.dtype != b.dtype:
        b = b.astype(a.dtype)
    return float(_dot(a, b))
