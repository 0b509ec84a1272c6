"""The affine stage: centre of mass, then rigid, then affine (12 parameters), coarse to fine.

It finds the world (scanner, RAS mm) transform ``T(x) = A x + t`` that takes FIXED's points into
MOVING's, so that ``moving(T(x))`` matches ``fixed(x)``. The deformable solve then starts from
MOVING resampled through ``T``, and the whole map is ``x -> T(y(x))``.

Mathematics
-----------
With ``c`` FIXED's centre of mass and ``T(x) = A (x - c) + b``, each level minimises over the
samples ``x_i`` (a regular subset of FIXED's voxels, weighted by the mask when one is given)

* ``ssd``: ``F = sum_i w_i (m(T x_i) - f_i)^2 / sum_i w_i (f_i - mean f)^2``;
* ``ncc``: the same after the best linear intensity map ``a m + beta`` (variable projection),
  so that ``F = 1 - ncc(m o T, f)^2``;
* ``mi`` (Mattes mutual information, for images of different contrast, e.g. T1 against T2):
  ``F = -MI`` (not normalised, as ITK/ANTs' ``MattesMutualInformationImageToImageMetricv4``),
  see below;

the first two by Levenberg-Marquardt on the Gauss-Newton normal equations ``(J^T W J + lambda diag) delta =
-J^T W r``. The Jacobian of the residual uses the image gradient ``g = grad m(T x)`` (central
differences of the smoothed level, interpolated like ``m``): for the affine stage
``d r / d A_jk = a g_j (x - c)_k`` and ``d r / d b_j = a g_j``; for the rigid stage the update
``A <- exp([delta_w]_x) A``, ``b <- b + delta_b`` gives ``d r / d delta_w = a (A (x - c)) x g``.
Levels are Gaussian-smoothed (``sigma = shrink / 2`` voxels, none at shrink 1) and subsampled copies
of the images; a level stops when a step moves no corner of FIXED's box by more than
``tolerance`` level voxels, or after ``iterations`` steps.

*Mattes mutual information* (Mattes et al. 2003, IEEE TMI 22(1); ITK's v4 metric). Intensities
map to bin coordinates ``eta(v) = (v - lo) (B - 4) / (hi - lo) + 2`` of ``B`` bins
(:data:`MI_BINS`, two padding bins at each end; FIXED's range over the level's samples,
MOVING's over the whole level image, both fixed while the level is optimised so that ``F`` is
differentiable). With ``m_p = m(T x_p)``, ``beta3`` the cubic B-spline and ``o_p`` a sample's
boundary weight, the Parzen-window joint histogram and distribution are

    ``H(i, l) = sum_p w_p o_p [i = floor(eta_f(f_p))] beta3(l - eta_m(m_p))``,
    ``N = sum_{i, l} H(i, l) = sum_p w_p o_p``,  ``p(i, l) = H(i, l) / N``

(FIXED into one bin, as ITK; MOVING over 4 bins), with marginals ``p_f(i) = sum_l p(i, l)``,
``p_m(l) = sum_i p(i, l)``, and

    ``MI = sum_{i, l} p(i, l) log(p(i, l) / (p_f(i) p_m(l)))``,  ``F = -MI``.

Samples mapped outside MOVING contribute nothing (``o_p = 0``, as ITK). ITK's ``o_p = 1``
inside makes ``F`` jump whenever a sample crosses MOVING's boundary, and its gradient ignores
the jumps, which misleads the line search (on Colin 27 against a moved inverted contrast, the
BFGS stopped where the gradient vanished, 0.77 mm from the truth at FIXED's box corners, while
``F``'s minimum lay within 0.2 mm of it): here ``o_p`` is the product over MOVING's axes of a
C2 ramp from 0 on the boundary to 1 at :data:`MI_FADE` level voxels inside (1 deeper inside).
Then, with ``J_p = d m(T x_p) / d theta = g^T d T x_p / d theta`` as above,

    ``d H(i, l) / d theta = sum_p w_p [i = floor(eta_f(f_p))] (-o_p beta3'(l - eta_m(m_p))
    (B - 4) / (hi_m - lo_m) J_p + beta3(l - eta_m(m_p)) d o_p / d theta)``,
    ``d p / d theta = (d H / d theta - p d N / d theta) / N``,
    ``d MI / d theta = sum_{i, l} (d p(i, l) / d theta) log(p(i, l) / (p_f(i) p_m(l)))``

(the other terms of the derivative sum to ``d (sum p) = 0``; ``d p = 0`` where ``p = 0``; away
from the boundary ``d N = 0``, since the B-spline weights sum to one whatever ``m``).

``F = -MI`` has no Gauss-Newton matrix: it is minimised by BFGS on the 6 or 12 parameters
scaled to level voxels (``phi_j = s_j theta_j``, ``s_j`` the largest displacement of a corner of
FIXED's box per unit ``theta_j``, in level voxels, so that rotations, translations and linear
parts are commensurate), started at each level from the inverse of a forward-difference Hessian
(steps of :data:`MI_HESSIAN_STEP`, eigenvalues made positive; 6 or 12 gradients), with a
backtracking Armijo line search (``F(phi + alpha d) <= F + 1e-4 alpha grad^T d``, the trial step
capped at :data:`MI_MAX_MOVE` level voxels; on failure one restart by steepest descent). The
rigid stage's gradient is taken in the chart ``A <- exp([w]_x) A`` at the current iterate and
the BFGS matrix is carried from chart to chart unchanged. The stopping rule is that of
Levenberg-Marquardt (a step moving FIXED's box corners by less than ``tolerance`` level voxels,
or ``iterations`` steps), or a line search finding no decrease.

Distribution
------------
The pyramid is built from each rank's planes of the images and every rank then holds its
(coarse) levels whole, at most :attr:`AffineOptions.max_level_voxels` per
level, and samples its own share of the points; the 12 x 12 normal equations are summed over
the ranks (:meth:`Decomposition.allreduce_array`), so every rank takes the same steps; for
``mi`` the joint histogram, its derivative and the count, in one call per evaluation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..kernels.sampling import affine_sums, gaussian_smooth, mattes_sums

__all__ = ["AffineOptions", "AFFINE_MODES", "AFFINE_METRICS", "affine_stage", "ImagePyramid"]

log = logging.getLogger("claire_py")

AFFINE_MODES = ("none", "rigid", "affine")
AFFINE_METRICS = ("auto", "ssd", "ncc", "mi")

#: Histogram bins per image of the ``mi`` metric (ANTs' default for Mattes MI).
MI_BINS = 32
#: Largest displacement of FIXED's box corners (level voxels) of a trial step of the ``mi`` BFGS.
MI_MAX_MOVE = 2.0
#: Finite-difference step (level voxels of corner displacement) of the ``mi`` BFGS's initial Hessian.
MI_HESSIAN_STEP = 0.25
#: Width (level voxels) over which a sample's weight ramps from 0 on MOVING's boundary to 1.
MI_FADE = 1.0


@dataclass(frozen=True)
class AffineOptions:
    """Options of the affine stage before the deformable solve.

    Attributes
    ----------
    mode : {"affine", "rigid", "none"}
        ``affine``: centre of mass, then rigid, then all 12 parameters; ``rigid``: centre of
        mass then rotation and translation; ``none``: no affine stage (the images are taken as
        aligned, as CLAIRE does).
    metric : {"auto", "ssd", "ncc", "mi"}
        ``auto`` follows the deformable distance: ``ssd`` for ``l2``, ``ncc`` (global) for
        ``ncc`` and ``lncc``. ``mi`` (Mattes mutual information, never chosen by ``auto``) is
        for images of different contrast (e.g. T1 against T2), whose intensities are related
        by no linear map.
    shrink : tuple of int
        Shrink factors of the levels, coarse to fine.
    iterations : tuple of int
        Most Levenberg-Marquardt steps (BFGS steps for ``mi``) per level (one entry per level).
    tolerance : float
        A level stops when a step moves FIXED's box corners by less than this many level voxels.
    samples : int
        At most this many sample points per level (a regular stride over FIXED's voxels).
    max_level_voxels : int
        Levels larger than this (voxels of one image) are skipped: every rank holds each level
        whole (16.7 M voxels = 64 MiB per float32 image).
    only : bool
        Stop after the affine stage (no deformable solve: the velocity is 0).
    """

    mode: str = "affine"
    metric: str = "auto"
    shrink: tuple = (4, 2, 1)
    iterations: tuple = (40, 20, 10)
    tolerance: float = 0.02
    samples: int = 60_000
    max_level_voxels: int = 1 << 24
    only: bool = False

    def __post_init__(self):
        if self.mode not in AFFINE_MODES:
            raise ValueError(f"affine mode {self.mode!r}: use one of {', '.join(AFFINE_MODES)}")
        if self.metric not in AFFINE_METRICS:
            raise ValueError(f"affine metric {self.metric!r}: use one of {', '.join(AFFINE_METRICS)}")
        shrink, iterations = tuple(self.shrink), tuple(self.iterations)
        if not shrink or any(not isinstance(s, int) or s < 1 for s in shrink) or list(shrink) != sorted(shrink)[::-1]:
            raise ValueError(f"affine shrink={self.shrink!r}: positive integers, coarse to fine (e.g. 4, 2, 1)")
        if len(iterations) != len(shrink) or any(not isinstance(i, int) or i < 0 for i in iterations):
            raise ValueError(f"affine iterations={self.iterations!r}: one integer >= 0 per level {shrink}")
        if not (self.tolerance > 0 and self.samples >= 1000 and self.max_level_voxels >= 4096):
            raise ValueError("affine tolerance must be > 0, samples >= 1000, max_level_voxels >= 4096")
        object.__setattr__(self, "shrink", shrink)
        object.__setattr__(self, "iterations", iterations)


def _smoothed_levels(image, shrinks, k0=0, n3=None, decomp=None):
    """``{shrink: image}``: Gaussian-smoothed by ``sigma = shrink / 2`` voxels (none at shrink
    1, as ANTs' affine stage) and subsampled, built fine to coarse, each level from the one
    before when its shrink divides (the extra ``sigma`` only: a quarter of the work per level).

    With ``decomp``, ``image`` is this rank's planes ``k0 <= k < k0 + image.shape[2]`` of an
    image of ``n3`` planes (contiguous, in rank order) and each level comes back as this rank's
    planes of it, ``(planes, first plane)``: each rank smooths its planes with the neighbours'
    planes within the kernel's radius (:meth:`Decomposition.regroup`), so that the levels equal
    the whole image's, and no rank holds more than its planes and their margins."""
    image = np.asarray(image, np.float32)
    n3 = image.shape[2] if n3 is None else n3
    full = (image, k0, n3)
    out, (base, b0, bn3), base_shrink, base_sigma = {}, full, 1, 0.0
    for shrink in sorted(set(shrinks)):
        if shrink % base_shrink:
            (base, b0, bn3), base_shrink, base_sigma = full, 1, 0.0
        sigma = 0.0 if shrink == 1 else 0.5 * shrink
        extra = math.sqrt(max(sigma ** 2 - base_sigma ** 2, 0.0)) / base_shrink  # in base's voxels
        step = shrink // base_shrink
        j0, j1 = -(-b0 // step), -(-(b0 + base.shape[2]) // step)  # this rank's planes of the level
        if decomp is not None:
            radius = int(3.0 * extra + 0.5) if extra > 0 else 0
            want = (max(j0 * step - radius, 0), min((j1 - 1) * step + radius + 1, bn3)) if j1 > j0 else (b0, b0)
            n1, n2 = base.shape[:2]
            chunk = decomp.regroup(base, ((0, n1), (0, n2), (b0, b0 + base.shape[2])), ((0, n1), (0, n2), want))
            origin = want[0]
        else:
            chunk, origin = base, b0
        smooth = gaussian_smooth(chunk, extra) if extra > 0 and chunk.size else chunk
        level = np.ascontiguousarray(smooth[::step, ::step, j0 * step - origin::step][:, :, :j1 - j0])
        out[shrink] = (level, j0) if decomp is not None else level
        base, b0, bn3, base_shrink, base_sigma = level, j0, -(-bn3 // step), shrink, sigma
    return out


def _with_gradient(image):
    """``(4, *image.shape)`` float32: ``image`` and its gradient in voxels, as
    ``numpy.gradient`` gives it (central differences inside, one-sided at the faces; zero
    along an axis of one voxel), made in place (``numpy.gradient`` and a stack took 1.4 s of
    the affine stage's 4 s at 256^3)."""
    out = np.empty((4,) + image.shape, np.float32)
    out[0] = image
    m = out[0]
    for axis in range(3):
        g = out[1 + axis]
        if image.shape[axis] < 2:
            g[...] = 0.0
            continue

        def at(sl, a=axis):
            return (slice(None),) * a + (sl,)

        np.subtract(m[at(slice(2, None))], m[at(slice(None, -2))], out=g[at(slice(1, -1))])
        g[at(slice(1, -1))] *= np.float32(0.5)
        np.subtract(m[at(slice(1, 2))], m[at(slice(0, 1))], out=g[at(slice(0, 1))])
        np.subtract(m[at(slice(-1, None))], m[at(slice(-2, -1))], out=g[at(slice(-1, None))])
    return out


class ImagePyramid:
    """Smoothed, subsampled copies of FIXED and MOVING, every level whole on every rank.

    ``levels[k]`` is a dict with ``shrink``, ``fixed`` (3-D float32), ``fixed_affine`` and
    ``moving_affine`` (voxel-to-world 4 x 4 of the level), ``moving`` (``(4, ...)`` float32:
    the image and its central-difference gradient in level voxels) and ``mask`` (or None).

    ``fixed``, ``moving`` (and ``mask``, on FIXED's grid) are whole images, or, with
    ``decomp``, this rank's planes along the last axis, from ``planes[0]`` (FIXED's first
    plane here) and ``planes[1]`` (MOVING's) of images of shapes ``shapes``: the levels are
    smoothed by planes (:func:`_smoothed_levels`) and only the kept ones, each at most
    :attr:`AffineOptions.max_level_voxels`, are gathered whole.
    """

    def __init__(self, fixed, moving, fixed_affine, moving_affine, options, mask=None, *, decomp=None,
                 planes=(0, 0), shapes=None):
        self.levels = []
        shapes = (np.shape(fixed), np.shape(moving)) if shapes is None else tuple(map(tuple, shapes))
        kept = [(shrink, iterations) for shrink, iterations in zip(options.shrink, options.iterations)
                if math.prod(math.ceil(n / shrink) for n in max(shapes)) <= options.max_level_voxels]
        shrinks = [shrink for shrink, _ in kept]

        def whole(level):  # this rank's planes of a level -> the level
            return level if decomp is None else np.ascontiguousarray(np.concatenate(decomp.allgather(level[0]),
                                                                                    axis=2))

        fixed_levels = _smoothed_levels(fixed, shrinks, planes[0], shapes[0][2], decomp)
        moving_levels = _smoothed_levels(moving, shrinks, planes[1], shapes[1][2], decomp)
        for shrink, iterations in kept:
            scale = np.diag([shrink, shrink, shrink, 1.0])
            m = whole(moving_levels.pop(shrink))
            sub = None
            if mask is not None:
                first = -(-planes[0] // shrink) * shrink - planes[0]  # this rank's first plane on the level
                sub = np.ascontiguousarray(np.asarray(mask)[::shrink, ::shrink, first::shrink])
                sub = sub if decomp is None else whole((sub, None))
            self.levels.append({
                "shrink": shrink, "iterations": iterations,
                "fixed": whole(fixed_levels.pop(shrink)),
                "fixed_affine": np.asarray(fixed_affine, float) @ scale,
                "moving_affine": np.asarray(moving_affine, float) @ scale,
                "moving": _with_gradient(m),
                "mask": sub,
            })
        if not self.levels:  # every level too large: the coarsest one that fits
            shrink = max(2, math.ceil((math.prod(shapes[0]) / options.max_level_voxels) ** (1 / 3)))
            coarse = AffineOptions(shrink=(shrink,), iterations=(options.iterations[0],),
                                   max_level_voxels=options.max_level_voxels * 8)
            self.levels = ImagePyramid(fixed, moving, fixed_affine, moving_affine, coarse, mask, decomp=decomp,
                                       planes=planes, shapes=shapes).levels


def _world_points(shape, affine, stride, offset=0):
    """World coordinates (N, 3) and flat indices of the voxels on a regular stride."""
    idx = np.stack(np.meshgrid(*[np.arange(offset, n, stride) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ np.asarray(affine[:3, :3]).T + affine[:3, 3]
    return world, np.ravel_multi_index(idx.T, shape)


def _centre_of_mass(image, affine):
    w = np.clip(np.asarray(image, np.float64), 0, None)
    total = w.sum()
    if total <= 0:
        return affine[:3, :3] @ ((np.array(image.shape) - 1) / 2) + affine[:3, 3]
    idx = [(w.sum(axis=tuple(b for b in range(3) if b != a)) * np.arange(n)).sum() for a, n in enumerate(image.shape)]
    return affine[:3, :3] @ (np.array(idx) / total) + affine[:3, 3]


def _rotation(w):
    """``exp([w]_x)`` by Rodrigues' formula."""
    theta = float(np.linalg.norm(w))
    k = np.array([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]])
    if theta < 1e-12:
        return np.eye(3) + k
    return np.eye(3) + math.sin(theta) / theta * k + (1 - math.cos(theta)) / theta ** 2 * k @ k


class _Level:
    """One level's samples on this rank and the objective with its Gauss-Newton pieces."""

    def __init__(self, level, centre, metric, decomp, samples):
        self._sample(level, centre, metric, decomp, samples)
        n, sf, sff = self.decomp.allreduce_array([self.w.sum(), (self.w * self.f).sum(), (self.w * self.f ** 2).sum()])
        self.fixed_variance = max(sff - sf ** 2 / n, 1e-300)

    def _sample(self, level, centre, metric, decomp, samples):
        """This rank's share of the samples, MOVING, and FIXED's box corners (no communication)."""
        shape = level["fixed"].shape
        stride = max(1, math.ceil((math.prod(shape) / samples) ** (1 / 3)))
        world, flat = _world_points(shape, level["fixed_affine"], stride)
        weights = np.ones(len(flat)) if level["mask"] is None else np.asarray(level["mask"], float).reshape(-1)[flat]
        used = np.flatnonzero(weights > 0)
        every = level["fixed"].reshape(-1)[flat[used]]  # FIXED at every rank's samples
        self.fixed_range = (float(every.min()), float(every.max())) if len(every) else (0.0, 1.0)
        keep = used[decomp.rank::decomp.size]  # this rank's share
        self.x = world[keep] - centre
        self.f = level["fixed"].reshape(-1)[flat[keep]].astype(np.float64)
        self.w = weights[keep]
        self.decomp, self.metric = decomp, metric
        self.moving = level["moving"]
        self.to_voxel = np.linalg.inv(level["moving_affine"])
        lo, hi = np.zeros(3), np.array(shape, float) - 1
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        self.corners = corners @ level["fixed_affine"][:3, :3].T + level["fixed_affine"][:3, 3] - centre
        self.voxel = float(np.cbrt(abs(np.linalg.det(level["fixed_affine"][:3, :3]))))

    def evaluate(self, A, b, rigid):
        """Objective, gradient and Gauss-Newton matrix (summed over the ranks) at ``(A, b)``.

        With ``r = a m + beta - f`` (``a = 1, beta = 0`` for ``ssd``; the least-squares
        ``a, beta`` for ``ncc``), ``F = sum w r^2 / sum w (f - mean f)^2``, gradient ``a sum w J
        r`` and matrix ``a^2 sum w J J^T``, all from the sums of :func:`affine_sums`."""
        parts = affine_sums(self.moving, self.x, self.f, self.w, A, b, self.to_voxel, rigid=rigid)
        flat = self.decomp.allreduce_array(np.concatenate([p.ravel() for p in parts]))
        k = len(parts[1])
        (n, sm, sf, smm, smf, sff), jm, j1, jf = flat[:6], flat[6:6 + k], flat[6 + k:6 + 2 * k], flat[6 + 2 * k:6 + 3 * k]
        jj = flat[6 + 3 * k:].reshape(k, k)
        a, beta = 1.0, 0.0
        if self.metric == "ncc":
            var_m = smm - sm * sm / n
            a = (smf - sm * sf / n) / var_m if var_m > 1e-300 else 0.0
            beta = (sf - a * sm) / n
        rr = a * a * smm + beta * beta * n + sff + 2 * a * beta * sm - 2 * a * smf - 2 * beta * sf
        return max(rr, 0.0) / self.fixed_variance, a * (a * jm + beta * j1 - jf), a * a * jj

    def moved(self, A, b, A2, b2):
        """Largest displacement of FIXED's box corners between two transforms, in level voxels."""
        return float(np.abs(self.corners @ (A2 - A).T + (b2 - b)).max()) / self.voxel


def _mutual_information(joint, djoint, count):
    r"""Mutual information of a Parzen joint histogram and its derivative.

    Parameters
    ----------
    joint : ndarray ``(B, B)``
        ``H(i, l)`` (FIXED's bin ``i``, MOVING's bin ``l``), total ``count``.
    djoint : ndarray ``(B, B, k)``
        ``d H / d theta``; its sum over the bins is ``d N / d theta``.
    count : float
        ``N = sum_{i, l} H(i, l)``.

    Returns
    -------
    mi : float
        :math:`\mathrm{MI} = \sum_{i,l} p_{il} \log \frac{p_{il}}{p_f(i)\, p_m(l)}` with
        :math:`p = H / N` (0 when ``count`` is 0).
    grad : ndarray ``(k,)``
        :math:`\frac{\partial \mathrm{MI}}{\partial \theta} = \sum_{i,l}
        \frac{\partial p_{il}}{\partial \theta} \log \frac{p_{il}}{p_f(i)\, p_m(l)}` with
        :math:`\partial p = (\partial H - p\, \partial N) / N`, that is
        :math:`(\sum_{i,l} \partial H_{il} \log \frac{p_{il}}{p_f(i) p_m(l)} - \mathrm{MI}\,
        \partial N) / N` (the derivative's other terms sum to :math:`\partial \sum p = 0`).
    """
    if not count > 0:
        return 0.0, np.zeros(djoint.shape[2])
    p = joint / count
    pf, pm = p.sum(axis=1), p.sum(axis=0)
    ratio = np.zeros_like(p)
    nz = p > 0
    ratio[nz] = np.log(p[nz] / np.outer(pf, pm)[nz])
    mi = float((p * ratio).sum())
    dcount = djoint.sum(axis=(0, 1))
    grad = (np.tensordot(ratio, djoint, axes=([0, 1], [0, 1])) - mi * dcount) / count
    return mi, grad


class _MattesLevel(_Level):
    """One level's samples on this rank and the Mattes mutual information objective.

    FIXED's intensity range is that of the level's samples (every rank's), MOVING's that of the
    whole level image: both fixed for the level, so that the objective is differentiable.
    :data:`MI_BINS` bins, FIXED's box window (as ITK), and samples fading out over
    :data:`MI_FADE` level voxels inside MOVING's boundary (see the module's Mathematics)."""

    bins, fade = MI_BINS, MI_FADE

    def __init__(self, level, centre, metric, decomp, samples):
        self._sample(level, centre, metric, decomp, samples)
        image = level["moving"][0]
        self.moving_range = (float(image.min()), float(image.max()))

    def evaluate(self, A, b, rigid):
        r"""Objective ``F = -MI`` and its gradient (6 or 12 parameters, as :func:`affine_sums`)
        at ``(A, b)``, from the joint histogram summed over the ranks in one
        :meth:`~Decomposition.allreduce_array` (bit-identical on every rank).

        Returns
        -------
        F : float
            :math:`-\sum_{i,l} p_{il} \log(p_{il} / (p_f(i) p_m(l)))`, 0 when no sample maps
            inside MOVING.
        grad : ndarray ``(k,)``
            ``d F / d theta``.
        """
        joint, djoint, count = mattes_sums(self.moving, self.x, self.f, self.w, A, b, self.to_voxel, rigid=rigid,
                                           bins=self.bins, fixed_range=self.fixed_range,
                                           moving_range=self.moving_range, fade=self.fade)
        flat = self.decomp.allreduce_array(np.concatenate([joint.ravel(), djoint.ravel(), [count]]))
        nb = self.bins
        joint, djoint = flat[:nb * nb].reshape(nb, nb), flat[nb * nb:-1].reshape(nb, nb, -1)
        mi, grad = _mutual_information(joint, djoint, flat[-1])
        return -mi, -grad


def _parameter_scales(lev, A, rigid):
    """Largest displacement of FIXED's box corners per unit of each parameter, in level voxels."""
    if rigid:  # d T x / d w_j = e_j x (A x): |e_j x u| = sqrt(|u|^2 - u_j^2)
        u = lev.corners @ A.T
        rotation = np.sqrt(np.maximum((u ** 2).sum(axis=1)[:, None] - u ** 2, 0.0)).max(axis=0)
        scales = np.concatenate([rotation, np.ones(3)])
    else:  # d T x / d A_jl = e_j x_l
        scales = np.concatenate([np.tile(np.abs(lev.corners).max(axis=0), 3), np.ones(3)])
    return np.maximum(scales, 1e-6) / lev.voxel


def _initial_inverse_hessian(lev, A, b, rigid, grad, scales, h=MI_HESSIAN_STEP):
    """Inverse of the forward-difference Hessian of the scaled objective at ``(A, b)``, its
    eigenvalues made positive (``|lambda|``, at least ``1e-3`` of the largest); None when it
    has no positive eigenvalue."""
    k = len(grad)
    hessian = np.empty((k, k))
    for j in range(k):
        e = np.zeros(k)
        e[j] = h
        A2, b2 = _step(A, b, e / scales, rigid)
        hessian[:, j] = (lev.evaluate(A2, b2, rigid)[1] / scales - grad) / h
    lam, V = np.linalg.eigh(0.5 * (hessian + hessian.T))
    if not lam[-1] > 0:
        return None
    lam = np.maximum(np.abs(lam), 1e-3 * lam[-1])
    return (V / lam) @ V.T


def _fit_level_bfgs(lev, A, b, rigid, iterations, tolerance, c1=1e-4, max_move=MI_MAX_MOVE):
    """BFGS with backtracking Armijo line search on the scaled parameters of one level.

    The same stopping rule as :func:`_fit_level`: stop when an accepted step moves FIXED's box
    corners by less than ``tolerance`` level voxels, after ``iterations`` accepted steps, or when
    the line search finds no decrease in a steepest-descent direction. Deterministic: every rank
    sees the same objective values, so every rank takes the same steps.

    Returns
    -------
    A, b, F0, F, steps
        As :func:`_fit_level`.
    """
    k = 6 if rigid else 12
    scales = _parameter_scales(lev, A, rigid)
    F, grad = lev.evaluate(A, b, rigid)
    grad = grad / scales
    # H: the inverse Hessian approximation (None: steepest descent)
    H = _initial_inverse_hessian(lev, A, b, rigid, grad, scales) if iterations > 0 else None
    F0, steps = F, 0
    while steps < iterations:
        gmax = float(np.abs(grad).max())
        if not gmax > 0:
            break
        d = -grad / gmax if H is None else -H @ grad
        slope = float(grad @ d)
        if not slope < 0:  # not a descent direction: restart from steepest descent
            H, d = None, -grad / gmax
            slope = float(grad @ d)
        kind = "steepest descent" if H is None else "quasi-Newton"
        move = lev.moved(A, b, *_step(A, b, d / scales, rigid))
        alpha = min(1.0, max_move / move) if move > 0 else 1.0
        accepted = False
        while True:
            A2, b2 = _step(A, b, alpha * d / scales, rigid)
            moved = lev.moved(A, b, A2, b2)
            F2, grad2 = lev.evaluate(A2, b2, rigid)
            if F2 <= F + c1 * alpha * slope:
                accepted = True
                break
            if moved < tolerance:
                break
            alpha *= 0.5
        if not accepted:
            if H is None:
                break
            H = None  # retry once in the steepest-descent direction
            continue
        grad2 = grad2 / scales
        s, y = alpha * d, grad2 - grad
        sy = float(s @ y)
        if sy > 1e-12 * float(np.linalg.norm(s) * np.linalg.norm(y)):
            if H is None:
                H = np.eye(k) * (sy / float(y @ y))
            rho = 1.0 / sy
            V = np.eye(k) - rho * np.outer(s, y)
            H = V @ H @ V.T + rho * np.outer(s, s)
        log.debug("affine mi step %d: F %.6f -> %.6f, alpha %.3g, moved %.4f voxels, %s", steps, F, F2, alpha,
                  moved, kind)
        A, b, F, grad = A2, b2, F2, grad2
        steps += 1
        if moved < tolerance:
            break
    return A, b, F0, F, steps


def _step(A, b, delta, rigid):
    if rigid:
        return _rotation(delta[:3]) @ A, b + delta[3:]
    return A + delta[:9].reshape(3, 3), b + delta[9:]


def _fit_level(lev, A, b, rigid, iterations, tolerance):
    F, grad, H = lev.evaluate(A, b, rigid)
    F0, lam, steps = F, 1e-3, 0
    for _ in range(iterations):
        scale = np.diag(H).copy()
        scale[scale <= 0] = 1.0
        try:
            delta = np.linalg.solve(H + lam * np.diag(scale), -grad)
        except np.linalg.LinAlgError:
            break
        A2, b2 = _step(A, b, delta, rigid)
        F2, grad2, H2 = lev.evaluate(A2, b2, rigid)
        if F2 < F:
            moved = lev.moved(A, b, A2, b2)
            A, b, F, grad, H = A2, b2, F2, grad2, H2
            lam, steps = max(lam / 10, 1e-7), steps + 1
            if moved < tolerance:
                break
        else:
            lam *= 10
            if lam > 1e6:
                break
    return A, b, F0, F, steps


def affine_stage(pyramid, decomp, options, *, distance="l2", initial=None):
    """The world transform FIXED -> MOVING found by the affine stage.

    Parameters
    ----------
    pyramid : ImagePyramid
        The same on every rank (e.g. built on rank 0 and broadcast).
    decomp : Decomposition
        Only its communicator is used (to sum over the ranks' samples).
    options : AffineOptions
    distance : str
        The deformable distance (picks the metric when ``options.metric == "auto"``).
    initial : ndarray ``(4, 4)``, optional
        A world transform FIXED -> MOVING to start from instead of the centres of mass.

    Returns
    -------
    transform : ndarray ``(4, 4)``
        ``T`` with ``T @ [x, 1]`` the MOVING world point of FIXED's world point ``x`` (RAS mm).
    history : list of dict
        Per stage and level: shrink, steps, objective before and after (``-MI`` for ``mi``).
    """
    metric = options.metric if options.metric != "auto" else ("ssd" if distance == "l2" else "ncc")
    coarse = pyramid.levels[0]
    centre = _centre_of_mass(coarse["fixed"], coarse["fixed_affine"])

    def level_of(level):
        if metric == "mi":
            return _MattesLevel(level, centre, metric, decomp, options.samples), _fit_level_bfgs
        return _Level(level, centre, metric, decomp, options.samples), _fit_level

    # starts: the given transform, else the better (on the coarsest level) of the headers'
    # alignment and the centres of mass; the result is kept only if it beats its start on the
    # finest level (an image whose mass moves, or a periodic pattern, can mislead both)
    if initial is not None:
        initial = np.asarray(initial, float)
        starts = [(initial[:3, :3].copy(), initial[:3, :3] @ centre + initial[:3, 3])]
    else:
        starts = [(np.eye(3), centre.copy()), (np.eye(3), _centre_of_mass(coarse["moving"][0], coarse["moving_affine"]))]
    coarse_level = level_of(coarse)[0]
    A, b = min(starts, key=lambda start: coarse_level.evaluate(*start, True)[0])
    start = (A.copy(), b.copy())
    history = []
    stages = {"none": (), "rigid": ("rigid",), "affine": ("rigid", "affine")}[options.mode]
    for stage in stages:
        # the rigid stage only brings the affine one into its basin: the coarse levels suffice
        levels = pyramid.levels[:-1] if stage == "rigid" and len(stages) > 1 and len(pyramid.levels) > 1 \
            else pyramid.levels
        for level in levels:
            lev, fit = level_of(level)
            A, b, before, after, steps = fit(lev, A, b, stage == "rigid", level["iterations"], options.tolerance)
            A, b = decomp.bcast((A, b))  # bit-identical on every rank
            history.append({"stage": stage, "shrink": level["shrink"], "steps": steps, "metric": metric,
                            "objective_before": before, "objective_after": after})
            log.info("affine stage %-6s shrink %d: %s %.4f -> %.4f in %d steps", stage, level["shrink"], metric,
                     before, after, steps)
    if stages:
        finest = level_of(pyramid.levels[-1])[0]
        found, kept = finest.evaluate(A, b, True)[0], finest.evaluate(*start, True)[0]
        if not found < kept:
            if found > kept:
                log.warning("affine stage: %s %.4g does not improve on its start's %.4g; keeping the start",
                            metric, found, kept)
            A, b = start
            history.append({"stage": "kept start", "shrink": pyramid.levels[-1]["shrink"], "steps": 0,
                            "metric": metric, "objective_before": found, "objective_after": kept})
    transform = np.eye(4)
    transform[:3, :3], transform[:3, 3] = A, b - A @ centre
    return transform, history
