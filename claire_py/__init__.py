"""claire_py: spectral, MPI-parallel, PDE-constrained diffeomorphic image registration.

Layers (imports point down only): ``claire_py`` (API, CLI, I/O) -> ``claire_py.solvers``
(the control problem and its solvers) -> ``claire_py.kernels`` (distributed fields,
spectral operators, numba arithmetic).
"""

from ._version import __version__
from .api import RegistrationResult, invert, jacobian, register, smooth, transport  # noqa: E402
from .batch import batch  # noqa: E402
from .config import PreprocessOptions, RegistrationConfig  # noqa: E402
from .deformation import DeformationMap  # noqa: E402
from .errors import UserInputError  # noqa: E402
from .solvers.monitor import IterationInfo  # noqa: E402

__all__ = ["__version__", "register", "transport", "jacobian", "invert", "RegistrationConfig", "RegistrationResult",
           "IterationInfo", "PreprocessOptions", "smooth", "UserInputError", "batch", "DeformationMap"]
