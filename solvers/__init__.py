"""claire_py.solvers: the optimal-control problem and its solvers (the middle floor).

Imports only from ``claire_py.kernels`` (relatively: ``from ..kernels import ...``), never
from the ``claire_py`` user layer, and never touches MPI directly.
"""

if __name__ != "claire_py.solvers":  # pragma: no cover - imported from the repo root by mistake
    raise ImportError("import claire_py.solvers, not solvers: this folder is installed as claire_py.solvers "
                      "(a second copy under another name would duplicate its classes and numba kernels)")


__all__: list[str] = []
