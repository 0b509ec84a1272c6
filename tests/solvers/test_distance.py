"""Distances (squared L2, NCC), masks and multi-component images: exact values, Taylor tests of
the gradient, Hessian symmetry, and registrations that need them."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest

from claire_py.solvers.distance import make_distance
from claire_py.solvers.newton import NewtonOptions, gauss_newton_krylov
from claire_py.solvers.problem import DistanceOptions, RegistrationProblem, RegularizationOptions

_spec = importlib.util.spec_from_file_location("_problems", pathlib.Path(__file__).with_name("test_problem.py"))
_problems = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_problems)
synthetic, random_velocity = _problems.synthetic, _problems._random_velocity


def _taylor_orders(problem, seed=1):
    d = problem.decomp
    v, w = random_velocity(d, seed), random_velocity(d, seed + 1)
    problem.set_velocity(v)
    j0, _ = problem.objective()
    slope = problem.directional_derivative(problem.gradient(), w)
    errors = []
    for h in [1e-1 / 2 ** i for i in range(5)]:
        problem.set_velocity(v + h * w)
        errors.append(abs(problem.objective()[0] - j0 - h * slope))
    return [math.log2(e0 / e1) for e0, e1 in zip(errors, errors[1:])], errors


def _variant(problem, fixed=None, moving=None, **kw):
    """A problem on the same transport with other images / distance / mask / weights."""
    return RegistrationProblem(problem.transport, problem.fixed if fixed is None else fixed,
                               problem.moving if moving is None else moving, problem.options, **kw)


def _mask(d):
    x = d.local_coordinates()
    return (0.5 + 0.5 * np.cos(x[0] - 1.0) * np.cos(x[1])).astype(d.dtype) * np.ones(d.local_shape, d.dtype)


def test_ncc_is_zero_for_affine_intensity_and_matches_its_formula():
    problem, _ = synthetic(16)
    d, m = problem.decomp, problem.moving[0]
    ncc = make_distance("ncc", 2.0 * m + 0.3, problem.inner)
    ncc.prepare(m)
    assert ncc.value() <= 1e-12 * problem.inner(m, m) and ncc.correlation == pytest.approx(1.0)
    f = problem.fixed[0]
    ncc = make_distance("ncc", f, problem.inner)
    ncc.prepare(m)
    a, b = m - d.allreduce(float(m.sum())) / d.num_points, f - d.allreduce(float(f.sum())) / d.num_points
    rho = problem.inner(a, b) / math.sqrt(problem.inner(a, a) * problem.inner(b, b))
    assert ncc.value() == pytest.approx(0.5 * problem.inner(b, b) * (1 - rho ** 2), rel=1e-10)
    with pytest.raises(ValueError, match="distance 'mi' is unknown; use one of l2, ncc"):
        make_distance("mi", f, problem.inner)
    with pytest.raises(ValueError, match="use one of l2, ncc"):
        DistanceOptions(name="mi")
    with pytest.raises(ValueError, match="weights"):
        DistanceOptions(weights=(0.0, 0.0))


@pytest.mark.parametrize("case", ["ncc", "ncc-mask", "l2-mask", "two-components"])
def test_taylor_gradient_of_distances(case):
    base, _ = synthetic(32)
    d = base.decomp
    if case == "two-components":
        fixed = np.stack([base.fixed[0], base.fixed[0] ** 2])
        moving = np.stack([base.moving[0], base.moving[0] ** 2])
        problem = _variant(base, fixed, moving, distance=DistanceOptions(weights=(1.0, 3.0)))
    else:
        name = case.split("-")[0]
        fixed = 2.0 * base.fixed + 0.3 if name == "ncc" else base.fixed
        problem = _variant(base, fixed, distance=DistanceOptions(name=name),
                           mask=_mask(d) if case.endswith("mask") else None)
    orders, errors = _taylor_orders(problem)
    assert min(orders) >= 1.9, (errors, orders)


def test_ncc_gauss_newton_hessian_is_symmetric_positive():
    base, _ = synthetic(32)
    problem = _variant(base, 2.0 * base.fixed + 0.3, distance=DistanceOptions(name="ncc"), mask=_mask(base.decomp))
    d = problem.decomp
    problem.set_velocity(random_velocity(d, 3))
    problem.gradient()
    x, y = random_velocity(d, 4), random_velocity(d, 5)
    hx, hy = problem.hessian_matvec(x), problem.hessian_matvec(y)
    a, b = problem.inner(hx, y), problem.inner(x, hy)
    assert abs(a - b) <= 1e-2 * abs(a), (a, b)
    assert problem.inner(hx, x) > 0


def test_ncc_registers_under_an_affine_intensity_change_where_l2_cannot():
    base, _ = synthetic(32, reg=RegularizationOptions(beta=1e-3))
    fixed = 2.0 * base.fixed + 0.3  # reference = 2 * (warped template) + 0.3
    newton = NewtonOptions(max_iterations=10)
    out = {}
    for name in ("ncc", "l2"):
        problem = _variant(base, fixed, distance=DistanceOptions(name=name))
        res = gauss_newton_krylov(problem, problem.decomp.new_vector(), newton)
        # judge both by the same yardstick: the correlation of the result with the reference
        ncc = make_distance("ncc", fixed[0], problem.inner)
        ncc.prepare(problem.deformed[0])
        out[name] = (res, ncc.value() / ncc._bb, res.history[-1].mismatch)
    ncc_res, ncc_left, ncc_mismatch = out["ncc"]
    l2_res, l2_left, l2_mismatch = out["l2"]
    assert ncc_res.converged and ncc_mismatch <= 0.15, ncc_res.history[-1]
    assert ncc_left < 0.25 * l2_left, (ncc_left, l2_left)
    assert l2_mismatch > 0.5, l2_res.history[-1]  # L2 reports that it cannot match the intensities


def _two_channel_problem(weights):
    """Channel 0 asks for the synthetic velocity, channel 1 (unmoved) asks for none."""
    base, _ = synthetic(32, reg=RegularizationOptions(beta=1e-3))
    m = base.moving[0]
    fixed = np.stack([base.fixed[0], m])
    moving = np.stack([m, m])
    return _variant(base, fixed, moving, distance=DistanceOptions(weights=weights))


def test_two_channel_registration_converges_and_weights_steer_it():
    newton = NewtonOptions(max_iterations=10)
    norms, channel0 = {}, {}
    for weights in ((1.0, 0.05), (0.05, 1.0)):
        problem = _two_channel_problem(weights)
        res = gauss_newton_krylov(problem, problem.decomp.new_vector(), newton)
        assert res.converged, res.stop_reason
        norms[weights] = problem.norm(res.velocity)
        r = problem.deformed[0] - problem.fixed[0]
        channel0[weights] = problem.norm(r) / problem.norm(problem.moving[0] - problem.fixed[0])
    moved, still = norms[(1.0, 0.05)], norms[(0.05, 1.0)]
    assert moved > 2 * still, norms
    assert channel0[(1.0, 0.05)] < 0.5 * channel0[(0.05, 1.0)], channel0


def test_problem_rejects_mismatched_components_and_weights():
    base, _ = synthetic(16)
    with pytest.raises(ValueError, match="2 weights given for 1 image components"):
        _variant(base, distance=DistanceOptions(weights=(1.0, 2.0)))
    with pytest.raises(ValueError, match="components"):
        _variant(base, moving=np.stack([base.moving[0]] * 2))
