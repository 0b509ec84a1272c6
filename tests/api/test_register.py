"""claire_py.register: the public Python API on a synthetic pair."""

import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import RegistrationConfig

COMM = MPI.COMM_WORLD


def _pair(n=32):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = 100 + 50 * (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    shift = 0.25 * np.sin(x[1])
    fixed = 100 + 50 * (np.sin(x[0] - shift) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_register_returns_gathered_results(precision):
    fixed, moving = _pair()
    infos = []
    cfg = RegistrationConfig.from_dict({"regularization": {"beta": 1e-3}, "precision": precision,
                                        "newton": {"max_iterations": 10}})
    res = claire_py.register(fixed if COMM.rank == 0 else None, moving if COMM.rank == 0 else None,
                             config=cfg, callback=infos.append)
    assert res.converged, res.stop_reason
    assert [i.iteration for i in res.history] == [i.iteration for i in infos]
    assert res.history[-1].mismatch < 0.3 and res.history[-1].objective < res.history[0].objective
    work = res.workload
    # the default grid continuation solves on 16^3 first: its work is counted as coarse_*
    matvecs = work["hessian_matvec"]["count"] + work.get("coarse_hessian_matvec", {"count": 0})["count"]
    assert matvecs == work["hessian_matvec"]["pcg_iterations"] >= 1
    for name in ("fft", "interpolation", "interpolation_plan", "state_solve", "adjoint_solve", "total"):
        assert work[name]["count"] >= 1 and work[name]["seconds"] >= 0, name
    if COMM.size > 1:
        assert work["halo_exchange"]["count"] >= 1 and work["alltoallv"]["count"] >= 1
    if COMM.rank == 0:
        assert res.velocity.shape == (3, 32, 32, 32) and res.warped.shape == (32, 32, 32)
        assert res.det_grad_y.min() > 0
        before = np.abs(moving - fixed).mean()
        after = np.abs(res.warped - fixed).mean()
        assert after < 0.5 * before, (before, after)
    else:
        assert res.velocity is None and res.warped is None


def test_config_round_trip_and_errors(tmp_path):
    cfg = RegistrationConfig.from_dict({"regularization": {"norm": "h2s", "beta": 1e-4},
                                        "newton": {"krylov": {"forcing": "quadratic"}}})
    assert cfg.regularization.norm == "h2s" and cfg.newton.krylov.forcing == "quadratic"
    assert RegistrationConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / f"cfg{COMM.rank}.json"
    path.write_text(cfg.to_json())
    assert RegistrationConfig.from_file(path) == cfg
    with pytest.raises(ValueError, match="unknown option"):
        RegistrationConfig.from_dict({"regularisation": {}})
    with pytest.raises(ValueError, match="norm"):
        RegistrationConfig.from_dict({"regularization": {"norm": "h4"}})
    with pytest.raises(ValueError, match="precision"):
        RegistrationConfig(precision="float16")


def test_register_rejects_mismatched_shapes():
    a = np.zeros((8, 8, 8))
    with pytest.raises(claire_py.UserInputError, match="not on the same grid"):
        claire_py.register(a, np.zeros((8, 8, 6)))


def test_register_refuses_a_grid_too_large_for_memory_before_allocating():
    huge = np.broadcast_to(np.zeros(1, np.float32), (4096, 4096, 4096))  # shape only, no memory
    with pytest.raises(claire_py.UserInputError, match=r"needs about \d+\.\d GiB .* available"):
        claire_py.register(huge, huge)
    per_rank, root = claire_py.api.estimate_memory((256, 256, 256), 2)
    assert 3.2e9 < 2 * per_rank + root < 5e9  # 256^3 float32 on one 2-rank node: 3.90 GiB measured


def test_the_memory_guard_picks_the_first_leaner_configuration_that_fits(monkeypatch):
    """Between the predicted peaks of the configured run (g kept, grad m(t_j) stored), g
    recomputed after each Krylov solve, and both recomputed, the guard takes the first that
    fits the node's available memory, and refuses below the last."""
    from claire_py import api

    shape, ranks = (512, 512, 512), COMM.size
    need = [ranks * per + root for per, root in (
        api.estimate_memory(shape, ranks, store_gradients=store, keep_gradient=keep)
        for store, keep in ((True, True), (True, False), (False, False)))]
    assert need[0] > need[1] > need[2]
    config = RegistrationConfig()
    for available, store, keep in ((1.01 * need[0], True, True), ((need[0] + need[1]) / 2, True, False),
                                   ((need[1] + need[2]) / 2, False, False)):
        monkeypatch.setattr(api, "_available_memory", lambda: available)
        chosen = api._check_memory(shape, COMM, config)
        assert (chosen.transport.store_gradients, chosen.newton.keep_gradient) == (store, keep), available
        assert chosen.regularization == config.regularization and chosen.transport.nt == config.transport.nt
    assert api._check_memory(shape, COMM, config) is not config
    monkeypatch.setattr(api, "_available_memory", lambda: 0.99 * need[2])
    with pytest.raises(claire_py.UserInputError, match=r"needs about \d+\.\d GiB"):
        api._check_memory(shape, COMM, config)
