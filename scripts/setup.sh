#!/usr/bin/env bash
# Set up claire_py in ./.venv: FFTW headers (Debian, when missing), a virtual environment,
# and the package with MPI from the MPICH wheel plus the test tools. Idempotent: a second
# run only checks. Environment: PYTHON (default python3), CLAIRE_EXTRAS (default "mpich,test";
# set to "test" to build mpi4py against a cluster's own MPI instead, see README; add "interop"
# for antspyx and SimpleITK, which the transform tests run, as the README's test command does).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS=${CLAIRE_EXTRAS:-mpich,test}

have_fftw() {
    for dir in "${FFTW_ROOT:+$FFTW_ROOT/include}" "${CONDA_PREFIX:+$CONDA_PREFIX/include}" /usr/include /usr/local/include; do
        [ -n "$dir" ] && [ -e "$dir/fftw3.h" ] && return 0
    done
    return 1
}

if ! have_fftw; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "setup: FFTW headers missing; installing Debian's libfftw3-dev"
        apt-get update -qq && apt-get install -y -qq libfftw3-dev >/dev/null
    else
        echo "setup: FFTW headers (fftw3.h) not found. Install them with" >&2
        echo "         sudo apt-get update && sudo apt-get install -y libfftw3-dev" >&2
        echo "       or set FFTW_ROOT to an FFTW installation (see README, 'Other platforms')." >&2
        exit 1
    fi
fi

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.claire-installed
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ "$(cat "$stamp")" != "$EXTRAS" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[$EXTRAS]"
    echo "$EXTRAS" > "$stamp"
fi
.venv/bin/python -c "import claire_py, mpi4py_fft; print('setup: claire_py', claire_py.__version__, 'ready in .venv')"
