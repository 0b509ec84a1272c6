"""The Python code blocks of docs/*.md run as written (at any rank count)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
BLOCKS = [(path.name, i, code) for path in sorted(DOCS.glob("*.md"))
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), re.S))]


def test_docs_have_examples():
    assert BLOCKS


@pytest.mark.parametrize("name, index, code", BLOCKS, ids=[f"{n}#{i}" for n, i, _ in BLOCKS])
def test_python_example_runs(name, index, code, capsys):
    exec(compile(code, f"{name}#{index}", "exec"), {})


def test_every_command_and_option_is_in_the_cli_reference():
    """docs/cli.md (``python scripts/cli_docs.py > docs/cli.md``) names every option."""
    from claire_py.cli import _build_parser

    text = (DOCS / "cli.md").read_text()
    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    missing = []
    for name, command in sub.choices.items():
        if f"## claire {name}" not in text:
            missing.append(name)
        for action in command._actions:
            missing += [f"{name} {flag}" for flag in action.option_strings if flag not in text]
    assert not missing, f"regenerate docs/cli.md (scripts/cli_docs.py): missing {missing}"
