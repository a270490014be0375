"""The conftest's interpreter probe: silent on a working interpreter, one line on a broken one."""

import importlib.util
import os
from pathlib import Path

import pytest


def _conftest():
    spec = importlib.util.spec_from_file_location("kernels_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="probe runs only under the interpreter")
def test_probe_names_versions_and_fix_when_the_interpreter_fails(monkeypatch):
    import triton

    mod = _conftest()
    assert mod._interpreter_breakage() is None  # this venv's interpreter works
    real_jit = triton.jit

    def broken_jit(fn):
        kernel = real_jit(fn)

        class Broken:
            def __getitem__(self, grid):
                def launch(*args):
                    raise TypeError("only integer scalar arrays can be converted\nmore detail")
                return launch
        return Broken() if fn.__name__ == "_probe" else kernel

    monkeypatch.setattr(triton, "jit", broken_jit)
    line = mod._interpreter_breakage()
    assert "\n" not in line and f"triton {triton.__version__}" in line and "numpy<2.4" in line
