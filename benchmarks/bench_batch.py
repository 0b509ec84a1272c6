"""``claire batch`` scheduling: dynamic hand-out against a static round-robin split.

Jobs of very unequal size (``--big``^3 and ``--small``^3 synthetic pairs, float32, a fixed
number of Gauss-Newton iterations) run on ``G`` groups of ``--ranks-per-job`` ranks, launched
as ``P = 1 + G K`` ranks:

* ``value``    : :func:`claire_py.batch` — world rank 0 hands the next job to whichever
  group asks (it sleeps in between, so the ``1 +`` rank costs no core).
* reference    : static round robin over the same groups, same registrations and outputs:
  group ``g`` runs jobs ``g, g + G, g + 2G, ...`` in order (the idle rank 0 sleeps too).

Two job orders: ``alternating`` (big, small, big, small, ...: with two groups round robin puts
every big job on one group) and ``shuffled`` (a seeded random order). ``ideal`` is
``max(sum of job times / G, longest job)`` from the dynamic run's own per-job times. Numba
compilation is warmed up on every group before timing. Wall times are the slowest rank's,
the median of ``--repeat`` runs, static and dynamic interleaved (alternating which goes first)
so that drifts in the machine's load affect both alike.

Run (2 cores: two 1-rank groups + the dispatcher, one thread per rank)::

    NUMBA_NUM_THREADS=1 .venv/bin/mpiexec -n 3 .venv/bin/python benchmarks/bench_batch.py --json out.json

Threads: a registration on a group takes ``cores / (the group's ranks on the node)`` threads
(the kernels' default counts the communicator it is given, not the whole job), so without
``NUMBA_NUM_THREADS=1`` (which caps FFTW's threads too) two 1-rank groups run 2 threads each
on 2 cores: oversubscribed, and a group left alone with the big jobs borrows the cores the
idle one frees, which hides the imbalance that the dynamic hand-out removes.
"""

import argparse
import os
import shutil
import statistics
import tempfile
import time

import nibabel as nib
import numpy as np
from _common import append_json
from mpi4py import MPI

import claire_py
from claire_py.batch import batch
from claire_py.kernels import Decomposition


def synthetic_pair(n, shift=0.4):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - shift * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed.astype(np.float32), moving.astype(np.float32)


def wait_all(comm):
    """A barrier whose waiting ranks sleep instead of spinning (the cores are the workers')."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def static_round_robin(jobs, outdir, comm, k, config):
    """Group ``g`` of ranks ``1 + g K .. `` runs jobs ``g, g + G, ...`` (rank 0 idles, as in
    the dynamic run); same registrations and outputs as :func:`claire_py.batch`."""
    rank = comm.Get_rank()
    groups = (comm.Get_size() - 1) // k
    group = comm.Split(MPI.UNDEFINED if rank == 0 else (rank - 1) // k, key=rank)
    if rank != 0:
        for job in jobs[(rank - 1) // k::groups]:
            res = claire_py.register(job["fixed"], job["moving"], config=config, comm=group)
            res.save(os.path.join(outdir, job["name"]), overwrite=True,
                     inputs={"fixed": job["fixed"], "moving": job["moving"]})
        group.Free()


def timed(comm, fn):
    wait_all(comm)
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    wait_all(comm)
    return comm.allreduce(elapsed, op=MPI.MAX)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--big", type=int, default=48, help="grid of the big jobs (N^3)")
    parser.add_argument("--small", type=int, default=16, help="grid of the small jobs (N^3)")
    parser.add_argument("--jobs", type=int, default=8, help="number of jobs, half big, half small")
    parser.add_argument("--max-iter", type=int, default=10, help="Gauss-Newton iterations of every job (all taken)")
    parser.add_argument("--ranks-per-job", type=int, default=1)
    parser.add_argument("--orders", default="alternating,shuffled")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="append one JSON object per measurement to this file")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, size, k = comm.Get_rank(), comm.Get_size(), args.ranks_per_job
    if size < 1 + 2 * k or (size - 1) % k:
        raise SystemExit(f"run with P = 1 + G * {k} ranks, G >= 2 groups (e.g. mpiexec -n {1 + 2 * k})")
    groups = (size - 1) // k
    work = comm.bcast(tempfile.mkdtemp(prefix="claire-bench-batch-") if rank == 0 else None)
    if rank == 0:
        for n in {args.big, args.small}:
            fixed, moving = synthetic_pair(n)
            nib.save(nib.Nifti1Image(fixed, np.eye(4)), os.path.join(work, f"f{n}.nii.gz"))
            nib.save(nib.Nifti1Image(moving, np.eye(4)), os.path.join(work, f"m{n}.nii.gz"))
    comm.Barrier()
    config = {"newton": {"max_iterations": args.max_iter, "gradient_tolerance": 1e-9}, "precision": "float32"}
    cfg = claire_py.RegistrationConfig.from_dict(config)

    def job(i, n):
        return {"name": f"job{i}_{n}", "fixed": os.path.join(work, f"f{n}.nii.gz"),
                "moving": os.path.join(work, f"m{n}.nii.gz")}

    # threads of a group's registration, and numba warmed up on every group
    group = comm.Split(MPI.UNDEFINED if rank == 0 else (rank - 1) // k, key=rank)
    threads = 0 if rank == 0 else Decomposition((args.small,) * 3, comm=group, dtype=np.float32).threads
    if rank != 0:
        group.Free()
    threads = comm.allreduce(threads, op=MPI.MAX)
    batch([job(i, args.small) for i in range(groups)], os.path.join(work, "warmup"), comm=comm, ranks_per_job=k,
          config=config)

    rows = []
    for order in args.orders.split(","):
        sizes = [args.big if i % 2 == 0 else args.small for i in range(args.jobs)]
        if order == "shuffled":
            np.random.default_rng(3).shuffle(sizes)
        elif order != "alternating":
            raise SystemExit(f"unknown order {order!r}")
        jobs = [job(i, n) for i, n in enumerate(sizes)]
        times = {"static": [], "dynamic": [], "ideal": []}

        def dynamic():
            done = batch(jobs, os.path.join(work, f"dynamic-{order}"), comm=comm, ranks_per_job=k, config=config,
                         overwrite=True)
            assert all(r["status"] == "complete" for r in done)
            seconds = [r["seconds"] for r in done]
            times["ideal"].append(max(sum(seconds) / groups, max(seconds)))

        def static():
            static_round_robin(jobs, os.path.join(work, f"static-{order}"), comm, k, cfg)

        for repeat in range(args.repeat):
            for kind in ("static", "dynamic") if repeat % 2 == 0 else ("dynamic", "static"):
                times[kind].append(timed(comm, static if kind == "static" else dynamic))
        rows.append(dict(name=f"batch_dynamic_{order}", n=args.big, dtype="float32", ranks=size, threads=threads,
                         value=statistics.median(times["dynamic"]), unit="s", reference="static round robin",
                         reference_value=statistics.median(times["static"]), jobs=" ".join(str(n) for n in sizes),
                         groups=groups, ranks_per_job=k, ideal=statistics.median(times["ideal"]),
                         repeat=args.repeat))
    if rank == 0:
        print(f"{len(sizes)} jobs ({args.big}^3 and {args.small}^3, float32, {args.max_iter} Gauss-Newton iterations "
              f"each) on {groups} group(s) of {k} rank(s) + the dispatcher, {threads} thread(s) per rank; median of "
              f"{args.repeat} runs")
        print(f"{'order':12} {'sizes':28} {'dynamic [s]':>11} {'static [s]':>10} {'ratio':>6} {'ideal [s]':>9}")
        for r in rows:
            print(f"{r['name'][14:]:12} {r['jobs']:28} {r['value']:11.2f} {r['reference_value']:10.2f} "
                  f"{r['value'] / r['reference_value']:6.2f} {r['ideal']:9.2f}")
        append_json(args.json, rows)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
