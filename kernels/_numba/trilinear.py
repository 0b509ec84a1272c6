"""Trilinear interpolation of non-periodic volumes at arbitrary points (voxel units).

A point ``q = (q0, q1, q2)`` in voxel (index) coordinates takes the weighted sum of the 8 nodes
``floor(q) .. floor(q) + 1`` of each of ``C`` stacked volumes; a point outside ``[0, n_a - 1]``
on some axis takes the value 0 and is flagged outside (zero padding, as
``scipy.ndimage.map_coordinates(order=1, mode="constant")``).
"""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel


@jit_parallel
def _trilinear(volumes, coords, out, inside):
    # volumes (C, n0, n1, n2); coords (N, 3) float64; out (N, C) float64; inside (N,) uint8
    for p in prange(coords.shape[0]):
        inside[p] = _sample(volumes, coords[p, 0], coords[p, 1], coords[p, 2], out[p])
        if not inside[p]:
            out[p, :] = 0.0


@jit
def _sample(v, q0, q1, q2, out):
    # trilinear values of the C stacked volumes v at (q0, q1, q2) into out[0:C]; False (out
    # untouched) outside
    nc, n0, n1, n2 = v.shape
    if not (0.0 <= q0 <= n0 - 1 and 0.0 <= q1 <= n1 - 1 and 0.0 <= q2 <= n2 - 1):
        return False
    i0 = min(int(math.floor(q0)), n0 - 2) if n0 > 1 else 0
    i1 = min(int(math.floor(q1)), n1 - 2) if n1 > 1 else 0
    i2 = min(int(math.floor(q2)), n2 - 2) if n2 > 1 else 0
    t0, t1, t2 = q0 - i0, q1 - i1, q2 - i2
    j0, j1, j2 = min(i0 + 1, n0 - 1), min(i1 + 1, n1 - 1), min(i2 + 1, n2 - 1)
    for c in range(nc):
        a = (v[c, i0, i1, i2] * (1.0 - t2) + v[c, i0, i1, j2] * t2) * (1.0 - t1) \
            + (v[c, i0, j1, i2] * (1.0 - t2) + v[c, i0, j1, j2] * t2) * t1
        b = (v[c, j0, i1, i2] * (1.0 - t2) + v[c, j0, i1, j2] * t2) * (1.0 - t1) \
            + (v[c, j0, j1, i2] * (1.0 - t2) + v[c, j0, j1, j2] * t2) * t1
        out[c] = a * (1.0 - t0) + b * t0
    return True


@jit
def _jacobian(jac, xp0, xp1, xp2, u0, u1, u2, g0, g1, g2, rigid):
    # d v(T x) / d(parameters) for a field v of world gradient g at T x: rigid (k = 6)
    # [u x g, g] with u = A x, else (k = 12) [g_j x_l (row-major j, l), g]
    if rigid:
        jac[0] = u1 * g2 - u2 * g1
        jac[1] = u2 * g0 - u0 * g2
        jac[2] = u0 * g1 - u1 * g0
        jac[3], jac[4], jac[5] = g0, g1, g2
    else:
        jac[0], jac[1], jac[2] = g0 * xp0, g0 * xp1, g0 * xp2
        jac[3], jac[4], jac[5] = g1 * xp0, g1 * xp1, g1 * xp2
        jac[6], jac[7], jac[8] = g2 * xp0, g2 * xp1, g2 * xp2
        jac[9], jac[10], jac[11] = g0, g1, g2


@jit_parallel
def _affine_sums(volumes, x, f, w, A, b, to_voxel, offset, rigid, out):
    # Per chunk of points (row of out): the weighted sums from which the affine stage's
    # objective and Gauss-Newton system follow for any linear intensity map a m + beta:
    # [sum w, sum w m, sum w f, sum w m m, sum w m f, sum w f f,
    #  sum w J m (k), sum w J (k), sum w J f (k), sum w J J^T (k x k)], where m = moving(T x),
    # T x = A x + b (world), and J = d m / d(parameters): rigid (k = 6) [u x g, g] with u = A x,
    # else (k = 12) [g_j x_l (row-major j, l), g]; g = grad m in world units.
    nchunks = out.shape[0]
    n = x.shape[0]
    k = 6 if rigid else 12
    for c in prange(nchunks):
        row = out[c]
        row[:] = 0.0
        s = np.empty(4)
        jac = np.empty(12)
        for p in range(c * n // nchunks, (c + 1) * n // nchunks):
            u0 = A[0, 0] * x[p, 0] + A[0, 1] * x[p, 1] + A[0, 2] * x[p, 2]
            u1 = A[1, 0] * x[p, 0] + A[1, 1] * x[p, 1] + A[1, 2] * x[p, 2]
            u2 = A[2, 0] * x[p, 0] + A[2, 1] * x[p, 1] + A[2, 2] * x[p, 2]
            y0, y1, y2 = u0 + b[0], u1 + b[1], u2 + b[2]
            q0 = to_voxel[0, 0] * y0 + to_voxel[0, 1] * y1 + to_voxel[0, 2] * y2 + offset[0]
            q1 = to_voxel[1, 0] * y0 + to_voxel[1, 1] * y1 + to_voxel[1, 2] * y2 + offset[1]
            q2 = to_voxel[2, 0] * y0 + to_voxel[2, 1] * y1 + to_voxel[2, 2] * y2 + offset[2]
            if not _sample(volumes, q0, q1, q2, s):
                s[:] = 0.0
            wp, m, fp = w[p], s[0], f[p]
            g0 = s[1] * to_voxel[0, 0] + s[2] * to_voxel[1, 0] + s[3] * to_voxel[2, 0]
            g1 = s[1] * to_voxel[0, 1] + s[2] * to_voxel[1, 1] + s[3] * to_voxel[2, 1]
            g2 = s[1] * to_voxel[0, 2] + s[2] * to_voxel[1, 2] + s[3] * to_voxel[2, 2]
            _jacobian(jac, x[p, 0], x[p, 1], x[p, 2], u0, u1, u2, g0, g1, g2, rigid)
            row[0] += wp
            row[1] += wp * m
            row[2] += wp * fp
            row[3] += wp * m * m
            row[4] += wp * m * fp
            row[5] += wp * fp * fp
            for i in range(k):
                wj = wp * jac[i]
                row[6 + i] += wj * m
                row[6 + k + i] += wj
                row[6 + 2 * k + i] += wj * fp
                base = 6 + 3 * k + i * k
                for j in range(i, k):
                    row[base + j] += wj * jac[j]


@jit
def _cubic_weights(t, w):
    # cubic Lagrange weights of the nodes -1, 0, 1, 2 at t in [0, 1] (as the transport's)
    w[0] = -t * (t - 1.0) * (t - 2.0) / 6.0
    w[1] = (t + 1.0) * (t - 1.0) * (t - 2.0) / 2.0
    w[2] = -(t + 1.0) * t * (t - 2.0) / 2.0
    w[3] = (t + 1.0) * t * (t - 1.0) / 6.0


@jit_parallel
def _resample_affine(volume, matrix, order, out):
    # out[i, j, k] = volume at q = matrix[:, :3] (i, j, k) + matrix[:, 3] (voxels of volume):
    # nearest (order 0, ties up), trilinear (1), or cubic Lagrange (3) with the stencil clamped
    # to the volume; 0 where q lies outside [0, n_a - 1] on some axis
    n0, n1, n2 = volume.shape
    m0, m1, m2 = out.shape
    stack = volume.reshape((1, n0, n1, n2))
    for i in prange(m0):
        value = np.empty(1)
        w0 = np.empty(4)
        w1 = np.empty(4)
        w2 = np.empty(4)
        for j in range(m1):
            for k in range(m2):
                q0 = matrix[0, 0] * i + matrix[0, 1] * j + matrix[0, 2] * k + matrix[0, 3]
                q1 = matrix[1, 0] * i + matrix[1, 1] * j + matrix[1, 2] * k + matrix[1, 3]
                q2 = matrix[2, 0] * i + matrix[2, 1] * j + matrix[2, 2] * k + matrix[2, 3]
                if not (0.0 <= q0 <= n0 - 1 and 0.0 <= q1 <= n1 - 1 and 0.0 <= q2 <= n2 - 1):
                    out[i, j, k] = 0.0
                    continue
                b0 = min(int(math.floor(q0)), n0 - 2) if n0 > 1 else 0
                b1 = min(int(math.floor(q1)), n1 - 2) if n1 > 1 else 0
                b2 = min(int(math.floor(q2)), n2 - 2) if n2 > 1 else 0
                if order == 0:
                    out[i, j, k] = volume[int(math.floor(q0 + 0.5)), int(math.floor(q1 + 0.5)),
                                          int(math.floor(q2 + 0.5))]
                    continue
                t0, t1, t2 = q0 - b0, q1 - b1, q2 - b2
                if order == 1:
                    _sample(stack, q0, q1, q2, value)
                    out[i, j, k] = value[0]
                    continue
                _cubic_weights(t0, w0)
                _cubic_weights(t1, w1)
                _cubic_weights(t2, w2)
                total = 0.0
                for a0 in range(4):
                    s0 = min(max(b0 + a0 - 1, 0), n0 - 1)
                    plane = 0.0
                    for a1 in range(4):
                        s1 = min(max(b1 + a1 - 1, 0), n1 - 1)
                        line = 0.0
                        for a2 in range(4):
                            line += w2[a2] * volume[s0, s1, min(max(b2 + a2 - 1, 0), n2 - 1)]
                        plane += w1[a1] * line
                    total += w0[a0] * plane
                out[i, j, k] = total
