"""The registration's options by their flat names: one table (:data:`OPTIONS`) from which come
``claire register``'s flags (:func:`add_flags`, :func:`overrides`), ``claire batch``'s job
columns (:func:`parse`) and with them ``docs/cli.md``.

A flat name is a flag's name with underscores (``--max-iter`` is ``max_iter``); its place is
the path of the option in the nested :class:`~claire_py.config.RegistrationConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import numpy as np

__all__ = ["Option", "OPTIONS", "BY_NAME", "add_flags", "overrides", "parse", "nested"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option. ``kind``: ``float``, ``nonnegative`` (a float >= 0), ``int``, ``text``
    (one of ``choices``), ``floats`` (comma-separated), ``flag`` (the command line can only
    turn it on), ``switch`` (``--name`` / ``--no-name``); ``optional``: a job may give
    ``none`` (the value ``None``). ``help`` may name the default as ``{default}``."""

    name: str
    path: tuple
    kind: str
    help: str
    choices: tuple | None = None
    optional: bool = False

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")


def _table():
    from .solvers.affine import AFFINE_METRICS, AFFINE_MODES
    from .solvers.distance import DISTANCES
    from .solvers.preconditioner import PRECONDITIONERS
    from .solvers.problem import REGULARIZATION_MODELS

    return (
        Option("beta", ("regularization", "beta"), "float", "regularisation weight (default {default:g})"),
        Option("regnorm", ("regularization", "norm"), "text",
               "regularisation model: h1s-div = CLAIRE's default (RELAXEDSTOKES: H1 seminorm, divergence term, "
               "relaxed projection), h1s = CLAIRE's compressible H1 seminorm, h2s/h3s seminorms, h1/h2/h3 norms, "
               "l2 (default {default})", REGULARIZATION_MODELS),
        Option("beta_div", ("regularization", "beta_div"), "float",
               "weight beta_w of h1s-div's divergence term (CLAIRE's -beta-div; default {default:g})"),
        Option("incompressible", ("regularization", "incompressible"), "flag", "volume-preserving (div v = 0)"),
        Option("train", ("continuation", "train"), "text",
               "choose beta by the det(grad y) bound: reduce by 10x while feasible (reduce), then bisect (binary); "
               "overrides --beta", ("reduce", "binary"), optional=True),
        Option("jbound", ("continuation", "det_bound"), "float",
               "lower det(grad y) bound for --train, upper = 1/JBOUND (default {default:g})"),
        Option("beta_continuation", ("continuation", "beta_continuation"), "flag",
               "reach --beta through beta = 1, 0.1, ... with inexact presolves"),
        Option("grid_continuation", ("continuation", "grid_continuation"), "switch",
               "solve on grids coarser by 2, 4, ... first (multi-resolution; default {default}, CLAIRE's is off)"),
        Option("coarsest_grid", ("continuation", "coarsest_grid"), "int",
               "points on the shortest axis of the coarsest grid (default {default})"),
        Option("scale_continuation", ("continuation", "scale_continuation"), "flag",
               "solve with images smoothed by sigma = 32, 16, ... voxels first"),
        Option("precond", ("newton", "preconditioner"), "text",
               "Krylov preconditioner: invreg = (beta A)^-1, 2level = coarse-grid Hessian solve for the low "
               "frequencies (small beta) (default {default})", PRECONDITIONERS),
        Option("distance", ("distance", "name"), "text",
               "l2 = squared L2, ncc = normalised cross-correlation (intensity-affine invariant), lncc = local NCC "
               "in a Gaussian window (invariant to bias fields; what SyN uses) (default {default})", DISTANCES),
        Option("lncc_sigma", ("distance", "lncc_sigma"), "float",
               "lncc's window: Gaussian sigma in voxels; ANTs' CC radius r is sigma = sqrt(r(r+1)/3), radius 4 = "
               "2.6 (default {default:g})"),
        Option("weights", ("distance", "weights"), "floats",
               "comma-separated weights of the components of 4-D (multi-channel) images (default: all 1)"),
        Option("pad", ("preprocess", "pad"), "int",
               "voxels of background padding per side against the periodic wrap-around, cropped on output "
               "(default {default})"),
        Option("nt", ("transport", "nt"), "int", "time steps of the transport (default {default})"),
        Option("interpolation", ("transport", "interpolation"), "text",
               "semi-Lagrangian interpolation: tricubic Lagrange or cubic B-spline (default {default})",
               ("lagrange", "bspline")),
        Option("gtol", ("newton", "gradient_tolerance"), "float", "stop at ||g||/||g0|| <= GTOL (default {default:g})"),
        Option("max_iter", ("newton", "max_iterations"), "int", "Gauss-Newton iterations (default {default})"),
        Option("krylov_max_iter", ("newton", "krylov", "max_iterations"), "int",
               "PCG iterations per Newton step (default {default})"),
        Option("forcing", ("newton", "krylov", "forcing"), "text", "PCG forcing sequence (default {default})",
               ("superlinear", "quadratic", "fixed")),
        Option("sigma", ("preprocess", "sigma"), "nonnegative", "image smoothing in voxels (default {default:g})"),
        Option("normalize", ("preprocess", "normalize"), "switch",
               "rescale each image's intensities to [0, 1] before the solve (default {default})"),
        Option("precision", ("precision",), "text", "working precision (default {default})", ("float32", "float64")),
        Option("resample", ("preprocess", "resample"), "flag",
               "resample MOVING onto FIXED's grid through their affines when the grids differ (implied by an "
               "affine stage)"),
        Option("affine", ("affine", "mode"), "text",
               "stage before the deformable solve: centre of mass, rigid, then affine (12 parameters), coarse to "
               "fine; none takes the pair as aligned, as CLAIRE does (default {default})", AFFINE_MODES),
        Option("affine_metric", ("affine", "metric"), "text",
               "the affine stage's measure: auto follows --distance (ssd for l2, global ncc otherwise); mi = Mattes "
               "mutual information, for pairs of different contrast (default {default})", AFFINE_METRICS),
        Option("affine_only", ("affine", "only"), "flag",
               "stop after the affine stage: the outputs hold the affine map (velocity 0)"),
    )


OPTIONS = _table()
BY_NAME = {o.name: o for o in OPTIONS}


def _default(option, config):
    value = config
    for part in option.path:
        value = getattr(value, part)
    return value


def _nonnegative(text):
    value = _float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{text} must be a finite number >= 0")
    return value


def _float(text):
    if isinstance(text, (bool, np.bool_)):
        raise ValueError(f"{text!r} is not a number")
    return float(text)


def _int(text):
    if isinstance(text, (bool, np.bool_, float)):
        raise ValueError(f"{text!r} is not an integer")
    return int(text)  # int("2.5") and int("x") raise


def _floats(text):
    try:
        if isinstance(text, str):
            return tuple(float(w) for w in re.split(r"[,;\s]+", text.strip()))
        return tuple(_float(w) for w in text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r}: give comma-separated numbers, e.g. 1,0.5") from None


def _bool(text):
    if isinstance(text, (bool, np.bool_)):
        return bool(text)
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(str(text).strip().lower())
    if value is None:
        raise ValueError(f"{text!r} is not true/false")
    return value


def _text(text, choices=None):
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a name")
    text = text.strip()
    if choices is not None and text not in choices:
        raise ValueError(f"{text!r}: use one of {', '.join(choices)}")
    return text


_PARSERS = {"float": _float, "nonnegative": _nonnegative, "int": _int, "floats": _floats, "flag": _bool,
            "switch": _bool}


def parse(option, value):
    """``value`` (a job file's cell: text, or a number / bool from YAML or JSON) as ``option``'s
    type; ``ValueError`` saying why not."""
    if option.optional and (value is None or str(value).strip().lower() in ("", "none", "off")):
        return None
    if option.kind == "text":
        return _text(value)  # the configuration names the valid choices
    return _PARSERS[option.kind](value)


def _argparse_type(parser):
    def convert(text):
        try:
            return parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parser.__name__.strip("_")
    return convert


def add_flags(parser, config):
    """Add every option as a flag of ``parser`` (one argument group), its help showing
    ``config``'s value as the default; unset flags parse to ``None`` (``False`` for a
    ``flag``)."""
    group = parser.add_argument_group("options of the registration (RegistrationConfig; see --dump-config)")
    for option in OPTIONS:
        default = _default(option, config)
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        kw = {"dest": option.name, "help": option.help.format(default=shown)}
        if option.kind == "flag":
            kw["action"] = "store_true"
        elif option.kind == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        elif option.kind == "text":
            kw["choices"] = option.choices
        else:  # argparse's own messages for plain numbers ("invalid float value: 'x'")
            kw["type"] = {"float": float, "int": int}.get(option.kind) or _argparse_type(_PARSERS[option.kind])
        group.add_argument(option.flag, **kw)


def nested(flat):
    """``{flat name: value}`` as the nested dict :meth:`RegistrationConfig.from_dict` reads."""
    out = {}
    for name, value in flat.items():
        *sections, leaf = BY_NAME[name].path
        place = out
        for section in sections:
            place = place.setdefault(section, {})
        place[leaf] = value
    return out


def overrides(args):
    """The flags given on the command line (``args`` from a parser with :func:`add_flags`), as
    ``{flat name: value}`` (a ``flag`` only when set)."""
    given = {}
    for option in OPTIONS:
        value = getattr(args, option.name)
        if option.kind == "flag" and not value:
            continue
        if value is not None:
            given[option.name] = value
    return given
