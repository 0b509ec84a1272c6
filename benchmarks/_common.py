"""Shared by the benchmark scripts: interleaved timing and the JSON-lines output."""

import json
import statistics
import time

from mpi4py import MPI


def median_times(comm, fns, repeat):
    """Median wall time of each callable (slowest rank), interleaved round-robin so that
    drifts in the machine's load affect all of them alike; one warm-up call each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, t in zip(fns, times):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            t.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return [statistics.median(t) for t in times]


def append_json(path, rows):
    """Append one JSON object per row to ``path`` (nothing when ``path`` is empty)."""
    if path:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
