"""claire_py against the original CLAIRE's runs on its brain pair at 64^3 (tests/data/claire_b64).

For each reference run (CLAIRE's default model RELAXEDSTOKES = ``h1s-div`` and ``-regnorm h1s``,
each at CLAIRE's default tolerance and at ``-opttol 1e-3``), registers the same pair with the
same settings in float64 through the public API and prints, beside CLAIRE's figures: ||g0|| in
CLAIRE's norm (sqrt(hd) ||g||_L2), Gauss-Newton iterations, Hessian matvecs, final
||g||/||g0||, D/D0, the det(grad y) range (CLAIRE's converted to the pull-back map: 1/max,
1/min) and, for the tight runs, ||v - v_CLAIRE|| / ||v_CLAIRE||. Uses only ``claire_py.register``,
so an older checkout's venv can run it too (``--norm`` overrides the model, e.g. to run an old
default).

Run::

    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_conformance.py --json /tmp/conf.json
    /tmp/old/.venv/bin/mpiexec -n 2 /tmp/old/.venv/bin/python benchmarks/bench_conformance.py --norm h1s
"""

import argparse
import json
import math
import os
import sys
import time

import nibabel as nib
import numpy as np
from mpi4py import MPI

import claire_py

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "claire_b64")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="default,h1s,default_tight,h1s_tight")
    parser.add_argument("--norm", help="regularisation model to use instead of the run's own")
    parser.add_argument("--json")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    with open(os.path.join(DATA, "reference.json")) as fh:
        reference = json.load(fh)["runs"]
    images = [np.asanyarray(nib.load(os.path.join(DATA, f)).dataobj).astype(np.float64) if comm.rank == 0 else None
              for f in ("brain01_64.nii.gz", "brain02_64.nii.gz")]
    velocities = np.load(os.path.join(DATA, "velocities.npz"))
    hd = (2 * math.pi / 64) ** 3
    rows = []
    if comm.rank == 0:
        print(f"{'run':>14} {'model':>8} {'||g0||':>13} {'CLAIRE':>13} {'GN':>6} {'matvecs':>8} {'||g||/||g0||':>17} "
              f"{'D/D0':>17} {'det range':>15} {'CLAIRE (1/max, 1/min)':>22} {'|v-v_C|/|v_C|':>13} {'time':>6}")
    for run in args.runs.split(","):
        ref = reference[run]
        norm = args.norm or ref["model"]
        cfg = claire_py.RegistrationConfig.from_dict({
            "regularization": {"norm": norm},
            "newton": {"gradient_tolerance": 1e-3 if run.endswith("tight") else 5e-2},
            "continuation": {"grid_continuation": False}, "affine": {"mode": "none"}, "precision": "float64"})
        t0 = time.perf_counter()
        res = claire_py.register(*images, config=cfg)
        seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if comm.rank != 0:
            continue
        h = res.history
        row = dict(name="conformance", run=run, norm=norm, n=64, dtype="float64", ranks=comm.size, threads=0,
                   g0=h[0].grad_norm * math.sqrt(hd), g0_claire=ref["g0"],
                   gn=sum(1 for x in h if x.iteration > 0), gn_claire=ref["gauss_newton_iterations"],
                   matvecs=res.workload["hessian_matvec"]["pcg_iterations"], matvecs_claire=ref["matvecs"],
                   grad_rel=h[-1].grad_rel, grad_rel_claire=ref["final_grad_rel"],
                   mismatch_rel=h[-1].mismatch ** 2, mismatch_rel_claire=ref["mismatch_rel"],
                   det_min=float(res.det_grad_y.min()), det_max=float(res.det_grad_y.max()),
                   det_min_claire=1 / ref["det_max"], det_max_claire=1 / ref["det_min"], value=seconds, unit="s")
        if run in velocities.files:
            expected = velocities[run].astype(np.float64)
            row["velocity_difference"] = float(np.linalg.norm(res.velocity - expected) / np.linalg.norm(expected))
        rows.append(row)
        diff = f"{100 * row['velocity_difference']:12.2f}%" if "velocity_difference" in row else f"{'':>13}"
        print(f"{run:>14} {norm:>8} {row['g0']:13.7e} {ref['g0']:13.7e} {row['gn']:3d}/{ref['gauss_newton_iterations']:<2d}"
              f" {row['matvecs']:4d}/{ref['matvecs']:<3d} {row['grad_rel']:8.3e}/{ref['final_grad_rel']:8.3e} "
              f"{row['mismatch_rel']:8.3e}/{ref['mismatch_rel']:8.3e} [{row['det_min']:.3f}, {row['det_max']:.3f}] "
              f"[{row['det_min_claire']:8.3f}, {row['det_max_claire']:8.3f}]   {diff} {seconds:6.1f}", flush=True)
    append_json(args.json, rows)


if __name__ == "__main__":
    main()
