"""Checkpoint and restart of a registration (``--checkpoint-every N``, ``--resume OUTDIR``).

``OUTDIR/checkpoint/`` holds ``state.json`` and velocity files (``.npy``, global arrays
``(3, n1, n2, n3)`` in the working precision, written by rank 0):

* every finished continuation level: its final velocity, history, matvec count and stop
  reason (the level is not solved again on resume);
* the running level: the velocity of its latest saved Gauss-Newton iterate (every ``N``
  iterations) and what :func:`~claire_py.solvers.newton.gauss_newton_krylov` needs to
  continue from it (iteration number, ``||g0||``, history, counters).

Every file is written under a temporary name and renamed; velocity files have unique names
and ``state.json`` (renamed last) names the ones that belong to it, so a run killed at any
moment leaves a consistent checkpoint. The solve is deterministic for a given number of
ranks, so a resumed run repeats the uninterrupted one (restarting on another number of ranks
works too, equal up to rounding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np

from .errors import UserInputError
from .io import write_text
from .solvers.monitor import IterationInfo

__all__ = ["FileCheckpoint", "read_checkpoint"]

_STATE = "state.json"


def _directory(outdir):
    return os.path.join(outdir, "checkpoint")


def read_checkpoint(outdir):
    """The ``state.json`` of ``outdir``'s checkpoint (a dict), or raise :class:`UserInputError`."""
    path = os.path.join(_directory(outdir), _STATE)
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"{outdir}: no checkpoint to resume from ({exc.__class__.__name__}: {path}); "
                             "run claire register with --checkpoint-every N first") from None


class FileCheckpoint:
    """Saves and restores solver progress in ``OUTDIR/checkpoint`` (see the module docstring).

    Parameters
    ----------
    outdir : str
        The registration's output directory.
    comm : mpi4py.MPI.Comm
        The registration's communicator (rank 0 reads and writes).
    every : int
        Save the running level every ``every`` Gauss-Newton iterations (finished levels are
        always saved).
    meta : dict
        Stored beside the progress (inputs, configuration) so that ``--resume`` can rebuild
        the run.
    resume : bool
        Start from the checkpoint already in ``outdir``.
    """

    def __init__(self, outdir, comm, *, every=1, meta=None, resume=False):
        if not (isinstance(every, int) and every >= 1):
            raise UserInputError(f"--checkpoint-every {every!r}: give a number of iterations >= 1")
        self.directory = _directory(outdir)
        self.comm, self.rank = comm, comm.Get_rank()
        self.every = every
        self.state = {"meta": meta or {}, "every": every, "levels": {}, "current": None}
        if resume:
            state, error = None, None
            if self.rank == 0:
                try:
                    state = read_checkpoint(outdir)
                except UserInputError as exc:
                    error = str(exc)
            state, error = comm.bcast((state, error))
            if error:
                raise UserInputError(error)
            self.state = state
            self.every = state["every"]
        elif self.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.saves = 0

    # ------------------------------------------------------------------ files
    def _write_velocity(self, decomp, velocity, name):
        full = decomp.gather(np.ascontiguousarray(velocity))
        if self.rank == 0:
            os.makedirs(self.directory, exist_ok=True)
            tmp = os.path.join(self.directory, f".{name}.partial")
            with open(tmp, "wb") as fh:
                np.save(fh, full)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, os.path.join(self.directory, name))

    def _read_velocity(self, decomp, name):
        full = np.load(os.path.join(self.directory, name)) if self.rank == 0 else None
        return decomp.scatter(full).astype(decomp.dtype)

    def _commit(self, obsolete=()):
        """Write ``state.json`` (atomically), then delete the files it no longer names."""
        if self.rank == 0:
            write_text(os.path.join(self.directory, _STATE), json.dumps(self.state))
            for name in obsolete:
                if name:
                    try:
                        os.unlink(os.path.join(self.directory, name))
                    except FileNotFoundError:
                        pass
        self.saves += 1

    # --------------------------------------------------- the solver's protocol
    def restore(self, level, decomp):
        saved = self.state["levels"].get(str(level))
        if saved is not None:
            return {"done": True, "velocity": self._read_velocity(decomp, saved["file"]),
                    "history": [IterationInfo(**h) for h in saved["history"]], "matvecs": saved["matvecs"],
                    "converged": saved["converged"], "stop_reason": saved["stop_reason"]}
        current = self.state["current"]
        if current is not None and current["level"] == level:
            resume = dict(current["resume"], history=[IterationInfo(**h) for h in current["resume"]["history"]])
            return {"done": False, "velocity": self._read_velocity(decomp, current["file"]), "resume": resume}
        return None

    def iterate(self, level, decomp, velocity, resume):
        it = resume["iteration"]
        if it == 0 or it % self.every:
            return
        current = self.state["current"]
        if current is not None and current["level"] == level and current["resume"]["iteration"] == it:
            return  # just restored from here
        name = f"level{level}-iteration{it}.npy"
        self._write_velocity(decomp, velocity, name)
        stored = dict(resume, history=[dataclasses.asdict(h) for h in resume["history"]])
        self.state["current"] = {"level": level, "file": name, "resume": stored}
        self._commit([current["file"]] if current else [])

    def level_done(self, level, decomp, result):
        name = f"level{level}-final.npy"
        self._write_velocity(decomp, result.velocity, name)
        self.state["levels"][str(level)] = {
            "file": name, "history": [dataclasses.asdict(h) for h in result.history], "matvecs": result.matvecs,
            "converged": result.converged, "stop_reason": result.stop_reason}
        current, self.state["current"] = self.state["current"], None
        self._commit([current["file"]] if current else [])

    def remove(self):
        """Delete the checkpoint (once the registration's outputs are complete)."""
        if self.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)
