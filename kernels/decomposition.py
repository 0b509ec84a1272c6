"""The one owner of MPI state: distributed real/spectral layouts over mpi4py-fft.

Conventions used everywhere in claire_py
----------------------------------------
* The domain is the periodic box ``Omega = [0, 2*pi)^3`` sampled on an ``N1 x N2 x N3``
  grid, ``x_i[j] = 2*pi*j / N_i``. Arrays are C-ordered with axis order ``(axis 0, axis 1,
  axis 2)`` = ``(N1, N2, N3)`` (the NIfTI array axes). Vector fields carry their component
  first: ``(3, n1, n2, n3)``, component ``d`` being along array axis ``d``.
* **Real layout** (what solvers see): axes 0 and 1 are split over a 1-D (slab) or 2-D
  (pencil) process grid, axis 2 is always whole on every rank.
* **Spectral layout** (``rfftn`` of the real field): shape ``(N1, N2, N3//2 + 1)``, axis 0
  whole on every rank; axis 2 split over all ranks (slab), or axes 1 and 2 split (pencil).
* Spectral coefficients are *normalised*: ``fhat[k] = (1/N) sum_x f(x) exp(-i k.x)`` with
  ``N = N1*N2*N3``, so ``f(x) = sum_k fhat[k] exp(i k.x)`` and coefficients do not depend on
  the grid size (spectral restriction/prolongation copy them unchanged).
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict

import numpy as np
from mpi4py import MPI
from mpi4py_fft import PFFT, fftw

from ._numba._jit import set_threads as set_kernel_threads
from ._numba.pointwise import dot as _local_dot

__all__ = ["Decomposition"]

_REAL_DTYPES = {np.dtype(np.float32): np.dtype(np.complex64), np.dtype(np.float64): np.dtype(np.complex128)}
_LAYOUTS = ("auto", "slab", "pencil")


#: Ranks of the whole job on this node, as the launchers announce them (MPICH/Hydra, Open MPI,
#: MVAPICH, Slurm): a Decomposition on a sub-communicator (a batch group) must count the
#: other groups' ranks too, without a collective over the whole job.
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                         "SLURM_NTASKS_PER_NODE")


def _default_threads(comm):
    """Cores per rank on this node: the CPUs this process may use divided by the job's ranks
    sharing the node (from the launcher's environment, else ``comm``'s ranks on the node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        ranks_on_node = node.Get_size()
    finally:
        node.Free()
    for name in _LOCAL_SIZE_VARIABLES:
        try:
            ranks_on_node = max(ranks_on_node, int(os.environ[name]))
            break
        except (KeyError, ValueError):
            continue
    return max(1, cpus // ranks_on_node)


def _same_layout(a, b):
    """True when FFTW may run a plan made for ``b`` on ``a`` (new-array execution)."""
    return (a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and fftw.get_alignment(a) >= fftw.get_alignment(b))


def _is_smooth(n):
    """True when ``n`` has no prime factor above 7 (FFTW's fast sizes)."""
    for p in (2, 3, 5, 7):
        while n % p == 0:
            n //= p
    return n == 1


class _FFTWWisdom:
    """FFTW wisdom kept in a per-user cache, one file per precision and world rank/size.

    Measured plans (``FFTW_MEASURE``) depend on timings, and two plans of one transform may
    round differently; reusing the wisdom of the first run makes later runs on this machine
    choose the same plans, so the same inputs on the same ranks give bitwise-identical
    results (and skip the measuring). The directory is ``$CLAIRE_PY_CACHE`` or
    ``$XDG_CACHE_HOME/claire_py`` (``~/.cache/claire_py``); ``CLAIRE_PY_CACHE=off`` disables
    it. Unreadable or unwritable caches are ignored.
    """

    def __init__(self):
        from mpi4py_fft.fftw.factory import fftlib

        self.libs = fftlib
        root = os.environ.get("CLAIRE_PY_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "claire_py")
        world = MPI.COMM_WORLD
        self.directory = None if root == "off" else os.path.join(root, "fftw-wisdom")
        self.suffix = f"rank{world.Get_rank()}of{world.Get_size()}.wisdom"
        #: per precision key ("F", "D", "G"): whether a wisdom file was found and imported
        self.imported = {}
        if self.directory is not None:
            from mpi4py_fft import fftw

            for key, lib in self.libs.items():
                # FFTW registers its threaded solvers at the first fftw_plan_with_nthreads, which
                # every mpi4py-fft plan calls; wisdom exported after that does not import before
                # it (the planner's configuration differs: import_wisdom returns 0, every run
                # measured afresh and rounded differently). A throwaway plan comes first.
                fftw.rfftn(fftw.aligned(4, dtype=np.dtype(key.lower() if key != "G" else "g")),
                           flags=(fftw.FFTW_ESTIMATE,))
                path = self._path(key)
                if os.path.isfile(path):  # 0 for a damaged file: ignored
                    self.imported[key] = bool(lib.import_wisdom(bytearray(path, "utf-8")))

    def _path(self, key):
        return os.path.join(self.directory, f"{key}{self.suffix}")

    def save(self):
        if self.directory is None:
            return
        try:
            os.makedirs(self.directory, exist_ok=True)
            for key, lib in self.libs.items():
                tmp = f"{self._path(key)}.{os.getpid()}.partial"
                if lib.export_wisdom(bytearray(tmp, "utf-8")) == 1:
                    os.replace(tmp, self._path(key))
                elif os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError:
            pass


def choose_proc_grid(shape, nranks, layout="auto", proc_grid=None):
    """Process grid ``(P1, P2)`` of the real layout (axis 0 over P1, axis 1 over P2).

    ``slab`` is ``(P, 1)``; ``pencil`` is ``proc_grid`` or the most square factorisation of
    ``P``; ``auto`` is slab while ``P <= min(N1, N3//2 + 1)`` (one global transpose per
    transform instead of two), pencil beyond. A grid with fewer points than blocks along any
    split axis of either layout is refused, and so is a last axis of 2 points on several ranks
    (mpi4py-fft's transposes fail on it).
    """
    n1, n2, n3 = shape
    nc = n3 // 2 + 1
    if layout not in _LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; use one of {', '.join(_LAYOUTS)}")
    if proc_grid is not None:
        if layout == "slab" or len(proc_grid) != 2 or math.prod(proc_grid) != nranks:
            raise ValueError(f"proc_grid {tuple(proc_grid)} must be two integers whose product is the "
                             f"number of ranks ({nranks}), with layout 'pencil' or 'auto'")
        p1, p2 = (int(p) for p in proc_grid)
    elif layout == "slab" or (layout == "auto" and nranks <= min(n1, nc)):
        p1, p2 = nranks, 1
    else:
        p1, p2 = MPI.Compute_dims(nranks, 2)
    # mpi4py-fft (collapse=True) splits the spectral layout's axis 2 over all P ranks when the
    # real layout is split along one axis only, and axes 1, 2 over (P1, P2) otherwise
    if p1 == 1 or p2 == 1:
        needs = [(0, n1, p1), (1, n2, p2), (2, nc, p1 * p2)]
    else:
        needs = [(0, n1, p1), (1, n2, p2), (1, n2, p1), (2, nc, p2)]
    if nranks > 1 and n3 < 3:  # mpi4py-fft's transposes assert (or hang) on a last axis of 2 points
        raise ValueError(f"grid {tuple(shape)} cannot be split over {nranks} ranks: its last axis has {n3} points "
                         "(3 or more needed); use fewer ranks (1) or transpose the image")
    for axis, n, p in needs:
        if p > n:
            kind = "slab" if p2 == 1 else f"pencil {p1}x{p2}"
            raise ValueError(
                f"grid {tuple(shape)} cannot be split over {nranks} ranks as a {kind} decomposition: axis "
                f"{axis} has {n} {'spectral ' if axis == 2 else ''}points for {p} blocks; use fewer ranks"
                + (" or layout='pencil'" if p2 == 1 else " or a different proc_grid"))
    return (p1, p2)


def _intersection(a, b):
    """The box common to boxes ``a`` and ``b`` (``((start, stop),) * 3``), or ``None``."""
    inter = tuple((max(s, t), min(e, f)) for (s, e), (t, f) in zip(a, b))
    return inter if all(s < e for s, e in inter) else None


class Decomposition:
    """Distributed layout of an ``N1 x N2 x N3`` periodic grid and its r2c spectrum.

    Owns the communicator, the mpi4py-fft ``PFFT`` plan (FFTW backend, real-to-complex),
    the local blocks of every rank in both layouts, local wavenumbers, allocation, global
    reductions, gather/scatter and the halo exchange. Nothing else in claire_py touches MPI.

    Parameters
    ----------
    shape : sequence of 3 int
        Global grid ``(N1, N2, N3)``; each ``N_i >= 2``. Odd and non-cubic sizes are fine.
    comm : mpi4py.MPI.Comm, optional
        Communicator to distribute over (default ``MPI.COMM_WORLD``). It is duplicated, so
        claire_py's messages never mix with the caller's.
    dtype : numpy dtype, optional
        ``float32`` or ``float64`` (default). Spectral arrays are the matching complex type.
    layout : {"auto", "slab", "pencil"}, optional
        ``slab`` splits only axis 0 (one global transpose per transform); ``pencil`` splits
        axes 0 and 1 over a 2-D process grid (two transposes, but scales to ``P <= N1*N2``).
        ``auto`` (default) takes slab while ``P <= min(N1, N3//2 + 1)``, pencil beyond.
    proc_grid : (int, int), optional
        Explicit pencil process grid ``(P1, P2)`` with ``P1*P2 == P``; implies pencil.
    threads : int, optional
        Threads per rank for FFTW and the numba kernels. Default: the CPUs available to this
        process divided by the number of ranks on the node.
    planner_effort : str, optional
        FFTW planner flag. Default ``"auto"``: ``FFTW_MEASURE`` (plans made once, here; about
        25 % faster transforms at 256^3) when every ``N_i`` factors into 2, 3, 5 and 7, and
        ``FFTW_ESTIMATE`` otherwise (measuring plans for sizes with large prime factors takes
        tens of seconds and gains nothing).

    Raises
    ------
    ValueError
        For a shape that is not 3-D, a dtype other than float32/float64, an unknown layout,
        or a process grid with more blocks than grid points along some axis.

    Examples
    --------
    >>> import numpy as np
    >>> from claire_py.kernels.decomposition import Decomposition
    >>> d = Decomposition((16, 12, 10), dtype=np.float64)
    >>> f = d.new_scalar()
    >>> f[...] = 1.0
    >>> float(d.inner(f, f))
    1920.0
    """

    def __init__(self, shape, *, comm=None, dtype=np.float64, layout="auto", proc_grid=None,
                 threads=None, planner_effort="auto"):
        shape = tuple(shape) if np.ndim(shape) == 1 else None
        if shape is None or len(shape) != 3:
            raise ValueError("shape must be a sequence of 3 grid sizes (N1, N2, N3); claire_py is 3-D only")
        if not all(isinstance(n, (int, np.integer)) and n >= 2 for n in shape):
            raise ValueError(f"shape {shape} must hold integers >= 2; pass e.g. (128, 128, 128)")
        self.shape = tuple(int(n) for n in shape)
        try:
            dtype = np.dtype(dtype)
        except TypeError as exc:
            raise ValueError(f"dtype {dtype!r} is not a numpy dtype; use numpy.float32 or numpy.float64") from exc
        if dtype not in _REAL_DTYPES:
            raise ValueError(f"dtype {dtype} is not supported; use numpy.float32 or numpy.float64")
        self.dtype = dtype
        self.complex_dtype = _REAL_DTYPES[dtype]

        base = MPI.COMM_WORLD if comm is None else comm
        self.proc_grid = choose_proc_grid(self.shape, base.Get_size(), layout, proc_grid)
        self.comm = base.Dup()
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.layout = "slab" if self.proc_grid[1] == 1 else "pencil"
        self.threads = _default_threads(self.comm) if threads is None else int(threads)
        if self.threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self.threads = set_kernel_threads(self.threads)

        if planner_effort == "auto":
            planner_effort = "FFTW_MEASURE" if all(_is_smooth(n) for n in self.shape) else "FFTW_ESTIMATE"
        # axes as lists of lists: mpi4py-fft 2.0.6's collapse=True mutates the groups and fails on
        # tuples when the first axis is not split (proc_grid (1, P)); collapse=True merges the
        # serial transforms over the unsplit axes into one FFTW plan (1.6x faster at P = 1).
        wisdom = _FFTWWisdom() if planner_effort in ("FFTW_MEASURE", "FFTW_PATIENT", "FFTW_EXHAUSTIVE") else None
        try:
            self.fft = PFFT(self.comm, self.shape, axes=[[0], [1], [2]], dtype=self.dtype,
                            grid=self.proc_grid, backend="fftw", collapse=True, threads=self.threads,
                            planner_effort=planner_effort, overwrite_input="FFTW_PRESERVE_INPUT")
        except AssertionError:  # mpi4py-fft asserts on degenerate splits (an axis of 2 points)
            raise ValueError(f"grid {self.shape} is too thin to split over {self.size} ranks; use fewer ranks "
                             "or a grid with at least 4 points per axis") from None
        if wisdom is not None:
            wisdom.save()
        self.spectral_shape = (self.shape[0], self.shape[1], self.shape[2] // 2 + 1)
        self.real_slice = tuple(self.fft.local_slice(False))
        self.spectral_slice = tuple(self.fft.local_slice(True))
        self.local_shape = tuple(s.stop - s.start for s in self.real_slice)
        self.local_spectral_shape = tuple(s.stop - s.start for s in self.spectral_slice)
        uneven = self.local_shape[2] != self.shape[2] or self.spectral_slice[0] != slice(0, self.shape[0])
        if self.comm.allreduce(uneven, op=MPI.LOR):  # every rank raises alike
            raise ValueError(f"grid {self.shape} is too thin to split over {self.size} ranks (mpi4py-fft "
                             "splits it unevenly); use fewer ranks or at least 4 points per axis")
        self._real_blocks = [self._as_bounds(s) for s in self.comm.allgather(self.real_slice)]
        self._spectral_blocks = [self._as_bounds(s) for s in self.comm.allgather(self.spectral_slice)]
        self._neighbours = self._find_neighbours()
        self.num_points = math.prod(self.shape)
        #: ``{name: [count, seconds]}`` of transforms and communication on this rank
        self.stats = defaultdict(lambda: [0, 0.0])
        self.spacing = tuple(2 * math.pi / n for n in self.shape)

    def free(self):
        """Release this decomposition's MPI communicators (its duplicate of ``comm`` and the
        FFT's subcommunicators and datatypes); collective. MPICH has about 2000 communicators
        per process: a process making many decompositions (a batch of registrations, a test
        suite) frees each when done. The object is unusable afterwards; a second call does
        nothing. Also ``with Decomposition(...) as d:``."""
        if getattr(self, "fft", None) is None:
            return
        self.fft.destroy()
        self.fft = None
        self.comm.Free()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.free()

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _as_bounds(slices):
        return tuple((s.start, s.stop) for s in slices)

    def _find_neighbours(self):
        """Ranks owning the next/previous block along axes 0 and 1 of the real layout."""
        me = self._real_blocks[self.rank]
        neighbours = {}
        for axis in (0, 1):
            other = 1 - axis
            n = self.shape[axis]
            up = [r for r, b in enumerate(self._real_blocks)
                  if b[axis][0] == me[axis][1] % n and b[other] == me[other]]
            down = [r for r, b in enumerate(self._real_blocks)
                    if b[axis][1] % n == me[axis][0] and b[other] == me[other]]
            neighbours[axis] = (down[0], up[0])
        return neighbours

    # -------------------------------------------------------------- allocation
    def _zeros(self, shape, dtype, zeroed=True):
        # SIMD-aligned like FFTW's own arrays, so transforms can read and write them in place
        a = fftw.aligned(shape, dtype=dtype)
        if zeroed:
            a[...] = 0
        return a

    def new_scalar(self, *, spectral=False, zeroed=True):
        """Zero local scalar field, real ``local_shape`` or complex ``local_spectral_shape``;
        with ``zeroed=False`` its values are undefined (for a caller that overwrites them all:
        zeroing touches every page of a field that is about to be written anyway)."""
        if spectral:
            return self._zeros(self.local_spectral_shape, self.complex_dtype, zeroed)
        return self._zeros(self.local_shape, self.dtype, zeroed)

    def spectral_scratch(self):
        """A spectral scalar array for transient use: the forward transform's own output array,
        which :meth:`forward_unnormalized` with an ``out`` of the same layout never writes
        (and a c2r may destroy), so it costs no memory; a new array when the layouts differ.
        Its contents are lost by :meth:`backward` and by transforms into arrays of another
        layout."""
        own = self.fft.forward._xfftn[-1].output_array
        fresh = self.new_scalar(spectral=True, zeroed=False)  # (untouched unless used: no pages)
        return own if _same_layout(fresh, own) and own.shape == self.local_spectral_shape else fresh

    def new_vector(self, *, spectral=False, zeroed=True):
        """Zero local vector field ``(3, *local_shape)`` (or its spectral counterpart); with
        ``zeroed=False`` its values are undefined (for a caller that overwrites them all)."""
        if spectral:
            return self._zeros((3,) + self.local_spectral_shape, self.complex_dtype, zeroed)
        return self._zeros((3,) + self.local_shape, self.dtype, zeroed)

    # ------------------------------------------------------------------ grids
    def local_coordinates(self):
        """Coordinates ``x_i = 2*pi*j/N_i`` of the local real block, as three broadcastable
        arrays of shapes ``(n1,1,1)``, ``(1,n2,1)``, ``(1,1,n3)`` in the working dtype."""
        out = []
        for axis, (s, n) in enumerate(zip(self.real_slice, self.shape)):
            x = (2 * np.pi / n) * np.arange(s.start, s.stop, dtype=np.float64)
            shp = [1, 1, 1]
            shp[axis] = x.size
            out.append(x.reshape(shp).astype(self.dtype))
        return tuple(out)

    def local_wavenumbers(self, *, zero_nyquist=False):
        """Integer wavenumbers of the local spectral block, one 1-D array per axis.

        Axes 0 and 1 follow ``numpy.fft.fftfreq(N) * N`` (``0, 1, ..., -1``; for even ``N``
        the Nyquist entry is ``-N/2``); axis 2 follows ``numpy.fft.rfftfreq(N3) * N3``
        (``0 .. N3//2``, Nyquist ``+N3/2`` for even ``N3``).

        Parameters
        ----------
        zero_nyquist : bool
            Set the Nyquist wavenumbers of even-sized axes to 0. This is the symbol used for
            odd-order derivatives (gradient, divergence, Leray projection): a real field's
            Nyquist mode ``cos(N x / 2)`` has no representable derivative, so it is dropped.
            Even-order operators (Laplacian, regularisation norms, smoothing) use the
            full wavenumbers so that they stay invertible on the Nyquist modes.

        Returns
        -------
        (k0, k1, k2) : tuple of float64 arrays of lengths ``local_spectral_shape``.
        """
        ks = []
        for axis, (s, n) in enumerate(zip(self.spectral_slice, self.shape)):
            idx = np.arange(s.start, s.stop)
            if axis == 2:
                k = idx.astype(np.float64)  # rfft axis: 0 .. n//2
            else:
                k = np.where(idx <= (n - 1) // 2, idx, idx - n).astype(np.float64)
            if zero_nyquist and n % 2 == 0:
                k[np.abs(k) == n // 2] = 0.0
            ks.append(k)
        return tuple(ks)

    # ------------------------------------------------------------- transforms
    def forward(self, f, out=None):
        """Normalised r2c transform of a local real scalar field: ``fhat = (1/N) rfftn(f)``."""
        out = self.new_scalar(spectral=True, zeroed=False) if out is None else out
        self._execute(self.fft.forward, "fwd", f, out, src_destroyable=False)
        out *= 1.0 / self.num_points
        return out

    def backward(self, fhat, out=None):
        """Inverse of :meth:`forward`: ``f = irfftn(fhat) * N`` on the local real block;
        ``fhat`` is preserved."""
        out = self.new_scalar(zeroed=False) if out is None else out
        return self._execute(self.fft.backward, "bck", fhat, out, src_destroyable=False)

    def forward_unnormalized(self, f, out):
        """``rfftn(f)`` without the ``1/N`` (for kernels that fold it into their multiplier).
        ``f`` is preserved; the last FFTW stage writes straight into ``out`` when its
        alignment allows (else one extra copy)."""
        return self._execute(self.fft.forward, "fwd", f, out, src_destroyable=False)

    def backward_destroying(self, fhat, out):
        """``irfftn(fhat) * N`` like :meth:`backward`, but ``fhat`` may be overwritten (FFTW's
        multi-dimensional c2r destroys its input): saves the copies in and out of the plan's
        own arrays when the arrays' alignment allows."""
        return self._execute(self.fft.backward, "bck", fhat, out, src_destroyable=True)

    def _record(self, name, t0):
        entry = self.stats[name]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0

    def _execute(self, transform, kind, src, dst, src_destroyable):
        """Run mpi4py-fft's serial stages and global transposes ourselves, so that the first
        stage may read ``src`` and the last may write ``dst`` without staging copies."""
        t0 = time.perf_counter()
        stages, transfers = transform._xfftn, transform._transfer
        last = len(stages) - 1
        for i, stage in enumerate(stages):
            plan = getattr(stage.xfftn.__self__, kind)
            # forward plans preserve their input (FFTW_PRESERVE_INPUT), c2r plans cannot
            inp = src if i == 0 and (src_destroyable or kind == "fwd") else None
            if i == 0 and inp is None:
                stage.input_array[...] = src
            out = dst if i == last else None
            if inp is not None and not _same_layout(inp, plan.input_array):
                plan.input_array[...] = inp
                inp = None
            if out is not None and not _same_layout(out, plan.output_array):
                plan(inp, None, implicit=True, normalize=False)
                out[...] = plan.output_array
            else:
                plan(inp, out, implicit=True, normalize=False)
            if i < last:
                transfers[i](stage.output_array, stages[i + 1].input_array)
        self._record("fft", t0)
        return dst

    # ------------------------------------------------------------- reductions
    def inner(self, a, b):
        """Global Euclidean inner product ``sum_x a(x) b(x)`` of two local real arrays of the
        same shape (any leading component axes), accumulated in float64 on every rank."""
        local = _local_dot(a, b)
        t0 = time.perf_counter()
        total = self.comm.allreduce(local, op=MPI.SUM)
        self._record("allreduce", t0)
        return total

    def norm(self, a):
        """Global Euclidean norm ``sqrt(inner(a, a))``."""
        return math.sqrt(self.inner(a, a))

    def allreduce(self, value, op="sum"):
        """Reduce a Python scalar over all ranks (``op`` = ``"sum"``, ``"min"`` or ``"max"``)."""
        return self.comm.allreduce(value, op={"sum": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX}[op])

    def allreduce_array(self, array):
        """Elementwise sum of a small float64 array over all ranks (a new array on every rank)."""
        out = np.empty_like(np.ascontiguousarray(array, np.float64))
        self.comm.Allreduce(np.ascontiguousarray(array, np.float64), out, op=MPI.SUM)
        return out

    def bcast(self, obj, root=0):
        """``root``'s ``obj`` (any picklable object, e.g. a few arrays) on every rank."""
        return self.comm.bcast(obj, root=root)

    def same_ranks(self, other):
        """True when ``other`` is distributed over the same ranks in the same order."""
        return self.size == other.size and MPI.Comm.Compare(self.comm, other.comm) in (MPI.IDENT, MPI.CONGRUENT)

    def allgather(self, obj):
        """List of every rank's ``obj`` (small Python objects), on every rank."""
        return self.comm.allgather(obj)

    def alltoall_counts(self, send_counts):
        """Exchange per-rank item counts: returns how many items each rank will send here."""
        recv = np.empty(self.size, np.int64)
        self.comm.Alltoall(np.ascontiguousarray(send_counts, dtype=np.int64), recv)
        return recv

    def alltoallv(self, send, send_counts, recv_counts, send_displs=None):
        """Personalised all-to-all of a flat array: ``send_counts[r]`` items go to rank ``r``,
        from ``send_displs[r]`` on (default: packed, the running sums of the counts); returns
        the ``sum(recv_counts)`` items received, packed in order of source."""
        t0 = time.perf_counter()
        recv_counts = [int(c) for c in recv_counts]
        recv = np.empty(sum(recv_counts), send.dtype)
        send_counts = [int(c) for c in send_counts]
        if send_displs is None:
            send_displs = np.concatenate(([0], np.cumsum(send_counts)[:-1]))
        recv_displs = np.concatenate(([0], np.cumsum(recv_counts)[:-1]))
        self.comm.Alltoallv((np.ascontiguousarray(send), (send_counts, [int(d) for d in send_displs])),
                            (recv, (recv_counts, [int(d) for d in recv_displs])))
        self._record("alltoallv", t0)
        return recv

    # ----------------------------------------------------- boxes (file I/O)
    def _box_exchange(self, data, have, want):
        """Every rank ``r`` holds ``data`` on the box ``have[r]`` of the grid (``((start,
        stop),) * 3``, leading component axes allowed) and wants the box ``want[r]``: returns
        what arrives here, ``[(box, flat array)]`` (C order, leading axes first), one entry per
        rank holding a part of ``want[self.rank]``."""
        t0 = time.perf_counter()
        lead, mine = data.shape[:-3], have[self.rank]
        parts = []
        for target in want:
            inter = _intersection(mine, target)
            parts.append(np.empty(0, data.dtype) if inter is None else np.ascontiguousarray(
                data[(...,) + tuple(slice(s - m0, e - m0) for (s, e), (m0, _) in zip(inter, mine))]).ravel())
        inters = [_intersection(h, want[self.rank]) for h in have]
        size = math.prod(lead)
        recv_counts = [0 if i is None else size * math.prod(e - s for s, e in i) for i in inters]
        recv = self.alltoallv(np.concatenate(parts), [p.size for p in parts], recv_counts)
        self._record("box_exchange", t0)
        out, offset = [], 0
        for inter, n in zip(inters, recv_counts):
            if inter is not None:
                out.append((inter, recv[offset:offset + n].reshape(lead + tuple(e - s for s, e in inter))))
            offset += n
        return out

    @staticmethod
    def _place(out, origin, received):
        for inter, piece in received:
            out[(...,) + tuple(slice(s - o, e - o) for (s, e), (o, _) in zip(inter, origin))] = piece
        return out

    def blocks_from_boxes(self, data, box, *, fill=0.0):
        """This rank's block of a field that every rank holds a part of: ``data`` is the part
        ``box`` (``((start, stop),) * 3`` in global grid indices, disjoint across ranks: e.g.
        the slab of a file this rank read), leading component axes allowed; grid points in no
        rank's box take ``fill``. The inverse of :meth:`boxes_from_blocks`."""
        have = self.comm.allgather(tuple((int(s), int(e)) for s, e in box))
        mine = self._real_blocks[self.rank]
        local = np.full(data.shape[:-3] + tuple(e - s for s, e in mine), fill, data.dtype)
        return self._place(local, mine, self._box_exchange(data, have, self._real_blocks))

    def regroup(self, data, box, want, *, fill=0.0):
        """The part ``want`` of a field (on any grid) that every rank holds a part of:
        ``data`` is the part ``box`` (``((start, stop),) * 3``, disjoint across ranks, leading
        component axes allowed); every rank names its own ``want`` (overlapping or not); grid
        points in no rank's ``box`` take ``fill``. :meth:`blocks_from_boxes` is the case
        ``want`` = this rank's block."""
        have = self.comm.allgather(tuple((int(s), int(e)) for s, e in box))
        wants = self.comm.allgather(tuple((int(s), int(e)) for s, e in want))
        mine = wants[self.rank]
        out = np.full(data.shape[:-3] + tuple(max(e - s, 0) for s, e in mine), fill, data.dtype)
        return self._place(out, mine, self._box_exchange(data, have, wants))

    def boxes_from_blocks(self, local, box):
        """The part ``box`` of a distributed field (this rank's block ``local``, leading axes
        allowed), collected from the ranks that own it; every rank names its own ``box``
        (overlapping or not, inside the grid). The inverse of :meth:`blocks_from_boxes`."""
        want = self.comm.allgather(tuple((int(s), int(e)) for s, e in box))
        mine = want[self.rank]
        out = np.empty(local.shape[:-3] + tuple(e - s for s, e in mine), local.dtype)
        return self._place(out, mine, self._box_exchange(local, self._real_blocks, want))

    # -------------------------------------------------------- gather/scatter
    def _blocks(self, spectral):
        return self._spectral_blocks if spectral else self._real_blocks

    def gather(self, local, *, root=0, spectral=False):
        """Assemble the global array on ``root`` (``None`` elsewhere).

        ``local`` is this rank's block, with any leading component axes, e.g. ``(3, n1, n2, n3)``.
        One component at a time; with slabs (blocks split along axis 0 only, in rank order)
        straight into the result, else through a buffer of one global component.
        """
        blocks = self._blocks(spectral)
        lead = local.shape[:-3]
        gshape = self.spectral_shape if spectral else self.shape
        components = np.reshape(local, (-1,) + local.shape[-3:])
        counts = [math.prod(e - s for s, e in b) for b in blocks]
        if self.rank != root:
            for c in components:
                self.comm.Gatherv(np.ascontiguousarray(c), None, root=root)
            return None
        out = np.empty(lead + gshape, local.dtype)
        flat_out = out.reshape((-1,) + gshape)
        starts = [b[0][0] for b in blocks]
        slabs = (all(b[1] == (0, gshape[1]) and b[2] == (0, gshape[2]) for b in blocks) and starts == sorted(starts))
        buf = None if slabs else np.empty(sum(counts), local.dtype)
        for c, target in zip(components, flat_out):
            self.comm.Gatherv(np.ascontiguousarray(c), (target if slabs else buf, counts), root=root)
            if not slabs:
                offset = 0
                for b, n in zip(blocks, counts):
                    target[tuple(slice(s, e) for s, e in b)] = buf[offset:offset + n].reshape([e - s for s, e in b])
                    offset += n
        return out

    def scatter(self, global_array, *, root=0, spectral=False):
        """Distribute a global array held on ``root`` (other ranks pass ``None``); returns
        this rank's block. Leading component axes are allowed."""
        blocks = self._blocks(spectral)
        gshape = self.spectral_shape if spectral else self.shape
        header = None
        if self.rank == root:
            global_array = np.asarray(global_array)
            header = (global_array.shape, global_array.dtype.str)
        shape, dtype = self.comm.bcast(header, root=root)
        if tuple(shape[-3:]) != gshape:
            raise ValueError(f"array of shape {tuple(shape)} does not end in the grid shape {gshape}")
        lead = tuple(shape[:-3])
        mine = blocks[self.rank]
        local = np.empty(lead + tuple(e - s for s, e in mine), np.dtype(dtype))
        if self.rank != root:
            self.comm.Scatterv(None, local, root=root)
            return local
        parts = [np.ascontiguousarray(global_array[(...,) + tuple(slice(s, e) for s, e in b)]).ravel()
                 for b in blocks]
        self.comm.Scatterv(([np.concatenate(parts), [p.size for p in parts]]), local, root=root)
        return local

    # ----------------------------------------------------------------- halo
    def min_block_thickness(self):
        """Thinnest local real block along the split axes 0 and 1 (over all ranks)."""
        return min(min(b[0][1] - b[0][0], b[1][1] - b[1][0]) for b in self._real_blocks)

    def exchange_halo(self, f, width, out=None):
        """Local block padded by ``width`` ghost layers on every side, periodic.

        The result of shape ``(..., n1 + 2g, n2 + 2g, n3 + 2g)`` equals the global field
        sliced around this rank's block with periodic wrap, including edges and corners
        across the 2-D process grid: axis 2 is wrapped locally, then axis 0 ghosts are
        exchanged with the axis-0 neighbours, then axis 1 ghosts (already holding the axis-0
        ghosts, hence the corners) with the axis-1 neighbours.

        Parameters
        ----------
        f : ndarray, shape ``(..., *local_shape)``
        width : int
            Ghost width ``g >= 0``; must not exceed the thinnest block of any rank along the
            split axes, nor ``N3``.
        out : ndarray, optional
            Preallocated padded array; ``f`` may be its interior (then only the ghost layers
            are written).
        """
        g = int(width)
        if g < 0:
            raise ValueError(f"halo width {width} must be >= 0")
        thinnest = self.min_block_thickness()
        if g > thinnest or g > self.shape[2]:
            raise ValueError(f"halo width {g} exceeds the thinnest local block ({min(thinnest, self.shape[2])} "
                             f"grid planes) of grid {self.shape} on {self.size} ranks; use fewer ranks, "
                             f"a pencil layout or a smaller halo")
        if f.shape[-3:] != self.local_shape:
            raise ValueError(f"field of shape {f.shape} does not match the local block {self.local_shape}")
        n0, n1, n2 = self.local_shape
        padded_shape = f.shape[:-3] + (n0 + 2 * g, n1 + 2 * g, n2 + 2 * g)
        if out is None:
            out = np.empty(padded_shape, f.dtype)
        elif out.shape != padded_shape:
            raise ValueError(f"out has shape {out.shape}, expected {padded_shape}")
        t0 = time.perf_counter()
        interior = out[..., g:g + n0, g:g + n1, g:g + n2]
        if not (f.ctypes.data == interior.ctypes.data and f.strides == interior.strides):
            interior[...] = f  # (``f`` may be ``out``'s interior already: then only the ghosts)
        if g == 0:
            return out
        out[..., g:g + n0, g:g + n1, :g] = f[..., :, :, n2 - g:]
        out[..., g:g + n0, g:g + n1, g + n2:] = f[..., :, :, :g]
        for axis, n in ((0, n0), (1, n1)):
            # along axis 0 only the interior rows of axis 1 are valid yet; along axis 1 all rows
            other = slice(g, g + n1) if axis == 0 else slice(None)

            def index(s):
                return (..., s, other, slice(None)) if axis == 0 else (..., slice(None), s, slice(None))

            down, up = self._neighbours[axis]
            low, high = index(slice(g, 2 * g)), index(slice(n, n + g))
            low_ghost, high_ghost = index(slice(0, g)), index(slice(n + g, n + 2 * g))
            if down == self.rank:  # one block along this axis: wrap locally
                out[high_ghost] = out[low]
                out[low_ghost] = out[high]
                continue
            recv = np.empty_like(out[high_ghost])
            self.comm.Sendrecv(np.ascontiguousarray(out[low]), dest=down, sendtag=10 + axis,
                               recvbuf=recv, source=up, recvtag=10 + axis)
            out[high_ghost] = recv
            self.comm.Sendrecv(np.ascontiguousarray(out[high]), dest=up, sendtag=20 + axis,
                               recvbuf=recv, source=down, recvtag=20 + axis)
            out[low_ghost] = recv
        self._record("halo_exchange", t0)
        return out

    def __repr__(self):
        return (f"Decomposition(shape={self.shape}, dtype={self.dtype.name}, ranks={self.size}, "
                f"layout={self.layout} {self.proc_grid[0]}x{self.proc_grid[1]}, threads={self.threads})")
