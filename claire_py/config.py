"""``RegistrationConfig``: the solvers' own option dataclasses, composed; typed and frozen."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .solvers.affine import AffineOptions
from .solvers.continuation import ContinuationOptions
from .solvers.krylov import KrylovOptions
from .solvers.newton import NewtonOptions
from .solvers.problem import DistanceOptions, RegularizationOptions
from .solvers.transport import TransportOptions

__all__ = ["PreprocessOptions", "RegistrationConfig", "PRESETS", "AffineOptions"]


@dataclass(frozen=True)
class PreprocessOptions:
    """What happens to the images before the solve.

    Attributes
    ----------
    normalize : bool
        Rescale each image's intensities to ``[0, 1]``.
    sigma : float
        Gaussian smoothing in voxels (CLAIRE's default 1; 0 switches it off).
    resample : bool
        When MOVING's grid (shape or affine) differs from FIXED's, resample MOVING onto
        FIXED's grid through the two affines (trilinear, zero outside) instead of refusing.
    pad : int
        Voxels of background added on every side before the solve and cropped from every
        output: the spectral domain is periodic, so structures near one face otherwise see
        the opposite face. 0 (default) suits images with a background border.
    """

    normalize: bool = True
    sigma: float = 1.0
    resample: bool = False
    pad: int = 0

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma={self.sigma!r} must be a finite number >= 0 (voxels)")
        if not (isinstance(self.pad, int) and 0 <= self.pad <= 256):
            raise ValueError(f"pad={self.pad!r} must be an integer number of voxels in [0, 256]")


@dataclass(frozen=True)
class RegistrationConfig:
    """Every option of a registration, grouped by the solver that reads it.

    Each option defaults as in the solver that reads it (CLAIRE's defaults) but for grid
    continuation, which is on (:data:`_DEFAULTS`), and the affine stage before the deformable
    solve, which CLAIRE does not have (``affine.mode = "affine"``); the ``claire`` preset turns
    both off.

    Examples
    --------
    >>> from claire_py import RegistrationConfig
    >>> cfg = RegistrationConfig.from_dict({"regularization": {"beta": 1e-3}, "precision": "float64"})
    >>> cfg.regularization.beta, cfg.transport.nt
    (0.001, 4)
    """

    regularization: RegularizationOptions = field(default_factory=RegularizationOptions)
    distance: DistanceOptions = field(default_factory=DistanceOptions)
    transport: TransportOptions = field(default_factory=TransportOptions)
    newton: NewtonOptions = field(default_factory=NewtonOptions)
    continuation: ContinuationOptions = field(default_factory=lambda: ContinuationOptions(**_DEFAULTS[ContinuationOptions]))
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    affine: AffineOptions = field(default_factory=AffineOptions)
    precision: str = "float32"

    def __post_init__(self):
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision={self.precision!r}: use 'float32' or 'float64'")

    @classmethod
    def preset(cls, name, overrides=None):
        """The configuration of preset ``name`` (see :data:`PRESETS`), with ``overrides`` (a
        nested dict) applied on top."""
        if name not in PRESETS:
            raise ValueError(f"preset {name!r} is unknown; use one of {', '.join(PRESETS)}")
        return cls.from_dict(_merged(PRESETS[name], overrides or {}))

    def to_dict(self):
        """Plain nested dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data):
        """Build from a nested dict; unknown keys are an error naming the valid ones."""
        def build(kind, values, where):
            if not isinstance(values, dict):
                raise ValueError(f"{where}: expected a mapping, got {values!r}")
            fields = {f.name: f for f in dataclasses.fields(kind)}
            unknown = set(values) - set(fields)
            if unknown:
                raise ValueError(f"{where}: unknown option(s) {', '.join(sorted(unknown))}; "
                                 f"valid: {', '.join(fields)}")
            kwargs = {}
            for name, value in values.items():
                sub = _NESTED.get((kind, name))
                kwargs[name] = build(sub, value, f"{where}.{name}") if sub else value
            return kind(**{**_DEFAULTS.get(kind, {}), **kwargs})

        return build(cls, dict(data), "config")

    @classmethod
    def from_file(cls, path, *, raw=False):
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) file; with
        ``raw`` return its nested dict instead."""
        with open(path) as fh:
            text = fh.read()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        return data if raw else cls.from_dict(data)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


def _merged(base, top):
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


#: Named starting points. ``claire`` is CLAIRE's own defaults exactly (our defaults but for
#: grid continuation, which CLAIRE leaves off, and no affine stage: CLAIRE takes the images as
#: aligned): its runs are reproduced with it. In the spirit of CLAIRE's: ``fast`` stops at ||g||/||g0|| = 5e-2 with
#: at most 10 PCG iterations per step, ``fast-smooth`` the same with the H2 seminorm (smoother
#: maps); both with CLAIRE's default model (``h1s-div``, beta = 1e-2, beta_div = 1e-4).
#: ``accurate`` matches with local normalised cross-correlation (``lncc``, a 2-voxel Gaussian
#: window), the metric of SyN, at beta = 7e-3: chosen on two real brain pairs, both ways
#: (benchmarks/RESULTS.md, "accuracy"), as the smallest beta at which no map folds by central
#: differences (5e-3 and 3e-3 fold on CLAIRE's pair); tighter tolerances, the two-level
#: preconditioner, a smaller window or a larger beta_div bought <= 0.007 Dice for 1.2-3x the
#: time or folded. Every preset inherits the default grid continuation (for ``accurate``:
#: Dice 0.890 vs 0.888 and 0.715 vs 0.711, 13-15% less time; RESULTS.md, "Performance,
#: second round"). (``accurate-smooth``, lncc with H2 at beta = 1e-3, was
#: dropped: 3-4x ``accurate``'s time for a lower Dice on both pairs.)
PRESETS = {
    "claire": {"continuation": {"grid_continuation": False}, "affine": {"mode": "none"}},
    "fast": {"newton": {"gradient_tolerance": 5e-2, "krylov": {"max_iterations": 10}}},
    "fast-smooth": {"regularization": {"norm": "h2s", "beta": 1e-3},
                    "newton": {"gradient_tolerance": 5e-2, "krylov": {"max_iterations": 10}}},
    "accurate": {"regularization": {"beta": 7e-3}, "distance": {"name": "lncc", "lncc_sigma": 2.0}},
}

#: Where claire_py's defaults differ from the solver floor's (which are CLAIRE's): grid
#: continuation is on. On real brain pairs it reaches the same Dice and mismatch as the fine
#: grid alone in a third to a quarter of the time (benchmarks/RESULTS.md, "Performance, second
#: round"); the ``claire`` preset turns it off again.
_DEFAULTS = {ContinuationOptions: {"grid_continuation": True}}

_NESTED = {
    (RegistrationConfig, "regularization"): RegularizationOptions,
    (RegistrationConfig, "distance"): DistanceOptions,
    (RegistrationConfig, "transport"): TransportOptions,
    (RegistrationConfig, "newton"): NewtonOptions,
    (RegistrationConfig, "continuation"): ContinuationOptions,
    (RegistrationConfig, "preprocess"): PreprocessOptions,
    (RegistrationConfig, "affine"): AffineOptions,
    (NewtonOptions, "krylov"): KrylovOptions,
}
