"""Slow serial references for the spectral operators, on *global* arrays with numpy.fft.

Used by the tests (every distributed operator is compared with these) and usable as a
plain-numpy fallback for small serial problems. Independent of the numba kernels and of
``Decomposition.local_wavenumbers``: the wavenumbers here come from ``numpy.fft.fftfreq``.
"""

import numpy as np

from .spectral import regularization_symbol


def _wavenumbers(shape, zero_nyquist):
    ks = []
    for axis, n in enumerate(shape):
        k = np.fft.rfftfreq(n, 1.0 / n) if axis == 2 else np.fft.fftfreq(n, 1.0 / n)
        if zero_nyquist and n % 2 == 0:
            k = np.where(np.abs(k) == n // 2, 0.0, k)
        shp = [1, 1, 1]
        shp[axis] = k.size
        ks.append(k.reshape(shp))
    return ks


def _apply(f, multiplier):
    fhat = np.fft.rfftn(f, axes=(-3, -2, -1))
    return np.fft.irfftn(multiplier * fhat, s=f.shape[-3:], axes=(-3, -2, -1))


def gradient(f):
    d = _wavenumbers(f.shape, True)
    return np.stack([_apply(f, 1j * d[a]) for a in range(3)])


def divergence(v):
    d = _wavenumbers(v.shape[1:], True)
    return sum(_apply(v[a], 1j * d[a]) for a in range(3))


def _q(shape):
    k = _wavenumbers(shape, False)
    return k[0] ** 2 + k[1] ** 2 + k[2] ** 2


def laplacian(f):
    return _apply(f, -_q(f.shape[-3:]))


def inverse_laplacian(f):
    q = _q(f.shape[-3:])
    with np.errstate(divide="ignore"):
        return _apply(f, np.where(q == 0, 0.0, -1.0 / q))


def regularization(v, norm="h1s", *, beta=1.0, gamma=1e-4, invert=False):
    """``beta A v`` (or its pseudo-inverse, 0 on the null space) per component."""
    c0, c1, c2, c3 = regularization_symbol(norm, beta=beta, gamma=gamma)
    q = _q(v.shape[1:])
    s = c0 + c1 * q + c2 * q ** 2 + c3 * q ** 3
    if invert:
        with np.errstate(divide="ignore"):
            s = np.where(s == 0, 0.0, 1.0 / np.where(s == 0, 1.0, s))
    return _apply(v, s)


def leray(v, relaxation=0.0):
    """``v - grad Delta^{-1} m div v``, ``m = 1`` (Leray) or ``(r / (1 + |d|^2) + 1)^{-1}``."""
    shape = v.shape[1:]
    d = np.broadcast_arrays(*_wavenumbers(shape, True))
    dd = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    vhat = np.fft.rfftn(v, axes=(-3, -2, -1))
    m = 1.0 / (relaxation / (1.0 + dd) + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        w = np.where(dd > 0, m * sum(d[a] * vhat[a] for a in range(3)) / dd, 0.0)
    out = np.stack([vhat[a] - w * d[a] for a in range(3)])
    return np.fft.irfftn(out, s=shape, axes=(-3, -2, -1))


def smooth(f, sigma):
    shape = f.shape[-3:]
    sig = np.broadcast_to(np.asarray(sigma, float), (3,))
    k = _wavenumbers(shape, False)
    m = np.exp(-0.5 * sum((sig[a] * 2 * np.pi / shape[a] * k[a]) ** 2 for a in range(3)))
    return _apply(f, m)


def resample(f, shape):
    """Spectral resampling of a global real field onto ``shape`` (modes ``|k_a| <
    min(N_a, M_a)/2`` kept, coefficients normalised by the number of points)."""
    src = f.shape[-3:]
    fhat = np.fft.fftn(f, axes=(-3, -2, -1)) / np.prod(src)
    out = np.zeros(f.shape[:-3] + tuple(shape), complex)
    keep = [min(a, b) for a, b in zip(src, shape)]
    ks = [np.fft.fftfreq(n, 1.0 / n).astype(int) for n in src]
    sel = [np.nonzero(2 * np.abs(k) < m)[0] for k, m in zip(ks, keep)]
    dst = [np.where(ks[a][sel[a]] >= 0, ks[a][sel[a]], shape[a] + ks[a][sel[a]]) for a in range(3)]
    out[(...,) + np.ix_(*dst)] = fhat[(...,) + np.ix_(*sel)]
    return np.real(np.fft.ifftn(out, axes=(-3, -2, -1))) * np.prod(shape)
