"""Spectral layer benchmark: our transforms and gradient against raw FFTW, in the same run.

Measures, per grid size and precision, at the rank count it is launched with:

* ``pair``     : ``Decomposition.forward`` + ``backward`` (normalised, with copies in and out)
* ``gradient`` : ``SpectralOperators.gradient`` (1 forward + 3 inverse transforms + kernels)
* reference    : raw FFTW r2c + c2r on the plans' own arrays — with 1 rank the serial FFTW
  plans (mpi4py_fft.fftw, FFTW_MEASURE, no copies, no normalisation); with P > 1 mpi4py-fft's
  own PFFT transform on its internal arrays. The gradient's reference is 1 r2c + 3 c2r.

Run::

    .venv/bin/mpiexec -n 1 .venv/bin/python benchmarks/bench_spectral.py --json out.json
    .venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_spectral.py --json out.json

Times are the median over ``--repeat`` runs of the slowest rank. Target: gradient within 1.2x
of four raw FFTW transforms.
"""

import argparse

import numpy as np
from _common import append_json, median_times
from mpi4py import MPI
from mpi4py_fft import fftw

from claire_py.kernels import Decomposition, SpectralOperators


def raw_fftw(decomp):
    """(forward, backward) callables of raw FFTW on the same problem."""
    if decomp.size == 1:
        u = fftw.aligned(decomp.shape, dtype=decomp.dtype)
        u[...] = np.random.default_rng(0).standard_normal(decomp.shape)
        flags = (fftw.flag_dict["FFTW_MEASURE"], fftw.flag_dict["FFTW_DESTROY_INPUT"])
        fwd = fftw.rfftn(u, s=decomp.shape, axes=(0, 1, 2), threads=decomp.threads, flags=flags)
        bck = fftw.irfftn(fwd.output_array, s=decomp.shape, axes=(0, 1, 2), threads=decomp.threads,
                          flags=(fftw.flag_dict["FFTW_MEASURE"],), output_array=u)
        return (lambda: fwd()), (lambda: bck())
    fft = decomp.fft
    fft.forward.input_array[...] = 1.0
    return (lambda: fft.forward(normalize=False)), (lambda: fft.backward(normalize=False))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="128,256", help="comma-separated grid sizes N (N^3 grids)")
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--json", help="append one JSON object per measurement to this file")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for dt in args.dtypes.split(","):
            d = Decomposition((n, n, n), dtype=np.dtype(dt))
            ops = SpectralOperators(d)
            f = np.random.default_rng(1).standard_normal(d.local_shape).astype(d.dtype)
            fhat = d.new_scalar(spectral=True)
            grad = d.new_vector()
            back = d.new_scalar()
            fwd, bck = raw_fftw(d)
            t_raw_f, t_raw_b, t_pair, t_grad = median_times(
                comm, [fwd, bck, lambda: d.backward(d.forward(f, fhat), back), lambda: ops.gradient(f, grad)],
                args.repeat)
            common = dict(n=n, dtype=dt, ranks=d.size, threads=d.threads, unit="s", layout=d.layout)
            rows.append(dict(name="fft_pair", value=t_pair, reference="raw FFTW r2c+c2r",
                             reference_value=t_raw_f + t_raw_b, **common))
            rows.append(dict(name="gradient", value=t_grad, reference="raw FFTW 1 r2c + 3 c2r",
                             reference_value=t_raw_f + 3 * t_raw_b, **common))
    if comm.rank == 0:
        print(f"{'name':10} {'N':>5} {'dtype':8} {'ranks':>5} {'thr':>3} {'ours [s]':>9} {'raw FFTW [s]':>12} "
              f"{'ratio':>6}")
        for r in rows:
            print(f"{r['name']:10} {r['n']:>5} {r['dtype']:8} {r['ranks']:>5} {r['threads']:>3} "
                  f"{r['value']:9.4f} {r['reference_value']:12.4f} {r['value'] / r['reference_value']:6.2f}")
        append_json(args.json, rows)


if __name__ == "__main__":
    main()
