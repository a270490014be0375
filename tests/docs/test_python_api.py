"""Every ```python block of docs/python_api.md runs as written, so the API docs cannot rot."""

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_python_api_example_runs(i):
    exec(compile(BLOCKS[i], f"{DOC.name}[block {i}]", "exec"), {"__name__": "__doc_example__"})
