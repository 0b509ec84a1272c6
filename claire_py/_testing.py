"""Helpers for claire_py's own tests, shipped so that users can check an installation."""

import numpy as np

__all__ = ["tolerance", "rel_err", "trig_poly"]


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
