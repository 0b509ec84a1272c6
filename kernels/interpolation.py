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

__all__ = ["InterpolationPlan", "IdentityPlan", "INTERPOLATION_KINDS"]

#: ``lagrange``: periodic tricubic Lagrange (64-point stencil, interpolates the nodes);
#: ``bspline``: cubic B-spline on prefiltered coefficients (the plan prefilters spectrally);
#: ``nearest``: the value of the nearest grid node (for label maps).
INTERPOLATION_KINDS = ("lagrange", "bspline", "nearest")

#: Ghost width of the padded block: the cubic stencil of a point owned by node ``i`` spans
#: ``i - 1 .. i + 2``.
GHOST = 2


class _PlanArrays:
    """Arrays of dead plans, handed to the next plan of the same size.

    A solver builds four plans per velocity (two Euler, two RK2) and drops the previous
    velocity's; at 256^3 float32 one plan is 16.7 M points x 16 bytes = 0.25 GiB. Page-faulting
    fresh memory for every plan cost up to several times the stencil computation itself on the
    2-core machine of DESIGN.md section 5, so the array of a plan that is garbage-collected is
    kept for the next one. At most ``keep`` arrays of one dtype are kept, an array of another
    dtype empties the pool, and a plan takes from the pool before allocating, so the peak of a
    velocity update is unchanged. The first interpolation through any plan empties the pool:
    the update is over and the memory goes back to the allocator (the peak RSS of a
    registration comes later, in the Hessian matvecs or the outputs).
    """

    def __init__(self, keep=1):
        self.keep = keep
        self._key, self._free = None, []

    #: With several ranks the points a rank owns vary from plan to plan by a few percent:
    #: arrays are allocated with this much slack, and a kept array serves any plan it can hold
    #: that is not smaller than ``1 / SLACK**2`` of it.
    SLACK = 1.03

    def take(self, npts, dtype):
        """``(plan, parent)``: an ``(npts, 4)`` array (contents undefined), a view of
        ``parent``, the array to give back."""
        dtype = np.dtype(dtype)
        if self._free and self._key == dtype:
            parent = self._free[-1]
            if npts <= parent.shape[0] <= npts * self.SLACK ** 2:
                self._free.pop()
                return parent[:npts], parent
        capacity = npts if npts < 65536 else int(npts * self.SLACK)
        parent = np.empty((capacity, 4), dtype)
        return parent[:npts], parent

    def give(self, parent):
        if parent.dtype != self._key:
            self._key, self._free = parent.dtype, []
        if len(self._free) < self.keep:
            self._free.append(parent)
        elif self._free[-1].shape[0] < parent.shape[0]:
            self._free[-1] = parent

    @property
    def holding(self):
        return bool(self._free)

    def clear(self):
        """Release the kept arrays (e.g. when a solve is over)."""
        self._key, self._free = None, []


#: The process's pool of plan arrays (see :class:`_PlanArrays`); ``_PLAN_ARRAYS.clear()``
#: hands its memory back.
_PLAN_ARRAYS = _PlanArrays()

#: Ghost-padded scratch blocks per decomposition (see ``InterpolationPlan._padded_buffer``).
_PADDED = weakref.WeakKeyDictionary()


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
    displacement : bool
        ``points`` of shape ``(3, *local_shape)`` are displacements (grid units) of this rank's
        grid nodes, the query points ``x + points``: no float64 array of points is formed
        (16 bytes per point less at the peak of a velocity update than passing ``x + u``).
    scale : 3 floats, optional
        With ``displacement``: the query points are ``x_a + scale_a points[a]`` (e.g. a time
        step over the grid spacing, for a velocity in physical units).

    Notes
    -----
    Building: wrap the points, find each one's owner from the block table of the real
    layout, sort by owner (stable, so grid order is kept within each destination), send the
    other ranks' points with ``Alltoallv`` (the points this rank owns itself, usually most,
    stay put), and store on the owner the flat corner index into its padded block and the 3
    fractions of each point (16 bytes in float32; the kernel evaluates the weights). With one
    rank there is no routing: the points are wrapped as the plan is built. Applying: halo
    exchange of width 2, the numba kernel, ``Alltoallv`` back for the others' points, un-sort.
    """

    def __init__(self, decomp, points, *, kind="lagrange", spectral=None, displacement=False, scale=None):
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
        if displacement and points.shape[1:] != decomp.local_shape:
            raise ValueError(f"displacements of shape {points.shape}, expected {(3,) + decomp.local_shape}")
        if points.dtype not in (np.float32, np.float64):
            points = points.astype(np.float64)
        self.decomp, self.kind, self.spectral = decomp, kind, spectral
        self.out_shape = points.shape[1:]
        x = points.reshape(3, -1)
        if not np.all(np.isfinite(x)):
            raise ValueError("interpolation points must be finite (is the velocity field finite?)")
        self.num_points = x.shape[1]
        lo = [s.start for s in decomp.real_slice]
        nodes = (lo, decomp.local_shape) if displacement else None
        origin = (lo[0] - GHOST, lo[1] - GHOST, -GHOST)
        self._padded_shape = tuple(n_ + 2 * GHOST for n_ in decomp.local_shape)
        plan_args = dict(kind=kind, dtype=decomp.dtype)
        if decomp.size > 1:
            # points that stay on this rank (most of them) bypass MPI: only the others travel
            starts0, starts1, table = self._block_table()
            counts, wrapped, self._order = _routing.route_points(x, decomp.shape, starts0, starts1, table,
                                                                 nodes=nodes, scale=scale)
            me = decomp.rank
            self._own_start, self._own_count = int(counts[:me].sum()), int(counts[me])
            self._send_counts = counts.copy()
            self._send_counts[me] = 0
            self._recv_counts = decomp.alltoall_counts(self._send_counts)
            displs = 3 * np.concatenate(([0], np.cumsum(counts)[:-1]))  # skips this rank's own block
            received = decomp.alltoallv(wrapped.ravel(), 3 * self._send_counts, 3 * self._recv_counts, displs)
            own = wrapped[self._own_start:self._own_start + self._own_count]
            self.num_owned = self._own_count + received.size // 3
            plan, parent = _PLAN_ARRAYS.take(self.num_owned, decomp.dtype)
            _interp.stencil_plan(own.T, origin, self._padded_shape, out=plan[:self._own_count], **plan_args)
            _interp.stencil_plan(received.reshape(-1, 3).T, origin, self._padded_shape,
                                 out=plan[self._own_count:], **plan_args)
            self._plan = plan
            del wrapped, own, received
        else:  # the routing is the identity: no exchange, no un-sorting
            self._order = None
            self.num_owned = x.shape[1]
            plan, parent = _PLAN_ARRAYS.take(self.num_owned, decomp.dtype)
            self._plan = _interp.stencil_plan(x, origin, self._padded_shape, out=plan, period=decomp.shape,
                                              nodes=nodes, scale=scale, **plan_args)
        weakref.finalize(self, _PLAN_ARRAYS.give, parent).atexit = False

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
        """The ghost-padded scratch block for ``components`` (0: scalar), shared by all plans
        of the decomposition (an interpolation uses it only while it runs)."""
        buffers = _PADDED.setdefault(self.decomp, {})
        key = (components, np.dtype(self.decomp.dtype).str)
        if key not in buffers:
            buffers[key] = np.empty(((components,) if components else ()) + self._padded_shape, self.decomp.dtype)
        return buffers[key]

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
        shape = ((comps,) if vector else ()) + self.out_shape
        if out is None:
            out = np.empty(shape, decomp.dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        c = max(comps, 1)
        flat = out.reshape((c, -1))
        local = self._order is None
        direct = local and out.dtype == decomp.dtype and out.flags.c_contiguous  # flat is a view of out
        values = flat if direct else np.empty((c, self.num_owned), decomp.dtype)
        padded = self._padded_buffer(0)
        for k in range(c):  # one scalar halo block at a time: no padded vector field
            decomp.exchange_halo(field[k] if vector else field, GHOST, out=padded)
            _interp.interpolate_planned(padded, self._plan, self.kind, out=values[k])
        if local:
            if not direct:
                out[...] = values.reshape(shape)
            return out
        target = flat if out.flags.c_contiguous else np.empty((c, self.num_points), decomp.dtype)
        start, count = self._own_start, self._own_count
        before, own, after = self._order[:start], self._order[start:start + count], self._order[start + count:]
        for k in range(c):  # component by component (no transposes); own points without MPI
            target[k, own] = values[k, :count]
            back = decomp.alltoallv(values[k, count:], self._recv_counts, self._send_counts)
            target[k, before] = back[:start]
            target[k, after] = back[start:]
        if target is not flat:
            out[...] = target.reshape(shape)
        return out


class IdentityPlan:
    """The plan of a zero displacement: every point is its own grid node, so interpolating
    is copying (exactly what every interpolating kind gives there, without building a plan
    or exchanging a halo). Same ``interpolate`` interface as :class:`InterpolationPlan`."""

    def __init__(self, decomp):
        self.decomp = decomp
        self.out_shape = decomp.local_shape

    def interpolate(self, field, out=None):
        """A copy of ``field`` (``(n1, n2, n3)`` or ``(C, n1, n2, n3)``), into ``out`` when given."""
        if field.shape[-3:] != self.decomp.local_shape or field.ndim not in (3, 4):
            raise ValueError(f"field of shape {field.shape} does not match the local block {self.decomp.local_shape}")
        if out is None:
            return np.array(field, dtype=self.decomp.dtype, copy=True)
        if out.shape != field.shape:
            raise ValueError(f"out has shape {out.shape}, expected {field.shape}")
        if out is not field:
            out[...] = field
        return out
