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
def _times_one_plus(a, d, c, one, out):
    n = a.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            out[i] = a[i] * (one + c * d[i])


@jit_parallel
def _damp_and_accumulate(lam, d, c, one, w, grad, body):
    n = lam.size
    for k in prange((n + _CHUNK - 1) // _CHUNK):
        for i in range(k * _CHUNK, min(n, (k + 1) * _CHUNK)):
            val = lam[i] / (one - c * d[i])
            lam[i] = val
            wl = w * val
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


@jit
def _fd4(mpad, a, i, j, k, s1, s8):
    """4th-order central difference of the padded ``mpad`` along axis ``a`` at padded index
    ``(i, j, k)``: ``s1 (m[-2] - m[+2]) + s8 (m[+1] - m[-1])`` with ``s1 = 1/(12 h)``,
    ``s8 = 8/(12 h)``."""
    if a == 0:
        return s1 * (mpad[i - 2, j, k] - mpad[i + 2, j, k]) + s8 * (mpad[i + 1, j, k] - mpad[i - 1, j, k])
    if a == 1:
        return s1 * (mpad[i, j - 2, k] - mpad[i, j + 2, k]) + s8 * (mpad[i, j + 1, k] - mpad[i, j - 1, k])
    return s1 * (mpad[i, j, k - 2] - mpad[i, j, k + 2]) + s8 * (mpad[i, j, k + 1] - mpad[i, j, k - 1])


@jit_parallel
def _minus_dot_fd_added(base, c, u, mpad, g, s1, s8, out):
    n0, n1, n2 = out.shape
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                dot = (u[0, i, j, k] * _fd4(mpad, 0, i + g, j + g, k + g, s1[0], s8[0])
                       + u[1, i, j, k] * _fd4(mpad, 1, i + g, j + g, k + g, s1[1], s8[1])
                       + u[2, i, j, k] * _fd4(mpad, 2, i + g, j + g, k + g, s1[2], s8[2]))
                out[i, j, k] = base[i, j, k] - c * dot


@jit_parallel
def _damp_and_accumulate_fd(lam, d, c, one, w, mpad, g, s1, s8, body):
    n0, n1, n2 = lam.shape
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                val = lam[i, j, k] / (one - c * d[i, j, k])
                lam[i, j, k] = val
                wl = w * val
                body[0, i, j, k] += wl * _fd4(mpad, 0, i + g, j + g, k + g, s1[0], s8[0])
                body[1, i, j, k] += wl * _fd4(mpad, 1, i + g, j + g, k + g, s1[1], s8[1])
                body[2, i, j, k] += wl * _fd4(mpad, 2, i + g, j + g, k + g, s1[2], s8[2])
