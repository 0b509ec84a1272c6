"""The one place that decides how kernels are compiled."""

import os

# Idle OpenMP threads of numba's "omp" layer spin for a while after each parallel kernel and
# steal the cores FFTW's threads need next: a gradient (1 kernel + 1 FFT, three times) ran
# 1.6x slower than with passive waiting. Must be set before the OpenMP runtime loads; a
# user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402

#: Parallel kernels: ``prange`` over the outermost array axis, cached on disk so that MPI
#: ranks and later runs skip compilation. No fastmath: tests compare against numpy to 1e-12.
jit_parallel = numba.njit(parallel=True, cache=True, nogil=True)

#: Serial kernels (small loops, or called from inside parallel ones).
jit = numba.njit(cache=True, nogil=True)


def set_threads(n):
    """Threads used by the parallel kernels of this process (clamped to numba's pool)."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


@jit
def _first_kernel(x):
    return x + 1.0


def start_runtime():
    """Start numba's runtime now (about 0.3 s once per process, whatever kernel comes first:
    loading its code generator and the cache machinery), so that the first real kernel's time
    is its own."""
    _first_kernel(0.0)
