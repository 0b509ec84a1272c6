#!/bin/bash
# Build the original CLAIRE (cpu branch, double precision) on Debian 12 (GCC 12, PETSc 3.18).
# usage: build_claire.sh CLAIRE_SRC ACCFFT_SRC [ACCFFT_PREFIX]
#   CLAIRE_SRC     work tree of andreasmang/claire, branch cpu (042dc6d)
#   ACCFFT_SRC     work tree of amirgholami/accfft, master (2038542)
#   ACCFFT_PREFIX  AccFFT install prefix (default: CLAIRE_SRC/deps/accfft)
# Result: CLAIRE_SRC/bin/{claire,clairetools,benchmark}. Downloads nothing but Debian packages.
# Safe to run twice (edits are idempotent; AccFFT is not rebuilt if already installed).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 CLAIRE_SRC ACCFFT_SRC [ACCFFT_PREFIX]" >&2; exit 1; }
CLAIRE=$(realpath "$1"); ACCFFT_SRC=$(realpath "$2")
ACCFFT=$(realpath -m "${3:-$CLAIRE/deps/accfft}")
JOBS=${JOBS:-2}

# 1. Debian packages (installed only if some are missing)
PKGS="petsc-dev libfftw3-dev libfftw3-mpi-dev libnifti-dev libopenmpi-dev openmpi-bin zlib1g-dev cmake build-essential pkg-config"
MISSING=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"; done)
if [ -n "$MISSING" ]; then
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $MISSING
fi

# 2. AccFFT: CPU only, static libraries (as CLAIRE's deps/build_libs.sh configures it)
if [ ! -f "$ACCFFT/lib/libaccfft.a" ]; then
  BLD=$(mktemp -d /tmp/accfft-build.XXXXXX)
  cmake -S "$ACCFFT_SRC" -B "$BLD" -DCMAKE_CXX_COMPILER=mpicxx -DCMAKE_C_COMPILER=mpicc \
        -DFFTW_USE_STATIC_LIBS=true -DBUILD_GPU=false -DBUILD_SHARED=false \
        -DCMAKE_INSTALL_PREFIX="$ACCFFT"
  make -C "$BLD" -j"$JOBS" && make -C "$BLD" install
  rm -rf "$BLD"
fi

# 3. Source edits for GCC 12 / PETSc 3.18
cd "$CLAIRE"
# (a) interp3.cpp defines its own _mm256_set_m128, which GCC >= 8 already provides as an
#     intrinsic (same semantics) -> redefinition error; guard the macro by the GCC version
#     (CLAIRE issue #10). The guard line doubles as the "already patched" marker.
if ! grep -q '^#if !defined(__GNUC__) || __GNUC__ < 8' src/interp3.cpp; then
  sed -i '/^#define _mm256_set_m128(va, vb)/{i\
#if !defined(__GNUC__) || __GNUC__ < 8
n;a\
#endif
}' src/interp3.cpp
fi
# (b) PETSc 3.17 renamed TaoGetSolutionVector -> TaoGetSolution.
sed -i 's/\bTaoGetSolutionVector\b/TaoGetSolution/g' src/Optimizer.cpp src/TaoInterface.cpp
# (c) Debian's PETSc is one library, libpetsc_real (it bundles no f2c LAPACK/BLAS).
sed -i 's/-lpetsc -lf2clapack -lf2cblas/-lpetsc_real/' config/setup.mk

# 4. Build with the repository's makefile, pointing it at the Debian libraries and AccFFT.
#    USESINGLE=no: double precision (the makefile defaults to single; Debian's PETSc is double).
make -j"$JOBS" USESINGLE=no \
  PETSC_DIR=/usr/lib/petsc PETSC_ARCH_DOUBLE= \
  ACCFFT_DIR="$ACCFFT" FFTW_DIR=/usr NIFTI_DIR=/usr ZLIB_DIR=/usr \
  MORTON_DIR="$CLAIRE/deps/3rdparty"
ls -l "$CLAIRE"/bin/
