"""Semi-Lagrangian transport: analytic solutions, conservation, adjoint consistency,
deformation maps, and equality across rank counts."""

import functools

import numpy as np
import pytest
from mpi4py import MPI

from claire_py.kernels import Decomposition, SpectralOperators
from claire_py.solvers.transport import SemiLagrangianTransport, TransportOptions

COMM = MPI.COMM_WORLD


@functools.lru_cache(maxsize=None)
def _grid(shape, dtype):
    """One decomposition and its operators per grid: a process holds at most 2048 MPI
    communicators, and every Decomposition keeps a few for its lifetime."""
    d = Decomposition(shape, dtype=dtype)
    return d, SpectralOperators(d)


def _setup(n, nt, dtype=np.float64, comm=None, interpolation="lagrange"):
    shape = (n, n, n) if np.ndim(n) == 0 else tuple(n)
    if comm is None:
        d, ops = _grid(shape, np.dtype(dtype))
    else:
        d = Decomposition(shape, dtype=dtype, comm=comm)
        ops = SpectralOperators(d)
    tr = SemiLagrangianTransport(d, ops, TransportOptions(nt=nt, interpolation=interpolation))
    x = [a.astype(np.float64) for a in d.local_coordinates()]
    return d, ops, tr, x


def _compressible(x, alpha):
    """v = (alpha sin x0, 0, 0) and its exact pull-back map y0(x0) at t = 1."""
    v = np.stack(np.broadcast_arrays(alpha * np.sin(x[0]), 0 * x[1], 0 * x[2]))
    y0 = 2 * np.arctan2(np.sin(x[0] / 2) * np.exp(-alpha), np.cos(x[0] / 2))
    det = np.exp(-alpha) / (np.cos(x[0] / 2) ** 2 + np.sin(x[0] / 2) ** 2 * np.exp(-2 * alpha))
    return v, y0, det


def _max_err(d, a, b):
    return d.allreduce(float(np.abs(a - b).max()), "max")


def test_state_converges_to_the_analytic_solution():
    errors = []
    for n, nt in [(16, 2), (32, 4), (64, 8)]:
        d, ops, tr, x = _setup(n, nt)
        v, y0, _ = _compressible(x, 0.8)
        tr.set_velocity(v)
        m0 = np.broadcast_to(np.cos(x[0]) + 0.5 * np.sin(x[1] + x[2]), d.local_shape)
        exact = np.cos(y0) + 0.5 * np.sin(x[1] + x[2])
        m = tr.solve_state(m0)
        assert m.shape == (nt + 1,) + d.local_shape
        errors.append(_max_err(d, m[-1], exact))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[1] / errors[2] >= 3.0 and errors[2] <= 1e-3, errors


def test_deformation_map_and_det_against_analytic_map():
    errors = []
    for n, nt in [(16, 4), (32, 8), (64, 16)]:
        d, ops, tr, x = _setup((n, 8, 8), nt)
        v, y0, det = _compressible(x, 0.8)
        tr.set_velocity(v)
        u = tr.displacement()
        h0 = 2 * np.pi / n
        # y0 - x0 wraps across 0 ~ 2pi near x0 = 0: compare on the circle
        du = np.angle(np.exp(1j * (u[0] * h0 - (y0 - x[0]))))
        errors.append((_max_err(d, du, 0 * du) / h0, _max_err(d, tr.det_grad_y(), det)))
        assert _max_err(d, u[1:], 0 * u[1:]) <= 1e-12
    for (eu0, ed0), (eu1, ed1) in zip(errors, errors[1:]):
        assert eu1 < eu0 and ed1 < ed0, errors
    assert errors[-1][0] <= 1e-2 and errors[-1][1] <= 1e-2, errors


def test_det_is_second_order_in_time():
    """The transported J against the analytic det of a compressible flow, nt = 4, 8, 16 on a
    grid fine enough that the time error dominates: the error falls ~4x per halving of dt."""
    errors = []
    for nt in (4, 8, 16):
        d, ops, tr, x = _setup((128, 8, 8), nt)
        v, _, det = _compressible(x, 1.0)
        tr.set_velocity(v)
        errors.append(_max_err(d, tr.det_grad_y(), det))
    orders = [np.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert min(orders) >= 1.8, (errors, orders)


def test_det_on_a_steep_regular_map_reports_no_fold():
    """det(grad y) of y(x0) = 2 atan(exp(-alpha) tan(x0 / 2)), alpha = 3.5, which compresses by
    e^-3.5 = 0.03 and expands by 33 within a few voxels of a 32-point axis: a diffeomorphism.
    Spectral derivatives of the composed displacement undershoot there (Gibbs: min -0.48);
    det_grad_y stays positive and close to the exact det everywhere (0.13 relative when
    measured), and at the compression close to central differences of the map (0.035, which
    also flatten the expansion peak: 13 for 33)."""
    d, ops, tr, x = _setup((32, 8, 8), 8)
    v, _, exact = _compressible(x, 3.5)
    tr.set_velocity(v)
    u = tr.displacement()
    det = tr.det_grad_y()
    central = tr.det_grad_y_central_differences(u)
    grads = [ops.gradient(np.ascontiguousarray(u[a])) for a in range(3)]
    spectral = 1.0 + grads[0][0] * d.spacing[0]  # the 1-D map: det = 1 + du0/dx0 (voxels per voxel)
    lo = lambda f: d.allreduce(float(f.min()), "min")  # noqa: E731
    assert lo(spectral) < -0.4  # what the spectral det of the composed map reported
    assert lo(central) > 0
    assert abs(lo(det) / lo(exact) - 1) <= 0.05 and abs(lo(central) / lo(det) - 1) <= 0.25
    rel = d.allreduce(float(np.abs(det / exact - 1).max()), "max")
    assert rel <= 0.2, rel


def test_det_of_a_divergence_free_flow_is_one_and_its_map_converges_at_second_order():
    """div v = 0: the transported J is 1 to rounding; central differences of the composed map
    give det - 1 = O(h^2 + dt^2), refined together."""
    errors = []
    for n, nt in [(16, 2), (32, 4), (64, 8)]:
        d, ops, tr, x = _setup(n, nt)
        v = 0.8 * np.stack(np.broadcast_arrays(np.sin(x[1]) * np.cos(x[2]), np.sin(x[2]) * np.cos(x[0]),
                                               np.sin(x[0]) * np.cos(x[1])))
        tr.set_velocity(v)
        assert _max_err(d, tr.det_grad_y(), np.ones(d.local_shape)) <= 1e-12
        errors.append(_max_err(d, tr.det_grad_y_central_differences(tr.displacement()), np.ones(d.local_shape)))
    orders = [np.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert orders[0] >= 1.7 and orders[1] >= 1.9, (errors, orders)  # 1.79, 1.98 when measured


def test_translation_is_exact_in_y():
    d, ops, tr, x = _setup((16, 12, 10), 4)
    c = np.array([0.3, -0.2, 0.5])
    tr.set_velocity(np.stack(np.broadcast_arrays(*(c[a] + 0 * x[a] for a in range(3)))))
    u = tr.displacement()
    for a in range(3):
        np.testing.assert_allclose(u[a], -c[a] / d.spacing[a], atol=1e-12)
    np.testing.assert_allclose(tr.det_grad_y(), 1.0, atol=1e-12)
    np.testing.assert_allclose(tr.det_grad_y_central_differences(u), 1.0, atol=1e-12)


def test_divergence_free_velocity_preserves_volume():
    d, ops, tr, x = _setup(32, 4)
    v = 0.5 * np.stack(np.broadcast_arrays(np.sin(x[1]), np.sin(x[2]), np.sin(x[0])))
    tr.set_velocity(v)
    div = ops.divergence(v)
    assert _max_err(d, div, 0 * div) <= 1e-12
    det = tr.det_grad_y()
    assert _max_err(d, det, 1.0 + 0 * det) <= 1e-12


def test_continuity_adjoint_conserves_mass():
    # det(grad y) spans about [0.6, 1.6]: the mass error is the time discretisation's,
    # 1e-4 here (1.2e-3 for alpha = 0.8, 4e-4 for that with nt = 8)
    d, ops, tr, x = _setup(32, 4)
    v, _, _ = _compressible(x, 0.5)
    v[1] = 0.2 * np.cos(x[2] + x[0])  # compressible in more than one direction
    tr.set_velocity(v)
    lam1 = np.broadcast_to(1.0 + 0.5 * np.cos(x[0] + x[1]) * np.sin(x[2]), d.local_shape)
    lam0, _ = tr.solve_adjoint(lam1, tr.state_history(np.zeros(d.local_shape)))
    mass1, mass0 = d.allreduce(float(lam1.sum())), d.allreduce(float(lam0.sum()))
    assert abs(mass0 - mass1) <= 1e-3 * abs(mass1)
    assert _max_err(d, lam0, lam1) > 1e-2  # the solve did move mass around


def _adjoint_mismatch(n, nt):
    """|<mt(1), mu> + <vt, b_mu>| / (|<mt(1), mu>| ): zero for the continuous problem."""
    d, ops, tr, x = _setup(n, nt)
    v = np.stack(np.broadcast_arrays(0.6 * np.sin(x[1]), 0.4 * np.cos(x[0]) + 0.2 * np.sin(x[1]),
                                     0.3 * np.sin(x[2] + x[0])))
    tr.set_velocity(v)
    m0 = np.broadcast_to(np.sin(x[0]) * np.cos(x[1]) + 0.3 * np.cos(x[2]) + 0.5 * np.sin(x[0] + x[2]),
                         d.local_shape)
    state = tr.state_history(m0)
    vt = np.stack(np.broadcast_arrays(np.cos(x[2]) + np.sin(x[0]), np.sin(x[0] + x[1]) + np.cos(x[1]),
                                      0.5 + np.cos(x[2])))
    mu = np.broadcast_to(np.cos(x[0] - x[2]) + np.sin(x[0]) * np.cos(x[1]) + 0.2, d.local_shape)
    mt1 = tr.solve_incremental_state(vt, state)
    _, b = tr.solve_adjoint(mu, state)  # the pair of the Gauss-Newton matvec
    lhs, rhs = d.inner(mt1, np.ascontiguousarray(mu)), -d.inner(vt, b)
    return abs(lhs - rhs) / abs(lhs)


def test_discrete_adjoint_consistency_improves_under_refinement():
    # second order in dt: 8.6e-3, 2.1e-3, 5.1e-4 when measured
    coarse, medium, fine = _adjoint_mismatch(16, 2), _adjoint_mismatch(32, 4), _adjoint_mismatch(64, 8)
    assert coarse > 3 * medium > 9 * fine, (coarse, medium, fine)
    assert fine <= 1e-3, (coarse, medium, fine)


def test_incremental_adjoint_is_the_adjoint_from_minus_mt():
    d, ops, tr, x = _setup(16, 3)
    tr.set_velocity(0.3 * np.stack(np.broadcast_arrays(np.sin(x[1]), np.cos(x[0]), 0 * x[2])))
    state = tr.state_history(np.broadcast_to(np.sin(x[0]), d.local_shape))
    mt1 = np.broadcast_to(np.cos(x[1]), d.local_shape)
    np.testing.assert_array_equal(tr.solve_incremental_adjoint(mt1, state),
                                  tr.solve_adjoint(-mt1, state)[1])


@pytest.mark.parametrize("store", [True, False], ids=["stored", "recomputed"])
def test_state_history_holds_the_state_and_its_spectral_gradients(store):
    d, ops, tr, x = _setup((16, 12, 10), 3)
    tr.set_velocity(0.4 * np.stack(np.broadcast_arrays(np.sin(x[1]), np.cos(x[2]), np.sin(x[0]))))
    m0 = np.ascontiguousarray(np.broadcast_to(np.cos(x[0]) * np.sin(x[1] + x[2]), d.local_shape))
    state, plain = tr.state_history(m0, store_gradients=store), tr.solve_state(m0)
    assert len(state) == tr.nt + 1 and state[0] is m0  # m(0) is shared, not copied
    for j in range(tr.nt + 1):
        np.testing.assert_array_equal(state[j], plain[j])
    np.testing.assert_array_equal(state.final, plain[-1])
    for j in range(tr.nt + 1):
        np.testing.assert_array_equal(state.gradient(j), ops.gradient(np.ascontiguousarray(plain[j])))
        if store:
            assert state.gradient(j) is state.gradient(j)
    if store:  # once differentiated, the inner time points are no longer kept
        with pytest.raises(RuntimeError, match="released"):
            state[1]
        np.testing.assert_array_equal(state.final, plain[-1])


def _all_fields(comm, shape, dtype=np.float64):
    d, ops, tr, x = _setup(shape, 4, dtype=dtype, comm=comm)
    # moves points by about N/3 along axis 0: across several ranks
    v = np.stack(np.broadcast_arrays(2 * np.pi / 3 * (1 + 0.3 * np.sin(x[1])), 0.5 * np.cos(x[0]), 0 * x[2] + 0.1))
    tr.set_velocity(v)
    m0 = np.broadcast_to(np.sin(x[0]) + np.cos(x[1] - x[2]), d.local_shape)
    m = tr.solve_state(m0)
    state = tr.state_history(m0)
    lam0, b = tr.solve_adjoint(np.ascontiguousarray(m[-1] - m0), state)
    mt1 = tr.solve_incremental_state(v, state)
    u = tr.displacement()
    fields = [m[-1], lam0, b, mt1, u, tr.det_grad_y()]
    return d, [d.gather(np.ascontiguousarray(f)) for f in fields]


@pytest.mark.parametrize("shape", [(24, 16, 12), (20, 18, 9)], ids=str)
def test_every_rank_count_gives_the_same_fields(shape):
    d, parallel = _all_fields(COMM, shape)
    if d.rank == 0:
        _, serial = _all_fields(MPI.COMM_SELF, shape)
        for i, (p, s) in enumerate(zip(parallel, serial)):
            assert np.abs(p - s).max() <= 1e-10 * max(1.0, np.abs(s).max()), f"field {i}"


def test_label_transport():
    d, ops, tr, x = _setup((16, 12, 10), 2)
    # a translation by exactly (2, -3, 1) voxels: labels move exactly
    shift = np.array([2, -3, 1])
    tr.set_velocity(np.stack(np.broadcast_arrays(*(shift[a] * d.spacing[a] + 0 * x[a] for a in range(3)))))
    gi = np.meshgrid(*[np.arange(n) for n in d.shape], indexing="ij")
    labels = ((gi[0] // 4) + 3 * (gi[1] // 6) + 7 * (gi[2] > 4)).astype(np.int16)
    expected = np.roll(labels, tuple(shift), axis=(0, 1, 2))[d.real_slice]
    out = tr.transport_labels(labels[d.real_slice])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, expected)
    prob = tr.transport_labels(labels[d.real_slice], method="probability")
    np.testing.assert_array_equal(prob, expected)
    with pytest.raises(ValueError, match="nearest"):
        tr.transport_labels(labels[d.real_slice], method="mode")


def test_probability_labels_are_the_most_probable_of_every_transported_indicator():
    # the reference transports every label's indicator, the background's too, and takes the
    # argmax; the method leaves the largest label out (the complement of the others)
    d, ops, tr, x = _setup((16, 12, 10), 3)
    tr.set_velocity(0.5 * np.stack(np.broadcast_arrays(np.sin(x[1]), np.cos(x[2]) * np.sin(x[0]), np.cos(x[0]))))
    gi = np.meshgrid(*[np.arange(n) for n in d.shape], indexing="ij")
    labels = np.where((gi[0] - 8) ** 2 + (gi[1] - 6) ** 2 + (gi[2] - 5) ** 2 < 20, 1 + (gi[0] > 8) + 2 * (gi[2] > 5), 0)
    local = labels[d.real_slice].astype(np.int32)
    values = np.unique(labels)
    p = np.stack([tr.transport_image((local == v).astype(float)) for v in values])
    expected = values[np.argmax(p, axis=0)]
    out = tr.transport_labels(local, method="probability")
    assert COMM.allreduce(int(np.count_nonzero(out != expected))) == 0
    assert COMM.allreduce(int(np.count_nonzero(out != local))) > 50  # the labels did move


def test_float32_transport_is_close_to_float64():
    shape = (16, 16, 16)
    _, f64 = _all_fields(COMM, shape, np.float64)
    _, f32 = _all_fields(COMM, shape, np.float32)
    if COMM.rank == 0:
        for a, b in zip(f64, f32):
            assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())


def test_options_and_order_of_calls():
    with pytest.raises(ValueError, match="nt"):
        TransportOptions(nt=0)
    with pytest.raises(ValueError, match="interpolation"):
        TransportOptions(interpolation="linear")
    d, ops, tr, x = _setup(8, 2)
    with pytest.raises(RuntimeError, match="set_velocity"):
        tr.solve_state(np.zeros(d.local_shape))
    with pytest.raises(ValueError, match="NaN"):
        tr.set_velocity(np.full((3,) + d.local_shape, np.nan))


def test_float32_solves_stay_float32():
    """NumPy 2 promotes float32 arrays times float64 scalars: every solve must keep the
    working precision (a float64 body force made the whole float32 Krylov solve float64)."""
    from claire_py.kernels import Decomposition, SpectralOperators
    from claire_py.solvers.transport import SemiLagrangianTransport

    d = Decomposition((16, 16, 16), dtype=np.float32)
    tr = SemiLagrangianTransport(d, SpectralOperators(d))
    x = d.local_coordinates()
    v = (0.3 * np.stack(np.broadcast_arrays(np.sin(x[1]), np.cos(x[2]), np.sin(x[0])))).astype(np.float32)
    tr.set_velocity(v)
    m = tr.solve_state(np.sin(x[0]).astype(np.float32) * np.ones(d.local_shape, np.float32))
    state = tr.state_history(m[0])
    lam, body = tr.solve_adjoint(m[-1], state)
    mt = tr.solve_incremental_state(v, state)
    arrays = (m, state.final, *(state.gradient(j) for j in range(tr.nt + 1)), lam, body, mt,
              tr.solve_incremental_adjoint(mt, state), tr.det_grad_y(), tr.adjoint_factor)
    assert {a.dtype for a in arrays} == {np.dtype(np.float32)}


@pytest.mark.parametrize("interpolation", ["lagrange", "bspline"])
def test_zero_velocity_fast_path_matches_the_general_path(interpolation):
    # v = 0 takes identity plans; v = 1e-30 (below float64's resolution of a node
    # coordinate) builds real plans that land on the nodes: every output must agree
    d, ops, tr, x = _setup((16, 12, 10), 3, interpolation=interpolation)
    m0 = np.ascontiguousarray(np.broadcast_to(np.sin(x[0]) * np.cos(x[1]) + 0.3 * np.cos(x[2]), d.local_shape))
    lam1 = np.ascontiguousarray(np.broadcast_to(np.cos(x[0] - x[2]) + 0.2, d.local_shape))
    vt = np.stack(np.broadcast_arrays(np.cos(x[2]), np.sin(x[0] + x[1]), 0.5 + np.cos(x[2])))
    outputs = []
    for scale in (0.0, 1e-30):
        tr.set_velocity(scale * np.stack(np.broadcast_arrays(np.sin(x[1]), np.cos(x[2]), np.sin(x[0]))))
        ffts = d.stats["fft"][0]
        lazy = tr.state_history(m0, store_gradients=False)
        unstored = tr.solve_adjoint(lam1, lazy)
        if scale == 0.0:  # m(t_j) is m0 itself at every time point: its gradient is computed once
            assert all(lazy[j] is m0 for j in range(len(lazy))) and d.stats["fft"][0] - ffts == 4
        state = tr.state_history(m0)
        outputs.append([tr.solve_state(m0), *tr.solve_adjoint(lam1, state), tr.solve_incremental_state(vt, state),
                        tr.displacement(), tr.det_grad_y(), *unstored])
        if scale == 0.0:  # stored once, for every time point
            assert all(state.gradient(j) is state.gradient(0) for j in range(len(state)))
            assert len(state.take_gradients()) == 1
    assert type(tr.backward_plan).__name__ == "InterpolationPlan"
    for fast, general in zip(*outputs):
        assert _max_err(d, fast, general) <= 1e-12
    np.testing.assert_allclose(outputs[0][0][-1], m0, atol=1e-12)  # nothing moved
