"""``claire batch``'s job lists: reading CSV / YAML / JSON lists, sweeps, and each job's
configuration from its flat options (:mod:`claire_py.options`)."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re

import numpy as np

from .config import PRESETS, RegistrationConfig, _merged
from .errors import UserInputError
from .options import BY_NAME, parse
from .options import nested as nested_options

#: The per-job options: the flat names of ``claire register``'s flags (``--max-iter`` ->
#: ``max_iter``), from :data:`claire_py.options.OPTIONS`.
OPTIONS = tuple(BY_NAME)
_PATHS = ("fixed", "moving", "labels_fixed", "labels_moving", "mask")
_KEYS = ("name",) + _PATHS + ("preset",) + tuple(OPTIONS)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+-]*$")


@dataclasses.dataclass
class _Job:
    name: str
    inputs: dict  # absolute paths: fixed, moving and, when given, labels_*, mask
    options: dict  # flat option name -> value (the job's own and the sweep's)
    config: RegistrationConfig
    directory: str
    record: dict | None = None  # the row of an earlier complete run: nothing to do


def _key(key):
    return str(key).strip().lower().replace("-", "_")


def _parse_option(key, value, where):
    if key == "preset":
        if value not in PRESETS:
            raise UserInputError(f"{where}: preset {value!r} is unknown; use one of {', '.join(PRESETS)}")
        return value
    try:
        return parse(BY_NAME[key], value)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{where}: {key}={value!r}: {exc}") from None


def _value_text(value):
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(_value_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def parse_sweep(texts):
    """``{NAME: [values]}`` from ``--sweep NAME=V1,V2,...`` arguments (values kept as text).

    Raises
    ------
    UserInputError
        On a malformed argument, an unknown option name or a name given twice.
    """
    sweep = {}
    for text in texts or ():
        name, sep, values = str(text).partition("=")
        name = _key(name)
        if not sep or not name or not values.strip():
            raise UserInputError(f"--sweep {text!r}: write NAME=V1,V2,... (e.g. --sweep beta=1e-2,1e-3)")
        if name in sweep:
            raise UserInputError(f"--sweep {name} is given twice; list all its values in one --sweep")
        sweep[name] = [v.strip() for v in values.split(",") if v.strip()]
    return sweep


def _checked_sweep(sweep):
    """``[(name, [(text, value), ...]), ...]`` of a sweep dict, each value parsed."""
    items = []
    for name, values in (sweep or {}).items():
        key = _key(name)
        if key not in OPTIONS and key != "preset":
            raise UserInputError(f"sweep over {name!r}: not an option; valid: preset, {', '.join(OPTIONS)}")
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            values = [values]
        values = list(values)
        if not values:
            raise UserInputError(f"sweep over {name!r}: no values given")
        texts = [_value_text(v) for v in values]
        if len(set(texts)) != len(texts):
            raise UserInputError(f"sweep over {name!r}: a value is given twice ({', '.join(texts)})")
        items.append((key, [(t, _parse_option(key, v, f"sweep over {name}")) for t, v in zip(texts, values)]))
    return items


def read_jobs(jobs):
    """The entries of a job list: ``(list of (where, dict), base directory)``.

    Parameters
    ----------
    jobs : str, os.PathLike or sequence of dict
        A ``.csv`` file (a header row naming the columns; lines starting with ``#`` are
        comments), a ``.yaml``/``.yml`` (needs PyYAML) or ``.json`` file holding a list of
        mappings, or a list of dicts.
    """
    if isinstance(jobs, (str, os.PathLike)):
        path = os.fspath(jobs)
        if not os.path.isfile(path):
            raise UserInputError(f"{path}: no such jobs file")
        lower = path.lower()
        try:
            with open(path, newline="") as fh:
                if lower.endswith(".csv"):
                    entries = _read_csv(path, fh)
                elif lower.endswith((".yaml", ".yml", ".json")):
                    entries = _read_structured(path, fh)
                else:
                    raise UserInputError(f"{path}: give the jobs as a .csv, .yaml/.yml or .json file")
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise UserInputError(f"{path}: cannot be read as a job list ({exc})") from None
        return entries, os.path.dirname(os.path.abspath(path))
    if isinstance(jobs, dict) or not hasattr(jobs, "__iter__"):
        raise UserInputError("jobs: give a .csv/.yaml/.json file or a list of dicts, one per job")
    return [(f"job {i + 1}", entry) for i, entry in enumerate(jobs)], os.getcwd()


def _read_csv(path, fh):
    lines = [(i + 1, line) for i, line in enumerate(fh) if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise UserInputError(f"{path}: no header row; the first line names the columns (fixed,moving,...)")
    reader = csv.DictReader([line for _, line in lines], skipinitialspace=True)
    entries = []
    for row in reader:
        line = lines[reader.line_num - 1][0]
        if None in row:
            raise UserInputError(f"{path}, line {line}: more cells than the header has columns")
        entries.append((f"{path}, line {line}", {k: v.strip() for k, v in row.items() if v is not None}))
    return entries


def _read_structured(path, fh):
    text = fh.read()
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UserInputError(f"{path}: not valid JSON ({exc})") from None
    else:
        try:
            import yaml
        except ImportError:
            raise UserInputError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or give the jobs "
                                 "as .csv or .json") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserInputError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, list):
        raise UserInputError(f"{path}: expected a list of jobs (mappings with fixed, moving, ...), got "
                             f"{type(data).__name__}")
    return [(f"{path}, job {i + 1}", entry) for i, entry in enumerate(data)]


def _stem(path):
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def _safe(text):
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _expand(entries, base, sweep):
    """``[(name, inputs, options, where), ...]``: every entry times every sweep combination."""
    items = _checked_sweep(sweep)
    swept = {key for key, _ in items}
    expanded = []
    for where, entry in entries:
        if not isinstance(entry, dict):
            raise UserInputError(f"{where}: a job is a mapping with fixed, moving, ...; got {entry!r}")
        entry = {_key(k): v for k, v in entry.items() if v is not None and not (isinstance(v, str) and not v.strip())}
        unknown = sorted(set(entry) - set(_KEYS))
        if unknown:
            raise UserInputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(_KEYS)}")
        for key in ("fixed", "moving"):
            if key not in entry:
                raise UserInputError(f"{where}: no {key} image given")
        if ("labels_fixed" in entry) != ("labels_moving" in entry):
            raise UserInputError(f"{where}: give both labels_fixed and labels_moving (or neither)")
        inputs = {}
        for key in _PATHS:
            if key in entry:
                if not isinstance(entry[key], (str, os.PathLike)):
                    raise UserInputError(f"{where}: {key} must be a file path, got {type(entry[key]).__name__}")
                inputs[key] = os.path.abspath(os.path.join(base, os.path.expanduser(os.fspath(entry[key]))))
        options = {k: _parse_option(k, v, where) for k, v in entry.items() if k not in _PATHS and k != "name"}
        clash = sorted(set(options) & swept)
        if clash:
            raise UserInputError(f"{where}: sets {', '.join(clash)}, which the sweep also sets; drop one of them")
        name = str(entry["name"]).strip() if "name" in entry else \
            _safe(f"{_stem(inputs['moving'])}_to_{_stem(inputs['fixed'])}")
        if not _NAME.match(name) or name in (".", ".."):
            raise UserInputError(f"{where}: job name {name!r} is not a safe directory name (letters, digits, "
                                 "._=+- ; not starting with . or -)")
        for combo in itertools.product(*(values for _, values in items)):
            suffix = "".join(f"__{key}={_safe(text)}" for (key, _), (text, _) in zip(items, combo))
            opts = dict(options, **{key: value for (key, _), (_, value) in zip(items, combo)})
            expanded.append((name + suffix, inputs, opts, where))
    return expanded


def _base_config(config):
    """The batch-wide settings as a nested dict (or the RegistrationConfig itself)."""
    if config is None or isinstance(config, RegistrationConfig):
        return config
    if isinstance(config, dict):
        nested = config
    elif isinstance(config, (str, os.PathLike)):
        try:
            nested = RegistrationConfig.from_file(os.fspath(config), raw=True)
        except ImportError:
            raise UserInputError(f"{config}: reading YAML needs PyYAML (pip install pyyaml)") from None
        except (OSError, ValueError) as exc:
            raise UserInputError(f"--config {config}: {exc}") from None
    else:
        raise UserInputError(f"config: give a RegistrationConfig, a nested dict or a file, not "
                             f"{type(config).__name__}")
    try:
        RegistrationConfig.from_dict(nested)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"config: {exc}") from None
    return nested


def _job_config(options, base, preset, where):
    overrides = nested_options({key: value for key, value in options.items() if key != "preset"})
    preset = options.get("preset", preset)
    if isinstance(base, RegistrationConfig):
        if preset:
            raise UserInputError(f"{where}: preset {preset!r} cannot refine a RegistrationConfig object; give the "
                                 "batch config as a nested dict or file instead")
        base = base.to_dict()
    try:
        top = _merged(base or {}, overrides)
        return RegistrationConfig.preset(preset, top) if preset else RegistrationConfig.from_dict(top)
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"{where}: {exc}") from None
