"""``claire batch --engine parsl``: the jobs as Parsl apps on this machine.

The Parsl runs are command-line processes started by rank 0 (a clean environment: each job
is its own MPI job launched by Parsl); under ``mpiexec -n P`` their jobs have ``P`` ranks and
are compared with the MPI engine running the same list on this run's ``P`` ranks (one group).
The other ranks wait asleep (not spinning in a barrier) while rank 0's subprocesses run."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

from claire_py import UserInputError
from claire_py._testing import assert_same_registration, clean_subprocess_env
from claire_py.batch import batch

COMM = MPI.COMM_WORLD
K = COMM.size  # ranks of every job, under both engines
CLAIRE = [sys.executable, "-m", "claire_py", "batch"]


def _pair(n, shift):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - shift * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


def _write(directory, files, jobs_csv):
    """``files``: ``{stem: (n, shift)}`` pairs saved as ``f{stem}``/``m{stem}.nii.gz``; the job list."""
    if COMM.rank == 0:
        for stem, (n, shift) in files.items():
            for prefix, image in zip("fm", _pair(n, shift)):
                nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0])),
                         os.path.join(directory, f"{prefix}{stem}.nii.gz"))
        with open(os.path.join(directory, "jobs.csv"), "w") as fh:
            fh.write(jobs_csv)
    COMM.Barrier()
    return os.path.join(directory, "jobs.csv")


def _wait_asleep():
    request = COMM.Ibarrier()
    while not request.Test():
        time.sleep(0.01)


def _table(outdir):
    with open(os.path.join(outdir, "results.csv"), newline="") as fh:
        return list(csv.DictReader(fh))


def _attempts(outdir, name):
    with open(os.path.join(outdir, ".parsl", "jobs", f"{name}.log")) as fh:
        return fh.read().count("=== attempt:")


def _without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _assert_rows_agree(rows, reference):
    """The same rows but for the seconds, numbers to 1e-8: each engine's process measures its
    own FFTW plans, with its own thread count, so the last bits of a float may differ (as
    ``claire_py._testing.assert_same_registration`` allows)."""
    rows, reference = _without_seconds(rows), _without_seconds(reference)
    assert [sorted(r) for r in rows] == [sorted(r) for r in reference]
    for row, expected in zip(rows, reference):
        for key, value in row.items():
            try:
                same = value == expected[key] or np.isclose(float(value), float(expected[key]), rtol=1e-8, atol=0)
            except ValueError:
                same = False
            assert same, (row["name"], key, value, expected[key])


JOBS = """name,fixed,moving,max-iter,precision
a,f16.nii.gz,m16.nii.gz,3,float64
b,f24.nii.gz,m24.nii.gz,2,float64
bad,f16.nii.gz,nowhere.nii.gz,2,float64
"""
NAMES = [f"{name}__beta={beta}" for name in ("a", "b", "bad") for beta in ("1e-2", "1e-3")]


def test_three_pairs_one_invalid_as_with_the_mpi_engine_and_a_rerun_does_no_work(shared_tmp):
    """Three pairs (one with a missing image) times a sweep of two values of beta."""
    jobs = _write(shared_tmp, {"16": (16, 0.3), "24": (24, 0.3)}, JOBS)
    by_mpi, by_parsl = os.path.join(shared_tmp, "mpi"), os.path.join(shared_tmp, "parsl")
    batch(jobs, by_mpi, ranks_per_job=K, sweep={"beta": ["1e-2", "1e-3"]})
    try:
        if COMM.rank == 0:
            command = CLAIRE + [jobs, "-o", by_parsl, "--engine", "parsl", "--ranks-per-job", str(K), "--no-report",
                                "--sweep", "beta=1e-2,1e-3"]
            done = subprocess.run(command, env=clean_subprocess_env(), capture_output=True, text=True, timeout=600)
            assert done.returncode == 1, done.stderr  # some jobs failed
            table = _table(by_parsl)
            assert [(r["name"], r["status"]) for r in table] == list(zip(NAMES, ["complete"] * 4 + ["failed"] * 2))
            assert {r["error"] for r in table[4:]} == {f"{shared_tmp}/nowhere.nii.gz: no such file"}
            assert [r["beta"] for r in table] == ["0.01", "0.001"] * 3 and table[0]["ranks"] == str(K)
            _assert_rows_agree(table, _table(by_mpi))  # the engines agree
            assert [_attempts(by_parsl, n) for n in NAMES] == [1] * 6  # a user error is not retried
            for name in NAMES[:4]:
                assert_same_registration(os.path.join(by_parsl, name), os.path.join(by_mpi, name))

            # a rerun registers nothing again: the complete jobs are read back, the failed ones tried again;
            # started as a user may start it, under `mpiexec -n 1` (Parsl's processes must not take its launch)
            stamps = [os.stat(os.path.join(by_parsl, n, "registration.json")).st_mtime_ns for n in NAMES[:4]]
            again = subprocess.run([os.path.join(os.path.dirname(sys.executable), "mpiexec"), "-n", "1"] + command,
                                   env=clean_subprocess_env(), capture_output=True, text=True, timeout=600)
            assert again.returncode == 1, again.stderr
            assert [os.stat(os.path.join(by_parsl, n, "registration.json")).st_mtime_ns for n in NAMES[:4]] == stamps
            assert [r["resumed"] for r in _table(by_parsl)] == ["True"] * 4 + ["False"] * 2
            assert [_attempts(by_parsl, n) for n in NAMES] == [1] * 4 + [2] * 2
            assert "4 of 6 job(s) complete (4 from an earlier run), 2 failed" in again.stdout
    finally:
        _wait_asleep()


SLOW = """name,fixed,moving,beta,gtol,max-iter,precision
slow,f32.nii.gz,m32.nii.gz,1e-5,1e-4,30,float64
"""


def _kill_the_worker_of(spec, state, proc, iteration, spared=()):
    """SIGKILL the Parsl worker running the job of ``spec`` (not one of the ranks ``spared``,
    those of an earlier attempt) once its checkpoint holds ``iteration``; the killed rank."""
    import psutil

    deadline = time.time() + 300
    rank = None
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(state) as fh:
                saved = json.load(fh)["current"]["resume"]["iteration"]
        except (OSError, ValueError, TypeError, KeyError):
            saved = -1
        if saved >= iteration:
            rank = next((p for p in psutil.process_iter(["cmdline"]) if spec in (p.info["cmdline"] or ())
                         and os.path.basename(p.info["cmdline"][0]) != "mpiexec" and p.pid not in spared), None)
            if rank is not None:
                break
        time.sleep(0.02)
    assert proc.poll() is None and rank is not None, "the batch ended before its job could be killed"
    mpiexec = next(p for p in rank.parents() if os.path.basename(p.cmdline()[0]) == "mpiexec")
    worker = mpiexec.parent()  # the Parsl worker process whose app launched the job
    assert "python" in os.path.basename(worker.cmdline()[0])
    worker.send_signal(signal.SIGKILL)
    psutil.wait_procs([rank], timeout=30)  # its ranks die with it: no orphan races the retry
    assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE
    return rank.pid


@pytest.mark.parametrize("kills", [1, 2], ids=["retried", "retries-exhausted"])
def test_a_job_whose_worker_is_killed_resumes_from_its_checkpoint(shared_tmp, kills):
    """One kill: the retry resumes and completes. Two kills with one retry allowed: the job is
    recorded as lost, the batch ends, and a rerun resumes it from its checkpoint."""
    jobs = _write(shared_tmp, {"32": (32, 0.3)}, SLOW)
    whole, killed = os.path.join(shared_tmp, "whole"), os.path.join(shared_tmp, "killed")
    batch(jobs, whole, ranks_per_job=K)  # the uninterrupted run (MPI engine, same ranks)
    try:
        if COMM.rank == 0:
            config = os.path.join(shared_tmp, "parsl_config.py")
            with open(config, "w") as fh:  # a configuration file, as a cluster's would be
                fh.write("from claire_py.batch_parsl import local_config\n"
                         f"config = local_config({os.path.join(shared_tmp, 'parsl_run')!r}, ranks_per_job={K}, "
                         "retries=1)\n")
            command = CLAIRE + [jobs, "-o", killed, "--engine", "parsl", "--parsl-config", config, "--ranks-per-job",
                                str(K), "--checkpoint-every", "1", "--no-report"]
            proc = subprocess.Popen(command, env=clean_subprocess_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            spec = os.path.join(killed, ".parsl", "jobs", "slow.json")
            state = os.path.join(killed, "slow", "checkpoint", "state.json")
            try:
                spared = [_kill_the_worker_of(spec, state, proc, 2)]
                if kills == 2:  # the retry, once it has saved an iterate of its own
                    spared.append(_kill_the_worker_of(spec, state, proc, 3, spared))
                out, err = proc.communicate(timeout=600)
            finally:
                proc.kill()
            assert _attempts(killed, "slow") == 2
            if kills == 1:
                assert proc.returncode == 0, err
                resumed = re.search(r"job slow: resumed from its checkpoint \(level 0, iteration (\d+)\)", err)
                assert resumed and int(resumed.group(1)) >= 2, err  # not from the start
            else:
                assert proc.returncode == 1, err
                [row] = _table(killed)
                assert row["status"] == "failed" and row["error"].startswith("lost 2 time(s): "), row
                assert not os.path.exists(os.path.join(killed, "slow", "registration.json"))
                done = subprocess.run(command, env=clean_subprocess_env(), capture_output=True, text=True,
                                      timeout=600)
                assert done.returncode == 0, done.stderr
                assert "job slow: resumed from its checkpoint (level 0, iteration " in done.stderr
                assert _attempts(killed, "slow") == 3
            assert [r["status"] for r in _table(killed)] == ["complete"]
            assert_same_registration(os.path.join(killed, "slow"), os.path.join(whole, "slow"))
    finally:
        _wait_asleep()


def test_from_python_with_a_config_object_leaving_the_callers_parsl_alone(shared_tmp):
    """``batch(engine="parsl", parsl_config=Config)`` in this process (rank 0, ``COMM_SELF``):
    the engine runs on a DataFlowKernel of its own, so one the caller loaded keeps working."""
    jobs = _write(shared_tmp, {"16": (16, 0.3)}, "name,fixed,moving,max-iter\nj,f16.nii.gz,m16.nii.gz,1\n")
    if COMM.rank == 0:
        import parsl
        from parsl.app.app import python_app
        from parsl.config import Config
        from parsl.executors.threads import ThreadPoolExecutor

        from claire_py.batch_parsl import local_config

        mine = parsl.load(Config(executors=[ThreadPoolExecutor(label="callers")],
                                 run_dir=os.path.join(shared_tmp, "callers_runinfo")))  # not ./runinfo
        try:
            config = local_config(os.path.join(shared_tmp, "run"), workers=1)
            [row] = batch(jobs, os.path.join(shared_tmp, "out"), comm=MPI.COMM_SELF, engine="parsl",
                          parsl_config=config)
            assert row["status"] == "complete" and row["iterations"] == 1 and row["ranks"] == 1
            assert parsl.dfk() is mine and python_app(lambda: 6 * 7)().result(timeout=60) == 42
        finally:
            mine.cleanup()
            parsl.clear()
    _wait_asleep()


def test_without_parsl_the_engine_says_how_to_install_it(tmp_path):
    if COMM.rank == 0:
        code = ("import sys; sys.modules['parsl'] = None; from claire_py.cli import main; "
                f"sys.exit(main(['batch', 'jobs.csv', '-o', {str(tmp_path / 'out')!r}, '--engine', 'parsl']))")
        done = subprocess.run([sys.executable, "-c", code], env=clean_subprocess_env(), capture_output=True,
                              text=True, cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines() == [
            "claire: error: --engine parsl needs Parsl, which is not installed: pip install 'claire_py[parsl]'"]
        assert not os.path.exists(tmp_path / "out")
    _wait_asleep()


@pytest.mark.parametrize("text, message", [
    ("x = 1\n", r"define the configuration as `config = parsl.config.Config\(...\)`"),
    ("raise RuntimeError('no cluster here')\n", r"running it failed \(RuntimeError: no cluster here\)"),
], ids=["no-config", "raises"])
def test_a_bad_parsl_config_is_refused_before_any_work(shared_tmp, text, message):
    jobs = _write(shared_tmp, {"16": (16, 0.3)}, "fixed,moving\nf16.nii.gz,m16.nii.gz\n")
    out = os.path.join(shared_tmp, "out")
    if COMM.rank == 0:
        config = os.path.join(shared_tmp, "parsl_config.py")
        with open(config, "w") as fh:
            fh.write(text)
        with pytest.raises(UserInputError, match=message):
            batch(jobs, out, comm=MPI.COMM_SELF, engine="parsl", parsl_config=config)
        with pytest.raises(UserInputError, match="a Parsl configuration is for --engine parsl"):
            batch(jobs, out, comm=MPI.COMM_SELF, parsl_config=config)
        assert not os.path.exists(out)
    if COMM.size > 1:  # the Parsl engine is one process; Parsl launches the ranks
        with pytest.raises(UserInputError, match="start claire batch without mpiexec"):
            batch(jobs, out, engine="parsl")
    _wait_asleep()
