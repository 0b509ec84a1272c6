"""Interpolation kernel benchmark: the planned tricubic kernel against the direct one, serial.

For each grid size N, precision and numba thread count, the query points are all N^3 grid
points displaced by a smooth random field of a few voxels (wrapped into [0, N)), in grid
order — the departure points of a semi-Lagrangian step. Rows:

* ``interp_planned`` : ``interpolate_planned`` of one scalar field on the ghost-padded
  ``(N+4)^3`` block (plan built beforehand), Mpts/s;
* ``interp_plain``   : its portable plain-numba twin ``_interpolate_planned_plain`` (no SIMD
  intrinsic), same plan and field, Mpts/s;
* ``stencil_plan``   : building that plan (corner index + 3 fractions per point), Mpts/s;
* reference          : the direct kernel ``interpolate_periodic`` (index wrapping and weights
  per call) on the same points and field, in the same run, Mpts/s.

Run::

    python benchmarks/bench_interp_kernel.py --json out.json

Times are medians over ``--repeat`` runs, the kernels interleaved round-robin so that load
drifts of the (shared) machine affect all alike. Target: interp_planned >= 40 Mpts/s on one
thread and >= 65 on two at 256^3 float32.
"""

import argparse
import statistics
import time

import numba
import numpy as np
from _common import append_json

from claire_py.kernels._numba import interp
from claire_py.kernels._numba._jit import set_threads

GHOST = 2


def displaced_grid_points(n, amplitude=3.0, modes=4, seed=0):
    """(n^3, 3) float64 points ``i + u(i)`` in grid order, ``u`` a random trigonometric field
    of wavenumbers <= ``modes`` and amplitude ~``amplitude`` voxels, wrapped into [0, n)."""
    rng = np.random.default_rng(seed)
    x = 2 * np.pi * np.arange(n) / n
    pts = np.empty((n, n, n, 3))
    i = np.arange(n, dtype=np.float64)
    for a in range(3):
        k = rng.integers(1, modes + 1, 3)
        ph = rng.uniform(0, 2 * np.pi, 3)
        s0 = np.sin(k[0] * x + ph[0])[:, None, None]
        s1 = np.sin(k[1] * x + ph[1])[None, :, None]
        s2 = np.sin(k[2] * x + ph[2])[None, None, :]
        node = (i[:, None, None], i[None, :, None], i[None, None, :])[a]
        pts[..., a] = node + amplitude * (s0 * s1 + s1 * s2 + s2 * s0) / 3.0 * 2.0
    pts = np.mod(pts, n)
    pts[pts >= n] = 0.0
    return pts.reshape(-1, 3)


def timed(fns, repeat):
    """Median wall time of each callable, interleaved round-robin after one warm-up call."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256", help="comma-separated grid sizes N (N^3 grids)")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", default="1,2", help="comma-separated numba thread counts")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--kind", default="lagrange", choices=interp.KINDS)
    parser.add_argument("--json", help="append one JSON object per measurement to this file")
    args = parser.parse_args()
    rows = []
    print(f"numba {numba.__version__}, threading layer pool {numba.config.NUMBA_NUM_THREADS}, "
          f"kind {args.kind}, median of {args.repeat}")
    print(f"{'name':15s} {'N':>4s} {'dtype':8s} {'thr':>3s} {'Mpts/s':>8s} {'direct':>8s} {'speedup':>7s}")
    for n in (int(s) for s in args.sizes.split(",")):
        points = displaced_grid_points(n)
        npts = points.shape[0]
        for dt in (np.dtype(s) for s in args.dtypes.split(",")):
            field = np.random.default_rng(1).standard_normal((n, n, n)).astype(dt)
            fpad = np.pad(field, GHOST, mode="wrap")
            origin = (-GHOST,) * 3
            points_t = np.ascontiguousarray(points.T)  # (3, npts), as the plans take them
            plan = interp.stencil_plan(points_t, origin, fpad.shape, kind=args.kind, dtype=dt)
            bits, coef = interp._plan_bits(plan), interp.weight_coefficients(args.kind, dt)
            out = np.empty(npts, dt)
            out_ref = np.empty(npts, dt)
            out_plain = np.empty(npts, dt)
            s1 = fpad.shape[2]
            s0 = fpad.shape[1] * s1
            for threads in (int(t) for t in args.threads.split(",")):
                threads = set_threads(threads)
                t_plan, t_interp, t_plain, t_ref = timed(
                    [lambda: interp.stencil_plan(points_t, origin, fpad.shape, kind=args.kind, out=plan, dtype=dt),
                     lambda: interp.interpolate_planned(fpad, plan, args.kind, out=out),
                     lambda: interp._interpolate_planned_plain(fpad.ravel(), s0, s1, plan, bits, coef, out_plain),
                     lambda: interp.interpolate_periodic(field, points, kind=args.kind, out=out_ref)],
                    args.repeat)
                for o in (out, out_plain):
                    err = float(np.max(np.abs(o - out_ref)))
                    assert err < (1e-4 if dt == np.float32 else 1e-10), f"planned and direct kernels differ by {err}"
                ref = npts / t_ref / 1e6
                for name, t in (("interp_planned", t_interp), ("interp_plain", t_plain), ("stencil_plan", t_plan)):
                    value = npts / t / 1e6
                    print(f"{name:15s} {n:4d} {dt.name:8s} {threads:3d} {value:8.1f} {ref:8.1f} {value / ref:7.2f}",
                          flush=True)
                    rows.append(dict(name=name, n=n, dtype=dt.name, ranks=1, threads=threads, value=round(value, 2),
                                     unit="Mpts/s", reference="interpolate_periodic",
                                     reference_value=round(ref, 2)))
            del plan, fpad, field
    append_json(args.json, rows)


if __name__ == "__main__":
    main()
