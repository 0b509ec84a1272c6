"""Time to solution of whole registrations, with DIPY's SyN side by side when installed.

Cases (each in its own MPI job, so that peak RSS is the case's own):

* ``pair``: the bundled brain pair (MNI152 2009 fixed, Colin 27 moving, 99x117x95 at 2 mm)
  with the README Quick start settings (CLAIRE's defaults: h1s-div, beta = 1e-2, nt = 4,
  float32, ||g||/||g0|| <= 5e-2);
* ``synthetic N``: ``fixed = f(x)``, ``moving = f(x + u(x))`` on N^3 (``f`` a few periodic
  blobs, ``u`` a smooth displacement of 0.2 rad, i.e. 2 voxels at 64^3, 8 at 256^3), default
  settings (beta = 1e-2);
* ``dipy`` (when ``import dipy`` works): DIPY's SymmetricDiffeomorphicRegistration with
  ``CCMetric(3)`` and its default level_iters on the same pair, fed the same normalised and
  smoothed intensities that our solver sees; its relative mismatch is computed on them the
  same way as ours (``||warped - fixed|| / ||moving - fixed||``) and det(grad y) from its
  forward field (np.gradient).

Per case: wall time of ``claire_py.register`` (slowest rank; a 16^3 warm-up registration runs
first in the same process so that loading numba's cached kernels is not counted), Gauss-Newton
iterations, Hessian matvecs (PCG iterations), final relative mismatch, det(grad y) range, peak
RSS (max over ranks, and the sum over ranks).

Run::

    .venv/bin/python benchmarks/bench_registration.py --ranks 2,1 --sizes 64,128 --json /tmp/reg.json
    .venv/bin/python benchmarks/bench_registration.py --ranks 2 --sizes 256 --no-pair --no-dipy
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json  # noqa: E402
from _launch import ROOT, emit, peak_rss_bytes, run_worker  # noqa: E402

PAIR = ("data/mni152_2009_t1_2mm.nii.gz", "data/colin27_t1_2mm.nii.gz")
GIB = 2.0 ** 30


def synthetic_pair(n, amplitude=0.2):
    """``(fixed, moving)`` float32 global arrays on n^3: periodic blobs and the same blobs
    displaced by a smooth field of ``amplitude`` radians. Built a slab of axis-0 planes at a
    time, so that the generator's temporaries stay small next to the registration's memory."""
    x = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x1, x2 = x[None, :, None], x[None, None, :]
    centres = [(2.0, 2.5, 3.0), (4.0, 3.5, 2.5), (3.0, 4.5, 4.0), (3.5, 2.0, 4.5)]

    def f(y0, y1, y2):
        out = 0.0
        for c in centres:
            out = out + np.exp(4.0 * (np.cos(y0 - c[0]) + np.cos(y1 - c[1]) + np.cos(y2 - c[2]) - 3.0))
        return out

    fixed, moving = np.empty((n, n, n), np.float32), np.empty((n, n, n), np.float32)
    for start in range(0, n, 8):
        x0 = x[start:start + 8, None, None]
        fixed[start:start + 8] = f(x0, x1, x2)
        u0 = amplitude * np.sin(x1) * np.cos(x2)
        u1 = amplitude * np.sin(x2) * np.cos(x0)
        u2 = amplitude * np.sin(x0) * np.cos(x1)
        moving[start:start + 8] = f(x0 + u0, x1 + u1, x2 + u2)
    return fixed, moving


def worker(args):
    from mpi4py import MPI

    import claire_py

    comm = MPI.COMM_WORLD
    if args.case == "dipy":
        return emit(dipy_case())
    overrides = {"precision": args.dtype}
    if args.beta:
        overrides["regularization"] = {"beta": args.beta}
    if args.max_iterations is not None:
        overrides.setdefault("newton", {})["max_iterations"] = args.max_iterations
    if args.krylov_max is not None:
        overrides.setdefault("newton", {})["krylov"] = {"max_iterations": args.krylov_max}
    if args.nt is not None:
        overrides["transport"] = {"nt": args.nt}
    if args.recompute_gradients or args.lean:
        overrides.setdefault("transport", {})["store_gradients"] = False
    if args.lean:
        overrides.setdefault("newton", {})["keep_gradient"] = False
    cfg = claire_py.RegistrationConfig.from_dict(overrides)
    # warm-up: load numba's cached kernels, FFTW wisdom, etc. (not counted)
    wf, wm = synthetic_pair(16) if comm.rank == 0 else (None, None)
    claire_py.register(wf, wm, config=claire_py.RegistrationConfig.from_dict(
        {"precision": args.dtype, "newton": {"max_iterations": 1}}))
    if args.case == "pair":
        fixed, moving = (os.path.join(ROOT, p) for p in PAIR)
        shape = "99x117x95"
    else:
        fixed, moving = synthetic_pair(args.n) if comm.rank == 0 else (None, None)
        shape = f"{args.n}^3"
    comm.Barrier()
    t0 = time.perf_counter()
    res = claire_py.register(fixed, moving, config=cfg)
    seconds = comm.allreduce(time.perf_counter() - t0, op=MPI.MAX)
    rss_max = peak_rss_bytes(comm)
    rss_sum = comm.allreduce(peak_rss_bytes(), op=MPI.SUM)
    if comm.rank != 0:
        return None
    work = res.workload
    hist = res.history
    out = dict(case=args.case, shape=shape, seconds=seconds, solver_seconds=res.seconds,
               gn_iterations=sum(1 for h in hist if h.iteration > 0),
               matvecs=work["hessian_matvec"]["pcg_iterations"],
               matvec_seconds=work["hessian_matvec"]["seconds"],
               set_velocity_seconds=work.get("set_velocity", {}).get("seconds", 0.0),
               set_velocity_count=work.get("set_velocity", {}).get("count", 0),
               mismatch=hist[-1].mismatch, grad_rel=hist[-1].grad_rel, stop=res.stop_reason,
               det_min=float(res.det_grad_y.min()), det_max=float(res.det_grad_y.max()),
               rss_max=rss_max, rss_sum=rss_sum, ranks=comm.size, threads=int(os.environ.get("NUMBA_NUM_THREADS", 0)))
    emit(out)


def dipy_case():
    """DIPY SyN (CCMetric(3), default level_iters) on the pair's normalised, smoothed images."""
    import dipy
    import nibabel as nib
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    import claire_py

    imgs = [nib.load(os.path.join(ROOT, p)) for p in PAIR]
    affine = imgs[0].affine
    data = []
    for img in imgs:
        a = np.asarray(img.dataobj, np.float64)
        a = (a - a.min()) / (a.max() - a.min())
        data.append(claire_py.smooth(a, 1.0, dtype=np.float64))  # what our problem registers
    fixed, moving = data
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3))
    t0 = time.perf_counter()
    mapping = sdr.optimize(fixed, moving, affine, affine)
    warped = mapping.transform(moving)
    seconds = time.perf_counter() - t0
    mismatch = float(np.linalg.norm(warped - fixed) / np.linalg.norm(moving - fixed))
    disp = np.asarray(mapping.get_forward_field(), np.float64)  # (n1, n2, n3, 3) in mm
    h = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    jac = np.empty(disp.shape[:3] + (3, 3))
    for a in range(3):
        grads = np.gradient(disp[..., a], *h)
        for b in range(3):
            jac[..., a, b] = (a == b) + grads[b]
    det = np.linalg.det(jac)
    return dict(case="dipy", shape="99x117x95", seconds=seconds, solver_seconds=seconds,
                gn_iterations=0, matvecs=0, mismatch=mismatch, det_min=float(det.min()), det_max=float(det.max()),
                rss_max=peak_rss_bytes(), rss_sum=peak_rss_bytes(), ranks=1, threads=0,
                level_iters=list(sdr.level_iters), version=dipy.__version__)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="pair", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="64,128", help="synthetic grid sizes (add 256 for the large case)")
    parser.add_argument("--ranks", default="2,1")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--beta", type=float, default=None, help="beta (default: the config's, 1e-2)")
    parser.add_argument("--max-iterations", type=int, default=None)
    parser.add_argument("--krylov-max", type=int, default=None)
    parser.add_argument("--nt", type=int, default=None, help="time steps (default: the config's, 4)")
    parser.add_argument("--recompute-gradients", action="store_true",
                        help="transport.store_gradients off: grad m(t_j) by FFT at every use")
    parser.add_argument("--lean", action="store_true",
                        help="the memory guard's leanest configuration: --recompute-gradients and "
                             "newton.keep_gradient off (the relaxed model's g recomputed after each Krylov solve)")
    parser.add_argument("--no-pair", action="store_true")
    parser.add_argument("--no-dipy", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    def extra(beta):
        out = ["--dtype", args.dtype]
        if beta:
            out += ["--beta", beta]
        if args.max_iterations is not None:
            out += ["--max-iterations", args.max_iterations]
        if args.krylov_max is not None:
            out += ["--krylov-max", args.krylov_max]
        if args.nt is not None:
            out += ["--nt", args.nt]
        if args.recompute_gradients:
            out += ["--recompute-gradients"]
        return out

    script = os.path.abspath(__file__)
    results = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        if not args.no_pair:
            results.append(run_worker(script, ranks, ["--case", "pair"] + extra(args.beta)))
            print_row(results[-1], flush=True)
        for n in (int(s) for s in args.sizes.split(",") if s):
            results.append(run_worker(script, ranks, ["--case", "synthetic", "--n", n] + extra(args.beta)))
            print_row(results[-1], flush=True)
    try:
        import dipy  # noqa: F401
        have_dipy = not args.no_dipy
    except ImportError:
        have_dipy = False
    if have_dipy:
        results.append(run_worker(script, 1, ["--case", "dipy"]))
        print_row(results[-1], flush=True)
    print()
    print(HEADER)
    for r in results:
        print_row(r)
    ours = [r for r in results if r["case"] == "pair"]
    dipy_rows = [r for r in results if r["case"] == "dipy"]
    if ours and dipy_rows:
        for r in ours:
            print(f"pair, {r['ranks']} rank(s): DIPY SyN time / ours = {dipy_rows[0]['seconds'] / r['seconds']:.2f}, "
                  f"mismatch ours {r['mismatch']:.3f} vs DIPY {dipy_rows[0]['mismatch']:.3f}")
    rows = []
    for r in results:
        n = r["shape"]
        common = dict(n=n, dtype=args.dtype if r["case"] != "dipy" else "float64", ranks=r["ranks"],
                      threads=r["threads"])
        name = "dipy_syn" if r["case"] == "dipy" else f"register_{r['case']}"
        row = dict(name=name, value=r["seconds"], unit="s", **common, **{k: v for k, v in r.items()
                                                                          if k not in ("seconds", "ranks", "threads")})
        if r["case"] == "pair" and dipy_rows:
            row.update(reference="dipy SyN CCMetric(3)", reference_value=dipy_rows[0]["seconds"])
        rows.append(row)
    append_json(args.json, rows)


HEADER = (f"{'case':10} {'grid':>10} {'ranks':>5} {'time [s]':>9} {'GN':>3} {'matvecs':>7} {'s/matvec':>8} "
          f"{'set_vel [s]':>11} {'mismatch':>8} {'det min':>8} {'det max':>8} {'RSS max':>8} {'RSS sum':>8}")


def print_row(r, flush=False):
    per = r.get("matvec_seconds", 0) / r["matvecs"] if r["matvecs"] else float("nan")
    print(f"{r['case']:10} {r['shape']:>10} {r['ranks']:>5} {r['seconds']:9.2f} {r['gn_iterations']:3d} "
          f"{r['matvecs']:7d} {per:8.3f} {r.get('set_velocity_seconds', 0):11.2f} {r['mismatch']:8.3f} "
          f"{r['det_min']:8.3f} {r['det_max']:8.3f} {r['rss_max'] / GIB:7.2f}G {r['rss_sum'] / GIB:7.2f}G",
          flush=flush)


if __name__ == "__main__":
    main()
