"""Tiny random checkpoints of the three families, built once per session with transformers."""

import pytest
import torch

import tiny_hf

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(family, dtype="float32", sharded=False, **config) -> (folder, transformers model).
    Sharded checkpoints are cut into ~3 kB files, so one layer's tensors span several files."""
    cache: dict = {}

    def make(family: str, dtype: str = "float32", sharded: bool = False, **config):
        key = (family, dtype, sharded, repr(sorted(config.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{dtype}-{'sharded' if sharded else 'single'}")
            model = tiny_hf.build(family, folder, dtype=DTYPES[dtype], shard_size="3KB" if sharded else None,
                                  **config)
            cache[key] = (folder, model)
        return cache[key]

    return make
