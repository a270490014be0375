"""The model families the engine reads, one module each (its config keys, tensor names and
layouts, dense layers, routing and attention variants): adding a family is a module here, its
entry in FAMILIES, its tiny transformers checkpoint in the tests, and its row in
docs/checkpoints.md (docs/architecture.md, "Adding a family").
"""

from __future__ import annotations

from pyengine.model.families import deepseek_v3, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from pyengine.model.families.base import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    mixtral.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, deepseek_v3.FAMILY, qwen2_moe.FAMILY, gpt_oss.FAMILY)}
"""model_type -> its family."""

REFUSED = {
    "deepseek_v2": "has softmax group-limited routing (topk_method) and shared experts; not supported "
                   "(deepseek_v3 is)",
}
"""model_types refused by name, with the reason (every other unknown one: "not a supported family")."""

__all__ = ["FAMILIES", "REFUSED", "Family"]
