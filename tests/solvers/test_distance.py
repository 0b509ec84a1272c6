"""Distances (squared L2, NCC, local NCC), masks and multi-component images: exact values, a
numpy reference, Taylor tests of the gradient, the Gauss-Newton Hessian, and registrations that
need them."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
from scipy import ndimage

from claire_py.solvers.distance import LocalNormalizedCrossCorrelation, make_distance
from claire_py.solvers.newton import NewtonOptions, gauss_newton_krylov
from claire_py.solvers.problem import DistanceOptions, RegistrationProblem, RegularizationOptions

_spec = importlib.util.spec_from_file_location("_problems", pathlib.Path(__file__).with_name("test_problem.py"))
_problems = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_problems)
synthetic, random_velocity, hessian_defect = _problems.synthetic, _problems._random_velocity, _problems.hessian_defect


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
    with pytest.raises(ValueError, match="distance 'mi' is unknown; use one of l2, ncc, lncc"):
        make_distance("mi", f, problem.inner)
    with pytest.raises(ValueError, match="use one of l2, ncc, lncc"):
        DistanceOptions(name="mi")
    with pytest.raises(ValueError, match="weights"):
        DistanceOptions(weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="lncc_sigma=0 must be a positive number of voxels"):
        DistanceOptions(name="lncc", lncc_sigma=0)
    with pytest.raises(ValueError, match="lncc needs the window"):
        make_distance("lncc", f, problem.inner)
    with pytest.raises(ValueError, match="lncc: the fixed image is constant"):
        make_distance("lncc", np.ones_like(f), problem.inner, sigma=2.0, smooth=problem.spectral.smooth)


def _global_fields(n, seed):
    """Two smooth random global fields and a mask on an ``n^3`` grid (the same on every rank)."""
    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.standard_normal((n, n, n)), 1.5, mode="wrap") for _ in range(3)]
    i, r = fields[0], fields[1]
    j = 0.7 * i + 0.5 * r + 0.2 * i ** 2  # correlated with i, not affinely
    return i, j, 0.5 + 0.5 * np.tanh(fields[2] / fields[2].std())


def _lncc_reference(i, j, w, sigma, cell_volume):
    """The module docstring's lncc, by scipy's (wrapped, sampled) Gaussian filter."""
    truncate = min(8.0, (min(i.shape) // 2 - 1) / sigma)  # the kernel must not wrap onto itself
    g = lambda f: ndimage.gaussian_filter(f, sigma, mode="wrap", truncate=truncate)  # noqa: E731
    mean_w = (w * j).sum() / w.sum()
    eps = LocalNormalizedCrossCorrelation.RELATIVE_EPSILON * (w * (j - mean_w) ** 2).sum() / w.sum()
    a = g(i * j) - g(i) * g(j)
    b = g(i * i) - g(i) ** 2 + eps
    c = g(j * j) - g(j) ** 2
    u = w * (eps / LocalNormalizedCrossCorrelation.RELATIVE_EPSILON) / (c + eps)
    return 0.5 * cell_volume * (u * (c - a * a / b)).sum()


@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_lncc_matches_a_numpy_reference_on_every_rank_count(sigma):
    """Value against scipy's Gaussian filter on the gathered grid (so 1, 2 and 4 ranks agree
    with one serial reference), and the gradient ``-lam(1)`` against central differences of
    the reference along a random direction."""
    problem, _ = synthetic(32)
    d = problem.decomp
    i, j, w = _global_fields(32, 7)
    local = lambda a: np.ascontiguousarray(a[d.real_slice])  # noqa: E731
    lncc = make_distance("lncc", local(j), problem.inner, local(w), sigma=sigma, smooth=problem.spectral.smooth)
    lncc.prepare(local(i))
    reference = _lncc_reference(i, j, w, sigma, problem.cell_volume)
    assert lncc.value() == pytest.approx(reference, rel=1e-7)  # sampled vs spectral Gaussian: e^(-2 pi^2 sigma^2)
    # smooth directions: at high frequencies a sampled and a spectral Gaussian differ
    direction, other = (ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(i.shape), 1.0,
                                                mode="wrap") for seed in (3, 4))
    h = 1e-5
    slope = (_lncc_reference(i + h * direction, j, w, sigma, problem.cell_volume)
             - _lncc_reference(i - h * direction, j, w, sigma, problem.cell_volume)) / (2 * h)
    assert problem.inner(-lncc.final_adjoint(), local(direction)) == pytest.approx(slope, rel=1e-6)
    # the Gauss-Newton term is symmetric positive semidefinite
    x, y = local(direction), local(other)
    hx, hy = -lncc.final_incremental_adjoint(x), -lncc.final_incremental_adjoint(y)
    assert problem.inner(hx, y) == pytest.approx(problem.inner(x, hy), rel=1e-10)
    assert problem.inner(hx, x) > 0


def test_lncc_with_a_window_wider_than_the_box_is_ncc():
    problem, _ = synthetic(16)
    d = problem.decomp
    i, j, _ = _global_fields(16, 8)
    local = lambda a: np.ascontiguousarray(a[d.real_slice])  # noqa: E731
    ncc = make_distance("ncc", local(j), problem.inner)
    lncc = make_distance("lncc", local(j), problem.inner, sigma=1e3, smooth=problem.spectral.smooth)
    for dist in (ncc, lncc):
        dist.prepare(local(i))
    tol = 3 * LocalNormalizedCrossCorrelation.RELATIVE_EPSILON
    assert lncc.value() == pytest.approx(ncc.value(), rel=tol)
    g_ncc, g_lncc = ncc.final_adjoint(), lncc.final_adjoint()
    assert problem.norm(g_lncc - g_ncc) <= tol * problem.norm(g_ncc)
    x = local(np.random.default_rng(5).standard_normal(i.shape))
    h_ncc, h_lncc = ncc.final_incremental_adjoint(x), lncc.final_incremental_adjoint(x)
    assert problem.norm(h_lncc - h_ncc) <= tol * problem.norm(h_ncc)


@pytest.mark.parametrize("case", ["ncc", "ncc-mask", "l2-mask", "two-components", "lncc", "lncc-mask",
                                  "lncc-two-components"])
def test_taylor_gradient_of_distances(case):
    base, _ = synthetic(32)
    d = base.decomp
    name = case.split("-")[0] if not case.startswith("two") else "l2"
    if case.endswith("two-components"):
        fixed = np.stack([base.fixed[0], base.fixed[0] ** 2])
        moving = np.stack([base.moving[0], base.moving[0] ** 2])
        problem = _variant(base, fixed, moving, distance=DistanceOptions(name=name, weights=(1.0, 3.0)))
    else:
        fixed = 2.0 * base.fixed + 0.3 if name != "l2" else base.fixed
        problem = _variant(base, fixed, distance=DistanceOptions(name=name),
                           mask=_mask(d) if case.endswith("mask") else None)
    orders, errors = _taylor_orders(problem)
    assert min(orders) >= 1.9, (errors, orders)


@pytest.mark.parametrize("name", ["ncc", "lncc"])
def test_correlation_gauss_newton_hessians_are_symmetric_positive(name):
    base, _ = synthetic(32)
    problem = _variant(base, 2.0 * base.fixed + 0.3, distance=DistanceOptions(name=name), mask=_mask(base.decomp))
    d = problem.decomp
    problem.set_velocity(random_velocity(d, 3))
    problem.gradient()
    x, y = random_velocity(d, 4), random_velocity(d, 5)
    hx, hy = problem.hessian_matvec(x), problem.hessian_matvec(y)
    a, b = problem.directional_derivative(hx, y), problem.directional_derivative(hy, x)
    assert abs(a - b) <= 1e-2 * abs(a), (a, b)
    assert problem.directional_derivative(hx, x) > 0


def test_lncc_gauss_newton_hessian_is_the_derivative_of_the_gradient_at_a_zero_residual(monkeypatch):
    """At the velocity that produced the reference, with the reference an affine function of
    the template (so every window's residual vanishes, up to the ridge ``eps``, made small
    here), H w equals the central difference of the gradient: the variable-projection term
    drops nothing there. The floor is the transport's optimise-then-discretise gap (see
    test_problem's l2 version)."""
    monkeypatch.setattr(LocalNormalizedCrossCorrelation, "RELATIVE_EPSILON", 1e-6)
    base, v_star = synthetic(32)
    problem = _variant(base, 2.0 * base.fixed + 0.3, distance=DistanceOptions(name="lncc", lncc_sigma=2.0))
    problem.set_velocity(v_star)
    assert problem.objective()[1] <= 1e-2
    assert hessian_defect(problem, v_star, random_velocity(problem.decomp, 2)) <= 1e-2


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


def _clean_residual(problem, velocity, clean_moving, fixed):
    """``||m(1) - mR|| / ||m(0) - mR||`` of the *clean* template moved by ``velocity``."""
    problem.transport.set_velocity(velocity)
    moved = problem.transport.solve_state(clean_moving)[-1]
    return problem.norm(moved - fixed) / problem.norm(clean_moving - fixed)


def test_only_lncc_registers_through_a_bias_field_as_well_as_without():
    """A template multiplied by a smooth bias field ``1 + 0.3 sin cos`` and shifted in intensity:
    lncc lands (nearly) where it lands on the clean template; l2 and ncc, which cannot see
    past a spatially varying gain, land measurably worse. Judged by the same yardstick: the
    residual of the clean template moved by each result."""
    base, _ = synthetic(48, reg=RegularizationOptions(beta=1e-3), frequency=4, amplitude=0.2)
    d = base.decomp
    x = d.local_coordinates()
    bias = (1.0 + 0.3 * np.sin(x[0] + 0.5) * np.cos(x[1])).astype(d.dtype)
    clean = base.moving
    biased = clean * bias + 0.2
    newton = NewtonOptions(max_iterations=10)
    left = {}
    for name in ("lncc", "ncc", "l2"):
        for tag, moving in (("clean", clean), ("biased", biased)):
            problem = _variant(base, moving=moving, distance=DistanceOptions(name=name, lncc_sigma=1.5))
            res = gauss_newton_krylov(problem, d.new_vector(), newton)
            left[name, tag] = _clean_residual(problem, res.velocity, clean[0], base.fixed[0])
    assert left["lncc", "clean"] < 0.05, left  # measured 0.021
    assert left["lncc", "biased"] <= 1.25 * left["lncc", "clean"], left  # measured 0.022
    for name in ("ncc", "l2"):
        assert left[name, "biased"] >= 3 * left["lncc", "biased"], left  # measured 0.41 and 1.13
