"""The MPI patterns of the top floor: the default communicator, work done on rank 0 whose
outcome every rank shares, and errors every rank agrees on. Whatever fails, every rank leaves
the pattern together (raising alike), so that no rank is left waiting in a collective."""

from __future__ import annotations

from .errors import UserInputError

__all__ = ["world", "on_root", "agree", "spread", "without_launcher"]


def world(comm=None):
    """``comm``, or ``MPI.COMM_WORLD`` when it is ``None``."""
    if comm is not None:
        return comm
    from mpi4py import MPI

    return MPI.COMM_WORLD


def on_root(comm, func):
    """``func()`` run on rank 0 of ``comm``; its value on every rank. A
    :class:`UserInputError` there is raised on every rank alike; any other exception is
    re-raised on rank 0 and raised as ``RuntimeError`` (its one line) on the others."""
    comm = world(comm)
    value, error, unexpected = None, None, None
    if comm.Get_rank() == 0:
        try:
            value = func()
        except UserInputError as exc:
            error = ("user", str(exc))
        except Exception as exc:  # a bug: raised below, after the other ranks learn of it
            unexpected, error = exc, ("bug", f"{type(exc).__name__} on rank 0: {exc}")
    error, value = comm.bcast((error, value))
    if unexpected is not None:
        raise unexpected
    if error is not None:
        raise UserInputError(error[1]) if error[0] == "user" else RuntimeError(error[1])
    return value


def agree(comm, error):
    """Raise on every rank of ``comm`` the first (lowest rank's) of the ranks' ``error``
    messages (``None`` where a rank had none), as :class:`UserInputError`; return when none."""
    errors = [e for e in world(comm).allgather(error) if e]
    if errors:
        raise UserInputError(errors[0])


#: Prefixes of the variables by which an MPI launcher (Hydra, PMI/PMIx, Open MPI) makes a
#: process one of its ranks.
_LAUNCHER_PREFIXES = ("PMI", "PMIX_", "HYDRA_", "MPIR_", "MPICH_", "OMPI_")


def without_launcher(environ=None):
    """A copy of ``environ`` (default ``os.environ``) without an MPI launcher's variables, so
    that a process started with it initialises MPI on its own (as a singleton, or as a rank
    of a launcher it was started by) instead of as a rank of this process's launcher."""
    import os

    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}


def spread(comm, jobs, weights=None):
    """Run ``jobs`` (callables without arguments) spread over the ranks of ``comm``, each on
    the rank with the least work so far by ``weights`` (default 1 each), and return their
    values in order on rank 0 (``None`` on the others). A :class:`UserInputError` or
    ``OSError`` on any rank is raised on every rank alike (an ``OSError`` keeps its message);
    any other exception is re-raised where it happened and raised as ``RuntimeError`` (its
    one line) on the others."""
    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    if len(set(comm.allgather(len(jobs)))) > 1:
        raise RuntimeError("spread: the ranks were given different numbers of jobs")
    load, owner = [0.0] * size, []
    for weight in [1.0] * len(jobs) if weights is None else weights:
        least = min(range(size), key=load.__getitem__)
        owner.append(least)
        load[least] += weight
    mine, error, unexpected = {}, None, None
    for i, job in enumerate(jobs):
        if owner[i] != rank:
            continue
        try:
            mine[i] = job()
        except UserInputError as exc:
            error = ("user", str(exc))
        except OSError as exc:
            error = ("os", str(exc))
        except Exception as exc:  # a bug: raised below, after the other ranks learn of it
            unexpected, error = exc, ("bug", f"{type(exc).__name__} on rank {rank}: {exc}")
        if error is not None:
            break
    first = next((e for e in comm.allgather(error) if e), None)
    if unexpected is not None:
        raise unexpected
    if first is not None:
        kind, message = first
        raise UserInputError(message) if kind == "user" else OSError(message) if kind == "os" else RuntimeError(message)
    parts = comm.gather(mine, root=0)
    if rank != 0:
        return None
    values = {i: value for part in parts for i, value in part.items()}
    return [values[i] for i in range(len(jobs))]
