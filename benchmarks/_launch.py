"""Shared by the registration-level benchmarks: one MPI job per measured case, peak memory.

Each case runs in its own ``.venv/bin/mpiexec -n P .venv/bin/python SCRIPT --worker ...``
process so that peak RSS (``ru_maxrss``, monotone over a process's life) belongs to that case
alone. The worker prints one line ``RESULT <json>`` on rank 0; :func:`run_worker` returns it.
"""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv", "bin")


def peak_rss_bytes(comm=None):
    """Peak resident set size of this process (``ru_maxrss``), the max over ranks of ``comm``."""
    from claire_py.timing import peak_rss_bytes as own

    rss = own()
    if comm is None:
        return rss
    from mpi4py import MPI

    return comm.allreduce(rss, op=MPI.MAX)


def physical_cores():
    """``(usable logical CPUs, physical cores among them)`` from ``sched_getaffinity`` and
    the (physical id, core id) pairs of /proc/cpuinfo."""
    cpus = sorted(os.sched_getaffinity(0))
    cores, cur, phys = {}, None, "0"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cur = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cur is not None:
                    cores[cur] = (phys, value)
    except OSError:  # pragma: no cover - not Linux
        pass
    physical = {cores.get(c, (None, c)) for c in cpus}
    return len(cpus), len(physical)


def run_worker(script, ranks, args, *, timeout=None, env=None):
    """Run ``script --worker ARGS`` under ``mpiexec -n ranks``; the dict its rank 0 printed
    after ``RESULT``. Raises with the job's stderr when it failed."""
    cmd = [os.path.join(VENV, "mpiexec"), "-n", str(ranks), os.path.join(VENV, "python"), script, "--worker"]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    found = re.findall(r"^RESULT (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(found[-1])


def emit(result):
    """What a worker's rank 0 prints for :func:`run_worker`."""
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
