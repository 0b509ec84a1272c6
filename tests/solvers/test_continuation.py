"""β continuation and β training by the det(∇y) bound."""

import importlib.util
import pathlib

import numpy as np
import pytest

from claire_py.solvers.continuation import ContinuationOptions, solve
from claire_py.solvers.newton import NewtonOptions
from claire_py.solvers.problem import RegularizationOptions

_spec = importlib.util.spec_from_file_location("_problems", pathlib.Path(__file__).with_name("test_problem.py"))
_problems = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_problems)
synthetic = _problems.synthetic


def _levels_by_beta(result):
    return {round(float(np.log10(b)), 6): (lo, hi, ok) for b, lo, hi, ok in result.levels if ok is not None}


def test_reduce_training_keeps_the_last_feasible_beta():
    problem, _ = synthetic(64, dtype=np.float32, reg=RegularizationOptions(beta=1e-2))
    opts = ContinuationOptions(train="reduce", det_bound=0.5)
    res = solve(problem, problem.decomp.new_vector(), NewtonOptions(max_iterations=10), opts)
    levels = _levels_by_beta(res)
    chosen = levels[round(float(np.log10(res.beta)), 6)]
    tenth = levels[round(float(np.log10(res.beta / 10)), 6)]
    assert chosen[2] and chosen[0] >= 0.5 and chosen[1] <= 2.0, levels
    assert not tenth[2], levels  # the 10x smaller neighbour violates the bound
    assert res.beta < 1.0 and res.levels[-1][3], res.levels  # the final solve respects it too
    assert all(h.beta == res.beta for h in res.history[-3:])


def test_binary_training_brackets_the_bound():
    problem, _ = synthetic(32, dtype=np.float32, reg=RegularizationOptions(beta=1e-2))
    opts = ContinuationOptions(train="binary", det_bound=0.5)
    res = solve(problem, problem.decomp.new_vector(), NewtonOptions(max_iterations=10), opts)
    infeasible = [b for b, lo, hi, ok in res.levels if ok is False and b < res.beta]
    assert infeasible, res.levels
    # the largest infeasible beta below the chosen one is within the bisection tolerance
    assert res.beta - max(infeasible) <= 1.01e-2 * 10 ** np.ceil(np.log10(res.beta))
    assert res.levels[-1][3]


def test_beta_continuation_reaches_the_target():
    problem, _ = synthetic(32, reg=RegularizationOptions(beta=1e-3))
    res = solve(problem, problem.decomp.new_vector(), NewtonOptions(max_iterations=10),
                ContinuationOptions(beta_continuation=True))
    assert [b for b, *_ in res.levels] == pytest.approx([1.0, 0.1, 0.01])
    assert res.beta == 1e-3 and res.converged
    assert [h.beta for h in res.history if h.iteration == 0] == pytest.approx([1.0, 0.1, 0.01, 1e-3])
    assert res.history[-1].mismatch < 0.2


def test_options_are_validated():
    with pytest.raises(ValueError, match="train"):
        ContinuationOptions(train="random")
    with pytest.raises(ValueError, match="det_bound"):
        ContinuationOptions(det_bound=1.5)
