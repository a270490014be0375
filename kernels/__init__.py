"""Triton kernels (shipped as pyengine.kernels).

Importing needs no GPU (triton imports on CPU). CPU tensors run only under the Triton
interpreter: set TRITON_INTERPRET=1 before this package is first imported.
Direct imports, not lazy ones: `moe_expert_shard` names both a submodule and a function,
and a lazy lookup would hand back the module once the submodule was imported elsewhere.
"""

from pyengine.kernels.moe_align import moe_align_block_size
from pyengine.kernels.moe_expert_shard import moe_expert_shard
from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm

__all__ = ["moe_align_block_size", "moe_expert_shard", "fused_residual_rmsnorm"]
