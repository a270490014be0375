import pytest
import torch

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
