"""The Parsl engine of ``claire batch`` (``--engine parsl``): every job a Parsl app.

:func:`claire_py.batch.batch` plans the jobs as for the MPI engine (job list, sweep, resume
of complete jobs, ``results.csv``); this engine then hands each job that is not complete to
Parsl as one app. The app runs in a Parsl worker and starts the registration as its own MPI
job: the launcher prefix Parsl composes for the app's resource specification
(``PARSL_MPI_PREFIX``, e.g. ``mpiexec -n K -ppn K -hosts NODE``, or ``srun ...``), then
``python -m claire_py.batch_parsl SPEC RESULT``, which registers the job on its ``K`` ranks,
writes ``OUTDIR/NAME/`` exactly as the MPI engine does, and leaves a small result file (the
job's one-line error or none). The row in ``results.csv`` is read back from the job's
``registration.json`` by the same code as the MPI engine's.

Failures. A job that fails by itself (a bad input, an exception in the registration) writes
its error: it is recorded as ``failed`` and is not retried. A job whose processes are lost (a
killed rank, a lost Parsl worker or node) leaves no result: the app raises :class:`JobLost`
and Parsl retries it (``Config.retries``; 2 in :func:`local_config`). With
``checkpoint_every`` the retry resumes from the job's last checkpoint in
``OUTDIR/NAME/checkpoint``, so a lost node costs at most the iterations since then. The
processes of an attempt die with the worker that started them (Linux ``PR_SET_PDEATHSIG``),
so a retry never races an orphan of the lost attempt.

``OUTDIR/.parsl/`` holds the job specifications, the attempts' output (``NAME.log``: what
the registration printed, one section per attempt) and Parsl's own run directory.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from concurrent.futures import as_completed

from .errors import UserInputError

__all__ = ["JobLost", "local_config", "load_config", "run"]

log = logging.getLogger("claire_py.batch")

_INSTALL = "--engine parsl needs Parsl, which is not installed: pip install 'claire_py[parsl]'"


class JobLost(RuntimeError):
    """The processes of an attempt ended without a result (killed, or their node lost)."""


def _parsl():
    try:
        import parsl
    except ImportError:
        raise UserInputError(_INSTALL) from None
    return parsl


def _cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _bindir():
    """The directory of this Python's scripts (``mpiexec``, Parsl's ``interchange.py``)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def local_config(directory, *, ranks_per_job=1, workers=None, retries=2):
    """A Parsl configuration that runs the jobs on this machine.

    One :class:`parsl.executors.MPIExecutor` block on a
    :class:`parsl.providers.LocalProvider`, running ``workers`` jobs at a time (default: as
    many as this machine's cores hold, ``cores // ranks_per_job``, at least one), each
    launched by the ``mpiexec`` beside this Python with ``cores // (workers * ranks_per_job)``
    threads per rank (``NUMBA_NUM_THREADS``, which caps FFTW's too), and retrying a lost job
    ``retries`` times.

    Parameters
    ----------
    directory : str
        Where Parsl's run directory and the node file go (created).
    ranks_per_job : int
        Ranks of each registration.
    workers : int, optional
        Jobs run at once.
    retries : int
        Attempts after the first of a job whose processes are lost.
    """
    _parsl()
    from parsl.config import Config
    from parsl.executors import MPIExecutor
    from parsl.launchers import SimpleLauncher
    from parsl.providers import LocalProvider

    workers = max(1, _cores() // ranks_per_job) if workers is None else int(workers)
    os.makedirs(directory, exist_ok=True)
    # The MPI executor hands out nodes from a scheduler's node list; on one machine that is
    # this host, once per job that may run at once.
    nodefile = os.path.join(directory, "nodes")
    with open(nodefile, "w") as fh:
        fh.write("localhost\n" * workers)
    # each job's ranks share the cores with the other jobs: cores / (jobs at once * K) threads each
    threads = max(1, _cores() // (workers * ranks_per_job))
    worker_init = (f"export PBS_NODEFILE={shlex.quote(nodefile)} NUMBA_NUM_THREADS={threads}; "
                   f"export PATH={shlex.quote(_bindir())}:$PATH")
    executor = MPIExecutor(
        label="claire_local", address="127.0.0.1", max_workers_per_block=workers, mpi_launcher="mpiexec",
        heartbeat_period=2, heartbeat_threshold=20,  # a lost worker is noticed within seconds
        provider=LocalProvider(launcher=SimpleLauncher(), nodes_per_block=1, init_blocks=1, min_blocks=1,
                               max_blocks=1, worker_init=worker_init))
    return Config(executors=[executor], retries=int(retries), run_dir=os.path.join(directory, "runinfo"),
                  strategy="none", strategy_period=0.5)  # the block starts at the first poll


def load_config(config):
    """``config`` as a :class:`parsl.config.Config`: itself, or the one a Python file defines
    as ``config`` (``None`` stays ``None``: :func:`local_config` when the jobs are known).

    Raises
    ------
    UserInputError
        Parsl not installed (naming the extra), the file missing or failing to run, or not
        defining a ``Config`` named ``config``.
    """
    parsl = _parsl()
    from parsl.config import Config

    if config is None or isinstance(config, Config):
        return config
    if not isinstance(config, (str, os.PathLike)):
        raise UserInputError(f"Parsl configuration: give a parsl.config.Config or a Python file, not "
                             f"{type(config).__name__}")
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise UserInputError(f"--parsl-config {path}: no such file")
    import runpy

    try:
        namespace = runpy.run_path(path)
    except Exception as exc:  # noqa: BLE001 - the user's file: one line, not a traceback
        raise UserInputError(f"--parsl-config {path}: running it failed ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())})") from None
    value = namespace.get("config")
    if not isinstance(value, Config):
        raise UserInputError(f"--parsl-config {path}: define the configuration as `config = parsl.config.Config(...)` "
                             f"(Parsl {parsl.__version__})")
    return value


def _die_with_parent():
    """Have the kernel kill this process when the one that started it dies (Linux)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _attempt(spec, result, ranks, parsl_resource_specification=None):
    """The Parsl app (runs in a Parsl worker): one attempt at the job of the file ``spec``.

    Starts the job's ranks with the launcher prefix Parsl set for this task (``mpiexec -n
    ranks`` from ``PATH`` under an executor without MPI mode) and returns the result they
    wrote (``{"error", "seconds", "resumed_from"}``); raises :class:`JobLost` when they wrote
    none."""
    prefix = os.environ.get("PARSL_MPI_PREFIX") or f"mpiexec -n {int(ranks)}"
    try:
        os.unlink(result)
    except FileNotFoundError:
        pass
    output = os.path.splitext(spec)[0] + ".log"
    command = shlex.split(prefix) + [sys.executable, "-m", "claire_py.batch_parsl", spec, result]
    with open(output, "ab") as fh:
        fh.write(f"=== attempt: {shlex.join(command)}\n".encode())
        fh.flush()
        status = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent).returncode
    try:
        with open(result) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        raise JobLost(f"its processes ended (exit status {status}) without a result; their output is in "
                      f"{output}") from None


def _spec(job, directory, checkpoint_every):
    """Write the job's specification for its ranks; ``(spec path, result path)``."""
    from .io import write_text

    spec = os.path.join(directory, f"{job.name}.json")
    write_text(spec, json.dumps({"name": job.name, "inputs": job.inputs, "config": job.config.to_dict(),
                                 "directory": os.path.abspath(job.directory), "checkpoint_every": checkpoint_every}))
    return spec, os.path.join(directory, f"{job.name}.result.json")


def _uses_mpi_mode(config):
    return all(getattr(executor, "enable_mpi_mode", False) for executor in config.executors)


def run(plan, outdir, results, *, ranks_per_job, checkpoint_every=None, config=None):
    """Run the jobs of ``plan`` that are not complete as Parsl apps; record each row in
    ``results`` (a :class:`claire_py.batch._Results`) as its job finishes."""
    from .batch import _finished_row, _one_line, _row

    todo = [(index, job) for index, job in enumerate(plan) if job.record is None]
    if not todo:
        return
    _parsl()
    from parsl.app.app import python_app
    from parsl.dataflow.dflow import DataFlowKernel

    work = os.path.join(os.path.abspath(outdir), ".parsl")  # workers may start elsewhere
    jobs_dir = os.path.join(work, "jobs")
    os.makedirs(jobs_dir, exist_ok=True)
    if config is None:
        workers = min(len(todo), max(1, _cores() // ranks_per_job))
        config = local_config(work, ranks_per_job=ranks_per_job, workers=workers)
    resources = {"num_nodes": 1, "num_ranks": ranks_per_job, "ranks_per_node": ranks_per_job} \
        if _uses_mpi_mode(config) else {}
    # Parsl's processes (interchange, local workers, the jobs' launchers) must not take this
    # process's MPI launch for theirs (under `mpiexec -n 1 claire batch`): MPI here is
    # initialised already, the variables are of no more use to it.
    from .parallel import without_launcher

    clean = without_launcher()
    for name in set(os.environ) - set(clean):
        del os.environ[name]
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = _bindir() + os.pathsep + path  # Parsl starts interchange.py (and local workers) by name
    try:
        dfk = DataFlowKernel(config)  # our own, not Parsl's global one: a caller's loaded DFK is left alone
    except Exception as exc:  # noqa: BLE001 - a configuration Parsl refuses: one line, not a traceback
        raise UserInputError(f"Parsl cannot start with this configuration ({_one_line(exc)})") from exc
    finally:
        os.environ["PATH"] = path
    try:
        app = python_app(_attempt, data_flow_kernel=dfk)
        futures = {}
        for index, job in todo:
            spec, result = _spec(job, jobs_dir, checkpoint_every)
            futures[app(spec, result, ranks_per_job, parsl_resource_specification=dict(resources))] = (index, job)
        for future in as_completed(futures):
            index, job = futures[future]
            try:
                outcome = future.result()
            except Exception as exc:  # noqa: BLE001 - lost every time it was tried: record it, go on
                row = _row(job, status="failed", resumed=False, seconds=float("nan"),
                           error=f"lost {config.retries + 1} time(s): {_one_line(exc)}")
            else:
                if outcome.get("resumed_from"):
                    log.info("job %s: resumed from its checkpoint (level %d, iteration %d)", job.name,
                             *outcome["resumed_from"])
                row = _finished_row(job, outcome["error"], outcome["seconds"])
            results.set(index, row)
    finally:
        dfk.cleanup()


def main(argv=None):
    """``python -m claire_py.batch_parsl SPEC RESULT``: the ranks of one attempt at a job.

    Registers the job of ``SPEC`` on ``COMM_WORLD`` and, on rank 0, writes ``RESULT``
    (atomically) with its error (``null`` when it completed), its seconds and the checkpoint
    it resumed from. Exit status 0 whenever ``RESULT`` was written."""
    _die_with_parent()
    spec_path, result_path = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(message)s")
    logging.getLogger("claire_py").setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    from mpi4py import MPI

    from .batch import _execute, _Job
    from .config import RegistrationConfig
    from .io import write_text

    with open(spec_path) as fh:
        spec = json.load(fh)
    job = _Job(spec["name"], spec["inputs"], {}, RegistrationConfig.from_dict(spec["config"]), spec["directory"])
    group = MPI.COMM_WORLD.Dup()
    agreement = group.Dup() if group.Get_size() > 1 else None
    try:
        error, seconds, start = _execute(job, group, agreement, spec["checkpoint_every"])
    finally:
        if agreement is not None:
            agreement.Free()
        group.Free()
    if MPI.COMM_WORLD.Get_rank() == 0:
        write_text(result_path, json.dumps({"error": error, "seconds": seconds, "resumed_from": start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
