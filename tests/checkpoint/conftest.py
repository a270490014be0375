"""Tiny random checkpoints of the three families, built once per session with transformers."""

import json

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


@pytest.fixture
def layout_config(tmp_path):
    """layout_config(stages, m, boundary="all_reduce", kind="gpipe", model=None) -> the path of a
    deployment config around a checkpoint: 3 GPUs of 32 GB, the given stages and schedule, and no
    model sizes but the batch shape in `model` (the sizes are the checkpoint's)."""
    def write(stages, m: int, boundary: str = "all_reduce", kind: str = "gpipe", model: dict | None = None) -> str:
        cfg = {"hardware": {"num_gpus": 3, "gpu_memory_gb": 32}, "parallel": {"stages": stages},
               "schedule": {"kind": kind, "micro_batches": m}, "comm": {"boundary": boundary, "timeout_s": 30}}
        if model:
            cfg["model"] = model
        path = tmp_path / f"layout-{len(list(tmp_path.glob('layout-*.json')))}.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    return write
