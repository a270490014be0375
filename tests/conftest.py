import os

import pytest
import torch

# Without CUDA, Triton kernels run under the interpreter: triton.jit picks interpreter vs compiler
# when a kernel module is imported, so it is set here, before any test module imports one (the
# Triton path of the engine, PYENGINE_KERNELS=triton, runs in tests outside tests/kernels too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# NCCL checks its buffers' pointers only when asked (read once per process, at its first call): the
# native tests make it refuse a null buffer to drive the abort path.
os.environ.setdefault("NCCL_CHECK_POINTERS", "1")

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run with `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_spec():
    return load_spec(TINY_CONFIG)


@pytest.fixture(scope="session")
def seed_spec():
    return load_spec(None)
