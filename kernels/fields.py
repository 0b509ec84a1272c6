"""Fused pointwise arithmetic on local blocks (no temporaries, one pass over memory).

Every function works on this rank's C-contiguous arrays of one dtype (float32 or float64),
scalars ``(n1, n2, n3)`` and vectors ``(3, n1, n2, n3)``, in place where it says so; no MPI.
They are the hot pointwise steps of the transport solves and the Krylov solver, where numpy
expressions would allocate a temporary per operator (e.g. ``body += (w * lam) * grad``
allocates a vector field).
"""

import numpy as np

from ._numba import pointwise as _pw

__all__ = ["axpy", "heun_factor", "scale_and_accumulate", "accumulate_product", "minus_dot_added",
           "det_identity_plus", "affine_to_fortran"]


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


def heun_factor(d_departure, d, sign, dt, out):
    """``out = 1 + sign dt/2 (d_X + d) + dt^2/2 d_X d`` (``out`` may be either input); returns
    ``out``.

    The factor of one explicit Heun (trapezoidal predictor-corrector) step of ``dq/dt = sign d
    q`` along a characteristic from its departure point ``X``, where ``d`` takes the value
    ``d_X = d(X)`` (``d_departure``), to the node, where it is ``d``: the predictor ``q_X (1 + dt
    sign d_X)``, the corrector ``q_X + dt/2 (sign d_X q_X + sign d (q_X + dt sign d_X q_X))``.
    With ``x = sign dt/2 d_X`` and ``y = sign dt/2 d`` it is ``1 + x + y + 2 x y``: positive
    where ``|x|, |y| < 1/sqrt(2)`` and, for ``x = y``, everywhere; unlike the implicit
    trapezoidal factor ``(1 + x) / (1 - y)`` it has no pole.
    """
    dt_ = out.dtype
    _like(d_departure, out, "d_departure"), _like(d, out, "d")
    _pw._heun_factor(_flat(d_departure, dt_, "d_departure"), _flat(d, dt_, "d"), dt_.type(sign),
                     dt_.type(0.5 * dt), dt_.type(0.5 * dt * dt), _flat(out, dt_, "out"))
    return out


def scale_and_accumulate(src, factor, w, grad, lam, body):
    """``lam = src factor``, then ``body += w lam grad`` (``grad``, ``body`` vector fields;
    ``lam`` may be ``src``): one Heun step of the continuity-form adjoint and its body force."""
    dt, n = lam.dtype, lam.size
    _like(src, lam, "src"), _like(factor, lam, "factor"), _like(grad, lam, "grad", 3), _like(body, lam, "body", 3)
    _pw._scale_and_accumulate(_flat(src, dt, "src"), _flat(factor, dt, "factor"), dt.type(w),
                              _vec(grad, n, dt, "grad"), _flat(lam, dt, "lam"), _vec(body, n, dt, "body"))


def accumulate_product(lam, w, grad, body):
    """``body += w lam grad`` for a scalar ``lam`` and vector fields ``grad``, ``body``."""
    dt, n = lam.dtype, lam.size
    _like(grad, lam, "grad", 3), _like(body, lam, "body", 3)
    _pw._accumulate_product(_flat(lam, dt, "lam"), dt.type(w), _vec(grad, n, dt, "grad"), _vec(body, n, dt, "body"))


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


def affine_to_fortran(field, matrix, offset=None, index_matrix=None, out=None):
    """``out[i, j, k, a] = offset_a + sum_b matrix_ab field[b, i, j, k] + sum_c index_matrix_ac
    (i, j, k)_c`` (float64 arithmetic), ``out`` of shape ``(n1, n2, n3, C)`` in Fortran order:
    NIfTI's order, so that a file's bytes are the array's. ``field`` is ``(C_in, n1, n2, n3)``
    C-contiguous (a scalar ``(n1, n2, n3)`` counts as ``C_in = 1``), ``matrix`` ``(C, C_in)``;
    ``offset`` (``(C,)``) and ``index_matrix`` (``(C, 3)``) default to 0. E.g. world mm of
    a deformation ``A (i + u) + t`` from a displacement ``u`` in voxels (``matrix =
    index_matrix = A``, ``offset = t``), or just the transposing copy (``matrix = [[1]]``).
    ``out`` (float32 by default) may be given, with any dtype, shape ``(n1, n2, n3, C)`` or
    ``(n1, n2, n3, 1, C)``, Fortran-contiguous. Returns ``out``."""
    field = np.asarray(field)
    if field.ndim == 3:
        field = field[None]
    if field.ndim != 4 or not field.flags.c_contiguous:
        raise TypeError("field: expected a C-contiguous (C_in, n1, n2, n3) or (n1, n2, n3) array")
    matrix = np.asarray(matrix, np.float64)
    cout = matrix.shape[0]
    if matrix.shape != (cout, field.shape[0]):
        raise ValueError(f"matrix: expected shape (C, {field.shape[0]}), got {matrix.shape}")
    offset = np.zeros(cout) if offset is None else np.asarray(offset, np.float64).reshape(cout)
    index_matrix = np.zeros((cout, 3)) if index_matrix is None else np.asarray(index_matrix, np.float64)
    if index_matrix.shape != (cout, 3):
        raise ValueError(f"index_matrix: expected shape ({cout}, 3), got {index_matrix.shape}")
    if out is None:
        out = np.empty(field.shape[1:] + (cout,), np.float32, order="F")
    if not out.flags.f_contiguous or out.shape[:3] != field.shape[1:] or out.size != field[0].size * cout:
        raise ValueError(f"out: expected a Fortran-contiguous array of shape {field.shape[1:] + (cout,)}")
    _pw._affine_to_fortran(field, matrix, index_matrix, offset, out.T.reshape((cout,) + field.shape[1:][::-1]))
    return out
