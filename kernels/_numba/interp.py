"""Periodic tricubic interpolation kernels (Lagrange and cubic B-spline) in grid units.

Coordinates are in *grid units* (index space): ``x_a = X_a / h_a`` with ``h_a = 2 pi / N_a``
for a physical coordinate ``X_a`` of the ``[0, 2 pi)^3`` box, so grid node ``i`` sits at
``x = i``. Fields are C-ordered ``(n0, n1, n2)`` arrays, vector fields ``(C, n0, n1, n2)``.

Both kinds use the 64-point stencil of nodes ``floor(x_a) - 1 .. floor(x_a) + 2`` on each axis,
with the fraction ``t = x_a - floor(x_a)`` in ``[0, 1)`` and separable axis weights

* ``lagrange`` (cubic Lagrange, interpolates the nodes, error ``O(h^4)``)::

      w_-1 = -t (t-1) (t-2) / 6          w_0 = (t+1) (t-1) (t-2) / 2
      w_1  = -(t+1) t (t-2) / 2          w_2 = (t+1) t (t-1) / 6

* ``bspline`` (cubic B-spline on *prefiltered* coefficients, see
  :func:`bspline_prefilter_reference`; error ``O(h^4)``)::

      w_-1 = (1-t)^3 / 6                 w_0 = (3 t^3 - 6 t^2 + 4) / 6
      w_1  = (-3 t^3 + 3 t^2 + 3 t + 1) / 6   w_2 = t^3 / 6

The value at ``x`` is ``sum_{a,b,c} w0[a] w1[b] w2[c] f[i0+a-1, i1+b-1, i2+c-1]``.

Two ways to evaluate it:

* :func:`interpolate_periodic` — direct kernel on a whole periodic field, indices wrapped
  modulo ``N_a``; any points. For tests and serial convenience.
* :func:`stencil_plan` + :func:`interpolate_planned` — the hot path of the distributed
  solver: the stencil corner (one unsigned flat index into a ghost-padded local block) and the
  3 fractions ``t_a`` (16 bytes per point in float32) are computed once per set of points, then
  any number of fields are interpolated by a kernel that evaluates the 12 axis weights from the
  fractions by Horner's rule (3 vector fused multiply-adds per axis) and does no index
  arithmetic beyond unsigned adds. Its inner step is written in LLVM IR (:func:`_stencil_simd`):
  each 4-value stencil row is one vector load, so a point costs 21 vector loads and ~45 vector
  operations; the plain-numba version (:func:`_interpolate_planned_plain`, 84 scalar
  multiply-adds, which LLVM vectorises across points with gathers) runs at 60 % of its speed.

Measured on the 2-core AMD EPYC (Zen3) of DESIGN.md section 5, 256^3, points = grid points
displaced by a few voxels, in grid order (``benchmarks/bench_interp_kernel.py``; +-15 %):
planned float32 ~100 Mpts/s on one thread, 196 on two (plain numba ~62, direct kernel ~14),
float64 ~76. Storing the 12 weights instead (56 bytes per point) was ~15 % faster in float32
and as fast in float64, at 3.5x the memory of every plan. Vector fields go component by
component: one pass over the points evaluating three components was 1.4-2x slower (three
fields' 48 stencil-row streams defeat the prefetchers and L1).

:func:`reference_interpolate_periodic` and :func:`bspline_prefilter_reference` are slow
vectorised-numpy references.
"""

import numpy as np
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import jit, jit_parallel
from .routing import _coordinate, _next_node, _node_of
from .routing import _wrap as _wrap_real

# llvmlite's IR builder, reached through numba (this subpackage imports only numpy and numba)
_ir = cgutils.ir

__all__ = ["KINDS", "PLAN_KINDS", "stencil_plan", "weight_coefficients", "interpolate_planned", "interpolate_periodic",
           "reference_interpolate_periodic", "bspline_prefilter_reference"]

#: Interpolation kinds understood by every function of this module.
KINDS = ("lagrange", "bspline")

#: Kinds of :func:`stencil_plan` (``nearest``: the value of the nearest node).
PLAN_KINDS = KINDS + ("nearest",)

#: Points per parallel work item of the planned kernels: each thread gets contiguous ranges.
_CHUNK = 8192


# ------------------------------------------------------------------ weights
@jit
def _axis_weights(t, kind):
    """The 4 weights of one axis for the fraction ``t`` (float64): kind 0 Lagrange, 1 B-spline."""
    if kind == 0:
        tp = t + 1.0
        tm = t - 1.0
        tmm = t - 2.0
        return (-t * tm * tmm / 6.0, tp * tm * tmm * 0.5, -tp * t * tmm * 0.5, tp * t * tm / 6.0)
    s = 1.0 - t
    t2 = t * t
    t3 = t2 * t
    return (s * s * s / 6.0, (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0,
            (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0, t3 / 6.0)


#: Polynomial coefficients of the axis weights in powers of the fraction ``t``: row ``k``
#: holds the ``t^k`` coefficients of ``(w_-1, w_0, w_1, w_2)``.
_COEFFICIENTS = {
    "lagrange": ((0.0, 1.0, 0.0, 0.0), (-1 / 3, -0.5, 1.0, -1 / 6), (0.5, -1.0, 0.5, 0.0), (-1 / 6, 0.5, -0.5, 1 / 6)),
    "bspline": ((1 / 6, 2 / 3, 1 / 6, 0.0), (-0.5, 0.0, 0.5, 0.0), (0.5, -1.0, 0.5, 0.0), (-1 / 6, 0.5, -0.5, 1 / 6)),
}


def weight_coefficients(kind, dtype):
    """``(16,)`` array of ``dtype``: the ``t^k`` coefficients of the 4 axis weights, ``k =
    0..3`` (``coef[4 k + j]`` for weight ``j``), evaluated by Horner's rule in the kernel.
    ``nearest`` plans use the Lagrange weights at ``t`` in ``{0, 1}``, where they are one-hot
    (the ``t`` coefficient of ``w_-1`` is rounded so that its Horner sum at ``t = 1`` is exactly
    0 in ``dtype``)."""
    coef = np.array(_COEFFICIENTS["bspline" if kind == "bspline" else "lagrange"], dtype=dtype)
    if kind != "bspline":
        coef[1, 0] = -(coef[3, 0] + coef[2, 0])
    return coef.ravel()


@jit_parallel
def _stencil_plan(points, period, lo0, lo1, lo2, n1, n2, scale, o0, o1, o2, p0, p1, p2, nearest, bits, frac):
    """Fill ``bits[p, 0]`` (flat corner index) and ``frac[p, 1:4]`` (fractions) of every point."""
    npts = points.shape[1]
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    bad = 0
    for ch in prange(nchunks):
        start = ch * _CHUNK
        stop = min(npts, start + _CHUNK)
        lo = (lo0, lo1, lo2)
        i, j, k = _node_of(start, lo, n1, n2)
        for p in range(start, stop):
            x0 = _coordinate(points, p, 0, i, scale)
            x1 = _coordinate(points, p, 1, j, scale)
            x2 = _coordinate(points, p, 2, k, scale)
            i, j, k = _next_node(i, j, k, lo, n1, n2)
            if period[0] > 0:
                x0 = _wrap_real(x0, period[0])
                x1 = _wrap_real(x1, period[1])
                x2 = _wrap_real(x2, period[2])
            f0 = np.floor(x0)
            f1 = np.floor(x1)
            f2 = np.floor(x2)
            i0 = np.int64(f0) - 1 - o0
            i1 = np.int64(f1) - 1 - o1
            i2 = np.int64(f2) - 1 - o2
            if (i0 < 0 or i1 < 0 or i2 < 0 or i0 + 3 >= p0 or i1 + 3 >= p1 or i2 + 3 >= p2
                    or not (x0 == x0 and x1 == x1 and x2 == x2)):
                bad += 1
                bits[p, 0] = 0
                frac[p, 1] = 0
                frac[p, 2] = 0
                frac[p, 3] = 0
                continue
            bits[p, 0] = (i0 * p1 + i1) * p2 + i2
            t0 = x0 - f0
            t1 = x1 - f1
            t2 = x2 - f2
            if nearest:
                t0 = 1.0 if t0 >= 0.5 else 0.0
                t1 = 1.0 if t1 >= 0.5 else 0.0
                t2 = 1.0 if t2 >= 0.5 else 0.0
            frac[p, 1] = t0
            frac[p, 2] = t1
            frac[p, 3] = t2
    return bad


# ------------------------------------------------------------------ planned kernel
@intrinsic
def _stencil_simd(typingctx, f, i, s0, s1, plan, p, coef):
    """``sum_{a,b,c} w0[a] w1[b] w2[c] f[i + a s0 + b s1 + c]`` in 4-wide SIMD, the weights
    of axis ``a`` evaluated from the fraction ``t_a = plan[p, 1 + a]`` by Horner's rule with the
    coefficient vectors of ``coef`` (3 fused multiply-adds per axis). The 4 contiguous values
    of each stencil row are one vector load, the 16 rows are combined with broadcast ``w1[b]``
    and ``w0[a]``, and the result is the dot product with ``(w2[0..3])``: 1 + 4 + 16 vector
    loads and ~45 vector operations per point instead of 64 scalar loads and 84
    multiply-adds.

    ``f``: 1-D C-contiguous float32/float64; ``plan``: C-contiguous ``(npts, 4)`` and
    ``coef``: ``(16,)``, both of ``f``'s dtype; ``i, s0, s1``: uint64; ``p``: integer. No
    bounds checks (the plan guarantees them). Written in LLVM IR because numba's loop
    vectoriser otherwise vectorises across points with per-element gathers (half the speed)."""
    if not (isinstance(f, types.Array) and f.ndim == 1 and f.layout == "C"
            and f.dtype in (types.float32, types.float64)
            and isinstance(plan, types.Array) and plan.ndim == 2 and plan.layout == "C" and plan.dtype == f.dtype
            and isinstance(coef, types.Array) and coef.ndim == 1 and coef.layout == "C" and coef.dtype == f.dtype
            and all(isinstance(t, types.Integer) and t.bitwidth == 64 for t in (i, s0, s1, p))):
        return None
    sig = f.dtype(f, i, s0, s1, plan, p, coef)

    def codegen(context, builder, signature, args):
        f_arr = context.make_array(signature.args[0])(context, builder, args[0])
        plan_arr = context.make_array(signature.args[4])(context, builder, args[4])
        coef_arr = context.make_array(signature.args[6])(context, builder, args[6])
        elt = context.get_value_type(signature.args[0].dtype)
        size = context.get_abi_sizeof(elt)
        vec = _ir.VectorType(elt, 4)
        i64 = _ir.IntType(64)
        i32 = _ir.IntType(32)
        fmuladd = cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(vec, [vec, vec, vec]),
            "llvm.fmuladd." + ("v4f32" if size == 4 else "v4f64"))
        undef = _ir.Constant(vec, _ir.Undefined)

        def load4(data, index):
            ptr = builder.gep(data, [index], inbounds=True)
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=size)

        def broadcast(v, k):
            return builder.shuffle_vector(v, undef, _ir.Constant(_ir.VectorType(i32, 4), [k] * 4))

        c = [load4(coef_arr.data, _ir.Constant(i64, 4 * k)) for k in range(4)]
        row = load4(plan_arr.data, builder.mul(args[5], _ir.Constant(i64, 4)))

        def weights(axis):
            t = broadcast(row, 1 + axis)
            w = builder.call(fmuladd, [c[3], t, c[2]])
            w = builder.call(fmuladd, [w, t, c[1]])
            return builder.call(fmuladd, [w, t, c[0]])

        w0, w1, w2 = weights(0), weights(1), weights(2)
        w1b = [broadcast(w1, b) for b in range(4)]
        acc = None
        ia = args[1]
        for a in range(4):
            if a:
                ia = builder.add(ia, args[2])
            col = builder.fmul(w1b[0], load4(f_arr.data, ia))  # (sum_b w1[b] f[.., b, c])_c
            ib = ia
            for b in range(1, 4):
                ib = builder.add(ib, args[3])
                col = builder.call(fmuladd, [w1b[b], load4(f_arr.data, ib), col])
            w0a = broadcast(w0, a)
            acc = builder.fmul(w0a, col) if acc is None else builder.call(fmuladd, [w0a, col, acc])
        r = builder.fmul(acc, w2)
        e = [builder.extract_element(r, _ir.Constant(i32, k)) for k in range(4)]
        return builder.fadd(builder.fadd(e[0], e[1]), builder.fadd(e[2], e[3]))

    return sig, codegen


@jit_parallel
def _interpolate_planned(f, s0, s1, plan, bits, coef, out):
    """One component: ``f`` flat padded (P,), ``out`` (npts,); SIMD stencil per point.
    Returns the number of corners whose stencil would leave ``f`` (skipped, ``out`` = 0)."""
    npts = plan.shape[0]
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    bad = 0
    for ch in prange(nchunks):
        # constants inside the prange body (numba's parfor outlining loses hoisted ones)
        us0 = np.uint64(s0)
        us1 = np.uint64(s1)
        three = np.uint64(3)
        limit = np.uint64(f.shape[0]) - three * (us0 + us1) - np.uint64(4)  # last valid corner
        start = ch * _CHUNK
        stop = min(npts, start + _CHUNK)
        for p in range(start, stop):
            i = np.uint64(bits[p, 0])
            if i > limit:
                bad += 1
                out[p] = 0
                continue
            out[p] = _stencil_simd(f, i, us0, us1, plan, p, coef)
    return bad


@jit
def _horner(c, j, t):
    return ((c[12 + j] * t + c[8 + j]) * t + c[4 + j]) * t + c[j]


@jit
def _plane(f, i, s1, u0, u1, u2, u3, v0, v1, v2, v3):
    """``sum_b v_b sum_c u_c f[i + b s1 + c]`` (one axis-0 plane of the stencil), unsigned
    indices throughout."""
    one = np.uint64(1)
    two = np.uint64(2)
    three = np.uint64(3)
    j = i
    r0 = u0 * f[j] + u1 * f[j + one] + u2 * f[j + two] + u3 * f[j + three]
    j = j + s1
    r1 = u0 * f[j] + u1 * f[j + one] + u2 * f[j + two] + u3 * f[j + three]
    j = j + s1
    r2 = u0 * f[j] + u1 * f[j + one] + u2 * f[j + two] + u3 * f[j + three]
    j = j + s1
    r3 = u0 * f[j] + u1 * f[j + one] + u2 * f[j + two] + u3 * f[j + three]
    return v0 * r0 + v1 * r1 + v2 * r2 + v3 * r3


@jit_parallel
def _interpolate_planned_plain(f, s0, s1, plan, bits, coef, out):
    """Portable plain-numba twin of :func:`_interpolate_planned` (weights by Horner's rule,
    separable sums over ``c``, then ``b``, then ``a``: 84 multiply-adds per point; LLVM
    vectorises it across points with gathers). About half as fast; the cross-check of the
    LLVM IR kernel."""
    npts = plan.shape[0]
    nchunks = (npts + _CHUNK - 1) // _CHUNK
    for ch in prange(nchunks):
        us0 = np.uint64(s0)
        us1 = np.uint64(s1)
        start = ch * _CHUNK
        stop = min(npts, start + _CHUNK)
        for p in range(start, stop):
            i = np.uint64(bits[p, 0])
            t0 = plan[p, 1]
            t1 = plan[p, 2]
            t2 = plan[p, 3]
            u0 = _horner(coef, 0, t2)
            u1 = _horner(coef, 1, t2)
            u2 = _horner(coef, 2, t2)
            u3 = _horner(coef, 3, t2)
            v0 = _horner(coef, 0, t1)
            v1 = _horner(coef, 1, t1)
            v2 = _horner(coef, 2, t1)
            v3 = _horner(coef, 3, t1)
            acc = _horner(coef, 0, t0) * _plane(f, i, us1, u0, u1, u2, u3, v0, v1, v2, v3)
            i += us0
            acc += _horner(coef, 1, t0) * _plane(f, i, us1, u0, u1, u2, u3, v0, v1, v2, v3)
            i += us0
            acc += _horner(coef, 2, t0) * _plane(f, i, us1, u0, u1, u2, u3, v0, v1, v2, v3)
            i += us0
            acc += _horner(coef, 3, t0) * _plane(f, i, us1, u0, u1, u2, u3, v0, v1, v2, v3)
            out[p] = acc


# ------------------------------------------------------------------ direct kernel
@jit
def _wrap(i, n):
    """``i mod n`` for ``-n <= i < 2n``."""
    if i < 0:
        return i + n
    if i >= n:
        return i - n
    return i


@jit_parallel
def _interpolate_periodic(f, points, kind, out):
    """``f``: (C, n0, n1, n2) periodic; ``out``: (C, npts)."""
    ncomp, n0, n1, n2 = f.shape
    npts = points.shape[0]
    for p in prange(npts):
        x0 = np.float64(points[p, 0])
        x1 = np.float64(points[p, 1])
        x2 = np.float64(points[p, 2])
        f0 = np.floor(x0)
        f1 = np.floor(x1)
        f2 = np.floor(x2)
        a0, a1, a2, a3 = _axis_weights(x0 - f0, kind)
        b0, b1, b2, b3 = _axis_weights(x1 - f1, kind)
        c0, c1, c2, c3 = _axis_weights(x2 - f2, kind)
        i = (np.int64(f0) - 1) % n0
        j = (np.int64(f1) - 1) % n1
        k = (np.int64(f2) - 1) % n2
        i0, i1, i2, i3 = i, _wrap(i + 1, n0), _wrap(i + 2, n0), _wrap(i + 3, n0)
        j0, j1, j2, j3 = j, _wrap(j + 1, n1), _wrap(j + 2, n1), _wrap(j + 3, n1)
        k0, k1, k2, k3 = k, _wrap(k + 1, n2), _wrap(k + 2, n2), _wrap(k + 3, n2)
        for c in range(ncomp):
            g = f[c]
            acc = 0.0
            for ia, wa in ((i0, a0), (i1, a1), (i2, a2), (i3, a3)):
                s = 0.0
                for jb, wb in ((j0, b0), (j1, b1), (j2, b2), (j3, b3)):
                    s += wb * (c0 * g[ia, jb, k0] + c1 * g[ia, jb, k1] + c2 * g[ia, jb, k2]
                               + c3 * g[ia, jb, k3])
                acc += wa * s
            out[c, p] = acc


# ------------------------------------------------------------------ wrappers
def _kind_code(kind):
    if kind not in KINDS:
        raise ValueError(f"interpolation kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return KINDS.index(kind)


def _check_real(name, arr, dtype=None):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: arrays must be float32 or float64, got {arr.dtype}")
    if dtype is not None and arr.dtype != dtype:
        raise TypeError(f"{name}: dtype {arr.dtype} does not match {np.dtype(dtype)}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    return arr


def _check_points(points):
    _check_real("points", points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points: expected shape (npts, 3), got {points.shape}")
    return points


def _check_field(name, field):
    _check_real(name, field)
    if field.ndim not in (3, 4):
        raise ValueError(f"{name}: expected a scalar (n0, n1, n2) or vector (C, n0, n1, n2) field, "
                         f"got shape {field.shape}")
    return field


def _out_for(out, shape, dtype):
    if out is None:
        return np.empty(shape, dtype)
    _check_real("out", out, dtype)
    if out.shape != shape:
        raise ValueError(f"out: array of shape {out.shape}, expected {shape}")
    return out


def _plan_bits(plan):
    """The unsigned view of a plan whose column 0 holds the corner indices."""
    return plan.view(np.uint32 if plan.dtype == np.float32 else np.uint64)


def stencil_plan(points, origin, padded_shape, kind="lagrange", *, out=None, dtype=np.float32, period=None,
                 nodes=None, scale=None):
    """Stencil corners and fractions of ``points`` in a ghost-padded block: 16 bytes per point
    in float32 (32 in float64); the kernel evaluates the 12 axis weights from the fractions.

    Parameters
    ----------
    points : ndarray, (3, npts), float32 or float64 (any strides)
        Global coordinates in grid units — or, with ``nodes``, displacements of the nodes of a
        local block. Each point's stencil must lie inside the padded block:
        ``floor(x_a) - 1 - origin_a >= 0`` and ``floor(x_a) + 2 - origin_a < padded_shape[a]``
        (a ``ValueError`` counts the points that do not).
    origin : 3 ints
        Global grid index of ``padded[0, 0, 0]`` (e.g. block start minus the ghost width;
        may be negative).
    padded_shape : 3 ints
        Shape ``(p0, p1, p2)`` of the padded block (of one component).
    kind : {"lagrange", "bspline", "nearest"}
        ``bspline`` expects prefiltered fields; ``nearest`` rounds the fractions to 0 or 1
        (the value of the nearest node, through the Lagrange weights).
    out : ndarray, (npts, 4), optional
        Where to write the plan (C-contiguous, ``dtype``).
    dtype : float32 or float64
        Precision of the plan (= that of the fields to interpolate).
    period : 3 numbers, optional
        Wrap the points into ``[0, N_a)`` first (a single block holding the whole periodic grid).
    nodes : ((lo0, lo1, lo2), (n0, n1, n2)), optional
        ``points[:, p]`` is the displacement of node ``p`` (C order) of the local block of
        shape ``(n0, n1, n2)`` whose first node is the global node ``lo``:
        ``x_a = lo_a + i_a + scale_a points[a, p]``. Saves the caller a float64 array of points.
    scale : 3 floats, optional
        With ``nodes``: the factors ``scale_a`` of the displacements (default 1).

    Returns
    -------
    plan : ndarray, (npts, 4), dtype
        Column 0: the C-order flat index into the padded block of the stencil corner
        ``(floor(x0)-1-o0, floor(x1)-1-o1, floor(x2)-1-o2)``, as the bits of a uint32 (float32
        plans) or uint64 (float64); columns 1-3: the fractions ``t_a = x_a - floor(x_a)``
        (computed in float64).
    """
    if not isinstance(points, np.ndarray) or points.dtype not in (np.float32, np.float64):
        raise TypeError("points: expected a float32 or float64 numpy array")
    if points.ndim != 2 or points.shape[0] != 3:
        raise ValueError(f"points: expected shape (3, npts), got {points.shape}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: plans must be float32 or float64, got {dtype}")
    if len(origin) != 3 or len(padded_shape) != 3:
        raise ValueError(f"origin and padded_shape need 3 entries, got {origin} and {padded_shape}")
    o0, o1, o2 = (int(o) for o in origin)
    p0, p1, p2 = (int(p) for p in padded_shape)
    if min(p0, p1, p2) < 4:
        raise ValueError(f"padded_shape {padded_shape} is too small for a 4-point stencil")
    if dtype == np.float32 and p0 * p1 * p2 >= 2 ** 32:
        raise ValueError(f"a padded block of {p0}x{p1}x{p2} points is too large for a float32 plan "
                         "(2^32 points at most): use more ranks")
    if kind not in PLAN_KINDS:
        raise ValueError(f"interpolation kind {kind!r} is unknown; use one of {', '.join(PLAN_KINDS)}")
    npts = points.shape[1]
    relative = nodes is not None
    (lo0, lo1, lo2), (n0, n1, n2) = nodes if relative else ((0, 0, 0), (1, 1, max(npts, 1)))
    if relative and n0 * n1 * n2 != npts:
        raise ValueError(f"nodes: a block of {n0}x{n1}x{n2} nodes for {npts} displacements")
    period = np.zeros(3) if period is None else np.asarray(period, dtype=np.float64)
    out = _out_for(out, (npts, 4), dtype)
    scale = (np.ones(3) if scale is None else np.asarray(scale, dtype=np.float64)) if relative else None
    bad = _stencil_plan(points, period, int(lo0), int(lo1), int(lo2), int(n1), int(n2), scale,
                        o0, o1, o2, p0, p1, p2, kind == "nearest", _plan_bits(out), out)
    if bad:
        raise ValueError(f"stencil_plan: {bad} of {npts} points have stencils outside the padded block "
                         f"(origin {tuple(origin)}, shape {tuple(padded_shape)}) or are not finite")
    return out


def interpolate_planned(fpad, plan, kind="lagrange", out=None):
    """Interpolate a ghost-padded field with a plan from :func:`stencil_plan`.

    ``out[p] = sum_{a,b,c} w0[a] w1[b] w2[c] fpad.flat[i + a p1 p2 + b p2 + c]`` with ``i`` the
    plan's corner and ``w_a`` the 4 weights of ``kind`` at the fraction ``t_a``, in 4-wide
    SIMD over ``c``: sums over ``b`` (weights ``w1``), then ``a`` (``w0``), then the dot
    product with ``w2`` (rounding differs from the plain separable order at the 1e-16
    relative level). Corners whose stencil would leave ``fpad`` raise a ``ValueError`` (the
    check is free).

    Parameters
    ----------
    fpad : ndarray, (p0, p1, p2) or (C, p0, p1, p2), C-contiguous
        Padded field, same dtype as ``plan``; ``(p0, p1, p2)`` must be the ``padded_shape``
        the plan was built for.
    plan : ndarray, (npts, 4), float32 or float64
    kind : {"lagrange", "bspline", "nearest"}
        The kind the plan was built for.
    out : ndarray, (npts,) or (C, npts), optional

    Returns
    -------
    out : ndarray, (npts,) or (C, npts), dtype of ``fpad``
        Vector fields are done component by component (faster than one pass over the points
        with all components, see the module docstring).
    """
    _check_field("fpad", fpad)
    _check_real("plan", plan, fpad.dtype)
    if plan.ndim != 2 or plan.shape[1] != 4:
        raise ValueError(f"plan: expected shape (npts, 4), got {plan.shape}")
    if kind not in PLAN_KINDS:
        raise ValueError(f"interpolation kind {kind!r} is unknown; use one of {', '.join(PLAN_KINDS)}")
    npts = plan.shape[0]
    vector = fpad.ndim == 4
    p0, p1, p2 = fpad.shape[-3:]
    ncomp = fpad.shape[0] if vector else 1
    out = _out_for(out, ((ncomp,) if vector else ()) + (npts,), fpad.dtype)
    flat = fpad.reshape(ncomp, p0 * p1 * p2)
    flat_out = out.reshape(ncomp, npts)
    coef, bits = weight_coefficients(kind, fpad.dtype), _plan_bits(plan)
    for c in range(ncomp):  # component by component: measured faster than one pass, see module doc
        if _interpolate_planned(flat[c], p1 * p2, p2, plan, bits, coef, flat_out[c]):
            raise ValueError(f"interpolate_planned: plan corners outside the padded field of shape "
                             f"{fpad.shape[-3:]} (plan built for another padded_shape?)")
    return out


def interpolate_periodic(field, points, kind="lagrange", out=None):
    """Direct periodic interpolation of a whole field at arbitrary points.

    Parameters
    ----------
    field : ndarray, (n0, n1, n2) or (C, n0, n1, n2), float32 or float64, C-contiguous
        Periodic field (prefiltered coefficients for ``kind="bspline"``).
    points : ndarray, (npts, 3), float32 or float64, C-contiguous
        Grid units, anywhere: node indices are wrapped modulo ``N_a`` (also for negative ``x``).
    kind : {"lagrange", "bspline"}
    out : ndarray, (npts,) or (C, npts), optional

    Returns
    -------
    out : ndarray, (npts,) or (C, npts), dtype of ``field``
        Weights in float64, accumulated in float64, stored in the field's dtype.
    """
    _check_field("field", field)
    _check_points(points)
    code = _kind_code(kind)
    vector = field.ndim == 4
    ncomp = field.shape[0] if vector else 1
    npts = points.shape[0]
    out = _out_for(out, ((ncomp,) if vector else ()) + (npts,), field.dtype)
    points = points.astype(np.float64, copy=False)  # one compiled variant per field dtype
    _interpolate_periodic(field.reshape((ncomp,) + field.shape[-3:]), points, code, out.reshape(ncomp, npts))
    return out


# ------------------------------------------------------------------ numpy references
def _reference_axis_weights(t, kind):
    if kind == "lagrange":
        return np.stack([-t * (t - 1) * (t - 2) / 6, (t + 1) * (t - 1) * (t - 2) / 2,
                         -(t + 1) * t * (t - 2) / 2, (t + 1) * t * (t - 1) / 6])
    return np.stack([(1 - t) ** 3 / 6, (3 * t ** 3 - 6 * t ** 2 + 4) / 6,
                     (-3 * t ** 3 + 3 * t ** 2 + 3 * t + 1) / 6, t ** 3 / 6])


def reference_interpolate_periodic(field, points, kind="lagrange"):
    """Vectorised-numpy reference of :func:`interpolate_periodic` (same arguments and
    result; float64 arithmetic, result in the field's dtype)."""
    _kind_code(kind)
    field = np.asarray(field)
    points = np.asarray(points, dtype=np.float64)
    vector = field.ndim == 4
    f = field.reshape((-1,) + field.shape[-3:]).astype(np.float64)
    n = f.shape[1:]
    fl = np.floor(points)
    t = points - fl
    idx = fl.astype(np.int64) - 1
    w = [_reference_axis_weights(t[:, a], kind) for a in range(3)]
    i = [np.mod(idx[:, a][None, :] + np.arange(4)[:, None], n[a]) for a in range(3)]
    out = np.zeros((f.shape[0], points.shape[0]))
    for a in range(4):
        for b in range(4):
            for c in range(4):
                out += (w[0][a] * w[1][b] * w[2][c]) * f[:, i[0][a], i[1][b], i[2][c]]
    out = out.astype(field.dtype)
    return out if vector else out[0]


def bspline_prefilter_reference(field):
    """Periodic cubic B-spline coefficients of ``field`` (scalar ``(n0, n1, n2)`` or vector
    ``(C, n0, n1, n2)``): each axis's Fourier coefficient is divided by ``(4 + 2 cos(2 pi k /
    N)) / 6``, the symbol of the sampled B-spline (exact for periodic data; never zero). The
    result, interpolated with ``kind="bspline"``, reproduces ``field`` at the nodes."""
    field = np.asarray(field)
    axes = (-3, -2, -1)
    fhat = np.fft.rfftn(field.astype(np.float64), axes=axes)
    shape = field.shape[-3:]
    for ax, n in zip(axes, shape):
        k = np.fft.rfftfreq(n) * n if ax == -1 else np.fft.fftfreq(n) * n
        sym = (4.0 + 2.0 * np.cos(2.0 * np.pi * k / n)) / 6.0
        fhat /= sym.reshape((-1,) + (1,) * (-ax - 1))
    return np.fft.irfftn(fhat, s=shape, axes=axes).astype(field.dtype)
