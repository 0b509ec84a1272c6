#!/usr/bin/env bash
# The whole test suite: serially, then under MPI with 2 ranks, then the decomposition-level
# and transport tests with 4 ranks (oversubscribed on small machines). Every MPI run uses the venv's
# mpiexec and `python -m mpi4py`, so a failing rank aborts the job instead of hanging it.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

status=0
run() {  # run LABEL EMPTY_OK COMMAND...: pytest's exit 5 (no test collected) fails unless EMPTY_OK
    local label=$1 empty_ok=$2 rc
    shift 2
    echo "=== $label: $*"
    "$@"
    rc=$?
    if [ "$rc" -eq 5 ] && [ "$empty_ok" = yes ]; then
        echo "=== $label: no tests selected"
        rc=0
    fi
    [ "$rc" -ne 0 ] && { echo "=== $label FAILED (exit $rc)"; status=1; }
    return 0
}

start=$(date +%s)
run "serial" no "$BIN/python" -m pytest -q "$@"
run "mpiexec -n 2" no "$BIN/mpiexec" -n 2 "$BIN/python" -m mpi4py -m pytest -q "$@"
run "mpiexec -n 4" yes "$BIN/mpiexec" -n 4 "$BIN/python" -m mpi4py -m pytest -q tests/kernels tests/solvers "$@"
echo "=== test suite finished in $(( $(date +%s) - start )) s: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
