"""Memory model: ``claire_py.api.estimate_memory`` against measured peak RSS, and its predictions.

1. Runs the synthetic registration of ``bench_registration.py`` (one MPI job per point, so
   that ``ru_maxrss`` is the point's own) at ``--sizes`` and ``--ranks``, with
   ``--max-iterations`` Gauss-Newton iterations (1 is enough: every iteration allocates the
   same; the outputs after the solve are included) — or reads those rows from a
   ``bench_registration.py --json`` file (``--from-json``).
2. Compares the measured peak RSS of rank 0 (max over ranks) with the prediction
   ``per_rank + root_extra`` of ``estimate_memory`` and the sum over ranks with
   ``P * per_rank + root_extra``; also with a two-term fit ``base + bytes_per_point * N^3 / P``
   from the two largest points.
3. Prints ``estimate_memory``'s predictions for 512^3 and 1024^3 at P = 1, 8, 64, 512.

Run::

    .venv/bin/python benchmarks/bench_memory.py --sizes 64,128,256 --ranks 1,2
    .venv/bin/python benchmarks/bench_memory.py --from-json /tmp/reg.json
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import run_worker  # noqa: E402

GIB = 2.0 ** 30


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64,128,256")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-iterations", type=int, default=1)
    parser.add_argument("--recompute-gradients", action="store_true",
                        help="measure and model the runs without stored grad m(t_j) (transport.store_gradients off)")
    parser.add_argument("--lean", action="store_true",
                        help="measure and model the memory guard's leanest runs (also newton.keep_gradient off)")
    parser.add_argument("--from-json", help="use the register_synthetic rows of a bench_registration.py --json file")
    parser.add_argument("--json")
    args = parser.parse_args()
    from claire_py import api

    def estimate_memory(shape, ranks, dtype):
        return api.estimate_memory(shape, ranks, dtype, store_gradients=not (args.recompute_gradients or args.lean),
                                   keep_gradient=not args.lean)

    measured = []
    if args.from_json:
        with open(args.from_json) as fh:
            for line in fh:
                r = json.loads(line)
                if r["name"] == "register_synthetic" and r["dtype"] == args.dtype:
                    measured.append(dict(n=int(r["shape"].split("^")[0]), ranks=r["ranks"], rss_max=r["rss_max"],
                                         rss_sum=r["rss_sum"]))
    else:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_registration.py")
        for p in (int(r) for r in args.ranks.split(",")):
            for n in (int(s) for s in args.sizes.split(",")):
                r = run_worker(script, p, ["--case", "synthetic", "--n", n, "--dtype", args.dtype,
                                           "--max-iterations", args.max_iterations, "--krylov-max", 5]
                               + (["--recompute-gradients"] if args.recompute_gradients else [])
                               + (["--lean"] if args.lean else []))
                measured.append(dict(n=n, ranks=p, rss_max=r["rss_max"], rss_sum=r["rss_sum"]))
                print(f"measured {n}^3 on {p} rank(s): peak RSS {r['rss_max'] / GIB:.2f} GiB per rank (max), "
                      f"{r['rss_sum'] / GIB:.2f} GiB in all", flush=True)
    # two-term fit on the largest two grids at one rank count: RSS_max = base + b * points / P + root * points
    fit = None
    for p in sorted({m["ranks"] for m in measured}):
        pts = sorted((m for m in measured if m["ranks"] == p), key=lambda m: m["n"])
        if len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            per_pt = (b["rss_max"] - a["rss_max"]) / ((b["n"] ** 3 - a["n"] ** 3) / p)
            fit = (b["rss_max"] - per_pt * b["n"] ** 3 / p, per_pt, p)
            break
    rows = []
    print(f"\n{'N':>5} {'P':>3} {'measured max':>12} {'estimate':>9} {'ratio':>6} {'measured sum':>12} "
          f"{'estimate':>9} {'ratio':>6} {'fit max':>8} {'ratio':>6}")
    for m in sorted(measured, key=lambda m: (m["ranks"], m["n"])):
        per_rank, root = estimate_memory((m["n"],) * 3, m["ranks"], args.dtype)
        est_max, est_sum = per_rank + root, m["ranks"] * per_rank + root
        fit_max = fit[0] + fit[1] * m["n"] ** 3 / m["ranks"] if fit else float("nan")
        print(f"{m['n']:5d} {m['ranks']:3d} {m['rss_max'] / GIB:11.2f}G {est_max / GIB:8.2f}G "
              f"{m['rss_max'] / est_max:6.2f} {m['rss_sum'] / GIB:11.2f}G {est_sum / GIB:8.2f}G "
              f"{m['rss_sum'] / est_sum:6.2f} {fit_max / GIB:7.2f}G {m['rss_max'] / fit_max:6.2f}")
        rows.append(dict(name="peak_rss", n=m["n"], dtype=args.dtype, ranks=m["ranks"], threads=0,
                         value=m["rss_max"], unit="B", reference="estimate_memory per_rank + root",
                         reference_value=est_max, rss_sum=m["rss_sum"], estimate_sum=est_sum))
    if fit:
        model = (estimate_memory((256,) * 3, 1, args.dtype)[0] - estimate_memory((128,) * 3, 1, args.dtype)[0]) / (
            256 ** 3 - 128 ** 3)
        print(f"fit (P = {fit[2]}, two largest grids): base {fit[0] / 2**20:.0f} MiB + {fit[1]:.0f} B per local point; "
              f"estimate_memory: 190 MiB + ~{model:.0f} B per local point (+ rank 0's global arrays)")
    print(f"\nestimate_memory predictions ({args.dtype}), GiB per rank (+ extra on rank 0):")
    print(f"{'N':>5} " + " ".join(f"{'P=' + str(p):>16}" for p in (1, 8, 64, 512)))
    for n in (512, 1024):
        cells = []
        for p in (1, 8, 64, 512):
            per_rank, root = estimate_memory((n,) * 3, p, args.dtype)
            cells.append(f"{per_rank / GIB:7.2f} (+{root / GIB:5.1f})")
        print(f"{n:5d} " + " ".join(f"{c:>16}" for c in cells))
    append_json(args.json, rows)


if __name__ == "__main__":
    main()
