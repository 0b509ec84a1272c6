"""``claire batch``: the MPI engine against the Parsl engine on the same job lists.

Both run the whole command on this machine, ``G = cores / K`` jobs at a time with one thread
per rank (``NUMBA_NUM_THREADS``), from an empty output directory, numba's cache warm:

* ``mpi``   : ``mpiexec -n 1+G*K claire batch LIST -o OUT`` (rank 0 hands the jobs out and sleeps);
* ``parsl`` : ``claire batch LIST -o OUT --engine parsl`` (the default local configuration:
  an MPIExecutor on a LocalProvider, G workers, each job its own ``mpiexec -n K``).

Lists: ``brain`` — the bundled 2 mm pair (``data/``) under a sweep of ``--betas`` (real jobs of
seconds each); ``tiny`` — ``--tiny`` 16³ synthetic jobs of one Gauss-Newton iteration (what is
left is the engines' own cost). Per list and engine: wall time (median of ``--repeat``
interleaved runs), the jobs' summed registration time (``seconds`` in ``results.csv``), the
idle share of the cores ``1 - summed / (cores * wall)``, and Parsl's added cost per job
``(wall_parsl - wall_mpi) * G / jobs``.

Run (one process; it starts the engines itself)::

    .venv/bin/python benchmarks/bench_batch_engines.py --json out.json
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from _common import append_json

from claire_py.parallel import without_launcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(os.path.abspath(sys.executable))


def _clean_env(threads):
    env = without_launcher()
    env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS="1")
    return env


def _lists(work, betas, tiny):
    data = os.path.join(ROOT, "data")
    with open(os.path.join(work, "brain.csv"), "w") as fh:
        fh.write("name,fixed,moving\n")
        fh.write(f"mni_colin,{data}/mni152_2009_t1_2mm.nii.gz,{data}/colin27_t1_2mm.nii.gz\n")
    n = 16
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - 0.3 * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), np.eye(4)), os.path.join(work, "f16.nii.gz"))
    nib.save(nib.Nifti1Image(moving.astype(np.float32), np.eye(4)), os.path.join(work, "m16.nii.gz"))
    with open(os.path.join(work, "tiny.csv"), "w") as fh:
        fh.write("name,fixed,moving,max-iter\n")
        for i in range(tiny):
            fh.write(f"tiny{i},f16.nii.gz,m16.nii.gz,1\n")
    return {"brain": (os.path.join(work, "brain.csv"), ["--sweep", "beta=" + betas]),
            "tiny": (os.path.join(work, "tiny.csv"), [])}


def _run(engine, jobs, extra, outdir, cores, k):
    groups = max(1, cores // k)
    if engine == "mpi":
        command = [os.path.join(BIN, "mpiexec"), "-n", str(1 + groups * k), os.path.join(BIN, "claire"), "batch"]
    else:
        command = [os.path.join(BIN, "claire"), "batch", "--engine", "parsl"]
    command += [jobs, "-o", outdir, "--ranks-per-job", str(k), "--no-report"] + extra
    shutil.rmtree(outdir, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run(command, env=_clean_env(max(1, cores // (groups * k))), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    with open(os.path.join(outdir, "results.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["status"] == "complete" for r in rows), rows
    return wall, sum(float(r["seconds"]) for r in rows), len(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", default="1e-2,5e-3,2e-3,1e-3", help="the brain list's sweep of beta")
    parser.add_argument("--tiny", type=int, default=8, help="jobs of the tiny list")
    parser.add_argument("--ranks-per-job", type=int, default=1)
    parser.add_argument("--lists", default="tiny,brain")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", help="append one JSON object per measurement to this file")
    args = parser.parse_args()
    cores, k = len(os.sched_getaffinity(0)), args.ranks_per_job
    groups = max(1, cores // k)
    work = tempfile.mkdtemp(prefix="claire-bench-engines-")
    try:
        lists = _lists(work, args.betas, args.tiny)
        _run("mpi", *lists["tiny"], os.path.join(work, "warmup"), cores, k)  # numba's cache, FFTW wisdom
        rows = []
        for name in args.lists.split(","):
            jobs, extra = lists[name]
            measured = {"mpi": [], "parsl": []}
            for repeat in range(args.repeat):
                for engine in ("mpi", "parsl") if repeat % 2 == 0 else ("parsl", "mpi"):
                    measured[engine].append(_run(engine, jobs, extra, os.path.join(work, f"{name}-{engine}"),
                                                 cores, k))
            wall = {e: statistics.median(m[0] for m in measured[e]) for e in measured}
            busy = {e: statistics.median(m[1] for m in measured[e]) for e in measured}
            count = measured["mpi"][0][2]
            idle = {e: 1 - busy[e] / (cores * wall[e]) for e in measured}
            rows.append(dict(name=f"batch_engine_parsl_{name}", n=0, dtype="float32", ranks=k, threads=1,
                             value=wall["parsl"], unit="s", reference="mpi engine", reference_value=wall["mpi"],
                             jobs=count, groups=groups, cores=cores, idle_parsl=idle["parsl"], idle_mpi=idle["mpi"],
                             registration_seconds_parsl=busy["parsl"], registration_seconds_mpi=busy["mpi"],
                             parsl_overhead_per_job=(wall["parsl"] - wall["mpi"]) * groups / count,
                             repeat=args.repeat))
        print(f"claire batch on {cores} core(s): {groups} job(s) at a time of {k} rank(s), 1 thread each; "
              f"median of {args.repeat} interleaved runs")
        print(f"{'list':6} {'jobs':>4} {'mpi [s]':>8} {'parsl [s]':>9} {'ratio':>6} {'idle mpi':>8} "
              f"{'idle parsl':>10} {'parsl +s/job':>12}")
        for r in rows:
            print(f"{r['name'][19:]:6} {r['jobs']:4d} {r['reference_value']:8.2f} {r['value']:9.2f} "
                  f"{r['value'] / r['reference_value']:6.2f} {r['idle_mpi']:8.0%} {r['idle_parsl']:10.0%} "
                  f"{r['parsl_overhead_per_job']:12.2f}")
        append_json(args.json, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
