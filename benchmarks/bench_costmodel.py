"""Cost model of one Gauss-Newton Hessian matvec and one gradient, checked in the same run.

Counted from the code (solvers/problem.py, solvers/transport.py, kernels/spectral.py), one
image component, squared L2 distance, CLAIRE's default model (h1s-div: the relaxed projection),
nt steps, stored grad m(t_j):

* ``hessian_matvec``: incremental state (nt scalar interpolations on the backward plan),
  incremental adjoint (nt on the forward plan) and ``beta A vt + P bt`` in one Fourier pass
  (9 scalar transforms); the fused pointwise kernels read the stored grad m(t_j).
* ``gradient`` (the first at a velocity, as in a solve): the adjoint (nt interpolations), the
  spectral grad m(t_j) of the nt + 1 time points (1 forward and 3 inverse transforms each,
  stored for the matvecs) and ``beta A v + P b`` (9 transforms). Timed as set_velocity +
  gradient minus set_velocity alone, both measured in the same interleaved loop.

The counts are verified by running the operation once and reading the transport's workload
(``interpolation``) and ``decomp.stats["fft"]`` (one entry per transform).

Pointwise words per grid point (reads + writes, from the fused kernels of kernels/fields.py):

* incremental state: ``mt = 0`` 1, per step two ``minus_dot_added`` (base, v~, grad m: 7 read,
  1 written): 1 + 16 nt;
* final condition ``-w mt`` and ``lam *= w``: 4; ``body = 0``: 3;
* adjoint: ``accumulate_product`` at t = 1 (lam, grad, body read, body written: 10), per step
  ``scale_and_accumulate`` (source, factor, grad, body read; lam, body written: 12): 10 + 12 nt.

Matvec: 18 + 28 nt words; gradient: 17 + 12 nt (no incremental state; its final condition reads
the residual). FFT pairs are counted as half the number of scalar transforms.

Primitives, each measured in this run (median, slowest rank), interleaved with the operations:
``fft_pair`` (``forward_unnormalized`` + radial kernel + ``backward_destroying`` of one scalar,
i.e. exactly one third of ``regularization``), ``interp`` (one scalar through the backward
plan: halo exchange, kernel, return exchange) and the streaming bandwidth of numpy on
preallocated arrays (``np.add(a, b, out=c)``, 3s per point); the model is
``n_fft_pairs * fft_pair + n_interp * interp + bytes / bandwidth``. Also shown: the same with
the bandwidth of numpy expressions that allocate their result (``c = a + b``), which is what
the solver's code does.

Run::

    .venv/bin/mpiexec -n 1 .venv/bin/python benchmarks/bench_costmodel.py --sizes 128,256 --json /tmp/cost.json
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_costmodel.py --sizes 128,256
"""

import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_json, median_times  # noqa: E402

from claire_py.kernels import Decomposition, SpectralOperators  # noqa: E402
from claire_py.solvers.monitor import Workload  # noqa: E402
from claire_py.solvers.problem import RegistrationProblem, RegularizationOptions  # noqa: E402
from claire_py.solvers.transport import SemiLagrangianTransport, TransportOptions  # noqa: E402


def counts(nt):
    """Per operation: (scalar FFT pairs, scalar interpolations, pointwise words per point); see
    the module docstring."""
    return {"hessian_matvec": (4.5, 2 * nt, 18 + 28 * nt),
            "gradient": (4.5 + 2 * (nt + 1), nt, 17 + 12 * nt)}


def smooth_field(d, amplitude, phase=0.0):
    x = d.local_coordinates()
    v = np.stack(np.broadcast_arrays(np.sin(x[1] + phase) * np.cos(x[2]), np.sin(x[2] + x[0] + phase),
                                     np.cos(x[0]) * np.sin(x[1] + phase)))
    return (amplitude * v).astype(d.dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--nt", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        d = Decomposition((n, n, n), dtype=np.dtype(args.dtype))
        ops = SpectralOperators(d)
        work = Workload()
        tr = SemiLagrangianTransport(d, ops, TransportOptions(nt=args.nt), work)
        x = d.local_coordinates()
        fixed = np.exp(3 * (np.cos(x[0] - 3) + np.cos(x[1] - 3) + np.cos(x[2] - 3) - 3)).astype(d.dtype)
        moving = np.exp(3 * (np.cos(x[0] - 2.8) + np.cos(x[1] - 3.2) + np.cos(x[2] - 3) - 3)).astype(d.dtype)
        prob = RegistrationProblem(tr, fixed[None], moving[None], RegularizationOptions(), work, sigma=1.0)
        v = smooth_field(d, 0.3)
        prob.set_velocity(v)
        vt = smooth_field(d, 0.1, phase=0.5)
        # verify the counts: one call each (the gradient first, as in a solve), read the counters
        measured_counts = {}
        for name, fn in (("gradient", prob.gradient), ("hessian_matvec", lambda: prob.hessian_matvec(vt))):
            i0, f0 = work.counts["interpolation"], d.stats["fft"][0]
            fn()
            measured_counts[name] = (d.stats["fft"][0] - f0, work.counts["interpolation"] - i0)

        def fresh_gradient():
            prob.set_velocity(v)
            prob.gradient()
        s = d.itemsize if hasattr(d, "itemsize") else np.dtype(args.dtype).itemsize
        f = moving.copy()
        out = d.new_scalar()
        hat = d.new_scalar(spectral=True)
        coeffs = (0.0, 1e-2, 0.0, 0.0)
        plan = tr.backward_plan
        a, b, c = (np.random.default_rng(i).random(d.local_shape).astype(d.dtype) for i in range(3))

        def fft_pair():
            ops._radial(f, coeffs, False, out)  # exactly what regularization does per component

        def interp():
            plan.interpolate(f, out=out)

        def stream():
            np.add(a, b, out=c)

        def stream_alloc():
            return a + b

        # in this order every matvec finds the stored gradients of the gradient before it
        fns = [lambda: prob.hessian_matvec(vt), lambda: prob.set_velocity(v), fresh_gradient, fft_pair, interp, stream,
               stream_alloc]
        t_mv, t_sv, t_sv_grad, t_fft, t_interp, t_stream, t_alloc = median_times(comm, fns, args.repeat)
        t_grad = t_sv_grad - t_sv
        pts = d.local_points if hasattr(d, "local_points") else int(np.prod(d.local_shape))
        pts = comm.allreduce(pts, op=MPI.MAX)
        bw = 3 * s * pts / t_stream
        bw_alloc = 3 * s * pts / t_alloc
        model = counts(args.nt)
        common = dict(n=n, dtype=args.dtype, ranks=d.size, threads=d.threads)
        if comm.rank == 0:
            print(f"\nN={n} {args.dtype} ranks={d.size} threads={d.threads} nt={args.nt}: fft_pair {t_fft * 1e3:.2f} ms, "
                  f"interp {t_interp * 1e3:.2f} ms, stream {bw / 1e9:.1f} GB/s (preallocated), "
                  f"{bw_alloc / 1e9:.1f} GB/s (allocating)")
        for name, t_meas in (("hessian_matvec", t_mv), ("gradient", t_grad)):
            n_fft, n_interp, words = model[name]
            bytes_pt = words * s
            t_model = n_fft * t_fft + n_interp * t_interp + bytes_pt * pts / bw
            t_model_alloc = n_fft * t_fft + n_interp * t_interp + bytes_pt * pts / bw_alloc
            got_fft, got_interp = measured_counts[name]
            if comm.rank == 0:
                print(f"  {name:15s} counted: {n_fft} FFT pairs, {n_interp} interps, {bytes_pt} B/pt pointwise; "
                      f"counters: {got_fft} transforms, {got_interp} interps")
                print(f"  {name:15s} measured {t_meas:.3f} s; model {t_model:.3f} s "
                      f"(fft {n_fft * t_fft:.3f}, interp {n_interp * t_interp:.3f}, pointwise "
                      f"{bytes_pt * pts / bw:.3f}); ratio {t_meas / t_model:.2f}; "
                      f"with allocating bandwidth {t_model_alloc:.3f} s, ratio {t_meas / t_model_alloc:.2f}")
            rows.append(dict(name=name, value=t_meas, unit="s", reference="cost model (sum of primitives)",
                             reference_value=t_model, ratio=t_meas / t_model, model_alloc=t_model_alloc,
                             fft_pairs=n_fft, interpolations=n_interp, pointwise_bytes_per_point=bytes_pt,
                             counted_transforms=got_fft, counted_interpolations=got_interp,
                             t_fft_pair=t_fft, t_interp=t_interp, bandwidth=bw, bandwidth_alloc=bw_alloc, **common))
        del prob, tr
    if comm.rank == 0:
        print(f"\n{'name':15} {'N':>5} {'ranks':>5} {'thr':>3} {'measured [s]':>12} {'model [s]':>9} {'ratio':>6} "
              f"{'model(alloc)':>12} {'ratio':>6}")
        for r in rows:
            print(f"{r['name']:15} {r['n']:>5} {r['ranks']:>5} {r['threads']:>3} {r['value']:12.3f} "
                  f"{r['reference_value']:9.3f} {r['ratio']:6.2f} {r['model_alloc']:12.3f} "
                  f"{r['value'] / r['model_alloc']:6.2f}")
        append_json(args.json, rows)


if __name__ == "__main__":
    main()
