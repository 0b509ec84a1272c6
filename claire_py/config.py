"""``RegistrationConfig``: the solvers' own option dataclasses, composed; typed and frozen."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from .solvers.continuation import ContinuationOptions
from .solvers.krylov import KrylovOptions
from .solvers.newton import NewtonOptions
from .solvers.problem import RegularizationOptions
from .solvers.transport import TransportOptions

__all__ = ["PreprocessOptions", "RegistrationConfig"]


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
    """

    normalize: bool = True
    sigma: float = 1.0
    resample: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma={self.sigma!r} must be a finite number >= 0 (voxels)")


@dataclass(frozen=True)
class RegistrationConfig:
    """Every option of a registration, grouped by the solver that reads it.

    Examples
    --------
    >>> from claire_py import RegistrationConfig
    >>> cfg = RegistrationConfig.from_dict({"regularization": {"beta": 1e-3}, "precision": "float64"})
    >>> cfg.regularization.beta, cfg.transport.nt
    (0.001, 4)
    """

    regularization: RegularizationOptions = field(default_factory=RegularizationOptions)
    transport: TransportOptions = field(default_factory=TransportOptions)
    newton: NewtonOptions = field(default_factory=NewtonOptions)
    continuation: ContinuationOptions = field(default_factory=ContinuationOptions)
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    precision: str = "float32"

    def __post_init__(self):
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision={self.precision!r}: use 'float32' or 'float64'")

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
            return kind(**kwargs)

        return build(cls, dict(data), "config")

    @classmethod
    def from_file(cls, path):
        """Read a JSON (``.json``) or YAML (``.yaml``/``.yml``, needs PyYAML) file."""
        with open(path) as fh:
            text = fh.read()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return cls.from_dict(yaml.safe_load(text) or {})
        return cls.from_dict(json.loads(text))

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


_NESTED = {
    (RegistrationConfig, "regularization"): RegularizationOptions,
    (RegistrationConfig, "transport"): TransportOptions,
    (RegistrationConfig, "newton"): NewtonOptions,
    (RegistrationConfig, "continuation"): ContinuationOptions,
    (RegistrationConfig, "preprocess"): PreprocessOptions,
    (NewtonOptions, "krylov"): KrylovOptions,
}
