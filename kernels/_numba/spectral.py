"""Fourier-multiplier kernels on a local block of r2c spectral coefficients.

Every kernel takes the local spectral block ``(n1, n2, n3c)`` (complex64 or complex128,
C-contiguous) and the local integer wavenumbers of its three axes as 1-D arrays ``k0, k1,
k2`` in the matching real dtype (see ``Decomposition.local_wavenumbers``). ``d0, d1, d2``
denote the wavenumbers with the Nyquist entries zeroed (used for odd-order derivatives).
``scale`` multiplies the result (it carries the ``1/N`` FFT normalisation when the caller
transforms without normalising). ``out`` may alias the input: every kernel is pointwise in
``k``. Kernels never see a communicator; only numbers.
"""

import numpy as np
from numba import prange

from ._jit import jit_parallel

__all__ = ["multiply_i_linear", "radial_polynomial", "radial_axpy", "regularization_energy", "separable_multiply",
           "leray"]


@jit_parallel
def _multiply_i_linear(uhat, a0, a1, a2, iscale, out):
    n0, n1, n2 = uhat.shape
    for i in prange(n0):
        for j in range(n1):
            aij = a0[i] + a1[j]
            for l in range(n2):
                out[i, j, l] = (iscale * (aij + a2[l])) * uhat[i, j, l]


@jit_parallel
def _add_multiply_i_linear(uhat, a0, a1, a2, iscale, out):
    n0, n1, n2 = uhat.shape
    for i in prange(n0):
        for j in range(n1):
            aij = a0[i] + a1[j]
            for l in range(n2):
                out[i, j, l] += (iscale * (aij + a2[l])) * uhat[i, j, l]


@jit_parallel
def _radial_polynomial(uhat, k0, k1, k2, c0, c1, c2, c3, scale, invert, null, out):
    n0, n1, n2 = uhat.shape
    for i in prange(n0):
        for j in range(n1):
            qij = k0[i] * k0[i] + k1[j] * k1[j]
            for l in range(n2):
                q = qij + k2[l] * k2[l]
                s = c0 + q * (c1 + q * (c2 + q * c3))
                if invert:
                    out[i, j, l] = (scale * null if s == 0 else scale / s) * uhat[i, j, l]
                else:
                    out[i, j, l] = (scale * s) * uhat[i, j, l]


@jit_parallel
def _radial_axpy(uhat, k0, k1, k2, c0, c1, c2, c3, scale, w, wscale, out):
    n0, n1, n2 = uhat.shape
    for i in prange(n0):
        for j in range(n1):
            qij = k0[i] * k0[i] + k1[j] * k1[j]
            for l in range(n2):
                q = qij + k2[l] * k2[l]
                s = c0 + q * (c1 + q * (c2 + q * c3))
                out[i, j, l] = (scale * s) * uhat[i, j, l] + wscale * w[i, j, l]


@jit_parallel
def _regularization_energy(v0, v1, v2, k0, k1, k2, d0, d1, d2, w2, c0, c1, c2, c3, bdiv):
    n0, n1, n2 = v0.shape
    partial = np.zeros(n0)
    for i in prange(n0):
        total = 0.0
        for j in range(n1):
            qij = k0[i] * k0[i] + k1[j] * k1[j]
            ddij = d0[i] * d0[i] + d1[j] * d1[j]
            for l in range(n2):
                q = np.float64(qij + k2[l] * k2[l])
                s = c0 + q * (c1 + q * (c2 + q * c3))
                a = v0[i, j, l]
                b = v1[i, j, l]
                c = v2[i, j, l]
                energy = (a.real * a.real + a.imag * a.imag + b.real * b.real + b.imag * b.imag
                          + c.real * c.real + c.imag * c.imag)
                dv = d0[i] * a + d1[j] * b + d2[l] * c
                dd = np.float64(ddij + d2[l] * d2[l])
                total += w2[l] * (s * energy + bdiv * (1.0 + dd) * (dv.real * dv.real + dv.imag * dv.imag))
        partial[i] = total
    return partial.sum()


@jit_parallel
def _separable_multiply(uhat, m0, m1, m2, scale, out):
    n0, n1, n2 = uhat.shape
    for i in prange(n0):
        for j in range(n1):
            mij = scale * m0[i] * m1[j]
            for l in range(n2):
                out[i, j, l] = (mij * m2[l]) * uhat[i, j, l]


@jit_parallel
def _leray(v0, v1, v2, d0, d1, d2, scale, relaxation, invert, o0, o1, o2):
    n0, n1, n2 = v0.shape
    for i in prange(n0):
        for j in range(n1):
            for l in range(n2):
                x0 = v0[i, j, l]
                x1 = v1[i, j, l]
                x2 = v2[i, j, l]
                dd = d0[i] * d0[i] + d1[j] * d1[j] + d2[l] * d2[l]
                if dd > 0:
                    if invert:  # the longitudinal part times 1 / (1 - m) = 1 + (1 + q) / r
                        weight = -(1 + dd) / (relaxation * dd)
                    else:  # the longitudinal part times 1 - m, m = (r / (1 + q) + 1)^-1
                        weight = 1 / (dd * (relaxation / (1 + dd) + 1))
                    w = (d0[i] * x0 + d1[j] * x1 + d2[l] * x2) * weight
                else:
                    w = x0 * 0
                o0[i, j, l] = scale * (x0 - w * d0[i])
                o1[i, j, l] = scale * (x1 - w * d1[j])
                o2[i, j, l] = scale * (x2 - w * d2[l])


# ------------------------------------------------------------------ wrappers
def _check_block(name, arr, shape=None):
    if arr.dtype not in (np.complex64, np.complex128):
        raise TypeError(f"{name}: spectral arrays must be complex64 or complex128, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: spectral arrays must be C-contiguous")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name}: array of shape {arr.shape}, expected {shape}")
    return arr


def _real_of(arr):
    return np.float32 if arr.dtype == np.complex64 else np.float64


def _wavenumbers(uhat, ks, axes=(0, 1, 2)):
    rt = _real_of(uhat)
    out = tuple(np.ascontiguousarray(k, dtype=rt) for k in ks)
    for ax, k in zip(axes, out):
        if k.shape != (uhat.shape[-3 + ax],):
            raise ValueError(f"wavenumbers of length {k.shape[0]} for an axis of length {uhat.shape[-3 + ax]}")
    return out


def _out_like(uhat, out, shape=None):
    shape = uhat.shape if shape is None else shape
    if out is None:
        return np.empty(shape, uhat.dtype)
    return _check_block("out", out, shape)


def multiply_i_linear(uhat, a0, a1, a2, scale=1.0, out=None, accumulate=False):
    """``out = 1j * scale * (a0[i] + a1[j] + a2[l]) * uhat`` (a first derivative along
    ``a`` when two of the three are zero); with ``accumulate``, ``out +=`` instead."""
    _check_block("uhat", uhat)
    a0, a1, a2 = _wavenumbers(uhat, (a0, a1, a2))
    if accumulate and out is None:
        raise ValueError("accumulate=True needs out")
    out = _out_like(uhat, out)
    kernel = _add_multiply_i_linear if accumulate else _multiply_i_linear
    kernel(uhat, a0, a1, a2, uhat.dtype.type(1j * scale), out)
    return out


def radial_polynomial(uhat, k0, k1, k2, coeffs, scale=1.0, invert=False, out=None, null=0.0):
    """Multiply by ``scale * s(|k|^2)`` or, with ``invert``, by ``scale / s(|k|^2)`` where
    ``s(q) = c0 + c1 q + c2 q^2 + c3 q^3``. Modes where ``s == 0`` (the null space, e.g. the
    zero mode of ``-Delta``) map to ``scale * null`` times themselves when inverting (0: the
    pseudo-inverse)."""
    _check_block("uhat", uhat)
    k0, k1, k2 = _wavenumbers(uhat, (k0, k1, k2))
    rt = _real_of(uhat)
    c0, c1, c2, c3 = (rt(c) for c in coeffs)
    out = _out_like(uhat, out)
    _radial_polynomial(uhat, k0, k1, k2, c0, c1, c2, c3, rt(scale), bool(invert), rt(null), out)
    return out


def radial_axpy(uhat, k0, k1, k2, coeffs, scale, w, wscale=1.0, out=None):
    """``out = scale * s(|k|^2) * uhat + wscale * w`` (``s`` as in :func:`radial_polynomial`;
    ``out`` may be ``uhat`` or ``w``): a regularisation operator applied and added to another
    spectral field in one pass."""
    _check_block("uhat", uhat)
    _check_block("w", w, uhat.shape)
    if w.dtype != uhat.dtype:
        raise TypeError(f"w: dtype {w.dtype}, expected {uhat.dtype}")
    k0, k1, k2 = _wavenumbers(uhat, (k0, k1, k2))
    rt = _real_of(uhat)
    c0, c1, c2, c3 = (rt(c) for c in coeffs)
    out = _out_like(uhat, out)
    _radial_axpy(uhat, k0, k1, k2, c0, c1, c2, c3, rt(scale), w, rt(wscale), out)
    return out


def regularization_energy(vhat, k0, k1, k2, d0, d1, d2, w2, coeffs, bdiv=0.0):
    """``sum_k w2[l] (s(|k|^2) |vhat_k|^2 + bdiv (1 + |d|^2) |d . vhat_k|^2)`` over a spectral
    vector block ``(3, n1, n2, n3c)``, accumulated in float64: with the r2c weights ``w2`` (2
    for the modes whose conjugates the half spectrum omits, else 1) and unnormalised
    coefficients, ``N`` times ``sum_x`` of the real fields' pointwise form (Parseval)."""
    _check_block("vhat", vhat)
    if vhat.ndim != 4 or vhat.shape[0] != 3:
        raise ValueError(f"vhat must have shape (3, n1, n2, n3c), got {vhat.shape}")
    k0, k1, k2 = _wavenumbers(vhat[0], (k0, k1, k2))
    d0, d1, d2 = _wavenumbers(vhat[0], (d0, d1, d2))
    w2 = np.ascontiguousarray(w2, dtype=np.float64)
    if w2.shape != (vhat.shape[-1],):
        raise ValueError(f"w2 of length {w2.shape[0]} for an axis of length {vhat.shape[-1]}")
    c0, c1, c2, c3 = (float(c) for c in coeffs)
    return float(_regularization_energy(vhat[0], vhat[1], vhat[2], k0, k1, k2, d0, d1, d2, w2, c0, c1, c2, c3,
                                        float(bdiv)))


def separable_multiply(uhat, m0, m1, m2, scale=1.0, out=None):
    """``out = scale * m0[i] * m1[j] * m2[l] * uhat`` with real 1-D factors (e.g. a
    Gaussian ``exp(-(sigma_a k_a)^2 / 2)`` per axis)."""
    _check_block("uhat", uhat)
    m0, m1, m2 = _wavenumbers(uhat, (m0, m1, m2))
    out = _out_like(uhat, out)
    _separable_multiply(uhat, m0, m1, m2, _real_of(uhat)(scale), out)
    return out


def leray(vhat, d0, d1, d2, scale=1.0, out=None, relaxation=0.0, invert=False):
    """Leray projection ``scale * (I - d d^T / |d|^2) vhat``, or with ``relaxation = r > 0``
    its relaxed form ``scale * (I - m(|d|^2) d d^T / |d|^2) vhat``, ``m(q) = (r / (1 + q) +
    1)^{-1}`` in ``(0, 1)``, and with ``invert`` (``r > 0`` only) the inverse of that, ``scale
    * (I + (1 + |d|^2) / r d d^T / |d|^2) vhat``; modes with ``d = 0`` (zero mode, pure
    Nyquist modes) are kept unchanged."""
    _check_block("vhat", vhat)
    if vhat.ndim != 4 or vhat.shape[0] != 3:
        raise ValueError(f"vhat must have shape (3, n1, n2, n3c), got {vhat.shape}")
    if not (relaxation > 0 if invert else relaxation >= 0):
        raise ValueError(f"relaxation={relaxation} must be {'> 0 to invert' if invert else '>= 0'}")
    d0, d1, d2 = _wavenumbers(vhat[0], (d0, d1, d2))
    out = _out_like(vhat, out)
    rt = _real_of(vhat)
    _leray(vhat[0], vhat[1], vhat[2], d0, d1, d2, rt(scale), rt(relaxation), bool(invert), out[0], out[1], out[2])
    return out
