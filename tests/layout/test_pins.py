"""Declared pins cannot combine into a broken Triton interpreter: triton 3.6 (the GPU machines)
is allowed, so the test extra must keep numpy below 2.4."""

import re
import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_triton_36_allowed_implies_numpy_below_24_in_the_test_extra():
    triton = next(d for d in _project()["dependencies"] if d.startswith("triton"))
    assert re.fullmatch(r"triton>=3\.[0-6](\.\d+)?", triton.split("#")[0].strip()), triton
    numpy_pins = [d for d in _project()["optional-dependencies"]["test"] if d.startswith("numpy")]
    assert numpy_pins == ["numpy<2.4"], numpy_pins
