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
"""

from __future__ import annotations

import numpy as np

__all__ = ["DISTANCES", "make_distance", "SquaredL2", "NormalizedCrossCorrelation"]

DISTANCES = ("l2", "ncc")


class SquaredL2:
    """``D = 1/2 ||m1 - mR||_w^2`` (see the module docstring)."""

    def __init__(self, fixed, inner, mask=None):
        self.fixed, self.inner, self.mask = fixed, inner, mask
        self._residual = None

    def _w(self, a):
        return a if self.mask is None else self.mask * a

    def prepare(self, m1):
        """Store what the value and derivatives at ``m1`` need."""
        self._residual = m1 - self.fixed

    def value(self):
        return 0.5 * self.inner(self._w(self._residual), self._residual)

    def final_adjoint(self):
        return -self._w(self._residual)

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


def make_distance(name, fixed, inner, mask=None):
    """The distance ``name`` (one of :data:`DISTANCES`) to the local block ``fixed``."""
    if name == "l2":
        return SquaredL2(fixed, inner, mask)
    if name == "ncc":
        return NormalizedCrossCorrelation(fixed, inner, mask)
    raise ValueError(f"distance {name!r} is unknown; use one of {', '.join(DISTANCES)}")
