"""Separable Gaussian smoothing of a whole non-periodic volume (the affine stage's pyramid).

One pass convolves along one array axis with a symmetric kernel ``w[-r..r]``, the volume
continued by its edge values beyond its faces (``scipy.ndimage.gaussian_filter(mode="nearest")``).
"""

from numba import prange

from ._jit import jit_parallel


@jit_parallel
def _convolve_axis0(volume, weights, out):
    # out[i, j, k] = sum_t weights[t] volume[clamp(i + t - r), j, k]
    n0, n1, n2 = volume.shape
    r = (weights.shape[0] - 1) // 2
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                out[i, j, k] = 0.0
        for t in range(weights.shape[0]):
            s = min(max(i + t - r, 0), n0 - 1)
            w = weights[t]
            for j in range(n1):
                for k in range(n2):
                    out[i, j, k] += w * volume[s, j, k]
