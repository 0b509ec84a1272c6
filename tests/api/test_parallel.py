"""The top floor's MPI patterns (claire_py.parallel): work spread over the ranks comes back in
order on rank 0, and a failure anywhere is raised on every rank alike."""

import pytest
from mpi4py import MPI

from claire_py import UserInputError
from claire_py.parallel import spread

COMM = MPI.COMM_WORLD


def test_spread_runs_each_job_once_on_the_least_loaded_rank_and_returns_them_in_order():
    ran = []

    def job(i):
        def run():
            ran.append(i)
            return (i, COMM.rank)
        return run

    weights = [3, 1, 1, 1, 2, 1, 0.5]
    values = spread(COMM, [job(i) for i in range(len(weights))], weights)
    everywhere = sorted(i for part in COMM.allgather(ran) for i in part)
    assert everywhere == list(range(len(weights)))  # each job ran once
    if COMM.rank:
        assert values is None
        return
    assert [i for i, _ in values] == list(range(len(weights)))
    owners = [rank for _, rank in values]
    assert owners[0] == 0 and len(set(owners)) == min(COMM.size, len(weights))
    load = [sum(w for w, r in zip(weights, owners) if r == rank) for rank in range(COMM.size)]
    assert max(load) - min(load) <= max(weights)  # greedy: no rank holds more than one job's worth extra


@pytest.mark.parametrize("kind", [UserInputError, OSError, ValueError])
def test_a_failure_on_one_rank_is_raised_on_every_rank(kind):
    last = COMM.size - 1

    def fail():
        if COMM.rank == last:
            raise kind("the job failed")
        return 1

    jobs = [lambda: 0] * (COMM.size - 1) + [fail]  # the last job lands on the last rank
    expected = {UserInputError: UserInputError, OSError: OSError}.get(kind, RuntimeError)
    if COMM.rank == last:
        expected = kind
    with pytest.raises(expected, match="the job failed"):
        spread(COMM, jobs)


def test_ranks_given_different_jobs_fail_alike_and_one_rank_runs_everything():
    if COMM.size > 1:
        with pytest.raises(RuntimeError, match="different numbers of jobs"):
            spread(COMM, [lambda: 0] * (1 + COMM.rank))
    alone = COMM.Split(COMM.rank)  # every rank on its own: all the jobs run here, in order
    try:
        assert spread(alone, [lambda i=i: i * i for i in range(5)], [5, 1, 1, 1, 1]) == [0, 1, 4, 9, 16]
    finally:
        alone.Free()
