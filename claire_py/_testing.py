"""Helpers for claire_py's own tests, shipped so that users can check an installation."""

import numpy as np

__all__ = ["tolerance", "rel_err", "trig_poly", "clean_subprocess_env", "assert_same_registration"]


def tolerance(dtype):
    """Relative accuracy asked of exact operators: 1e-12 in float64, 1e-5 in float32."""
    return 1e-12 if np.dtype(dtype) == np.float64 else 1e-5


def rel_err(a, b):
    """``max|a - b| / max|b|``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def trig_poly(x, modes):
    """``sum c * sin/cos(k0 x0) * ... `` for ``modes = [(c, (k0, k1, k2), phase), ...]``:
    a real trigonometric polynomial ``sum c cos(k.x + phase)`` on coordinates
    ``x = (x0, x1, x2)`` (broadcastable arrays), in float64."""
    out = 0.0
    for c, k, phase in modes:
        out = out + c * np.cos(k[0] * x[0].astype(float) + k[1] * x[1].astype(float)
                               + k[2] * x[2].astype(float) + phase)
    return np.asarray(out)


def clean_subprocess_env():
    """The environment without the MPI launcher's variables, so that a Python subprocess
    started from inside an ``mpiexec`` rank initialises MPI as its own singleton."""
    from .parallel import without_launcher

    return without_launcher()


def assert_same_registration(directory, reference):
    """The finished registrations in ``directory`` and ``reference`` agree to the reliability
    tolerance: the same iterations, objectives to 1e-8 (another process may have measured other,
    equally exact, FFTW plans, so rounding may differ), and the float32 files of the float64
    solutions to 4 ulps; ``directory``'s checkpoint removed once complete."""
    import json
    import os

    import nibabel as nib

    with open(os.path.join(directory, "registration.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(reference, "registration.json")) as fh:
        expected = json.load(fh)
    assert meta["complete"] and len(meta["history"]) == len(expected["history"])
    np.testing.assert_allclose([h["objective"] for h in meta["history"]],
                               [h["objective"] for h in expected["history"]], rtol=1e-8)
    for name in ("velocity.nii.gz", "warped.nii.gz", "det_grad_y.nii.gz"):
        a = nib.load(os.path.join(directory, name)).get_fdata()
        b = nib.load(os.path.join(reference, name)).get_fdata()
        assert np.abs(a - b).max() <= 4 * np.finfo(np.float32).eps * np.abs(b).max(), name
    assert not os.path.exists(os.path.join(directory, "checkpoint"))
