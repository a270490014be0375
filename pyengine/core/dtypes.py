"""One dtype table for the whole engine: names, byte sizes, short names, and torch dtypes.

Canonical names are torch's (`bfloat16`, `float16`, `float32`, ...). nccl-tests' aliases
(`float`, `half`, `int`, `double`) are accepted where a user types a dtype. Torch is imported
only when a torch dtype is asked for, so the planner stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MODEL_DTYPES = ("bfloat16", "float16", "float32")
"""Dtypes a model's weights and activations may use."""

BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8, "int32": 4, "int64": 8,
         "uint8": 1}
"""Every dtype the engine moves or computes in, by canonical name."""

SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
"""Short names used in file names and tables (tuned kernel configs, CLI flags)."""

ALIASES = {"float": "float32", "half": "float16", "int": "int32", "double": "float64"}
"""nccl-tests' dtype names for the same types (accepted on input)."""

NCCL_TESTS_NAMES = {"float32": "float", "float16": "half", "float64": "double"}
"""How nccl-tests prints these types in its `type` column."""


def canonical(name: str) -> str:
    """The canonical name of `name` (an alias, a short name or a canonical name)."""
    name = ALIASES.get(name, name)
    name = {v: k for k, v in SHORT.items()}.get(name, name)
    if name not in BYTES:
        raise ValueError(f"dtype = {name!r}: must be one of {sorted(BYTES)} "
                         f"(or {sorted(ALIASES)}, {sorted(SHORT.values())})")
    return name


def nbytes(name: str) -> int:
    return BYTES[canonical(name)]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, canonical(name))


def name_of(dtype: torch.dtype) -> str:
    """Canonical name of a torch dtype ('torch.bfloat16' -> 'bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name not in BYTES:
        raise ValueError(f"dtype = {dtype}: not one the engine handles ({sorted(BYTES)})")
    return name
