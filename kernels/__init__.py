"""claire_py.kernels: distributed fields and compute primitives (the ground floor).

Nothing here imports from ``claire_py.solvers`` or the ``claire_py`` user layer. The numba
arithmetic lives in ``_numba`` and never sees MPI.
"""

if __name__ != "claire_py.kernels":  # pragma: no cover - imported from the repo root by mistake
    raise ImportError("import claire_py.kernels, not kernels: this folder is installed as claire_py.kernels "
                      "(a second copy under another name would duplicate its classes and numba kernels)")


from ._numba._jit import start_runtime as start_kernel_runtime
from .decomposition import Decomposition
from .spectral import REGULARIZATION_NORMS, SpectralOperators, SpectralResampler, regularization_symbol

__all__ = ["Decomposition", "SpectralOperators", "SpectralResampler", "REGULARIZATION_NORMS",
           "regularization_symbol", "start_kernel_runtime"]
