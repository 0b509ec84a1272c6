"""The Python API: what library users call. Thin over the solvers and kernels layers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .config import RegistrationConfig
from .errors import UserInputError
from .kernels import Decomposition, SpectralOperators
from .solvers.monitor import Workload
from .solvers.newton import gauss_newton_krylov
from .solvers.problem import RegistrationProblem
from .solvers.transport import SemiLagrangianTransport

__all__ = ["smooth", "register", "RegistrationResult"]

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


@dataclass
class RegistrationResult:
    """What :func:`register` returns. On rank 0 the arrays are the global fields; on other
    ranks they are ``None``.

    Attributes
    ----------
    velocity : ndarray ``(3, n1, n2, n3)``
        Stationary velocity on ``[0, 2 pi)^3`` (radians per unit time, component ``a`` along
        array axis ``a``).
    warped : ndarray ``(n1, n2, n3)``
        The moving image deformed onto the fixed one, in the moving image's intensities:
        ``warped(x) = moving(y(x))`` (pull-back).
    det_grad_y : ndarray ``(n1, n2, n3)``
        Jacobian determinant of the pull-back map ``y``.
    history : list of IterationInfo
    workload : dict
        Counts and seconds per operation.
    converged : bool
    stop_reason : str
    """

    velocity: np.ndarray | None
    warped: np.ndarray | None
    det_grad_y: np.ndarray | None
    history: list
    workload: dict
    converged: bool
    stop_reason: str


def _normalized(local, decomp):
    lo = decomp.allreduce(float(local.min()), "min")
    hi = decomp.allreduce(float(local.max()), "max")
    return (local - lo) / (hi - lo) if hi > lo else np.zeros_like(local)


def register(fixed, moving, *, config=None, comm=None, callback=None):
    """Register ``moving`` onto ``fixed`` with CLAIRE's Gauss-Newton-Krylov solver.

    Parameters
    ----------
    fixed, moving : ndarray ``(n1, n2, n3)`` or None
        The reference ``m_R`` and the template ``m_T`` (the ANTs/DIPY/ITK order), global
        arrays on rank 0 (other ranks may pass ``None``, or the same arrays).
    config : RegistrationConfig, optional
    comm : mpi4py.MPI.Comm, optional
    callback : callable, optional
        ``callback(info)`` with an :class:`~claire_py.solvers.monitor.IterationInfo` after each
        Gauss-Newton iteration, on every rank.

    Returns
    -------
    RegistrationResult
    """
    config = RegistrationConfig() if config is None else config
    shape = _image_shape(fixed, comm, "fixed")
    if _image_shape(moving, comm, "moving") != shape:
        raise UserInputError("fixed and moving images must have the same shape; resample one onto the other")
    t0 = time.perf_counter()
    workload = Workload()
    decomp = Decomposition(shape, comm=comm, dtype=np.dtype(config.precision))
    ops = SpectralOperators(decomp)
    transport = SemiLagrangianTransport(decomp, ops, config.transport, workload)
    fixed_local = _global_input(fixed, decomp, "fixed")
    moving_local = _global_input(moving, decomp, "moving")
    images = []
    for img in (fixed_local, moving_local):
        if not np.all(np.isfinite(img)):
            raise UserInputError("images must not contain NaN or infinite values")
        img = _normalized(img, decomp) if config.preprocess.normalize else img
        if config.preprocess.sigma > 0:
            img = ops.smooth(img, config.preprocess.sigma)
        images.append(img)
    problem = RegistrationProblem(transport, images[0], images[1], config.regularization, workload)
    log.info("registering %s on %s (%s)", "x".join(map(str, shape)), decomp, config.precision)
    log.info("iter     objective   mismatch  |g|/|g0|  krylov  step      time")
    result = gauss_newton_krylov(problem, decomp.new_vector(), config.newton, callback=callback)
    log.info("stopped: %s", result.stop_reason)
    if problem.velocity is not result.velocity:
        problem.set_velocity(result.velocity)
    warped = transport.transport_image(moving_local)
    det = transport.det_grad_y()
    workload.add("total", 1, time.perf_counter() - t0)
    for name, (count, seconds) in decomp.stats.items():
        workload.add(name, count, seconds)
    work = workload.as_dict()
    work.setdefault("hessian_matvec", {"count": 0, "seconds": 0.0})["pcg_iterations"] = result.matvecs
    log.info("workload (count, seconds):\n%s", "\n".join(
        f"  {name:20s} {entry['count']:>8} {entry['seconds']:>10.3f}" for name, entry in work.items()))
    return RegistrationResult(
        velocity=decomp.gather(result.velocity), warped=decomp.gather(warped), det_grad_y=decomp.gather(det),
        history=result.history, workload=work, converged=result.converged, stop_reason=result.stop_reason)
