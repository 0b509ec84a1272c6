"""Distributed interpolation plans: route query points to their owners once, interpolate often.

A plan is built for one set of query points — in claire_py the departure points of every
local grid node along the characteristics of one velocity — and then interpolates any
number of fields at them, each with one halo exchange, one numba kernel call and one
return exchange. Points may lie anywhere (they are wrapped periodically), also farther than
the halo or than a whole local block: each goes to the rank owning its stencil's base node.

Coordinates are in grid units: ``x_a = X_a / h_a`` with ``h_a = 2 pi / N_a``, so node ``i``
sits at ``x = i``.
"""

from __future__ import annotations

import weakref

import numpy as np

from ._numba import interp as _interp
from ._numba import routing as _routing

__all__ = ["InterpolationPlan", "INTERPOLATION_KINDS"]

#: ``lagrange``: periodic tricubic Lagrange (64-point stencil, interpolates the nodes);
#: ``bspline``: cubic B-spline on prefiltered coefficients (the plan prefilters spectrally);
#: ``nearest``: the value of the nearest grid node (for label maps).
INTERPOLATION_KINDS = ("lagrange", "bspline", "nearest")

#: Ghost width of the padded block: the cubic stencil of a point owned by node ``i`` spans
#: ``i - 1 .. i + 2``.
GHOST = 2


class _PlanArrays:
    """Base and weight arrays of dead plans, handed to the next plan of the same size.

    A solver builds four plans per velocity (two Euler, two RK2) and drops the previous
    velocity's; at 256^3 float32 one plan is 16.7 M points x 56 bytes = 0.9 GiB. Page-faulting
    that much fresh memory for every plan cost 0.1-1.3 s per plan on the 2-core machine of
    DESIGN.md section 5 — up to 7x the stencil computation itself (0.19 s) — so the arrays of
    a plan that is garbage-collected are kept for the next one. At most ``keep`` sets of one
    size are kept, a set of another size empties the pool, and a plan takes from the pool
    before allocating, so the peak of a velocity update (old plans + the new ones) is
    unchanged. The first interpolation through any plan empties the pool: the update is over
    and the memory goes back to the allocator (keeping it raised the peak RSS of a 256^3
    registration by 56 bytes per point, as the peak comes later, in the outputs). Of the four
    plans of a transport's velocity update, three then reuse arrays (the first Euler plan
    allocates).
    """

    def __init__(self, keep=1):
        self.keep = keep
        self._key, self._free = None, []

    #: With several ranks the points a rank owns vary from plan to plan by a few percent:
    #: arrays are allocated with this much slack, and a kept set serves any plan it can hold
    #: that is not smaller than ``1 / SLACK**2`` of it.
    SLACK = 1.03

    def take(self, npts, dtype):
        """``(base, weights, parents)``: arrays for ``npts`` points (contents undefined), views
        of ``parents``, the arrays to give back."""
        dtype = np.dtype(dtype)
        if self._free and self._key == dtype:
            base, weights = self._free[-1]
            if npts <= base.shape[0] <= npts * self.SLACK ** 2:
                self._free.pop()
                return base[:npts], weights[:npts], (base, weights)
        capacity = npts if npts < 65536 else int(npts * self.SLACK)
        base, weights = np.empty(capacity, np.uint64), np.empty((capacity, 12), dtype)
        return base[:npts], weights[:npts], (base, weights)

    def give(self, base, weights):
        if weights.dtype != self._key:
            self._key, self._free = weights.dtype, []
        if len(self._free) < self.keep:
            self._free.append((base, weights))
        elif self._free[-1][0].shape[0] < base.shape[0]:
            self._free[-1] = (base, weights)

    @property
    def holding(self):
        return bool(self._free)

    def clear(self):
        """Release the kept arrays (e.g. when a solve is over)."""
        self._key, self._free = None, []


#: The process's pool of plan arrays (see :class:`_PlanArrays`); ``_PLAN_ARRAYS.clear()``
#: hands its memory back.
_PLAN_ARRAYS = _PlanArrays()


class InterpolationPlan:
    """Interpolation of distributed fields at a fixed set of query points.

    Parameters
    ----------
    decomp : Decomposition
        Layout of the fields to interpolate.
    points : ndarray, shape ``(3, *local_shape)`` or ``(3, npts)``
        Query points of this rank in grid units (global coordinates, any real values:
        they are wrapped into ``[0, N_a)``). Results come back in the same order.
    kind : {"lagrange", "bspline", "nearest"}
        Interpolation scheme (see :data:`INTERPOLATION_KINDS`).
    spectral : SpectralOperators, optional
        Needed for ``bspline`` (the B-spline prefilter is a spectral multiplier).

    Notes
    -----
    Building: wrap the points, find each one's owner from the block table of the real
    layout, sort by owner (stable, so grid order is kept within each destination), exchange
    with ``Alltoallv``, and precompute on the owner the flat base index into its padded block
    and 12 separable weights per point. Applying: halo exchange of width 2, the numba kernel,
    ``Alltoallv`` back, un-sort.
    """

    def __init__(self, decomp, points, *, kind="lagrange", spectral=None):
        if kind not in INTERPOLATION_KINDS:
            raise ValueError(f"interpolation kind {kind!r} is unknown; use one of {', '.join(INTERPOLATION_KINDS)}")
        if kind == "bspline" and spectral is None:
            raise ValueError("bspline interpolation needs spectral=SpectralOperators(decomp) for its prefilter")
        if GHOST > decomp.min_block_thickness():
            raise ValueError(f"cubic interpolation needs local blocks of at least {GHOST} grid planes; grid "
                             f"{decomp.shape} on {decomp.size} ranks has thinner ones: use fewer ranks or "
                             f"a pencil layout")
        points = np.asarray(points)
        if points.shape[0] != 3:
            raise ValueError(f"points must have shape (3, ...), got {points.shape}")
        self.decomp, self.kind, self.spectral = decomp, kind, spectral
        self.out_shape = points.shape[1:]
        x = points.reshape(3, -1)
        if not np.all(np.isfinite(x)):
            raise ValueError("interpolation points must be finite (is the velocity field finite?)")
        self.num_points = x.shape[1]
        starts0, starts1, table = self._block_table()
        # with one rank the routing is the identity: no exchange, no un-sorting
        self._send_counts, x, self._order = _routing.route_points(x, decomp.shape, starts0, starts1, table,
                                                                  with_order=decomp.size > 1)
        if decomp.size > 1:
            self._recv_counts = decomp.alltoall_counts(self._send_counts)
            x = decomp.alltoallv(x.ravel(), 3 * self._send_counts, 3 * self._recv_counts).reshape(-1, 3)
        self.num_owned = x.shape[0]

        lo = [s.start for s in decomp.real_slice]
        origin = (lo[0] - GHOST, lo[1] - GHOST, -GHOST)
        self._padded_shape = tuple(n_ + 2 * GHOST for n_ in decomp.local_shape)
        scheme = "bspline" if kind == "bspline" else "lagrange"
        base, weights, parents = _PLAN_ARRAYS.take(self.num_owned, decomp.dtype)
        self._base, self._weights = _interp.stencil_plan(x, origin, self._padded_shape, kind=scheme,
                                                         base_out=base, weights_out=weights, dtype=decomp.dtype)
        weakref.finalize(self, _PLAN_ARRAYS.give, *parents).atexit = False
        if kind == "nearest":
            self._weights[...] = 0
            frac = x - np.floor(x)
            for a in range(3):
                self._weights[np.arange(self.num_owned), 4 * a + 1 + (frac[:, a] >= 0.5)] = 1
        self._padded = {}

    # ----------------------------------------------------------------- build
    def _block_table(self):
        """Block starts along axes 0 and 1 of the real layout and the rank owning each block."""
        blocks = self.decomp._real_blocks
        starts0 = np.unique([b[0][0] for b in blocks])
        starts1 = np.unique([b[1][0] for b in blocks])
        table = np.empty((starts0.size, starts1.size), np.int64)
        for r, b in enumerate(blocks):
            table[np.searchsorted(starts0, b[0][0]), np.searchsorted(starts1, b[1][0])] = r
        return starts0, starts1, table

    # ----------------------------------------------------------------- apply
    def _padded_buffer(self, components):
        key = components
        if key not in self._padded:
            shape = ((components,) if components else ()) + self._padded_shape
            self._padded[key] = np.empty(shape, self.decomp.dtype)
        return self._padded[key]

    def interpolate(self, field, out=None):
        """Values of a local scalar ``(n1, n2, n3)`` or vector ``(C, n1, n2, n3)`` field at the
        plan's points: shape ``out_shape`` or ``(C, *out_shape)``.

        For ``bspline`` the field is prefiltered first (one forward and one inverse FFT per
        component)."""
        decomp = self.decomp
        vector = field.ndim == 4
        if field.shape[-3:] != decomp.local_shape or field.ndim not in (3, 4):
            raise ValueError(f"field of shape {field.shape} does not match the local block {decomp.local_shape}")
        comps = field.shape[0] if vector else 0
        if field.dtype != decomp.dtype:
            field = field.astype(decomp.dtype)
        if self.kind == "bspline":
            field = self.spectral.bspline_prefilter(field)
        if _PLAN_ARRAYS.holding:  # this velocity's plans are built: see _PlanArrays
            _PLAN_ARRAYS.clear()
        padded = decomp.exchange_halo(field, GHOST, out=self._padded_buffer(comps))
        shape = ((comps,) if vector else ()) + self.out_shape
        if out is None:
            out = np.empty(shape, decomp.dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        flat = out.reshape(((comps,) if vector else ()) + (-1,))
        if self._order is None:
            if out.dtype == decomp.dtype and out.flags.c_contiguous:  # straight into out (flat is a view)
                _interp.interpolate_planned(padded, self._base, self._weights, out=flat)
            else:
                flat[...] = _interp.interpolate_planned(padded, self._base, self._weights)
            return out
        values = _interp.interpolate_planned(padded, self._base, self._weights)
        c = max(comps, 1)
        send = np.ascontiguousarray(values.reshape(c, -1).T)  # point-major, grouped by destination
        back = decomp.alltoallv(send.ravel(), c * self._recv_counts, c * self._send_counts).reshape(-1, c)
        if vector:
            flat[:, self._order] = back.T
        else:
            flat[self._order] = back[:, 0]
        return out
