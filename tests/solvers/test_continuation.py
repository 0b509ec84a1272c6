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
    final = [h for h in res.history if h.level == res.history[-1].level]
    assert final and all(h.beta == res.beta for h in final)
    assert res.stages[-1]["kind"] == "solve" and res.stages[-1]["beta"] == res.beta


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





def test_level_schedules():
    from claire_py.solvers.continuation import grid_levels, scale_levels

    assert grid_levels((99, 117, 95), 16) == [(25, 30, 24), (50, 59, 48)]
    assert grid_levels((64, 64, 64), 16) == [(16, 16, 16), (32, 32, 32)]
    assert grid_levels((20, 20, 20), 16) == []
    assert scale_levels((256, 256, 256), 1.0) == [32.0, 16.0, 8.0, 4.0, 2.0]
    assert scale_levels((64, 64, 64), 1.0) == [8.0, 4.0, 2.0]  # capped at 1/8 of the grid
    assert scale_levels((64, 64, 64), 0.0) == [8.0, 4.0, 2.0, 1.0]


def test_grid_continuation_saves_fine_grid_matvecs():
    newton = NewtonOptions(gradient_tolerance=1e-2)
    fine = {}
    for grid in (False, True):
        problem, _ = synthetic(64, dtype=np.float32, frequency=2, reg=RegularizationOptions(beta=1e-3))
        res = solve(problem, problem.decomp.new_vector(), newton, ContinuationOptions(grid_continuation=grid))
        assert res.converged and res.history[-1].mismatch <= 0.05, (res.stop_reason, res.history[-1])
        assert [s["grid"] for s in res.stages] == ([[16] * 3, [32] * 3] if grid else []) + [[64] * 3]
        assert res.stages[-1]["matvecs"] == sum(s["matvecs"] for s in res.stages[-1:])
        fine[grid] = res.stages[-1]["matvecs"]
        # levels are marked in the history, coarse to fine
        assert [h.level for h in res.history] == sorted(h.level for h in res.history)
    assert fine[True] < fine[False], fine


def test_scale_continuation_runs_smooth_to_sharp_and_converges():
    problem, _ = synthetic(32, reg=RegularizationOptions(beta=1e-3))
    res = solve(problem, problem.decomp.new_vector(), NewtonOptions(gradient_tolerance=1e-2),
                ContinuationOptions(scale_continuation=True))
    assert [s["sigma"] for s in res.stages] == [4.0, 2.0, 1.0, 0.0]
    assert res.converged and res.history[-1].mismatch <= 0.1, res.history[-1]
    assert problem.velocity is res.velocity


def test_two_level_preconditioner_needs_fewer_pcg_iterations_at_small_beta():
    from claire_py.solvers.krylov import KrylovOptions
    from claire_py.solvers.newton import gauss_newton_krylov

    out = {}
    for pc in ("invreg", "2level"):
        problem, _ = synthetic(32, reg=RegularizationOptions(norm="h1s", beta=1e-4))
        newton = NewtonOptions(max_iterations=3, gradient_tolerance=1e-3, preconditioner=pc,
                               krylov=KrylovOptions(max_iterations=200, forcing="fixed", tolerance=1e-2))
        res = gauss_newton_krylov(problem, problem.decomp.new_vector(), newton)
        out[pc] = (problem, res)
    (p, invreg), (_, two) = out["invreg"], out["2level"]
    per_step = {k: [h.krylov_iterations for h in r.history[1:]] for k, (_, r) in out.items()}
    assert len(per_step["2level"]) == len(per_step["invreg"]) == 3, per_step
    assert all(a < b for a, b in zip(per_step["2level"], per_step["invreg"])), per_step
    assert sum(per_step["2level"]) < 0.7 * sum(per_step["invreg"]), per_step
    difference = p.norm(two.velocity - invreg.velocity) / p.norm(invreg.velocity)
    assert difference <= 1e-2, difference


@pytest.mark.parametrize("kwargs, message", [
    ({"train": "halve"}, "use None, 'reduce' or 'binary'"),
    ({"det_bound": 1.5}, r"must lie in \(0, 1\)"),
    ({"coarsest_grid": 4}, "must be an integer >= 8"),
    ({"presolve_tolerance": 0}, r"must lie in \(0, 1\)"),
])
def test_continuation_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContinuationOptions(**kwargs)


def test_unknown_preconditioner_lists_the_choices():
    with pytest.raises(ValueError, match="use one of invreg, 2level"):
        NewtonOptions(preconditioner="multigrid")


def test_beta_continuation_solves_each_beta_on_its_own_problem():
    """Each β level runs on ``problem.with_beta``: the problem passed in keeps its options,
    and a problem at another β shares the state but not the options."""
    problem, _ = synthetic(16, reg=RegularizationOptions(beta=1e-2))
    options = problem.options
    res = solve(problem, problem.decomp.new_vector(), NewtonOptions(max_iterations=4),
                ContinuationOptions(beta_continuation=True))
    assert problem.options is options
    assert sorted({h.beta for h in res.history}, reverse=True) == [1.0, 0.1, 0.01]
    assert problem.velocity is res.velocity  # the last level's β is the problem's own
    other = problem.with_beta(0.5)
    assert other.options.beta == 0.5 and problem.options.beta == 1e-2 and problem.with_beta(1e-2) is problem
    assert other.objective()[0] > problem.objective()[0]  # same state, larger regularisation weight
