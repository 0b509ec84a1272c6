"""Parzen-window joint histogram of FIXED and MOVING(T x) and its derivative with respect to the
parameters of ``T`` (Mattes et al. 2001; ITK's ``MattesMutualInformationImageToImageMetricv4``).

Intensities map to continuous bin coordinates ``eta = (v - lo) * scale + 2`` (two padding bins
at each end, ``scale = (bins - 4) / (hi - lo)``, so ``[lo, hi]`` maps onto ``[2, bins - 2]``).
A MOVING value spreads over the bins ``l`` with the cubic B-spline weights ``beta3(l - eta_m)``
(4 bins), a FIXED value either into the single bin ``floor(eta_f)`` (``fixed_order = 0``, ITK's
choice) or over 4 bins with ``beta3(i - eta_f)`` (``fixed_order = 3``, Mattes' paper). Both
windows sum to one over the bins, so the histogram's total is the (weighted) number of samples
whatever ``T``, and, away from MOVING's boundary, its derivative sums to zero.

Points mapped outside MOVING contribute nothing (as ITK). ITK drops them abruptly, which makes
the histogram jump as points cross the boundary; with ``fade > 0`` a point's weight instead
ramps (C2) from 0 on MOVING's boundary to 1 at ``fade`` voxels inside, and the derivative
includes the ramp's, so that the objective is differentiable everywhere.
"""

import math

import numpy as np
from numba import prange

from ._jit import jit, jit_parallel
from .trilinear import _jacobian, _sample


@jit
def _bspline3(t):
    """Cubic B-spline ``beta3(t)`` (support ``|t| < 2``, integral 1)."""
    a = abs(t)
    if a < 1.0:
        return (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    if a < 2.0:
        r = 2.0 - a
        return r * r * r / 6.0
    return 0.0


@jit
def _bspline3_derivative(t):
    """``d beta3 / d t``."""
    a = abs(t)
    if a < 1.0:
        d = -2.0 * a + 1.5 * a * a
    elif a < 2.0:
        r = 2.0 - a
        d = -0.5 * r * r
    else:
        return 0.0
    return d if t >= 0.0 else -d


@jit
def _bin_coordinate(v, lo, scale, nbins):
    # eta = (v - lo) * scale + 2, clamped to [2, nbins - 2]; the first bin of the 4-bin window
    # floor(eta) - 1 with floor(eta) clamped to [2, nbins - 3]; and whether eta was clamped
    eta = (v - lo) * scale + 2.0
    clamped = False
    if eta < 2.0:
        eta, clamped = 2.0, True
    elif eta > nbins - 2.0:
        eta, clamped = nbins - 2.0, True
    first = min(max(int(math.floor(eta)), 2), nbins - 3) - 1
    return eta, first, clamped


@jit
def _ramp(t):
    """``0`` for ``t <= 0``, ``1`` for ``t >= 1``, ``6 t^5 - 15 t^4 + 10 t^3`` between (C2)."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return 1.0
    return t * t * t * (10.0 + t * (-15.0 + 6.0 * t))


@jit
def _ramp_derivative(t):
    if t <= 0.0 or t >= 1.0:
        return 0.0
    r = t * (1.0 - t)
    return 30.0 * r * r


@jit
def _boundary_weight(q, n, fade):
    # weight ramp(d / fade) of a point at voxel coordinate q on an axis of n nodes, d its
    # distance to the nearer end of [0, n - 1], and d weight / d q
    if n < 2 or fade <= 0.0:
        return 1.0, 0.0
    lo, hi = q, n - 1.0 - q
    if lo <= hi:
        return _ramp(lo / fade), _ramp_derivative(lo / fade) / fade
    return _ramp(hi / fade), -_ramp_derivative(hi / fade) / fade


@jit_parallel
def _mattes_sums(volumes, x, f, w, A, b, to_voxel, offset, rigid, fixed_lo, fixed_scale, moving_lo,
                 moving_scale, fixed_order, fade, joint, djoint, count):
    # Per chunk of points (first axis of joint (C, nb, nb), djoint (C, nb, nb, k), count (C,)):
    #   joint[i, l]     += w o Wf(i) beta3(l - eta_m)
    #   djoint[i, l, :] += w Wf(i) (o (-beta3'(l - eta_m)) moving_scale J + beta3(l - eta_m) Jo)
    #   count           += w o
    # over the points whose T x lies inside MOVING (the others contribute nothing), with
    # m = moving(T x), T x = A x + b (world), eta_m = (m - moving_lo) moving_scale + 2, Wf the
    # FIXED window (box or cubic B-spline), J = d m / d(parameters) from MOVING's gradient
    # volumes g (world units), and o the boundary weight: the product over the axes of
    # ramp(distance to MOVING's nearer face / fade) (1 everywhere when fade <= 0), Jo its
    # derivative. A clamped eta_m (m outside the moving range) has zero derivative.
    nchunks, nb = joint.shape[0], joint.shape[1]
    n = x.shape[0]
    nq0, nq1, nq2 = volumes.shape[1], volumes.shape[2], volumes.shape[3]
    k = 6 if rigid else 12
    for c in prange(nchunks):
        H = joint[c]
        dH = djoint[c]
        H[:] = 0.0
        dH[:] = 0.0
        total = 0.0
        s = np.empty(4)
        jac = np.empty(12)
        jaco = np.zeros(12)
        wf = np.empty(4)
        wm = np.empty(4)
        dwm = np.empty(4)
        for p in range(c * n // nchunks, (c + 1) * n // nchunks):
            wp = w[p]
            if wp == 0.0:
                continue
            xp0, xp1, xp2 = x[p, 0], x[p, 1], x[p, 2]
            u0 = A[0, 0] * xp0 + A[0, 1] * xp1 + A[0, 2] * xp2
            u1 = A[1, 0] * xp0 + A[1, 1] * xp1 + A[1, 2] * xp2
            u2 = A[2, 0] * xp0 + A[2, 1] * xp1 + A[2, 2] * xp2
            y0, y1, y2 = u0 + b[0], u1 + b[1], u2 + b[2]
            q0 = to_voxel[0, 0] * y0 + to_voxel[0, 1] * y1 + to_voxel[0, 2] * y2 + offset[0]
            q1 = to_voxel[1, 0] * y0 + to_voxel[1, 1] * y1 + to_voxel[1, 2] * y2 + offset[1]
            q2 = to_voxel[2, 0] * y0 + to_voxel[2, 1] * y1 + to_voxel[2, 2] * y2 + offset[2]
            if not _sample(volumes, q0, q1, q2, s):
                continue
            o0, d0 = _boundary_weight(q0, nq0, fade)
            o1, d1 = _boundary_weight(q1, nq1, fade)
            o2, d2 = _boundary_weight(q2, nq2, fade)
            o = o0 * o1 * o2
            if o == 0.0:  # on the boundary: the ramp and its derivative vanish
                continue
            g0 = s[1] * to_voxel[0, 0] + s[2] * to_voxel[1, 0] + s[3] * to_voxel[2, 0]
            g1 = s[1] * to_voxel[0, 1] + s[2] * to_voxel[1, 1] + s[3] * to_voxel[2, 1]
            g2 = s[1] * to_voxel[0, 2] + s[2] * to_voxel[1, 2] + s[3] * to_voxel[2, 2]
            _jacobian(jac, xp0, xp1, xp2, u0, u1, u2, g0, g1, g2, rigid)
            faded = o < 1.0
            if faded:  # the boundary weight's gradient, voxel -> world
                e0, e1, e2 = d0 * o1 * o2, o0 * d1 * o2, o0 * o1 * d2
                h0 = e0 * to_voxel[0, 0] + e1 * to_voxel[1, 0] + e2 * to_voxel[2, 0]
                h1 = e0 * to_voxel[0, 1] + e1 * to_voxel[1, 1] + e2 * to_voxel[2, 1]
                h2 = e0 * to_voxel[0, 2] + e1 * to_voxel[1, 2] + e2 * to_voxel[2, 2]
                _jacobian(jaco, xp0, xp1, xp2, u0, u1, u2, h0, h1, h2, rigid)
            # FIXED's window
            eta_f, fi, _ = _bin_coordinate(f[p], fixed_lo, fixed_scale, nb)
            if fixed_order == 0:
                nf = 1
                fi = min(max(int(math.floor(eta_f)), 2), nb - 3)
                wf[0] = wp
            else:
                nf = 4
                for a in range(4):
                    wf[a] = wp * _bspline3(fi + a - eta_f)
            # MOVING's window and its derivative with respect to m
            eta_m, mi, clamped = _bin_coordinate(s[0], moving_lo, moving_scale, nb)
            for a in range(4):
                t = mi + a - eta_m
                wm[a] = _bspline3(t)
                dwm[a] = 0.0 if clamped else -_bspline3_derivative(t) * moving_scale
            for af in range(nf):
                i = fi + af
                for am in range(4):
                    l = mi + am
                    H[i, l] += wf[af] * o * wm[am]
                    d = wf[af] * o * dwm[am]
                    if faded:
                        e = wf[af] * wm[am]
                        for j in range(k):
                            dH[i, l, j] += d * jac[j] + e * jaco[j]
                    else:
                        for j in range(k):
                            dH[i, l, j] += d * jac[j]
            total += wp * o
        count[c] = total
