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
