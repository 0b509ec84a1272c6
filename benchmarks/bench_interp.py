"""Interpolation and transport benchmark at the rank count it is launched with.

For each grid size, precision and thread count:

* ``plan_build``   : building an InterpolationPlan for the RK2 departure points of every local
  grid node (routing, Alltoallv, stencil weights), seconds;
* ``interp_plan``  : one scalar interpolation through the plan (halo exchange + kernel +
  return exchange), Mpts/s with points = grid points, against the kernel alone on the same
  points (``reference``: the planned numba kernel without halo exchange and routing);
* ``state_solve`` / ``adjoint_solve`` : one full solve with nt = 4 (plans already built), seconds.

Run::

    .venv/bin/mpiexec -n 1 .venv/bin/python benchmarks/bench_interp.py --threads 1,2 --json out.json
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_interp.py --threads 1 --json out.json
"""

import argparse
import time

import numpy as np
from _common import append_json, median_times
from mpi4py import MPI

from claire_py.kernels import Decomposition, SpectralOperators
from claire_py.kernels._numba import interp
from claire_py.solvers.transport import SemiLagrangianTransport, TransportOptions


def velocity(d, amplitude_voxels=3.0):
    x = d.local_coordinates()
    h = d.spacing
    v = np.stack(np.broadcast_arrays(np.sin(x[1]) * np.cos(x[2]), np.sin(x[2] + x[0]), np.cos(x[0]) * np.sin(x[1])))
    return (amplitude_voxels * np.array(h)[:, None, None, None] * v).astype(d.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--solve-size", type=int, default=256, help="grid of the state/adjoint solve timing")
    parser.add_argument("--json")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for n in (int(s) for s in args.sizes.split(",")):
            for dt in args.dtypes.split(","):
                d = Decomposition((n, n, n), dtype=np.dtype(dt), threads=threads)
                ops = SpectralOperators(d)
                tr = SemiLagrangianTransport(d, ops, TransportOptions(nt=4))
                v = velocity(d)
                t0 = time.perf_counter()
                tr.set_velocity(v)
                t_set = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
                plan = tr.backward_plan
                f = np.cos(d.local_coordinates()[0] + d.local_coordinates()[1]).astype(d.dtype) + d.new_scalar()
                out = d.new_scalar()
                npts = d.allreduce(plan.num_points)
                padded = d.exchange_halo(f, 2)
                t_plan, t_kernel = median_times(
                    comm, [lambda: plan.interpolate(f, out=out),
                           lambda: interp.interpolate_planned(padded, plan._plan, plan.kind)], args.repeat)
                common = dict(n=n, dtype=dt, ranks=d.size, threads=d.threads)
                rows.append(dict(name="set_velocity", value=t_set, unit="s",
                                 note="4 plan builds (2 Euler + 2 RK2) + div v", **common))
                rows.append(dict(name="interp_plan", value=npts / t_plan / 1e6, unit="Mpts/s",
                                 reference="kernel only", reference_value=npts / t_kernel / 1e6, **common))
                if n == args.solve_size:
                    m0 = f
                    hist = tr.solve_state(m0)
                    state = tr.state_history(m0)
                    t_state, t_adj = median_times(
                        comm, [lambda: tr.solve_state(m0, out=hist), lambda: tr.solve_adjoint(hist[-1], state)],
                        max(1, args.repeat // 2))
                    rows.append(dict(name="state_solve", value=t_state, unit="s", nt=4, **common))
                    rows.append(dict(name="adjoint_solve", value=t_adj, unit="s", nt=4, **common))
                del tr, plan
    if comm.rank == 0:
        print(f"{'name':14} {'N':>5} {'dtype':8} {'ranks':>5} {'thr':>3} {'value':>10} {'unit':7} {'kernel-only':>11}")
        for r in rows:
            ref = f"{r['reference_value']:11.1f}" if "reference_value" in r else ""
            print(f"{r['name']:14} {r['n']:>5} {r['dtype']:8} {r['ranks']:>5} {r['threads']:>3} "
                  f"{r['value']:10.3f} {r['unit']:7} {ref}")
        append_json(args.json, rows)


if __name__ == "__main__":
    main()
