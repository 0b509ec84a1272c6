"""Spectral differential operators on distributed fields.

All operators are Fourier multipliers on the distributed r2c transform of a
:class:`~claire_py.kernels.decomposition.Decomposition`; they take and return *local real*
blocks (scalars ``(n1, n2, n3)``, vectors ``(3, n1, n2, n3)``) and reuse the decomposition's
FFTW plans and a few named spectral work arrays.

Conventions (domain ``[0, 2*pi)^3``, integer wavenumbers ``k``):

* **Zero mode.** Inverses of operators whose symbol vanishes at ``k = 0`` (``Delta``,
  the seminorms ``h1s``, ``h2s``, ``h3s``) return the mean-free solution: the zero mode of the
  result is 0. They invert exactly on mean-free fields.
* **Nyquist modes** (``k_a = N_a/2`` on even-sized axes). First-order operators (gradient,
  divergence, the Leray projection and its relaxed form) use ``k_a = 0`` there:
  a real field's Nyquist mode has no representable derivative. Even-order operators
  (Laplacian, regularisation norms, Gaussian smoothing) use the full ``|k|^2`` so they
  stay invertible; hence ``laplacian != divergence(gradient)`` on Nyquist modes only.
  Spectral resampling drops every mode with ``|k_a| >= min(N_src, N_dst)_a / 2``.
"""

from __future__ import annotations

import math

import numpy as np

from ._numba import spectral as _k

__all__ = ["SpectralOperators", "SpectralResampler", "REGULARIZATION_NORMS", "regularization_symbol"]

#: Regularisation operators ``A`` of DESIGN.md section 1, as radial symbols ``s(|k|^2)``.
REGULARIZATION_NORMS = ("h1s", "h2s", "h3s", "h1", "h2", "h3", "l2")


def regularization_symbol(norm, *, beta=1.0, gamma=1e-4):
    """Symbol of the regularisation operator ``beta * A`` of a named norm.

    Parameters
    ----------
    norm : str
        ``h1s`` (``-Delta``), ``h2s`` (``Delta^2``), ``h3s`` (``-Delta^3``), ``h1``, ``h2``,
        ``h3`` (the seminorm plus ``gamma * I``) or ``l2`` (``I``).
    beta, gamma : float
        Regularisation weight, identity weight of the full norms.

    Returns
    -------
    coeffs : tuple of 4 floats
        ``(c0, c1, c2, c3)`` of ``s(q) = c0 + c1 q + c2 q^2 + c3 q^3``, ``q = |k|^2``, per
        velocity component.
    """
    base = {"h1s": (0, 1, 0, 0), "h2s": (0, 0, 1, 0), "h3s": (0, 0, 0, 1),
            "h1": (gamma, 1, 0, 0), "h2": (gamma, 0, 1, 0), "h3": (gamma, 0, 0, 1),
            "l2": (1, 0, 0, 0)}
    if norm not in base:
        raise ValueError(f"unknown regularisation norm {norm!r}; use one of {', '.join(REGULARIZATION_NORMS)}")
    if not beta > 0:
        raise ValueError(f"beta={beta} must be > 0")
    return tuple(beta * c for c in base[norm])


class SpectralOperators:
    """Gradient, divergence, Laplacian, regularisation, Leray projection and smoothing.

    Parameters
    ----------
    decomp : Decomposition
        Owner of the layout and the FFT plans.

    Notes
    -----
    Each call costs one forward transform per input component and one inverse transform per
    output component; the multiplier is applied by a fused numba kernel that also carries the
    ``1/N`` normalisation. Scalar work arrays are allocated once, here.
    """

    def __init__(self, decomp):
        self.decomp = decomp
        rt = decomp.dtype.type
        self.k = tuple(k.astype(rt) for k in decomp.local_wavenumbers())
        self.d = tuple(k.astype(rt) for k in decomp.local_wavenumbers(zero_nyquist=True))
        self._zeros = tuple(np.zeros_like(k) for k in self.k)
        self._scale = 1.0 / decomp.num_points
        self._hat = decomp.new_scalar(spectral=True)
        self._scratch = decomp.spectral_scratch()  # the FFT's own output array (no extra memory)
        self._r2c_weights = None

    # ------------------------------------------------------------ internals
    def _vector_hat(self):
        """A spectral vector work array, made at each use and not kept: three fields that
        would otherwise sit through the Gauss-Newton matvec's transport solves, its peak."""
        return self.decomp.new_vector(spectral=True, zeroed=False)

    def _check(self, f, vector):
        shape = ((3,) if vector else ()) + self.decomp.local_shape
        if f.shape != shape:
            kind = "vector (3, n1, n2, n3)" if vector else "scalar (n1, n2, n3)"
            raise ValueError(f"expected a local {kind} field of shape {shape}, got {f.shape}")

    def _out(self, out, vector):
        if out is None:  # every operator writes all of its output
            return self.decomp.new_vector(zeroed=False) if vector else self.decomp.new_scalar(zeroed=False)
        self._check(out, vector)
        return out

    def _forward(self, f, out):
        """Unnormalised forward transform (the kernels apply ``1/N``)."""
        return self.decomp.forward_unnormalized(f, out)

    def _backward_from(self, kernel, out):
        """Run ``kernel(scratch)`` into a spectral scratch array and transform it back (the
        transform may overwrite the scratch)."""
        kernel(self._scratch)
        return self.decomp.backward_destroying(self._scratch, out)

    def _vector_multiplier(self, v, out, kernel):
        """Transform the three components, apply ``kernel(vhat)`` in place, transform back."""
        out = self._out(out, True)
        vhat = self._vector_hat()
        for a in range(3):
            self._forward(v[a], vhat[a])
        kernel(vhat)
        for a in range(3):
            self.decomp.backward_destroying(vhat[a], out[a])
        return out

    def _each_component(self, f, out, apply):
        """Apply a scalar operator per component when ``f`` is a vector field."""
        if f.ndim == 4:
            for c in range(f.shape[0]):
                apply(f[c], out[c])
        else:
            apply(f, out)
        return out

    # ------------------------------------------------------------ operators
    def gradient(self, f, out=None):
        """``grad f`` of a scalar field: ``(3, n1, n2, n3)``, component ``a`` = ``df/dx_a``."""
        self._check(f, False)
        out = self._out(out, True)
        fhat = self._forward(f, self._hat)
        for a in range(3):
            mult = tuple(self.d[b] if b == a else self._zeros[b] for b in range(3))
            self._backward_from(lambda t: _k.multiply_i_linear(fhat, *mult, self._scale, out=t), out[a])
        return out

    def divergence(self, v, out=None):
        """``div v`` of a vector field."""
        self._check(v, True)
        out = self._out(out, False)
        for a in range(3):  # component by component: no spectral vector field
            fhat = self._forward(v[a], self._hat)
            mult = tuple(self.d[b] if b == a else self._zeros[b] for b in range(3))
            _k.multiply_i_linear(fhat, *mult, self._scale, out=self._scratch, accumulate=a > 0)
        return self.decomp.backward_destroying(self._scratch, out)

    def _radial(self, f, coeffs, invert, out, null=0.0):
        self._check(f, f.ndim == 4)
        out = self._out(out, f.ndim == 4)

        def apply(fc, oc):
            fhat = self._forward(fc, self._hat)
            self._backward_from(lambda t: _k.radial_polynomial(fhat, *self.k, coeffs, self._scale, invert, out=t,
                                                               null=null), oc)

        return self._each_component(f, out, apply)

    def laplacian(self, f, out=None):
        """``Delta f`` (scalar or per component of a vector)."""
        return self._radial(f, (0.0, -1.0, 0.0, 0.0), False, out)

    def inverse_laplacian(self, f, out=None):
        """``Delta^{-1} f`` on the mean-free part; the result has zero mean."""
        return self._radial(f, (0.0, -1.0, 0.0, 0.0), True, out)

    def regularization(self, v, norm="h1s", *, beta=1.0, gamma=1e-4, out=None):
        """``beta A v`` for a velocity field (see :func:`regularization_symbol`)."""
        self._check(v, True)
        return self._radial(v, regularization_symbol(norm, beta=beta, gamma=gamma), False, out)

    def inverse_regularization(self, v, norm="h1s", *, beta=1.0, gamma=1e-4, null=0.0, out=None):
        """``(beta A)^{-1} v``; null-space modes (the zero mode of the seminorms) are multiplied
        by ``null`` (0 by default; CLAIRE's preconditioner uses ``1 / beta``)."""
        self._check(v, True)
        return self._radial(v, regularization_symbol(norm, beta=beta, gamma=gamma), True, out, null)

    def regularization_energy(self, v, norm="h1s", *, beta=1.0, gamma=1e-4, beta_div=0.0):
        """``1/2 <beta A v, v> + beta_div/2 (||grad div v||^2 + ||div v||^2)``, the L2 inner
        products and norms of the box ``[0, 2 pi)^3`` (global, on every rank): by Parseval
        from three forward transforms, where the same from real fields costs 14."""
        self._check(v, True)
        vhat = self._vector_hat()
        for a in range(3):
            self._forward(v[a], vhat[a])
        if self._r2c_weights is None:
            lo, hi = self.decomp.spectral_slice[2].start, self.decomp.spectral_slice[2].stop
            n = self.decomp.shape[2]
            index = np.arange(lo, hi)
            self._r2c_weights = np.where((index == 0) | (2 * index == n), 1.0, 2.0)
        local = _k.regularization_energy(vhat, *self.k, *self.d, self._r2c_weights,
                                         regularization_symbol(norm, beta=beta, gamma=gamma), beta_div)
        cell = math.prod(2 * math.pi / n for n in self.decomp.shape)
        return 0.5 * cell / self.decomp.num_points * self.decomp.allreduce(local)

    def regularization_plus(self, v, b, norm="h1s", *, beta=1.0, gamma=1e-4, leray=None):
        """``beta A v + b`` (``leray=None``), ``K (beta A v + b)`` with ``K`` the Leray projection
        (``leray=0``), or ``beta A v + P b`` with ``P`` its relaxed form (``leray = r > 0``, see
        :meth:`leray`), for velocity-shaped ``v`` and ``b``, written into ``b`` (returned).
        One pass in Fourier space: 9 transforms and no vector temporary, where
        :meth:`regularization` and :meth:`leray` apart need 12 and a vector field."""
        self._check(v, True)
        self._check(b, True)
        coeffs = regularization_symbol(norm, beta=beta, gamma=gamma)
        if leray is None:
            for a in range(3):
                bhat = self._forward(b[a], self._hat)
                vhat = self._forward(v[a], self._scratch)
                _k.radial_axpy(vhat, *self.k, coeffs, self._scale, bhat, self._scale, out=vhat)
                self.decomp.backward_destroying(vhat, b[a])
            return b
        bhat = self._vector_hat()
        for a in range(3):
            self._forward(b[a], bhat[a])
        relaxed = leray > 0
        if relaxed:  # P b, normalised
            _k.leray(bhat, *self.d, self._scale, out=bhat, relaxation=leray)
        for a in range(3):  # + beta A v (normalised), or, for Leray, + N beta A v before projecting
            vhat = self._forward(v[a], self._hat)
            _k.radial_axpy(vhat, *self.k, coeffs, self._scale if relaxed else 1.0, bhat[a], 1.0, out=bhat[a])
        if not relaxed:
            _k.leray(bhat, *self.d, self._scale, out=bhat)
        for a in range(3):
            self.decomp.backward_destroying(bhat[a], b[a])
        return b

    def leray(self, v, out=None, *, relaxation=0.0, invert=False):
        """Leray projection ``K v = v - grad Delta^{-1} div v`` onto divergence-free fields, or
        with ``relaxation = r > 0`` the relaxed projection of CLAIRE's RELAXEDSTOKES model,
        ``v - grad Delta^{-1} M^{-1} div v`` with ``M^{-1} = (r / (1 - Delta) + 1)^{-1}``
        (``r = beta_v / beta_w``): the longitudinal part of ``v`` is scaled by ``1 - M^{-1} =
        r / (r + 1 + |k|^2)``, between 0 (``r -> 0``, Leray) and 1 (``r -> inf``, the
        identity); ``invert`` (``r > 0``) applies its inverse. The zero mode (the mean
        velocity) is kept."""
        self._check(v, True)
        return self._vector_multiplier(
            v, out, lambda vhat: _k.leray(vhat, *self.d, self._scale, out=vhat, relaxation=relaxation, invert=invert))

    def smooth(self, f, sigma, out=None):
        """Gaussian smoothing with standard deviation ``sigma`` in voxels (scalar or one per
        axis), a scalar or per component of a vector field.

        The multiplier is ``exp(-sum_a (sigma_a h_a k_a)^2 / 2)`` with ``h_a = 2 pi / N_a``,
        the periodic Gaussian of width ``sigma_a`` grid cells; ``sigma = 0`` is the identity.
        """
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (3,))
        if np.any(sig < 0) or not np.all(np.isfinite(sig)):
            raise ValueError(f"sigma={sigma} must be finite and >= 0 (voxels)")
        m = tuple(np.exp(-0.5 * (s * h * k) ** 2) for s, h, k in zip(sig, self.decomp.spacing, self.k))
        return self._separable(f, m, out)

    def bspline_prefilter(self, f, out=None):
        """Periodic cubic B-spline coefficients ``c`` of a scalar or vector field, so that
        ``sum_j c_j beta3(x - j) = f(x)`` at the nodes: per axis the multiplier
        ``6 / (4 + 2 cos(2 pi k / N_a))`` (exact, no boundary effects on the torus)."""
        m = tuple(3.0 / (2.0 + np.cos(h * k)) for h, k in zip(self.decomp.spacing, self.k))
        return self._separable(f, m, out)

    def _separable(self, f, m, out):
        """Multiply by the separable real symbol ``m[0][k0] m[1][k1] m[2][k2]``."""
        self._check(f, f.ndim == 4)
        out = self._out(out, f.ndim == 4)

        def apply(fc, oc):
            fhat = self._forward(fc, self._hat)
            self._backward_from(lambda t: _k.separable_multiply(fhat, *m, self._scale, out=t), oc)

        return self._each_component(f, out, apply)


class SpectralResampler:
    """Spectral restriction / prolongation between two grids on the same ranks.

    ``resampler(f)`` maps a local real field of ``src`` to the local real field of ``dst``
    with the same Fourier coefficients on the modes both grids represent, ``|k_a| <
    min(N_src,a, N_dst,a) / 2``, and zero elsewhere (Nyquist modes are dropped). Restriction
    N -> N/2 and prolongation N/2 -> N are the two uses; any pair of shapes works.
    Prolongation followed by restriction is the identity on band-limited coarse fields.

    The routing (which spectral indices go to which rank) is computed once, here, from the
    two decompositions' block tables; each call is one forward transform, one ``Alltoallv``
    and one inverse transform per component.
    """

    def __init__(self, src, dst):
        if not src.same_ranks(dst):
            raise ValueError("resampling needs two decompositions over the same communicator")
        self.src, self.dst = src, dst
        keep = [min(a, b) for a, b in zip(src.shape, dst.shape)]

        def mapped(shape_src, shape_dst, axis, lo, hi):
            """dst global index for each src global index in [lo, hi), or -1 if dropped."""
            idx = np.arange(lo, hi)
            n = shape_src[axis]
            k = idx if axis == 2 else np.where(idx <= (n - 1) // 2, idx, idx - n)
            dst_idx = np.where(k >= 0, k, shape_dst[axis] + k)
            return np.where(2 * np.abs(k) < keep[axis], dst_idx, -1)

        me_src = src._spectral_blocks[src.rank]
        me_dst = dst._spectral_blocks[dst.rank]
        self._send, self._recv = [], []
        for r in range(src.size):
            # what I send to r: my src indices whose dst index falls in r's dst block
            send_idx, recv_idx = [], []
            for a in range(3):
                m = mapped(src.shape, dst.shape, a, *me_src[a])
                lo, hi = dst._spectral_blocks[r][a]
                send_idx.append(np.nonzero((m >= lo) & (m < hi))[0])
                # what r sends me: r's src indices mapped into my dst block, as my local positions
                m = mapped(src.shape, dst.shape, a, *src._spectral_blocks[r][a])
                lo, hi = me_dst[a]
                recv_idx.append(m[(m >= lo) & (m < hi)] - lo)
            self._send.append(np.ix_(*send_idx))
            self._recv.append(np.ix_(*recv_idx))
        self._send_counts = [math.prod(len(i.ravel()) for i in ix) for ix in self._send]
        self._recv_counts = [math.prod(len(i.ravel()) for i in ix) for ix in self._recv]
        self._src_hat = src.new_scalar(spectral=True)
        self._dst_hat = dst.new_scalar(spectral=True)

    def __call__(self, f, out=None):
        """Resample a local real scalar ``(n1, n2, n3)`` or vector ``(3, n1, n2, n3)`` field."""
        vector = f.ndim == 4
        expect = ((3,) if vector else ()) + self.src.local_shape
        if f.shape != expect:
            raise ValueError(f"expected a field of shape {expect} on the source grid, got {f.shape}")
        if out is None:
            out = self.dst.new_vector() if vector else self.dst.new_scalar()
        for fc, oc in (zip(f, out) if vector else [(f, out)]):
            fhat = self.src.forward(fc, self._src_hat)
            send = np.concatenate([fhat[ix].ravel() for ix in self._send]).astype(self.dst.complex_dtype)
            recv = self.src.alltoallv(send, self._send_counts, self._recv_counts)
            self._dst_hat[...] = 0
            offset = 0
            for ix, c in zip(self._recv, self._recv_counts):
                shape = tuple(len(i.ravel()) for i in ix)
                self._dst_hat[ix] = recv[offset:offset + c].reshape(shape)
                offset += c
            self.dst.backward(self._dst_hat, oc)
        return out
