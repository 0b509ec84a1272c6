"""claire_py.options: one table of flat options behind claire register's flags and claire
batch's job columns."""

import json

import pytest

from claire_py import RegistrationConfig
from claire_py.batch import OPTIONS as BATCH_COLUMNS
from claire_py.batch import _job_config, _parse_option
from claire_py.cli import _build_parser, main
from claire_py.options import OPTIONS, nested

#: a value other than the default for each kind, as given on the command line and in a job file
_SAMPLE = {"float": ("0.25", 0.25), "nonnegative": ("0.5", 0.5), "int": ("12", 12), "floats": ("1,0.5", (1.0, 0.5))}


def _sample(option, default):
    if option.kind == "text":
        value = next(c for c in option.choices if c != default)
        return [option.flag, value], value
    if option.kind == "flag":
        return [option.flag], True
    if option.kind == "switch":
        return ([f"--no-{option.flag[2:]}"], False) if default else ([option.flag], True)
    text, value = _SAMPLE[option.kind]
    return [option.flag, text], value


def _at(config, path):
    for part in path:
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("option", OPTIONS, ids=[o.name for o in OPTIONS])
def test_every_option_reaches_its_place_from_the_command_line_and_from_a_job(option, capsys):
    default = _at(RegistrationConfig(), option.path)
    argv, value = _sample(option, default)
    assert main(["register", "--dump-config", *argv]) == 0
    dumped = json.loads(capsys.readouterr().out or "{}")
    if dumped:  # printed on rank 0
        assert _at(RegistrationConfig.from_dict(dumped), option.path) == value, argv
    assert option.name in BATCH_COLUMNS
    text = argv[-1] if option.kind not in ("flag", "switch") else str(value).lower()
    config = _job_config({option.name: _parse_option(option.name, text, "job 1")}, None, None, "job 1")
    assert _at(config, option.path) == value


def test_the_table_is_the_register_parser_s_and_documents_the_defaults():
    register = next(a for a in _build_parser()._actions if getattr(a, "choices", None) and "register" in a.choices)
    parser = register.choices["register"]
    flags = {s for action in parser._actions for s in action.option_strings}
    assert {o.flag for o in OPTIONS} <= flags
    helps = {action.dest: action.help for action in parser._actions}
    assert "default 0.01" in helps["beta"] and "default on" in helps["grid_continuation"]
    assert nested({"forcing": "fixed", "beta": 1.0}) == {"newton": {"krylov": {"forcing": "fixed"}},
                                                       "regularization": {"beta": 1.0}}
