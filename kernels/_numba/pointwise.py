"""Pointwise and reduction kernels on local real arrays."""

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel


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


_CHUNK = 1 << 16


@jit_parallel
def _axpy(alpha, x, y):
    n = x.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(c * _CHUNK, min(n, (c + 1) * _CHUNK)):
            y[i] += alpha * x[i]


@jit_parallel
def _heun_factor(d_departure, d, s, h, hh, out):
    n = d.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            a = d_departure[i]
            b = d[i]
            out[i] = 1 + s * h * (a + b) + hh * a * b


@jit_parallel
def _scale_and_accumulate(src, factor, w, grad, lam, body):
    n = lam.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            val = src[i] * factor[i]
            lam[i] = val
            wl = w * val
            body[0, i] += wl * grad[0, i]
            body[1, i] += wl * grad[1, i]
            body[2, i] += wl * grad[2, i]


@jit_parallel
def _accumulate_product(lam, w, grad, body):
    n = lam.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            wl = w * lam[i]
            body[0, i] += wl * grad[0, i]
            body[1, i] += wl * grad[1, i]
            body[2, i] += wl * grad[2, i]


@jit_parallel
def _add_minus_dot(base, c, u, grad, out):
    n = base.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            out[i] = base[i] - c * (u[0, i] * grad[0, i] + u[1, i] * grad[1, i] + u[2, i] * grad[2, i])


@jit_parallel
def _det_identity_plus(g0, g1, g2, h0, h1, h2, out):
    n = out.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            a00 = 1.0 + h0 * np.float64(g0[0, i])
            a01 = h1 * np.float64(g0[1, i])
            a02 = h2 * np.float64(g0[2, i])
            a10 = h0 * np.float64(g1[0, i])
            a11 = 1.0 + h1 * np.float64(g1[1, i])
            a12 = h2 * np.float64(g1[2, i])
            a20 = h0 * np.float64(g2[0, i])
            a21 = h1 * np.float64(g2[1, i])
            a22 = 1.0 + h2 * np.float64(g2[2, i])
            out[i] = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
                      + a02 * (a10 * a21 - a11 * a20))


_TILE = 32


@jit_parallel
def _affine_to_fortran(field, m, l, t, out_t):
    # out_t[a, k, j, i] = t[a] + sum_b m[a, b] field[b, i, j, k] + sum_c l[a, c] (i, j, k)_c: the
    # transpose of a Fortran-ordered (n1, n2, n3, C) array, filled tile by tile (k, i) so that
    # both the C-ordered reads and the transposed writes stay in cache
    cin, n1, n2, n3 = field.shape
    cout = out_t.shape[0]
    for kt in prange((n3 + _TILE - 1) // _TILE):
        k0 = kt * _TILE
        k1 = min(n3, k0 + _TILE)
        for i0 in range(0, n1, _TILE):
            i1 = min(n1, i0 + _TILE)
            for j in range(n2):
                for i in range(i0, i1):
                    for k in range(k0, k1):
                        for a in range(cout):
                            s = t[a] + l[a, 0] * i + l[a, 1] * j + l[a, 2] * k
                            for b in range(cin):
                                s += m[a, b] * np.float64(field[b, i, j, k])
                            out_t[a, k, j, i] = s
