"""Spectral operators: exact on trigonometric polynomials, equal to the serial numpy
reference at any rank count, inverses round-trip, Leray is a projection onto div-free fields."""

import numpy as np
import pytest
from mpi4py import MPI

from claire_py._testing import rel_err, tolerance, trig_poly
from claire_py.kernels import REGULARIZATION_NORMS, Decomposition, SpectralOperators, SpectralResampler
from claire_py.kernels import reference, regularization_symbol

COMM = MPI.COMM_WORLD
SHAPES = [(16, 12, 10), (15, 9, 14), (12, 17, 9)]
# modes strictly below Nyquist on every SHAPES entry: (amplitude, k, phase)
MODES = [(1.0, (1, 2, 3), 0.3), (0.5, (-3, 1, 0), 1.1), (0.25, (4, -4, 2), -0.7), (0.75, (0, 0, 4), 0.0),
         (2.0, (0, 0, 0), 0.0)]


def _setup(shape, dtype):
    d = Decomposition(shape, dtype=dtype)
    return d, SpectralOperators(d), d.local_coordinates()


#: beta * A of each norm as a function of q = |k|^2, written out (not from the code under test)
SYMBOLS = {"h1s": lambda q, g: q, "h2s": lambda q, g: q ** 2, "h3s": lambda q, g: q ** 3,
           "h1": lambda q, g: q + g, "h2": lambda q, g: q ** 2 + g, "h3": lambda q, g: q ** 3 + g,
           "l2": lambda q, g: 1.0 + 0 * q}


def _symbol(norm, q, gamma=1e-2, beta=0.7):
    return beta * SYMBOLS[norm](q, gamma)


def test_symbol_table_covers_the_norms():
    assert set(SYMBOLS) == set(REGULARIZATION_NORMS)
    for norm in REGULARIZATION_NORMS:
        c = regularization_symbol(norm, beta=0.7, gamma=1e-2)
        for q in (0.0, 1.0, 7.0):
            assert c[0] + c[1] * q + c[2] * q ** 2 + c[3] * q ** 3 == pytest.approx(_symbol(norm, q))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_seminorms_are_powers_of_the_laplacian(shape, dtype):
    """h1s = -Delta, h2s = Delta^2, h3s = -Delta^3 (Delta from its own exact tests), per component."""
    d, ops, _ = _setup(shape, dtype)
    rng = np.random.default_rng(2)
    v = rng.standard_normal((3,) + shape)[(slice(None),) + d.real_slice].astype(dtype)
    lap = ops.laplacian(v)
    lap2 = ops.laplacian(lap)
    powers = {"h1s": -lap, "h2s": lap2, "h3s": -ops.laplacian(lap2)}
    for norm, expected in powers.items():
        assert rel_err(ops.regularization(v, norm, beta=0.7), 0.7 * expected) <= 10 * tolerance(dtype), norm


def _phase(k, x, phi):
    return k[0] * x[0].astype(float) + k[1] * x[1].astype(float) + k[2] * x[2].astype(float) + phi


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gradient_divergence_laplacian_exact(shape, dtype):
    d, ops, x = _setup(shape, dtype)
    f = trig_poly(x, MODES).astype(dtype)
    grad = sum(np.stack(np.broadcast_arrays(*[-c * k[a] * np.sin(_phase(k, x, p)) for a in range(3)]))
               for c, k, p in MODES)
    lap = sum(-c * np.dot(k, k) * np.cos(_phase(k, x, p)) for c, k, p in MODES)
    tol = tolerance(dtype)
    f_copy = f.copy()
    assert rel_err(ops.gradient(f), grad) <= tol
    np.testing.assert_array_equal(f, f_copy)  # operators never overwrite their input
    assert rel_err(ops.laplacian(f), lap) <= tol
    assert rel_err(ops.divergence(grad.astype(dtype)), lap) <= tol
    mean_free = f - 2.0
    assert rel_err(ops.inverse_laplacian(lap.astype(dtype)), mean_free) <= 10 * tol


@pytest.mark.parametrize("norm", REGULARIZATION_NORMS)
def test_regularization_exact_and_inverse(norm, dtype):
    d, ops, x = _setup((16, 12, 10), dtype)
    comps = [MODES[:2], MODES[2:4], MODES[1:3]]
    v = np.stack(np.broadcast_arrays(*[trig_poly(x, m) for m in comps])).astype(dtype)
    # gamma = 1 keeps the inverse well conditioned: rounding noise in the zero mode of v is
    # divided by s(0) = beta * gamma (conditioning is tested in the round-trip test below)
    av = np.stack(np.broadcast_arrays(*[sum(c * _symbol(norm, np.dot(k, k), 1.0) * np.cos(_phase(k, x, p))
                                             for c, k, p in m) for m in comps]))
    out = ops.regularization(v, norm, beta=0.7, gamma=1.0)
    assert rel_err(out, av) <= tolerance(dtype)
    inv = np.stack(np.broadcast_arrays(*[sum((c / s if (s := _symbol(norm, np.dot(k, k), 1.0)) else 0.0)
                                              * np.cos(_phase(k, x, p)) for c, k, p in m) for m in comps]))
    # rounding noise of v on any mode is divided by that mode's symbol, at worst its smallest
    # non-zero value s_min: the attainable relative accuracy is eps * (max|v| / s_min) / max|inv|
    s_min = min(s for s in (_symbol(norm, 0.0, 1.0), _symbol(norm, 1.0, 1.0)) if s > 0)
    amplification = max(1.0, np.abs(v).max() / s_min / np.abs(inv).max())
    err = rel_err(ops.inverse_regularization(v, norm, beta=0.7, gamma=1.0), inv)
    assert err <= tolerance(dtype) * amplification


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relaxed_leray_scales_the_longitudinal_part(shape, dtype):
    """CLAIRE's RELAXEDSTOKES projection: v - grad Delta^-1 M^-1 div v keeps divergence-free
    fields and scales a gradient field grad phi, mode by mode, by 1 - M^-1 = r / (r + 1 + |k|^2)."""
    d, ops, x = _setup(shape, dtype)
    r = 3.0
    w = np.stack(np.broadcast_arrays(np.sin(x[1]), np.sin(x[2]), np.sin(x[0]))).astype(dtype)
    assert rel_err(ops.leray(w, relaxation=r), w) <= tolerance(dtype)
    modes = MODES[:3]
    grad = sum(np.stack(np.broadcast_arrays(*[-c * k[a] * np.sin(_phase(k, x, p)) for a in range(3)]))
               for c, k, p in modes)
    scaled = sum(r / (r + 1 + np.dot(k, k)) * np.stack(np.broadcast_arrays(
        *[-c * k[a] * np.sin(_phase(k, x, p)) for a in range(3)])) for c, k, p in modes)
    assert rel_err(ops.leray(grad.astype(dtype), relaxation=r), scaled) <= 10 * tolerance(dtype)
    assert d.norm(ops.leray(grad.astype(dtype))) <= 10 * tolerance(dtype) * d.norm(grad)


@pytest.mark.parametrize("norm", REGULARIZATION_NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_inverse_regularization_round_trips(shape, norm):
    d, ops, _ = _setup(shape, np.float64)
    rng = np.random.default_rng(4)
    local = rng.standard_normal((3,) + shape)[(slice(None),) + d.real_slice]
    v = local - np.array([d.allreduce(float(c.sum())) / d.num_points for c in local])[:, None, None, None]
    kw = dict(beta=0.3, gamma=1e-2)
    # rounding is amplified by the condition number of A on the grid's non-null modes
    q = np.add.outer(np.add.outer(np.fft.fftfreq(shape[0], 1 / shape[0]) ** 2,
                                  np.fft.fftfreq(shape[1], 1 / shape[1]) ** 2),
                     np.fft.rfftfreq(shape[2], 1 / shape[2]) ** 2)
    sym = _symbol(norm, q)
    kappa = sym.max() / sym[sym > 0].min()
    tol = 1e-14 * kappa
    back = ops.inverse_regularization(ops.regularization(v, norm, **kw), norm, **kw)
    assert rel_err(back, v) <= tol
    back = ops.regularization(ops.inverse_regularization(v, norm, **kw), norm, **kw)
    assert rel_err(back, v) <= tol


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_operators_equal_the_serial_numpy_reference(shape, dtype):
    """Random fields (all modes, Nyquist included) against numpy.fft on the global array:
    the distributed result at this rank count equals the serial one."""
    d, ops, _ = _setup(shape, dtype)
    rng = np.random.default_rng(5)
    g = rng.standard_normal(shape)
    v = rng.standard_normal((3,) + shape)
    f_loc = g[d.real_slice].astype(dtype)
    v_loc = v[(slice(None),) + d.real_slice].astype(dtype)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    checks = [
        (ops.gradient(f_loc), reference.gradient(g)),
        (ops.divergence(v_loc), reference.divergence(v)),
        (ops.laplacian(f_loc), reference.laplacian(g)),
        (ops.inverse_laplacian(f_loc), reference.inverse_laplacian(g)),
        (ops.leray(v_loc), reference.leray(v)),
        (ops.leray(v_loc, relaxation=100.0), reference.leray(v, relaxation=100.0)),
        (ops.smooth(f_loc, 1.5), reference.smooth(g, 1.5)),
        (ops.smooth(v_loc, (0.5, 1.0, 2.0)), reference.smooth(v, (0.5, 1.0, 2.0))),
    ]
    for norm in REGULARIZATION_NORMS:
        kw = dict(beta=0.3, gamma=1e-2)
        checks.append((ops.regularization(v_loc, norm, **kw), reference.regularization(v, norm, **kw)))
        checks.append((ops.inverse_regularization(v_loc, norm, **kw),
                       reference.regularization(v, norm, invert=True, **kw)))
    for i, (local, ref) in enumerate(checks):
        full = d.gather(local)
        err = COMM.bcast(rel_err(full, ref) if d.rank == 0 else None)
        assert err <= tol, f"check {i}: relative error {err:.2e}"


def test_serial_and_parallel_fields_are_equal():
    """Max abs difference between this rank count and one rank, float64, <= 1e-12."""
    shape = (16, 12, 10)
    d, ops, _ = _setup(shape, np.float64)
    s = Decomposition(shape, comm=MPI.COMM_SELF, dtype=np.float64)
    sops = SpectralOperators(s)
    rng = np.random.default_rng(6)
    v = rng.standard_normal((3,) + shape)
    par = d.gather(ops.leray(ops.inverse_regularization(v[(slice(None),) + d.real_slice], "h2")))
    ser = sops.leray(sops.inverse_regularization(v, "h2"))
    grad_par = d.gather(ops.gradient(v[0][d.real_slice]))
    if d.rank == 0:
        assert np.abs(par - ser).max() <= 1e-12
        assert np.abs(grad_par - sops.gradient(v[0])).max() <= 1e-12


@pytest.mark.parametrize("shape", SHAPES + [(8, 8, 8)], ids=str)
def test_leray_projection(shape, dtype):
    d, ops, x = _setup(shape, dtype)
    rng = np.random.default_rng(7)
    v = rng.standard_normal((3,) + shape)[(slice(None),) + d.real_slice].astype(dtype)
    kv = ops.leray(v)
    div_rel = d.norm(ops.divergence(kv)) / d.norm(ops.divergence(v))
    assert div_rel <= (1e-10 if dtype == np.float64 else 1e-5)
    twice = ops.leray(kv)
    assert d.norm(twice - kv) <= tolerance(dtype) * d.norm(kv)
    # a gradient field is removed, a divergence-free field is kept
    phi = trig_poly(x, MODES[:3]).astype(dtype)
    assert d.norm(ops.leray(ops.gradient(phi))) <= 10 * tolerance(dtype) * d.norm(ops.gradient(phi))
    w = np.stack(np.broadcast_arrays(np.sin(x[1]), np.sin(x[2]), np.sin(x[0]))).astype(dtype)
    assert rel_err(ops.leray(w), w) <= tolerance(dtype)


def test_smoothing_is_exact_on_trig_polys(dtype):
    d, ops, x = _setup((16, 12, 10), dtype)
    sigma = (1.0, 0.5, 2.0)
    f = trig_poly(x, MODES).astype(dtype)
    h = [2 * np.pi / n for n in d.shape]
    expected = sum(c * np.exp(-0.5 * sum((sigma[a] * h[a] * k[a]) ** 2 for a in range(3)))
                   * np.cos(_phase(k, x, p)) for c, k, p in MODES)
    assert rel_err(ops.smooth(f, sigma), expected) <= tolerance(dtype)
    assert rel_err(ops.smooth(f, 0.0), f) <= tolerance(dtype)
    with pytest.raises(ValueError, match="sigma"):
        ops.smooth(f, -1.0)


@pytest.mark.parametrize("fine, coarse", [((16, 12, 10), (8, 6, 5)), ((15, 9, 14), (7, 4, 7)),
                                          ((32, 32, 32), (16, 16, 16))], ids=str)
def test_restriction_and_prolongation(fine, coarse, dtype):
    df, dc = Decomposition(fine, dtype=dtype), Decomposition(coarse, dtype=dtype)
    restrict, prolong = SpectralResampler(df, dc), SpectralResampler(dc, df)
    modes = [(1.0, (1, 1, 1), 0.2), (0.5, (-1, 0, 2), 0.9), (0.3, (0, 1, -1), 0.0), (1.5, (0, 0, 0), 0.0)]
    tol = tolerance(dtype)
    f_fine = trig_poly(df.local_coordinates(), modes).astype(dtype)
    f_coarse = trig_poly(dc.local_coordinates(), modes).astype(dtype)
    assert rel_err(restrict(f_fine), f_coarse) <= tol
    assert rel_err(prolong(f_coarse), f_fine) <= tol
    v = np.stack([f_coarse, 2 * f_coarse, -f_coarse])
    assert rel_err(restrict(prolong(v)), v) <= tol
    # random fields: against the numpy reference (modes above the coarse band are dropped)
    g = np.random.default_rng(8).standard_normal(fine)
    out = dc.gather(restrict(g[df.real_slice].astype(dtype)))
    if dc.rank == 0:
        assert rel_err(out, reference.resample(g, coarse)) <= 2 * tol
    gc = np.random.default_rng(9).standard_normal(coarse)
    out = df.gather(prolong(gc[dc.real_slice].astype(dtype)))
    if df.rank == 0:
        assert rel_err(out, reference.resample(gc, fine)) <= 2 * tol


def test_operators_refuse_wrong_shapes():
    d, ops, _ = _setup((8, 8, 8), np.float64)
    with pytest.raises(ValueError, match="vector"):
        ops.divergence(d.new_scalar())
    with pytest.raises(ValueError, match="scalar"):
        ops.gradient(d.new_vector())
    with pytest.raises(ValueError, match="unknown regularisation norm"):
        ops.regularization(d.new_vector(), "h4s")


@pytest.mark.parametrize("leray", [None, 0.0, 30.0], ids=["identity", "leray", "relaxed"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_regularization_plus_equals_its_parts(shape, dtype, leray):
    """The fused beta A v + L b against the numpy reference of each part."""
    d, ops, _ = _setup(shape, dtype)
    rng = np.random.default_rng(11)
    v, b = rng.standard_normal((2, 3) + shape)
    part = lambda f: f[(slice(None),) + d.real_slice].astype(dtype)  # noqa: E731
    out = ops.regularization_plus(part(v), part(b), "h2", beta=0.3, gamma=1e-2, leray=leray)
    av = reference.regularization(v, "h2", beta=0.3, gamma=1e-2)
    expected = {None: av + b, 0.0: reference.leray(av + b), 30.0: av + reference.leray(b, relaxation=30.0)}[leray]
    full = d.gather(np.ascontiguousarray(out))
    err = COMM.bcast(rel_err(full, expected) if d.rank == 0 else None)
    assert err <= (1e-12 if dtype == np.float64 else 2e-5), err


@pytest.mark.parametrize("beta_div", [0.0, 0.2])
@pytest.mark.parametrize("shape", SHAPES + [(8, 8, 8)], ids=str)
def test_regularization_energy_is_the_real_space_value(shape, dtype, beta_div):
    """Parseval on the half spectrum (odd and even axes, Nyquist included) against the same
    quantity from real fields: 1/2 <beta A v, v> + beta_div/2 (||grad div v||^2 + ||div v||^2)."""
    d, ops, _ = _setup(shape, dtype)
    rng = np.random.default_rng(12)
    v = rng.standard_normal((3,) + shape)[(slice(None),) + d.real_slice].astype(dtype)
    cell = np.prod([2 * np.pi / n for n in shape])
    inner = lambda a, b: cell * d.allreduce(float(np.sum(a.astype(float) * b.astype(float))))  # noqa: E731
    div = ops.divergence(v)
    grad = ops.gradient(div)
    expected = 0.5 * inner(ops.regularization(v, "h2", beta=0.3, gamma=1e-2), v)
    expected += 0.5 * beta_div * (inner(grad, grad) + inner(div, div))
    value = ops.regularization_energy(v, "h2", beta=0.3, gamma=1e-2, beta_div=beta_div)
    assert value == pytest.approx(expected, rel=1e-10 if dtype == np.float64 else 1e-5)
