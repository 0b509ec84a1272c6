"""MPI strong scaling: the same registration at each rank count; CSV and PNG.

The work is made identical at every rank count: the synthetic problem of
``bench_registration.py`` with ``max_iterations`` Gauss-Newton iterations (default 2), PCG
with a fixed forcing tolerance it cannot reach (1e-6) and ``--krylov`` iterations per step,
gradient tolerance 1e-6 (no early stop). Each (size, ranks) point is its own
``.venv/bin/mpiexec -n P .venv/bin/python benchmarks/bench_scaling.py --worker ...`` job; its
matvec count is printed so that equal work can be checked.

Threads per rank are claire_py's default (usable CPUs / ranks on the node, at least 1). The
baseline of the efficiency is 1 rank pinned to 1 CPU (``1x1``); ``1x2`` is 1 rank with 2
threads. Efficiency = T(1x1) / (cores x T) with cores = min(ranks x threads, physical cores).
Points with ranks x threads above the physical core count are labelled oversubscribed.

Run::

    .venv/bin/python benchmarks/bench_scaling.py --sizes 128,256 --ranks 1,2,4 --out /tmp/scaling
"""

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import emit, peak_rss_bytes, physical_cores, run_worker  # noqa: E402


def worker(args):
    if args.pin:  # before numba / FFTW start their thread pools
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from mpi4py import MPI

    import claire_py
    from bench_registration import synthetic_pair

    comm = MPI.COMM_WORLD
    cfg = claire_py.RegistrationConfig.from_dict({
        "precision": args.dtype, "affine": {"mode": "none"},  # the deformable solver alone
        "newton": {"max_iterations": args.max_iterations, "gradient_tolerance": 1e-6,
                   "absolute_gradient_tolerance": 1e-30,
                   "krylov": {"forcing": "fixed", "tolerance": 1e-6, "max_iterations": args.krylov}}})
    wf, wm = synthetic_pair(16) if comm.rank == 0 else (None, None)
    claire_py.register(wf, wm, config=claire_py.RegistrationConfig.from_dict({"newton": {"max_iterations": 1}}))
    fixed, moving = synthetic_pair(args.n) if comm.rank == 0 else (None, None)
    comm.Barrier()
    t0 = time.perf_counter()
    res = claire_py.register(fixed, moving, config=cfg)
    seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    rss = peak_rss_bytes(comm)
    if comm.rank == 0:
        from claire_py.kernels import Decomposition  # noqa: F401  (threads as the solve used them)

        work = res.workload
        emit(dict(n=args.n, ranks=comm.size, seconds=seconds, matvecs=work["hessian_matvec"]["pcg_iterations"],
                  gn_iterations=sum(1 for h in res.history if h.iteration > 0),
                  set_velocity=work.get("set_velocity", {}).get("count", 0), rss_max=rss,
                  threads=_threads_used(), mismatch=res.history[-1].mismatch))


def _threads_used():
    import numba

    return numba.get_num_threads()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pin", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-iterations", type=int, default=2)
    parser.add_argument("--krylov", type=int, default=5, help="PCG iterations per Gauss-Newton step")
    parser.add_argument("--out", default="/tmp/claire_scaling", help="CSV/PNG prefix")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    logical, physical = physical_cores()
    print(f"usable CPUs {logical}, physical cores {physical}")
    script = os.path.abspath(__file__)
    common = ["--dtype", args.dtype, "--max-iterations", args.max_iterations, "--krylov", args.krylov]
    ranks = [int(r) for r in args.ranks.split(",")]
    configs = []  # (label, ranks, pin)
    for p in ranks:
        if p == 1:
            configs.append(("1x1", 1, True))
            if logical > 1:
                configs.append((f"1x{logical}", 1, False))
        else:
            configs.append((f"{p}x{max(1, logical // p)}", p, False))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        base = None
        for label, p, pin in configs:
            r = run_worker(script, p, ["--n", n] + common + (["--pin"] if pin else []))
            used = p * r["threads"]
            cores = min(used, physical)
            if label == "1x1":
                base = r["seconds"]
            r.update(label=label, cores=cores, oversubscribed=used > physical,
                     speedup=base / r["seconds"] if base else float("nan"),
                     efficiency=base / (cores * r["seconds"]) if base else float("nan"))
            rows.append(r)
            print_row(r, flush=True)
    print()
    print(HEADER)
    for r in rows:
        print_row(r)
    with open(args.out + ".csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, args.out + ".png", physical)
    print(f"wrote {args.out}.csv and {args.out}.png")
    append_json(args.json, [dict(name="scaling", n=r["n"], dtype=args.dtype, ranks=r["ranks"], threads=r["threads"],
                                 value=r["seconds"], unit="s", reference="1 rank x 1 thread",
                                 reference_value=r["seconds"] * r["speedup"], efficiency=r["efficiency"],
                                 oversubscribed=r["oversubscribed"], matvecs=r["matvecs"]) for r in rows])


HEADER = (f"{'N':>5} {'config':>6} {'time [s]':>9} {'speedup':>7} {'eff.':>5} {'GN':>3} {'matvecs':>7} "
          f"{'plans':>5} {'RSS/rank':>8}  note")


def print_row(r, flush=False):
    note = "OVERSUBSCRIBED" if r["oversubscribed"] else ""
    print(f"{r['n']:5d} {r['label']:>6} {r['seconds']:9.2f} {r['speedup']:7.2f} {r['efficiency']:5.2f} "
          f"{r['gn_iterations']:3d} {r['matvecs']:7d} {r['set_velocity']:5d} {r['rss_max'] / 2**30:7.2f}G  {note}",
          flush=flush)


def plot(rows, path, physical):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(10, 4))
    for n in sorted({r["n"] for r in rows}):
        pts = [r for r in rows if r["n"] == n]
        xs = list(range(len(pts)))
        ax_t.plot(xs, [r["seconds"] for r in pts], "o-", label=f"{n}^3")
        ax_e.plot(xs, [r["efficiency"] for r in pts], "o-", label=f"{n}^3")
        for ax, key in ((ax_t, "seconds"), (ax_e, "efficiency")):
            for x, r in zip(xs, pts):
                if r["oversubscribed"]:
                    ax.annotate("oversub.", (x, r[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        labels = [r["label"] for r in pts]
    for ax in (ax_t, ax_e):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels)
        ax.set_xlabel(f"ranks x threads ({physical} physical cores)")
        ax.legend()
    ax_t.set_ylabel("time [s]")
    ax_t.set_yscale("log")
    ax_e.set_ylabel("parallel efficiency vs 1x1")
    ax_e.set_ylim(0, 1.2)
    fig.suptitle("claire_py strong scaling (synthetic, fixed work)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
