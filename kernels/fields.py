"""Fused pointwise arithmetic on local blocks (no temporaries, one pass over memory).

Every function works on this rank's C-contiguous arrays of one dtype (float32 or float64),
scalars ``(n1, n2, n3)`` and vectors ``(3, n1, n2, n3)``, in place where it says so; no MPI.
They are the hot pointwise steps of the transport solves and the Krylov solver, where numpy
expressions would allocate a temporary per operator (e.g. ``body += (w * lam) * grad``
allocates a vector field).
"""

import numpy as np

from ._numba import pointwise as _pw

__all__ = ["axpy", "times_one_plus", "damp_and_accumulate", "minus_dot_added", "det_identity_plus",
           "FourthOrderGradient"]


def _flat(a, dtype, name):
    if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous:
        raise TypeError(f"{name}: expected a C-contiguous {np.dtype(dtype).name} array")
    return a.reshape(-1)


def _like(a, ref, name, components=None):
    """``a`` must be an array of ``ref``'s dtype and shape (``(components, *ref.shape)``)."""
    shape = ref.shape if components is None else (components,) + ref.shape
    if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != ref.dtype:
        raise ValueError(f"{name}: expected a {ref.dtype} array of shape {shape}, got "
                         f"{getattr(a, 'dtype', type(a).__name__)} {getattr(a, 'shape', '')}")
    return a


def _vec(a, n, dtype, name):
    if a.shape[0] != 3 or a[0].size != n:
        raise ValueError(f"{name}: expected a vector field (3, ...) of {n} points per component, got {a.shape}")
    return _flat(a, dtype, name).reshape(3, n)


def axpy(alpha, x, y):
    """``y += alpha x`` in place; returns ``y``. C-contiguous float32/float64 arrays of one dtype
    go through a numba kernel (``alpha`` rounded to that dtype); others take numpy's way (a
    temporary, numpy's type promotion)."""
    if x.shape != y.shape:
        raise ValueError(f"axpy: shapes {x.shape} and {y.shape} differ")
    if (x.dtype == y.dtype and y.dtype in (np.float32, np.float64) and x.flags.c_contiguous
            and y.flags.c_contiguous):
        _pw._axpy(y.dtype.type(alpha), x.reshape(-1), y.reshape(-1))
    else:
        y += alpha * x
    return y


def times_one_plus(a, d, c, out):
    """``out = a (1 + c d)`` (``out`` may be ``a``); returns ``out``."""
    dt = a.dtype
    _like(d, a, "d"), _like(out, a, "out")
    _pw._times_one_plus(_flat(a, dt, "a"), _flat(d, dt, "d"), dt.type(c), dt.type(1), _flat(out, dt, "out"))
    return out


def damp_and_accumulate(lam, d, c, w, grad, body):
    """``lam <- lam / (1 - c d)`` in place, then ``body += w lam grad`` (``grad``, ``body``
    vector fields): one trapezoidal step of the continuity-form adjoint and its body force."""
    dt, n = lam.dtype, lam.size
    _like(d, lam, "d"), _like(grad, lam, "grad", 3), _like(body, lam, "body", 3)
    _pw._damp_and_accumulate(_flat(lam, dt, "lam"), _flat(d, dt, "d"), dt.type(c), dt.type(1), dt.type(w),
                             _vec(grad, n, dt, "grad"), _vec(body, n, dt, "body"))


def minus_dot_added(base, c, u, grad, out):
    """``out = base - c (u . grad)`` for vector fields ``u``, ``grad`` (``out`` may be
    ``base``); returns ``out``."""
    dt, n = base.dtype, base.size
    _like(u, base, "u", 3), _like(grad, base, "grad", 3), _like(out, base, "out")
    _pw._add_minus_dot(_flat(base, dt, "base"), dt.type(c), _vec(u, n, dt, "u"), _vec(grad, n, dt, "grad"),
                       _flat(out, dt, "out"))
    return out


def det_identity_plus(grad_u, scale, out):
    """``out = det(I + G)`` with ``G_ab = scale_b grad_u[a][b]`` (float64 arithmetic), e.g.
    ``det(grad y)`` of ``y = x + u`` from the gradients ``grad_u[a] = grad u_a`` (each a vector
    field) and ``scale = h`` (``u`` in voxels). Returns ``out``."""
    dt, n = out.dtype, out.size
    for a in range(3):
        if grad_u[a].shape != (3,) + out.shape:
            raise ValueError(f"grad_u[{a}]: expected shape {(3,) + out.shape}, got {grad_u[a].shape}")
    g = [_vec(grad_u[a], n, grad_u[a].dtype, f"grad_u[{a}]") for a in range(3)]
    _pw._det_identity_plus(*g, *(float(s) for s in scale), _flat(out, dt, "out"))
    return out


class FourthOrderGradient:
    """``grad m`` by 4th-order central differences on a ghost-padded block, fused into the two
    products the Gauss-Newton Hessian needs (no gradient field is formed).

    ``D_a m = (m[-2] - 8 m[-1] + 8 m[+1] - m[+2]) / (12 h_a)`` along axis ``a`` (error
    ``O(h^4)``); ``mpad`` holds ``m`` with ``ghost >= 2`` periodic layers on every side (see
    ``Decomposition.exchange_halo``), of shape ``local_shape + 2 ghost``.

    Parameters
    ----------
    spacing : 3 floats
        Grid spacings ``h_a``.
    dtype : float32 or float64
    ghost : int
        Ghost width of the padded blocks.
    """

    def __init__(self, spacing, dtype, ghost=2):
        if ghost < 2:
            raise ValueError(f"4th-order differences need a ghost width >= 2, got {ghost}")
        self.dtype, self.ghost = np.dtype(dtype), int(ghost)
        self._s1 = np.array([1.0 / (12.0 * h) for h in spacing], dtype=self.dtype)
        self._s8 = np.array([8.0 / (12.0 * h) for h in spacing], dtype=self.dtype)

    def _check(self, mpad, local_shape):
        want = tuple(n + 2 * self.ghost for n in local_shape)
        if mpad.shape != want or mpad.dtype != self.dtype:
            raise ValueError(f"padded field of shape {mpad.shape} and dtype {mpad.dtype}, expected {want} "
                             f"{self.dtype.name}")

    def minus_dot_added(self, base, c, u, mpad, out):
        """``out = base - c (u . grad m)`` (``out`` may be ``base``); returns ``out``."""
        self._check(mpad, base.shape)
        _like(base, mpad[tuple(slice(0, n) for n in base.shape)], "base")
        _like(u, base, "u", 3), _like(out, base, "out")
        _pw._minus_dot_fd_added(base, self.dtype.type(c), u, mpad, self.ghost, self._s1, self._s8, out)
        return out

    def damp_and_accumulate(self, lam, d, c, w, mpad, body):
        """``lam <- lam / (1 - c d)`` in place, then ``body += w lam grad m``."""
        self._check(mpad, lam.shape)
        _like(lam, mpad[tuple(slice(0, n) for n in lam.shape)], "lam")
        _like(d, lam, "d"), _like(body, lam, "body", 3)
        dt = self.dtype.type
        _pw._damp_and_accumulate_fd(lam, d, dt(c), dt(1), dt(w), mpad, self.ghost, self._s1, self._s8, body)
