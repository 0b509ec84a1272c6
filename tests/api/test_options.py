"""The solver features through the CLI and the Python API: presets, distances, masks,
multi-channel images, padding, continuation switches and label overlap."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from mpi4py import MPI

import claire_py
from claire_py import RegistrationConfig
from claire_py.cli import main
from claire_py.config import PRESETS

COMM = MPI.COMM_WORLD


def _pair(n=24, shift=0.3):
    x = np.meshgrid(*[2 * np.pi * np.arange(n) / n] * 3, indexing="ij")
    moving = (np.sin(x[0]) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    fixed = (np.sin(x[0] - shift * np.sin(x[1])) ** 2 + np.sin(x[1]) ** 2 + np.sin(x[2]) ** 2) / 3
    return fixed, moving


def _save(path, data, affine=None):
    if COMM.rank == 0:
        nib.save(nib.Nifti1Image(np.asarray(data), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    COMM.Barrier()


def _root(a):
    return a if COMM.rank == 0 else None


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve_and_flags_refine_them(capsys, preset):
    assert main(["register", "f.nii", "m.nii", "--dump-config", "--preset", preset, "--nt", "6"]) == 0
    if COMM.rank == 0:
        cfg = json.loads(capsys.readouterr().out)
        assert cfg["newton"]["gradient_tolerance"] == 5e-2
        assert cfg["newton"]["krylov"]["max_iterations"] == (10 if preset.startswith("fast") else 50)
        assert cfg["regularization"]["norm"] == ("h2s" if preset.endswith("smooth") else "h1s-div")
        assert cfg["distance"]["name"] == ("lncc" if preset.startswith("accurate") else "l2")
        assert cfg["transport"]["nt"] == 6  # the flag wins over the preset
    assert RegistrationConfig.preset(preset).to_dict() == RegistrationConfig.preset(preset, {}).to_dict()


def test_preset_and_option_errors_list_the_valid_choices(capsys):
    with pytest.raises(ValueError, match="preset 'slow' is unknown; use one of claire, fast, fast-smooth, accurate"):
        RegistrationConfig.preset("slow")
    with pytest.raises(ValueError, match="distance='mi': use one of l2, ncc"):
        RegistrationConfig.from_dict({"distance": {"name": "mi"}})
    with pytest.raises(ValueError, match="unknown option.*valid: name, weights"):
        RegistrationConfig.from_dict({"distance": {"metric": "ncc"}})
    with pytest.raises(ValueError, match="pad=-1"):
        RegistrationConfig.from_dict({"preprocess": {"pad": -1}})
    with pytest.raises(SystemExit) as exc:
        main(["register", "f.nii", "m.nii", "--precond", "amg"])
    assert exc.value.code == 2
    if COMM.rank == 0:
        assert "invalid choice: 'amg'" in capsys.readouterr().err


def test_ncc_and_lncc_register_images_with_different_contrast():
    fixed, moving = _pair()
    fixed = 3.0 - 2.0 * fixed  # inverted and rescaled contrast: NCC and local NCC do not mind
    out = {}
    for name in ("ncc", "lncc", "l2"):
        cfg = RegistrationConfig.from_dict({"distance": {"name": name}, "regularization": {"beta": 1e-3},
                                            "preprocess": {"normalize": False}, "precision": "float64"})
        out[name] = claire_py.register(_root(fixed), _root(moving), config=cfg)
    # each relative to its own distance before registration (measured: ncc 0.03; lncc 0.30, whose
    # ridge eps leaves a floor in the flat windows around the extrema of sin^2 even at the truth)
    for name, most in (("ncc", 0.3), ("lncc", 0.35)):
        assert out[name].converged and out[name].history[-1].mismatch < most, (name, out[name].history[-1])
    # L2 cannot explain a contrast change: most of the mismatch stays (0.75 when measured, with an
    # unresolved, folding map at this beta; 0.87 before the adjoint lost its pole, which kept the
    # step small)
    assert out["l2"].history[-1].mismatch > 0.7


def test_multichannel_nifti_mask_and_labels_through_the_cli(shared_tmp, capsys):
    fixed, moving = _pair()
    f_path, m_path = os.path.join(shared_tmp, "f.nii.gz"), os.path.join(shared_tmp, "m.nii.gz")
    _save(f_path, np.stack([fixed, 1 - fixed], -1).astype(np.float32))  # two channels, (n1, n2, n3, 2)
    _save(m_path, np.stack([moving, 1 - moving], -1).astype(np.float32))
    mask_path = os.path.join(shared_tmp, "mask.nii.gz")
    _save(mask_path, np.ones(fixed.shape, np.float32))
    lf, lm = os.path.join(shared_tmp, "lf.nii.gz"), os.path.join(shared_tmp, "lm.nii.gz")
    _save(lf, (fixed > 0.5).astype(np.int16) + (fixed > 0.8))
    _save(lm, (moving > 0.5).astype(np.int16) + (moving > 0.8))
    out = os.path.join(shared_tmp, "run")
    assert main(["register", f_path, m_path, "-o", out, "--beta", "1e-3", "--weights", "1,0.5", "--mask", mask_path,
                 "--labels-fixed", lf, "--labels-moving", lm, "--precision", "float64"]) == 0
    COMM.Barrier()
    with open(os.path.join(out, "registration.json")) as fh:
        meta = json.load(fh)
    assert meta["config"]["distance"]["weights"] == [1.0, 0.5] and meta["converged"]
    assert meta["dice"]["labels"] == [1, 2]
    assert all(a > b for a, b in zip(meta["dice"]["after"], meta["dice"]["before"])), meta["dice"]
    assert nib.load(os.path.join(out, "warped.nii.gz")).shape == fixed.shape + (2,)
    if COMM.rank == 0:
        assert "Dice (mean)" in capsys.readouterr().out
    bad = os.path.join(shared_tmp, "bad")
    assert main(["register", f_path, m_path, "-o", bad, "--weights", "1,2,3"]) == 2
    assert main(["register", f_path, m_path, "-o", bad, "--labels-fixed", lf]) == 2
    if COMM.rank == 0:
        err = capsys.readouterr().err
        assert "3 distance weights for 2 image component(s)" in err and "give both --labels-fixed" in err
    assert not os.path.exists(bad)


def test_padding_is_cropped_and_keeps_the_result_close():
    fixed, moving = _pair(20)
    base = {"regularization": {"beta": 1e-3}, "precision": "float64"}
    plain = claire_py.register(_root(fixed), _root(moving), config=RegistrationConfig.from_dict(base))
    padded = claire_py.register(_root(fixed), _root(moving),
                                config=RegistrationConfig.from_dict({**base, "preprocess": {"pad": 4}}))
    if COMM.rank == 0:
        assert padded.warped.shape == padded.det_grad_y.shape == fixed.shape
        assert padded.velocity.shape == padded.displacement.shape == (3,) + fixed.shape
        # this pair is periodic itself, so padding cuts it: still registered, alike inside
        assert np.abs(padded.warped - fixed).mean() < 0.4 * np.abs(moving - fixed).mean()
        inner = (slice(None),) + (slice(6, -6),) * 3
        assert np.abs(padded.displacement - plain.displacement)[inner].max() < 0.5  # voxels


def test_grid_and_scale_continuation_through_the_api():
    fixed, moving = _pair(32)
    cfg = RegistrationConfig.from_dict({"regularization": {"beta": 1e-3},
                                        "continuation": {"grid_continuation": True, "scale_continuation": True},
                                        "newton": {"preconditioner": "2level"}})
    res = claire_py.register(_root(fixed), _root(moving), config=cfg)
    assert res.converged, res.stop_reason
    kinds = ["grid continuation"] + ["scale continuation"] * 2 + ["solve"]
    assert [s["kind"] for s in res.stages] == kinds
    assert res.stages[0]["grid"] == [16, 16, 16] and [s["sigma"] for s in res.stages[1:]] == [4.0, 2.0, 1.0]
    assert res.history[-1].mismatch < 0.3
