"""Image distances and their derivatives with respect to the deformed image ``m(1)``.

The optimiser needs three things from a distance ``D(m1)`` (DESIGN.md section 1):

* its value;
* the adjoint's final condition ``lam(1) = -dD/dm1`` (the L2 Riesz representative);
* the Gauss-Newton final condition of the incremental adjoint, ``lt(1) = -D''(m1) mt(1)``
  with ``D''`` the (Gauss-Newton approximation of the) second derivative, symmetric positive
  semidefinite.

An optional mask ``w(x)`` in ``[0, 1]`` weights every inner product: ``<a, b>_w = <w a, b>``.
Inner products are the L2 ones of the box (grid sum times cell volume, via ``inner``).

* ``l2``: ``D = 1/2 ||m1 - mR||_w^2``; ``lam(1) = w (mR - m1)``, ``lt(1) = -w mt``.
* ``ncc``: normalised cross-correlation, scaled so that its size matches ``l2``'s:
  ``D = 1/2 ||b||^2 (1 - rho^2) = 1/2 min_{alpha, c} ||alpha m1 + c - mR||_w^2`` with
  ``a = m1 - mean_w(m1)``, ``b = mR - mean_w(mR)``, ``rho = <a, b> / (||a|| ||b||)``: the L2
  distance after the best affine intensity fit. With ``alpha = <a, b> / <a, a>``,
  ``lam(1) = w alpha (b - alpha a)`` and ``lt(1) = -w alpha^2 Q mt``, ``Q`` the
  ``w``-orthogonal projection onto the complement of ``span{1, a}`` (variable projection's
  Gauss-Newton term). ``D = 0`` exactly when ``m1`` is an affine function of ``mR``.
* ``lncc``: local normalised cross-correlation in a Gaussian window ``G`` of ``sigma`` voxels
  (``G * f`` the periodic Gaussian smoothing of the spectral operators). With ``I = m1``,
  ``J = mR``, the local moments ``A = G*(IJ) - G*I G*J`` (covariance), ``B = G*(I^2) - (G*I)^2 +
  eps`` and ``C = G*(J^2) - (G*J)^2`` (variances), and the local correlation
  ``rho^2 = A^2 / (B C)``,
  ``D = 1/2 int u (C - A^2 / B) = 1/2 int w V C / (C + eps) (1 - rho^2)``, the window weight
  ``u = w V / (C + eps)`` fixed by ``mR`` (``V`` its variance over the mask, ``eps = 1e-3 V``).
  Each window's ``C - A^2/B`` is ``min_{alpha, c} G*(alpha I + c - J)^2`` at ``x``: the L2
  residual after the best *local* affine intensity fit, so a smooth bias field or a shift of
  intensities costs (nearly) nothing; ``u`` gives every window the weight ``V`` whatever its
  contrast (as ANTs' and DIPY's CC do), fading windows where ``mR`` is flat (``C << eps``). As
  ``sigma`` grows the windows become the whole box and ``lncc`` becomes ``ncc`` (to ``eps/V``).
  With ``alpha = A / B``, ``p = u alpha`` and ``q = u alpha^2 / 2``,
  ``lam(1) = J G*p - G*(p G*J) - 2 I G*q + 2 G*(q G*I)`` (``-dD/dI``; ``G`` is self-adjoint;
  3 smoothings, 3 more in ``prepare``),
  and the Gauss-Newton term of variable projection, window by window,
  ``lt(1) = -(mt G*u2 - G*(u2 G*mt) - I G*r + G*(r G*I))``, ``u2 = u alpha^2``,
  ``r = u2 (G*(mt I) - G*mt G*I) / B`` (4 smoothings per matvec): the second variation of
  ``1/2 int u2 (G*(mt^2) - (G*mt)^2 - (G*(mt I) - G*mt G*I)^2 / B)``, a weighted sum of squared
  projections, hence symmetric positive semidefinite and exact at a zero residual (up to the
  ridge ``eps`` in ``B``, which keeps flat windows of ``m1`` finite).
"""

from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "make_distance", "SquaredL2", "NormalizedCrossCorrelation",
           "LocalNormalizedCrossCorrelation"]

DISTANCES = ("l2", "ncc", "lncc")


class SquaredL2:
    """``D = 1/2 ||m1 - mR||_w^2`` (see the module docstring)."""

    def __init__(self, fixed, inner, mask=None):
        self.fixed, self.inner, self.mask = fixed, inner, mask
        self._m1, self._value = None, None

    def _w(self, a):
        return a if self.mask is None else self.mask * a

    def prepare(self, m1):
        """Store what the value and derivatives at ``m1`` need: ``m1`` itself (the state
        holds it anyway) and the value; the residual is formed again when the adjoint needs it,
        so that it is not held through the Gauss-Newton matvecs."""
        residual = m1 - self.fixed
        self._m1, self._value = m1, 0.5 * self.inner(self._w(residual), residual)

    def value(self):
        return self._value

    def final_adjoint(self):
        residual = self.fixed - self._m1
        return residual if self.mask is None else self.mask * residual

    def final_incremental_adjoint(self, mt1):
        return -self._w(mt1)


class NormalizedCrossCorrelation:
    """Normalised cross-correlation as a distance (see the module docstring)."""

    def __init__(self, fixed, inner, mask=None):
        self.inner, self.mask = inner, mask
        self._ones_weight = self.inner(self._w(np.ones_like(fixed)), np.ones_like(fixed))
        self._b = self._centered(fixed)
        self._bb = self.inner(self._w(self._b), self._b)
        if not self._bb > 0:
            raise ValueError("ncc: the fixed image is constant (inside the mask); nothing to correlate")

    def _w(self, a):
        return a if self.mask is None else self.mask * a

    def _centered(self, a):
        ones = np.ones_like(a)
        return a - self.inner(self._w(a), ones) / self._ones_weight

    def prepare(self, m1):
        a = self._centered(m1)
        aa = self.inner(self._w(a), a)
        self._a, self._aa = a, max(aa, 1e-300)
        self._alpha = self.inner(self._w(a), self._b) / self._aa

    def value(self):
        ab = self._alpha * self._aa
        return 0.5 * max(self._bb - ab * ab / self._aa, 0.0)

    @property
    def correlation(self):
        """``rho``, the correlation coefficient of ``m1`` and ``mR`` (weighted by the mask)."""
        return self._alpha * np.sqrt(self._aa / self._bb)

    def final_adjoint(self):
        return self._w(self._alpha * (self._b - self._alpha * self._a))

    def final_incremental_adjoint(self, mt1):
        q = self._centered(mt1)
        q -= (self.inner(self._w(self._a), q) / self._aa) * self._a
        return -(self._alpha ** 2) * self._w(q)


class LocalNormalizedCrossCorrelation:
    """Local normalised cross-correlation in a Gaussian window (see the module docstring).

    Parameters
    ----------
    fixed : ndarray
        The local block of ``mR``.
    inner : callable
        The L2 inner product of two local blocks (collective).
    mask : ndarray, optional
        ``w``, weighting the integral over the windows' centres.
    sigma : float
        Standard deviation of the window in voxels.
    smooth : callable
        ``smooth(f, sigma)``, the (distributed, periodic) Gaussian smoothing of a local block.
    """

    #: ``eps / V``: windows whose variance is below this fraction of the image's fade out
    RELATIVE_EPSILON = 1e-3

    def __init__(self, fixed, inner, mask=None, *, sigma, smooth):
        self.inner, self.mask = inner, mask
        self._g = lambda f: smooth(f, sigma)
        ones = np.ones_like(fixed)
        weight = inner(self._w(ones), ones)
        centered = fixed - inner(self._w(fixed), ones) / weight
        variance = inner(self._w(centered), centered) / weight
        if not variance > 0:
            raise ValueError("lncc: the fixed image is constant (inside the mask); nothing to correlate")
        self._eps = self.RELATIVE_EPSILON * variance
        self._fixed = fixed
        self._mean_fixed = self._g(fixed)
        self._var_fixed = np.maximum(self._g(fixed * fixed) - self._mean_fixed ** 2, 0.0)
        self._u = self._w(variance / (self._var_fixed + self._eps))

    def _w(self, a):
        return a if self.mask is None else self.mask * a

    def prepare(self, m1):
        g = self._g
        mean = g(m1)
        covariance = g(m1 * self._fixed) - mean * self._mean_fixed
        inv_variance = 1.0 / (np.maximum(g(m1 * m1) - mean ** 2, 0.0) + self._eps)
        alpha = covariance * inv_variance
        self._m1, self._mean, self._alpha, self._inv_variance = m1, mean, alpha, inv_variance
        self._value = 0.5 * self.inner(self._u, self._var_fixed - alpha * covariance)
        self._u2 = self._g_u2 = None

    def value(self):
        return max(self._value, 0.0)

    def final_adjoint(self):
        g = self._g
        p = self._u * self._alpha
        q = 0.5 * p * self._alpha
        # G is linear: the two terms G*(p G*J) and G*(q G*I) share one smoothing
        return self._fixed * g(p) - 2.0 * self._m1 * g(q) + g(2.0 * q * self._mean - p * self._mean_fixed)

    def final_incremental_adjoint(self, mt1):
        g = self._g
        if self._u2 is None:  # once per point of linearisation
            self._u2 = self._u * self._alpha ** 2
            self._g_u2 = g(self._u2)
        u2 = self._u2
        s = g(mt1)
        r = u2 * (g(mt1 * self._m1) - s * self._mean) * self._inv_variance
        return self._m1 * g(r) - mt1 * self._g_u2 + g(u2 * s - r * self._mean)  # 4 smoothings


def make_distance(name, fixed, inner, mask=None, *, sigma=None, smooth=None):
    """The distance ``name`` (one of :data:`DISTANCES`) to the local block ``fixed``; ``lncc``
    needs its window ``sigma`` (voxels) and the grid's Gaussian ``smooth(f, sigma)``."""
    if name == "l2":
        return SquaredL2(fixed, inner, mask)
    if name == "ncc":
        return NormalizedCrossCorrelation(fixed, inner, mask)
    if name == "lncc":
        if sigma is None or smooth is None:
            raise ValueError("lncc needs the window's sigma and the grid's Gaussian smoothing")
        return LocalNormalizedCrossCorrelation(fixed, inner, mask, sigma=sigma, smooth=smooth)
    raise ValueError(f"distance {name!r} is unknown; use one of {', '.join(DISTANCES)}")
