"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter (the variable is
set by the root conftest, before any test module imports a kernel)."""

from __future__ import annotations

import os

import torch


def _interpreter_breakage() -> str | None:
    """One line naming the versions and the fix when the Triton interpreter cannot run a
    1-element kernel with range() over a runtime scalar (triton 3.6 with numpy >= 2.4 fails
    here), else None. Kernel modules would otherwise fail one by one, ~30 times."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out, n):
        acc = tl.zeros([1], dtype=tl.float32)
        for _ in range(n):
            acc += 1.0
        tl.store(out + tl.arange(0, 1), acc)

    out = torch.zeros(1)
    try:
        _probe[(1,)](out, 3)
    except Exception as exc:  # any failure: the interpreter itself is unusable
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return (f"Triton interpreter broken (triton {triton.__version__}, numpy {numpy.__version__}): "
                f"{first[:120]}; fix: pip install 'numpy<2.4' (triton < 3.7)")
    if out.item() != 3.0:
        return f"Triton interpreter wrong (triton {triton.__version__}, numpy {numpy.__version__})"
    return None


def pytest_collection_modifyitems(config, items):
    """Skip the kernel tests with one shared reason when the interpreter is broken."""
    import pytest

    mine = [i for i in items if "tests/kernels" in str(i.fspath).replace(os.sep, "/")]
    reason = _interpreter_breakage() if mine else None
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))
