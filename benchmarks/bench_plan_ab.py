"""A/B of ``set_velocity`` and a state solve: the interpolation-plan code of an older commit
against the current kernels, interleaved in one process (same load for both).

The old ``kernels/interpolation.py`` and ``kernels/_numba/routing.py`` are extracted with
``git show COMMIT:...`` into a temporary directory and imported under other names; the
transport's ``InterpolationPlan`` is swapped between calls. Median of ``repeat`` after one
warm-up of each.

Run::

    .venv/bin/python benchmarks/bench_plan_ab.py --n 256 --repeat 3
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_plan_ab.py --n 256 --repeat 3
"""

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import ROOT  # noqa: E402
from bench_interp import velocity  # noqa: E402

from claire_py.kernels import Decomposition, SpectralOperators  # noqa: E402
from claire_py.kernels import interpolation as new_interpolation  # noqa: E402
from claire_py.solvers import transport as T  # noqa: E402


def old_plan_class(commit, comm):
    tmp = tempfile.mkdtemp(prefix=f"claire_ab_{comm.rank}_")

    def show(path):
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    with open(os.path.join(tmp, "ab_old_routing.py"), "w") as fh:
        fh.write(show("kernels/_numba/routing.py").replace("from ._jit import", "from claire_py.kernels._numba._jit import"))
    with open(os.path.join(tmp, "ab_old_interpolation.py"), "w") as fh:
        fh.write(show("kernels/interpolation.py")
                 .replace("from ._numba import interp as _interp", "from claire_py.kernels._numba import interp as _interp")
                 .replace("from ._numba import routing as _routing", "import ab_old_routing as _routing"))
    sys.path.insert(0, tmp)
    return importlib.import_module("ab_old_interpolation").InterpolationPlan


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--old", default="89de20c", help="commit of the reference plan code")
    parser.add_argument("--json")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    plans = {"old": old_plan_class(args.old, comm), "new": new_interpolation.InterpolationPlan}
    d = Decomposition((args.n,) * 3, dtype=np.float32)
    ops = SpectralOperators(d)
    v = velocity(d)
    m0 = np.cos(d.local_coordinates()[0]).astype(np.float32) + d.new_scalar()
    transports, res = {}, {"old": [], "new": []}
    for variant in ["old", "new"] * (args.repeat + 1):
        T.InterpolationPlan = plans[variant]
        tr = transports.setdefault(variant, T.SemiLagrangianTransport(d, ops, T.TransportOptions(nt=4)))
        comm.Barrier()
        t0 = time.perf_counter()
        tr.set_velocity(v)
        t1 = time.perf_counter()
        tr.solve_state(m0)  # what follows every velocity update in the solver
        t2 = time.perf_counter()
        res[variant].append((comm.allreduce(t1 - t0, op=MPI.MAX), comm.allreduce(t2 - t1, op=MPI.MAX)))
    T.InterpolationPlan = new_interpolation.InterpolationPlan
    med = {k: [statistics.median(r[i] for r in res[k][1:]) for i in (0, 1)] for k in res}
    if comm.rank == 0:
        print(f"N={args.n} float32 ranks={d.size} threads={d.threads}; median of {args.repeat} (old = {args.old})")
        for i, name in enumerate(("set_velocity", "state_solve")):
            print(f"{name:13s} old {med['old'][i]:7.3f} s  new {med['new'][i]:7.3f} s  old/new {med['old'][i] / med['new'][i]:.2f}"
                  f"   all old {[round(r[i], 2) for r in res['old'][1:]]} new {[round(r[i], 2) for r in res['new'][1:]]}")
        append_json(args.json, [dict(name=name, n=args.n, dtype="float32", ranks=d.size, threads=d.threads,
                                     value=med["new"][i], unit="s", reference=f"plan code of {args.old}",
                                     reference_value=med["old"][i]) for i, name in enumerate(("set_velocity", "state_solve"))])


if __name__ == "__main__":
    main()
