"""Test configuration: the same files run serially and under ``mpiexec -n 2`` / ``-n 4``.

Under MPI only rank 0 prints pytest's report; a failure on any rank prints its report to
stderr (prefixed with the rank) and aborts the whole job, so a failing rank can never leave
the others waiting in a collective.
"""

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

COMM = MPI.COMM_WORLD


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if COMM.size > 1 and COMM.rank > 0:
        sys.stdout = open(os.devnull, "w")


def pytest_runtest_logreport(report):
    if report.failed and COMM.size > 1:
        sys.stderr.write(f"\n[rank {COMM.rank}/{COMM.size}] FAILED {report.nodeid} ({report.when})\n"
                         f"{report.longreprtext}\n")
        sys.stderr.flush()
        COMM.Abort(1)


@pytest.fixture
def comm():
    return COMM


@pytest.fixture(params=[np.float64, np.float32], ids=["f64", "f32"])
def dtype(request):
    return np.dtype(request.param)


def _shared_tempdir():
    """A temporary directory shared by all ranks (created by rank 0), removed afterwards."""
    path = COMM.bcast(tempfile.mkdtemp(prefix="claire-test-") if COMM.rank == 0 else None)
    yield path
    COMM.Barrier()
    if COMM.rank == 0:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def shared_tmp():
    """A temporary directory shared by all ranks, one per test."""
    yield from _shared_tempdir()


@pytest.fixture(scope="module")
def module_shared_tmp():
    """A temporary directory shared by all ranks and by the tests of one module."""
    yield from _shared_tempdir()
