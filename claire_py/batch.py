"""``claire batch``: many registrations as one MPI job (pair lists and parameter sweeps).

A job list (CSV, YAML or JSON file, or a list of dicts) names, per job, ``fixed`` and ``moving``
(NIfTI paths), optionally ``name``, ``labels_fixed`` + ``labels_moving`` (integer label maps:
Dice before/after), ``mask``, and per-job options by the flat names of ``claire register``'s
flags (see :data:`OPTIONS`; ``max-iter`` and ``max_iter`` are the same key; an empty CSV
cell leaves the option unset). A sweep multiplies the list by every combination of the given
option values; a swept job is named ``NAME__beta=1e-2__regnorm=h1s``.

Scheduling. The ``P`` ranks of ``comm`` run the jobs in groups of ``K = ranks_per_job``:

* ``P == K``: one group, every rank, the jobs in list order.
* ``P == 1 + G K``: rank 0 only hands out jobs, one at a time, to whichever of the ``G``
  groups (ranks ``1 .. P-1``) asks next, so that groups finishing short jobs take more of them.
  Between requests rank 0 sleeps (no busy polling): launch one rank more than the cores
  that should work (``mpiexec -n 3`` runs two 1-rank groups on a 2-core machine).

Every job is an ordinary registration (:func:`claire_py.register` on its group's
communicator) written to ``OUTDIR/NAME/`` by :meth:`RegistrationResult.save`. A rerun skips
the jobs whose ``registration.json`` says complete (a complete one with other inputs or
options is an error unless ``overwrite``) and redoes the others. A failing job is recorded
with its one-line error and does not stop the others. ``OUTDIR/results.csv`` holds one row
per job (rewritten atomically as jobs finish: ``pending``, ``running``, ``complete``,
``failed``).

Relative paths in a jobs file are relative to the file's directory; in a list of dicts, to
the working directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections import deque

import numpy as np

from .api import register
from .config import PRESETS
from .errors import UserInputError
from .parallel import world
from .batch_jobs import (_PATHS, OPTIONS, _base_config, _expand, _Job, _job_config, _parse_option,  # noqa: F401
                         parse_sweep, read_jobs)
from .batch_results import _complete_row, _finished_row, _flat, _read_record, _Results, _row, summary_table

__all__ = ["batch", "OPTIONS", "read_jobs", "parse_sweep", "summary_table", "add_batch_command"]

log = logging.getLogger(__name__)


_TAG_REQUEST, _TAG_JOB = 71, 72
_POLL_MIN, _POLL_MAX = 0.001, 0.05  # seconds between the dispatcher's looks for requests
_ALONE_TIMEOUT = 30.0  # seconds a rank that failed alone waits for its group before aborting


def _plan(jobs, outdir, sweep, config, preset, overwrite):
    """Every job, resolved and checked, with the rows of those already complete."""
    from .outputs import prepare_outdir

    if preset is not None and preset not in PRESETS:
        raise UserInputError(f"preset {preset!r} is unknown; use one of {', '.join(PRESETS)}")
    base = _base_config(config)
    entries, where_base = read_jobs(jobs)
    expanded = _expand(entries, where_base, sweep)
    if not expanded:
        raise UserInputError("the job list is empty")
    seen = {}
    for name, _, _, where in expanded:
        if name in seen:
            raise UserInputError(f"job name {name!r} is used twice ({seen[name]} and {where}); give distinct names")
        seen[name] = where
    plan = [_Job(name, inputs, options, _job_config(options, base, preset, where), os.path.join(outdir, name))
            for name, inputs, options, where in expanded]
    prepare_outdir(outdir, overwrite=True, create=False)  # a writable place with some room; removes nothing
    try:
        os.makedirs(outdir, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"{outdir}: cannot create the output directory ({exc.strerror or exc})") from None
    for job in plan:
        meta = None if overwrite else _read_record(job.directory)
        if meta is not None:
            wanted = {"inputs": job.inputs, "config": json.loads(json.dumps(job.config.to_dict()))}
            stored = _flat({"inputs": meta.get("inputs"), "config": meta.get("config")})
            differ = [k for k, v in _flat(wanted).items() if stored.get(k, "<unset>") != v]
            if differ:
                shown = "; ".join(f"{k}: {stored.get(k, '<unset>')!r} there, {_flat(wanted)[k]!r} now"
                                  for k in differ[:3])
                raise UserInputError(f"{job.directory} holds a complete registration with other inputs or options "
                                     f"than job {job.name} ({shown}); pass --overwrite to redo it, or choose another "
                                     "-o")
            try:
                job.record = _complete_row(job, meta, resumed=True)
            except (KeyError, TypeError, IndexError, ValueError):
                job.record = None  # an unreadable record: run the job again
    return plan


def _one_line(exc):
    text = " ".join(str(exc).split())
    if not isinstance(exc, UserInputError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:500]


def _agree(agreement, error, name):
    """The first error of any rank of the group (``None`` when none failed), on every rank.
    A rank that failed while the others wait in a collective it will never join aborts the
    whole job after :data:`_ALONE_TIMEOUT` s, so nothing hangs."""
    from mpi4py import MPI

    mine = np.array([1 if error else 0], dtype=np.int64)
    worst = np.zeros_like(mine)
    request = agreement.Iallreduce(mine, worst, op=MPI.MAX)
    deadline = time.monotonic() + _ALONE_TIMEOUT
    while not request.Test():
        if error and time.monotonic() > deadline:
            sys.stderr.write(f"claire batch: job {name} failed on world rank {MPI.COMM_WORLD.Get_rank()} alone "
                             f"({error}); the rest of its group cannot go on: aborting (rerun to resume)\n")
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)
        time.sleep(0.005)
    if not worst[0]:
        return None
    return next(e for e in agreement.allgather(error) if e)


def _job_checkpoint(job, group, every):
    """The job's :class:`~claire_py.checkpoint.FileCheckpoint` in ``OUTDIR/NAME/checkpoint``
    (saved every ``every`` Gauss-Newton iterations), resuming from the one there when it was
    made by the same inputs and options (another's is discarded); and, when resuming, the
    ``(level, iteration)`` it resumes from."""
    from .checkpoint import FileCheckpoint, read_checkpoint

    meta = {"inputs": job.inputs, "config": json.loads(json.dumps(job.config.to_dict()))}
    start = None
    if group.Get_rank() == 0:
        try:
            state = read_checkpoint(job.directory)
            if state.get("meta") == meta:
                current = state.get("current") or {}
                start = (current.get("level", len(state.get("levels", {}))),
                         current.get("resume", {}).get("iteration", 0))
        except UserInputError:
            pass  # none there (or unreadable): start afresh
    start = group.bcast(start, root=0)
    return FileCheckpoint(job.directory, group, every=every, meta=meta, resume=start is not None), start


def _execute(job, group, agreement, checkpoint_every=None):
    """Register one job on ``group`` and save it (every rank its slabs of the files).

    Returns
    -------
    error : str or None
        The one-line error of the first rank that failed (the same on every rank).
    seconds : float
        Wall time of the attempt.
    resumed_from : tuple or None
        ``(level, iteration)`` of the checkpoint the job resumed from.
    """
    t0 = time.perf_counter()
    leader = group.Get_rank() == 0
    error, start = None, None
    try:
        checkpoint = None
        if checkpoint_every:
            checkpoint, start = _job_checkpoint(job, group, checkpoint_every)
            if start is not None and leader:
                log.info("job %s: resuming from its checkpoint (level %d, iteration %d)", job.name, *start)
        labels = (job.inputs["labels_fixed"], job.inputs["labels_moving"]) if "labels_fixed" in job.inputs else None
        # every rank of the group keeps its slabs and writes them: no rank gathers a field
        result = register(job.inputs["fixed"], job.inputs["moving"], config=job.config, comm=group,
                          mask=job.inputs.get("mask"), labels=labels, checkpoint=checkpoint, gather=False)
        try:
            result.save(job.directory, overwrite=True, inputs=job.inputs)
        finally:
            result.free()  # the decomposition's communicators: a batch makes many
        del result
        if leader and checkpoint is not None:
            checkpoint.remove()  # the outputs are complete
    except Exception as exc:  # noqa: BLE001 - a failing job is recorded, the batch goes on
        error = _one_line(exc)
        if not isinstance(exc, UserInputError):
            log.warning("job %s failed", job.name, exc_info=True)
    if agreement is not None:
        error = _agree(agreement, error, job.name)
    return error, time.perf_counter() - t0, start


def _run_job(job, group, agreement, checkpoint_every=None):
    """Register one job on ``group`` and save it; its row on the group's rank 0 (a failure
    is a row too), ``None`` on the other ranks."""
    error, seconds, _ = _execute(job, group, agreement, checkpoint_every)
    return _finished_row(job, error, seconds) if group.Get_rank() == 0 else None


def _run_in_order(plan, comm, results, checkpoint_every=None):
    """One group (every rank of ``comm``): the jobs in list order."""
    group = comm.Dup()
    agreement = group.Dup() if group.Get_size() > 1 else None
    try:
        for index, job in enumerate(plan):
            if job.record is not None:
                continue
            if results is not None:
                results.set(index, _row(job, status="running"), final=False)
            row = _run_job(job, group, agreement, checkpoint_every)
            if results is not None:
                results.set(index, row)
    finally:
        if agreement is not None:
            agreement.Free()
        group.Free()


def _dispatch(plan, work, groups, results):
    """World rank 0 with several groups: hand out the next job to whichever group asks."""
    from mpi4py import MPI

    todo = deque(i for i, job in enumerate(plan) if job.record is None)
    status, delay = MPI.Status(), _POLL_MIN
    while groups:
        if not work.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_REQUEST, status=status):
            time.sleep(delay)  # no busy polling: the core is the workers'
            delay = min(2 * delay, _POLL_MAX)
            continue
        delay = _POLL_MIN
        source = status.Get_source()
        finished = work.recv(source=source, tag=_TAG_REQUEST)
        if finished is not None:
            results.set(*finished)
        if todo:
            index = todo.popleft()
            work.send(index, dest=source, tag=_TAG_JOB)
            results.set(index, _row(plan[index], status="running"), final=False)
        else:
            work.send(-1, dest=source, tag=_TAG_JOB)
            groups -= 1


def _work(plan, work, group, checkpoint_every=None):
    """A group of ranks 1..P-1: ask world rank 0 for a job, run it, report it, ask again."""
    agreement = group.Dup() if group.Get_size() > 1 else None
    finished = None
    try:
        while True:
            index = None
            if group.Get_rank() == 0:
                work.send(finished, dest=0, tag=_TAG_REQUEST)
                index = work.recv(source=0, tag=_TAG_JOB)
            index = group.bcast(index, root=0)
            if index < 0:
                return
            row = _run_job(plan[index], group, agreement, checkpoint_every)
            finished = (index, row)
    finally:
        if agreement is not None:
            agreement.Free()


def _positive(value, what):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserInputError(f"{what} {value!r} must be an integer >= 1")
    return int(value)


def _check_layout(size, ranks_per_job):
    k = _positive(ranks_per_job, "ranks per job")
    if size != k and (size < k or (size - 1) % k):
        raise UserInputError(
            f"{size} rank(s) cannot run groups of {k}: launch P = {k} ranks (one group, the jobs in order) or "
            f"P = 1 + G*{k} (rank 0 hands out the jobs to G groups), e.g. mpiexec -n {1 + k} or -n {1 + 2 * k}")
    return k


def batch(jobs, outdir, *, comm=None, ranks_per_job=1, sweep=None, config=None, preset=None, overwrite=False,
          engine="mpi", parsl_config=None, checkpoint_every=None):
    """Run many registrations: a list of pairs, times a parameter sweep, as one MPI job
    (``engine="mpi"``) or as Parsl apps (``engine="parsl"``, see :mod:`claire_py.batch_parsl`).

    Parameters
    ----------
    jobs : str, os.PathLike or sequence of dict
        A ``.csv``, ``.yaml``/``.yml`` or ``.json`` job list, or a list of dicts (as given
        on rank 0 of ``comm``), each with ``fixed`` and ``moving`` (NIfTI paths) and
        optionally ``name``, ``labels_fixed`` and ``labels_moving`` (integer label maps: Dice
        before/after), ``mask`` and per-job options (``preset`` and the keys of
        :data:`OPTIONS`: ``beta``, ``regnorm``, ``gtol``, ``max_iter``, ``sigma``, ...). The
        default name is ``MOVING_to_FIXED`` (file stems).
    outdir : str
        Where job ``NAME`` writes ``OUTDIR/NAME/`` (the files of ``claire register``) and the
        batch ``OUTDIR/results.csv``.
    comm : mpi4py.MPI.Comm, optional
        Default ``COMM_WORLD``; its size ``P`` must be ``ranks_per_job`` (one group) or
        ``1 + G * ranks_per_job`` (rank 0 dispatches jobs to ``G`` groups).
    ranks_per_job : int
        Ranks ``K`` of each registration.
    sweep : dict, optional
        ``{option: [values]}``: every job is run for every combination, named
        ``NAME__beta=0.01__regnorm=h1s`` (values as given; strings are parsed like a CSV's).
    config : RegistrationConfig, dict or path, optional
        Settings of every job (a nested dict or JSON/YAML file as for
        :meth:`RegistrationConfig.from_dict`); the jobs' own options and the sweep's refine it.
    preset : str, optional
        A preset (see :data:`claire_py.config.PRESETS`) that ``config`` and the options
        refine, unless a job names its own.
    overwrite : bool
        Redo every job, even those already complete in ``outdir``.
    engine : {"mpi", "parsl"}
        ``"mpi"``: the ranks of ``comm`` run the jobs (the scheduling above). ``"parsl"``:
        this one process (``comm`` of size 1) hands every job to Parsl, which runs it as its
        own MPI job of ``ranks_per_job`` ranks and retries it when its worker is lost.
    parsl_config : parsl.config.Config or path, optional
        With ``engine="parsl"``: the Parsl configuration, or a Python file defining one as
        ``config``; default :func:`claire_py.batch_parsl.local_config` (this machine).
    checkpoint_every : int, optional
        Save each job's progress in ``OUTDIR/NAME/checkpoint`` every this many Gauss-Newton
        iterations; a job run again (a rerun, a Parsl retry) resumes from its checkpoint
        when that was made by the same inputs and options.

    Returns
    -------
    list of dict
        One row per job in list order, on every rank: ``name``, the input paths, the
        options, ``status`` (``complete`` or ``failed``), ``resumed`` (complete from an
        earlier run), ``seconds`` (the registration's), ``iterations``, ``matvecs``,
        ``mismatch_before``/``after`` (relative, as in the ``claire register`` summary),
        ``det_min``/``det_max`` of det(grad y), ``dice_mean_before``/``dice_mean`` with
        labels, ``beta_final``, ``converged``, ``stop_reason``, ``ranks`` and ``error``.
        The same rows are in ``OUTDIR/results.csv``.

    Raises
    ------
    UserInputError
        On every rank alike, before any job runs: an unreadable job list, an unknown key or
        a bad option value (naming the job), duplicate names, a rank count that does not
        split into groups, an unusable ``outdir``, an engine that cannot start (Parsl not
        installed, a Parsl configuration file that does not define one). Failures of single jobs are not raised:
        they are rows with ``status == "failed"`` and the one-line ``error``.
    """
    from mpi4py import MPI

    comm = world(comm)
    rank, size = comm.Get_rank(), comm.Get_size()
    if checkpoint_every is not None:
        checkpoint_every = _positive(checkpoint_every, "checkpoint every")
    if engine == "parsl":
        if size > 1:
            raise UserInputError("--engine parsl runs in one process (Parsl launches each job's ranks): start claire "
                                 "batch without mpiexec")
        from . import batch_parsl

        k = _positive(ranks_per_job, "ranks per job")
        parsl_config = batch_parsl.load_config(parsl_config)  # a bad one is refused before any work
    elif engine == "mpi":
        if parsl_config is not None:
            raise UserInputError("a Parsl configuration is for --engine parsl; drop it or choose that engine")
        k = _check_layout(size, ranks_per_job)
    else:
        raise UserInputError(f"engine {engine!r} is unknown; use mpi or parsl")
    plan, error, cause = None, None, None
    if rank == 0:
        try:
            plan = _plan(jobs, os.fspath(outdir), sweep, config, preset, overwrite)
        except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for a plan that never comes
            error, cause = _one_line(exc), exc
    plan, error = comm.bcast((plan, error), root=0)
    if error:
        raise UserInputError(error) from cause
    results = _Results(plan, os.fspath(outdir)) if rank == 0 else None
    error = comm.bcast(results.write() if rank == 0 else None, root=0)
    if error:
        raise UserInputError(error)
    skipped = sum(job.record is not None for job in plan)
    if rank == 0 and engine == "parsl":
        log.info("batch: %d job(s), %d already complete, as Parsl apps of %d rank(s) each", len(plan), skipped, k)
    elif rank == 0:
        log.info("batch: %d job(s), %d already complete, on %d rank(s) in %s of %d", len(plan), skipped, size,
                 "one group" if size == k else f"{(size - 1) // k} group(s)", k)
    if engine == "parsl":
        batch_parsl.run(plan, os.fspath(outdir), results, ranks_per_job=k, checkpoint_every=checkpoint_every,
                        config=parsl_config)
    elif size == k:
        _run_in_order(plan, comm, results, checkpoint_every)
    else:
        work = comm.Dup()  # private: never matches the jobs' own messages
        try:
            group = comm.Split(MPI.UNDEFINED if rank == 0 else (rank - 1) // k, key=rank)
            if rank == 0:
                _dispatch(plan, work, (size - 1) // k, results)
            else:
                try:
                    _work(plan, work, group, checkpoint_every)
                finally:
                    group.Free()
            request = work.Ibarrier()  # idle ranks sleep instead of spinning in a collective
            while not request.Test():
                time.sleep(0.01)
        finally:
            work.Free()
    rows = None
    if rank == 0:
        error = results.write()
        rows = results.final()
    rows, error = comm.bcast((rows, error), root=0)
    if error:
        raise UserInputError(error)
    return rows


def _cmd_batch(args):
    """``claire batch``: returns 0 when every job completed, 1 when some failed."""
    comm = world()
    logging.getLogger("claire_py").setLevel(logging.WARNING)  # the registrations' own log: warnings only
    log.setLevel(logging.INFO if comm.Get_rank() == 0 else logging.WARNING)
    sweep = parse_sweep(args.sweep)
    rows = batch(args.jobs, args.output, comm=comm, ranks_per_job=args.ranks_per_job,
                 sweep=sweep, config=args.config, preset=args.preset, overwrite=args.overwrite,
                 engine=args.engine, parsl_config=args.parsl_config, checkpoint_every=args.checkpoint_every)
    if comm.Get_rank() == 0:
        print(summary_table(rows, os.path.join(args.output, "results.csv")))
        if not args.no_report:
            from .report import write_batch_report

            print(f"report: {write_batch_report(args.output, rows, tuple(sweep or ()))}")
    return 1 if any(r["status"] != "complete" for r in rows) else 0


def add_batch_command(subparsers):
    """Add ``claire batch`` to the ``claire`` command's subparsers."""
    import argparse
    import textwrap

    p = subparsers.add_parser(
        "batch", help="many registrations as one MPI job: a list of pairs, parameter sweeps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every job of JOBS (times every --sweep combination) as an ordinary registration\n"
                    "writing OUTDIR/NAME/, and OUTDIR/results.csv with one row per job. Launch P = K ranks\n"
                    "(one group of K = --ranks-per-job, the jobs in order) or P = 1 + G*K (rank 0 hands out the\n"
                    "jobs to G groups as they finish, sleeping in between). A rerun skips the complete jobs and\n"
                    "redoes the others; a failing job is recorded and the others go on (exit status 1 when any\n"
                    "failed). With --engine parsl, run it as one process (no mpiexec): Parsl starts each job's K\n"
                    "ranks on the resources of --parsl-config and retries a job whose worker is lost.",
        epilog="JOBS columns (CSV header) or keys (YAML/JSON list of mappings): fixed, moving (required),\n"
               "name, labels_fixed, labels_moving, mask (paths relative to JOBS' directory), preset, and the\n"
               "options (as claire register's flags; an empty cell leaves one unset):\n  "
               + textwrap.fill(", ".join(OPTIONS), 88, subsequent_indent="  ") + "\n\n"
               "Example jobs.csv:\n  fixed,moving,beta\n  template.nii.gz,subj01.nii.gz,\n"
               "  template.nii.gz,subj02.nii.gz,1e-3\n"
               "run as: mpiexec -n 5 claire batch jobs.csv -o out --sweep regnorm=h1s,h2s")
    p.add_argument("jobs", help="job list: .csv, .yaml/.yml (PyYAML) or .json")
    p.add_argument("-o", "--output", required=True, help="output directory: OUTDIR/NAME/ per job, OUTDIR/results.csv")
    p.add_argument("--ranks-per-job", type=int, default=1, metavar="K", help="ranks of each registration (default 1)")
    p.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="run every job for each value of option NAME (repeat for a grid of combinations)")
    p.add_argument("--config", help="JSON or YAML RegistrationConfig file: settings of every job")
    p.add_argument("--preset", choices=tuple(PRESETS), help="start every job from this preset (a job's own wins)")
    p.add_argument("--overwrite", action="store_true", help="redo every job, even those already complete")
    p.add_argument("--engine", choices=("mpi", "parsl"), default="mpi",
                   help="mpi (default): the ranks of this MPI job run the jobs; parsl: this one process hands each job "
                        "to Parsl as its own MPI job of K ranks, retried when its worker is lost (pip install "
                        "'claire_py[parsl]')")
    p.add_argument("--parsl-config", metavar="FILE",
                   help="with --engine parsl: a Python file defining `config = parsl.config.Config(...)` (a cluster's "
                        "provider, nodes, launcher); default: this machine, cores/K jobs at a time, 2 retries")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="save each job's progress in OUTDIR/NAME/checkpoint every N Gauss-Newton iterations; a job run "
                        "again (a rerun, a retry) resumes from it")
    p.add_argument("--no-report", action="store_true", help="skip OUTDIR/batch_report.html (table and plot of the results)")
    p.set_defaults(run=_cmd_batch)
    return p
