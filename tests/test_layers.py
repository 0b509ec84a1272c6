"""The three floors: claire_py -> solvers -> kernels, imports pointing down only."""

import ast
import pathlib
import subprocess
import sys

import pytest
from mpi4py import MPI

from claire_py._testing import clean_subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def _imports(path):
    """(module, level) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            if node.level and not node.module:
                for alias in node.names:
                    yield alias.name, node.level
            else:
                yield node.module or "", node.level


def _files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def test_there_are_files_to_check():
    assert len(_files("kernels")) >= 4 and len(_files("claire_py")) >= 4


@pytest.mark.parametrize("path", _files("kernels") + _files("solvers"), ids=lambda p: str(p.relative_to(ROOT)))
def test_lower_floors_import_only_downwards(path):
    floor = path.relative_to(ROOT).parts[0]
    in_numba = "_numba" in path.parts
    for module, level in _imports(path):
        top = module.split(".")[0]
        assert not (level == 0 and top in ("claire_py", "solvers", "kernels")), \
            f"{path.name}: absolute import of {module!r}; use a relative import"
        if in_numba:
            assert level in (0, 1) and (level == 1 or top in ("numpy", "numba") or top in STDLIB), \
                f"{path.name}: the numba arithmetic may import only numpy, numba and the stdlib, not {module!r}"
            continue
        if level >= 2:
            assert floor == "solvers" and top == "kernels" and level == 2, \
                f"{path.name}: import of {'.' * level}{module} climbs above its floor"
        if floor == "solvers":
            assert top != "mpi4py", f"{path.name}: solvers never touch MPI; call Decomposition methods"


@pytest.mark.parametrize("path", _files("claire_py"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_top_floor_imports_its_modules_and_the_floors_below_by_their_installed_names(path):
    """The top floor reaches ``solvers``/``kernels`` as ``.solvers``/``.kernels`` (the installed
    ``claire_py.solvers``/``claire_py.kernels``), and its modules import each other's modules,
    never a name of the package's ``__init__`` (which imports them all: an arrow up)."""
    own = {p.stem for p in _files("claire_py")} | {"solvers", "kernels"}
    for module, level in _imports(path):
        top = module.split(".")[0]
        assert not (level == 0 and top in ("claire_py", "solvers", "kernels")), \
            f"{path.name}: absolute import of {module!r}; use a relative import (.{module.removeprefix('claire_py.')})"
        assert level <= 1, f"{path.name}: import of {'.' * level}{module} climbs out of the package"
        if level == 1 and path.name != "__init__.py":
            assert top in own and top != "__init__", \
                f"{path.name}: imports {module!r} from the package's __init__; import it from its own module"


def test_only_decomposition_touches_the_communicator_in_kernels():
    users = [p.name for p in _files("kernels")
             if any(m.split(".")[0] == "mpi4py" for m, level in _imports(p) if level == 0)]
    assert users == ["decomposition.py"]


def test_installed_names_are_the_claire_py_ones():
    import claire_py.kernels
    import claire_py.kernels._numba
    import claire_py.solvers

    assert claire_py.solvers.__name__ == "claire_py.solvers"
    assert pathlib.Path(claire_py.solvers.__file__).parent == ROOT / "solvers"
    assert pathlib.Path(claire_py.kernels.__file__).parent == ROOT / "kernels"
    assert "solvers" not in sys.modules and "kernels" not in sys.modules


@pytest.mark.parametrize("name", ["solvers", "kernels", "kernels.spectral"])
def test_repo_root_folders_cannot_shadow_the_package(name):
    result = None
    if MPI.COMM_WORLD.rank == 0:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True,
                              text=True, env=clean_subprocess_env(), timeout=120)
        result = (proc.returncode, proc.stderr)
    code, err = MPI.COMM_WORLD.bcast(result)
    assert code != 0 and f"import claire_py.{name.split('.')[0]}" in err
