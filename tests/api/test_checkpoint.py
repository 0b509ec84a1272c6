"""Checkpoint/restart: an interrupted registration resumed from its checkpoint ends where
the uninterrupted one does; same inputs and ranks give bitwise-identical results; 1, 2 and 4
ranks agree in float64."""

import json
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import RegistrationConfig
from claire_py._testing import assert_same_registration, clean_subprocess_env
from claire_py.checkpoint import FileCheckpoint

COMM = MPI.COMM_WORLD


def _pair(n=24):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(2 * x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - 0.4 * np.sin(x[1])) ** 2 + np.sin(2 * x[1] + 0.3 * np.cos(x[2])) ** 2
             + np.sin(x[2]) ** 2) / 3
    return fixed, moving


_CONFIG = {"regularization": {"beta": 1e-4}, "precision": "float64",
           "newton": {"gradient_tolerance": 1e-3, "max_iterations": 8},
           "continuation": {"grid_continuation": True, "coarsest_grid": 12}}


class _Killed(Exception):
    pass


def _root(a):
    return a if COMM.rank == 0 else None


@pytest.mark.parametrize("kill_at", [(0, 2), (1, 3)], ids=["coarse-level", "fine-level"])
def test_resumed_run_equals_the_uninterrupted_one(shared_tmp, kill_at):
    fixed, moving = _pair()
    cfg = RegistrationConfig.from_dict(_CONFIG)
    whole = claire_py.register(_root(fixed), _root(moving), config=cfg)
    assert [s["kind"] for s in whole.stages] == ["grid continuation", "solve"]
    assert whole.stages[kill_at[0]]["iterations"] > kill_at[1], whole.stages

    def kill(info):  # what SIGKILL leaves: the checkpoint as of this iterate (writes are atomic)
        if (info.level, info.iteration) == kill_at:
            raise _Killed

    out = os.path.join(shared_tmp, "run")
    with pytest.raises(_Killed):
        claire_py.register(_root(fixed), _root(moving), config=cfg, callback=kill,
                           checkpoint=FileCheckpoint(out, COMM, every=1))
    state = json.load(open(os.path.join(out, "checkpoint", "state.json")))
    assert state["current"]["level"] == kill_at[0] and state["current"]["resume"]["iteration"] == kill_at[1] - 1
    resumed_from = []
    resumed = claire_py.register(_root(fixed), _root(moving), config=cfg, callback=resumed_from.append,
                                 checkpoint=FileCheckpoint(out, COMM, resume=True))
    assert (resumed_from[0].level, resumed_from[0].iteration) == (kill_at[0], kill_at[1] - 1)  # no repeated work
    assert [h.objective for h in resumed.history] == [h.objective for h in whole.history]
    if COMM.rank == 0:
        difference = np.abs(resumed.velocity - whole.velocity).max() / np.abs(whole.velocity).max()
        assert difference <= 1e-8, difference
        np.testing.assert_array_equal(resumed.warped, whole.warped)  # same ranks: bitwise


def test_same_inputs_and_ranks_are_bitwise_identical_and_rank_counts_agree():
    fixed, moving = _pair(20)
    # beta 1e-3: at 1e-4 the 30-iteration PCG solves amplify the FFTs' rounding differences
    # between decompositions to ~1e-5 (benchmarks/RELIABILITY.md); here they stay ~1e-14
    cfg = RegistrationConfig.from_dict({**_CONFIG, "continuation": {}, "regularization": {"beta": 1e-3}})
    first = claire_py.register(_root(fixed), _root(moving), config=cfg)
    again = claire_py.register(_root(fixed), _root(moving), config=cfg)
    alone = None
    if COMM.rank == 0:
        np.testing.assert_array_equal(first.velocity, again.velocity)
        np.testing.assert_array_equal(first.warped, again.warped)
        if COMM.size > 1:  # 1 rank against this run's P ranks
            alone = claire_py.register(fixed, moving, config=cfg, comm=MPI.COMM_SELF)
            difference = np.abs(alone.velocity - first.velocity).max() / np.abs(first.velocity).max()
            assert difference <= 1e-8, difference
    COMM.Barrier()


def test_sigkill_then_resume_from_the_command_line(tmp_path):
    """Rank 0 runs the command-line processes (singleton MPI jobs); other ranks wait."""
    try:
        if COMM.rank == 0:
            _sigkill_then_resume(tmp_path)
    finally:
        COMM.Barrier()


def _sigkill_then_resume(tmp_path):
    fixed, moving = _pair(32)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    f, m = str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz")
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), affine), f)
    nib.save(nib.Nifti1Image(moving.astype(np.float32), affine), m)
    flags = ["--beta", "1e-4", "--precision", "float64", "--gtol", "1e-3", "--max-iter", "8", "--no-report", "--quiet"]
    claire = [sys.executable, "-m", "claire_py", "register"]
    env = clean_subprocess_env()
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    subprocess.run(claire + [f, m, "-o", whole] + flags, check=True, env=env, capture_output=True)
    proc = subprocess.Popen(claire + [f, m, "-o", killed, "--checkpoint-every", "1"] + flags, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(killed, "checkpoint", "state.json")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            with open(state) as fh:
                if json.load(fh)["current"]["resume"]["iteration"] >= 2:
                    break
        except (OSError, ValueError, TypeError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "registration.json"))
    done = subprocess.run(claire + ["--resume", killed, "--quiet", "--no-report"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert_same_registration(killed, whole)
