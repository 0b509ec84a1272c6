"""The Python API: what library users call. Thin over the solvers and kernels layers."""

from __future__ import annotations

import logging
import time

import numpy as np

from .errors import UserInputError
from .kernels import Decomposition, SpectralOperators

__all__ = ["smooth"]

log = logging.getLogger(__name__)


def _global_input(array, decomp, name):
    """Scatter a global array given on rank 0 (or on every rank) to local blocks."""
    if decomp.rank == 0 and array is None:
        raise UserInputError(f"{name}: rank 0 must pass the image array")
    return decomp.scatter(None if decomp.rank != 0 else np.asarray(array, dtype=decomp.dtype))


def _image_shape(array, comm, name):
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    shape = None
    if comm.Get_rank() == 0:
        shape = None if array is None else np.shape(array)
    shape = comm.bcast(shape, root=0)
    if shape is None or len(shape) != 3:
        raise UserInputError(f"{name}: a 3-D array is needed, got shape {shape}")
    return shape


def smooth(image, sigma, *, comm=None, dtype=np.float32):
    """Gaussian smoothing of a 3-D image on the distributed spectral grid.

    Parameters
    ----------
    image : ndarray of shape (n1, n2, n3) or None
        The global image, on rank 0 at least (other ranks may pass ``None``).
    sigma : float or sequence of 3 floats
        Standard deviation in voxels, per array axis.
    comm : mpi4py.MPI.Comm, optional
        Communicator (default ``COMM_WORLD``).
    dtype : float32 or float64
        Working precision.

    Returns
    -------
    ndarray or None
        The smoothed global image on rank 0, ``None`` on other ranks. The image is treated
        as periodic (the spectral domain is the torus).

    Examples
    --------
    >>> import numpy as np, claire_py
    >>> img = np.zeros((16, 16, 16)); img[8, 8, 8] = 1.0
    >>> out = claire_py.smooth(img, 1.5)
    >>> round(float(out.sum()), 5)
    1.0
    """
    shape = _image_shape(image, comm, "image")
    t0 = time.perf_counter()
    decomp = Decomposition(shape, comm=comm, dtype=dtype)
    ops = SpectralOperators(decomp)
    local = _global_input(image, decomp, "image")
    result = decomp.gather(ops.smooth(local, sigma))
    log.info("smoothed %s with sigma=%s voxels on %s in %.3f s", "x".join(map(str, shape)), sigma,
             decomp, time.perf_counter() - t0)
    return result
